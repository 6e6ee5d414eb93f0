"""Builds the storage pieces from the process's Settings, the same way in gateway and workers."""

from __future__ import annotations

import dataclasses

from core.config import Settings
from storage.factory import make_object_store
from storage.fetch import FetchPolicy
from storage.object_store import ObjectStore, load_or_create_secret
from storage.retry import RetryPolicy
from storage.s3 import S3Settings
from storage.weights import CacheObserver, WeightsCache


# Where the local store's URL-signing secret is generated when the operator sets none.
FILES_URL_KEY = "files-url.key"


def _csv(value: str) -> frozenset[str]:
    return frozenset(part.strip() for part in value.split(",") if part.strip())


def object_store(settings: Settings) -> ObjectStore:
    s3 = None
    if settings.object_store == "s3":
        s3 = S3Settings(
            endpoint=settings.s3_endpoint,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            bucket=settings.s3_bucket,
            region=settings.s3_region,
            secure=settings.s3_secure,
            key_prefix=settings.s3_key_prefix,
            presign_expiry_seconds=settings.s3_presign_expiry_seconds,
            public_base_url=settings.s3_public_base_url,
            presign_endpoint=settings.s3_presign_endpoint,
            presign_access_key=settings.s3_presign_access_key,
            presign_secret_key=settings.s3_presign_secret_key,
            timeout_seconds=settings.s3_timeout_seconds,
        )
    signing_key = None
    if settings.object_store == "local":
        signing_key = settings.files_url_secret.encode() or load_or_create_secret(settings.data_dir / FILES_URL_KEY)
    return make_object_store(
        settings.object_store,
        local_root=settings.files_dir,
        local_base_url=settings.files_base_url,
        s3=s3,
        local_signing_key=signing_key,
        local_url_expiry_seconds=settings.files_url_expiry_seconds,
    )


def output_write_policy(settings: Settings) -> RetryPolicy:
    return RetryPolicy(
        attempts=settings.output_write_attempts,
        base_delay_seconds=settings.output_write_backoff_seconds,
        max_delay_seconds=settings.output_write_max_backoff_seconds,
    )


def image_fetch_policy(settings: Settings) -> FetchPolicy:
    return FetchPolicy(
        max_bytes=settings.max_input_bytes,
        max_data_uri_bytes=settings.max_data_uri_bytes,
        timeout_seconds=settings.fetch_timeout_seconds,
        total_timeout_seconds=settings.fetch_total_timeout_seconds,
        allow_private_networks=settings.allow_private_networks,
        allowed_hosts=_csv(settings.fetch_allowed_hosts),
        max_redirects=settings.max_redirects,
        max_image_pixels=settings.max_image_pixels,
    )


def weights_cache(settings: Settings, store: ObjectStore, observer: CacheObserver | None = None) -> WeightsCache:
    policy = dataclasses.replace(
        image_fetch_policy(settings),
        max_bytes=settings.max_weights_bytes,
        total_timeout_seconds=settings.weights_total_timeout_seconds,
    )
    return WeightsCache(
        settings.weights_dir,
        policy,
        allow_pickle=settings.allow_pickle_weights,
        store=store,
        max_blob_bytes=settings.max_weights_cache_bytes,
        observer=observer,
        local_roots=settings.local_roots,
    )


def upload_content_types(settings: Settings) -> frozenset[str]:
    return _csv(settings.upload_allowed_content_types)
