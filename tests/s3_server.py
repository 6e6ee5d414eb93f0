"""moto's S3 server with its signatures checked, and a SigV4 verifier for the presigned URLs the service hands out.

moto verifies header-signed calls once authentication is on (IAM users, access keys and policies
made here), but it cannot check a query-signed GET: it answers 500. So a presigned URL is checked
here, by recomputing its signature with botocore's signer from the URL's own date, region and host,
and only a URL that passes is handed on to moto, re-signed in headers with the same key, so the
key's policy still decides. A plain module rather than conftest, so tests can import the verifier.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

AMZ_DATE = "%Y%m%dT%H%M%SZ"
REGION = "us-east-1"

# Access key id -> secret. The writers may do anything in S3; the reader is the read-only
# presign user of the public-host tests, allowed to read objects and nothing else.
WRITERS = {"writer": "writer-secret", "testing": "testing"}
READERS = {"reader": "reader-secret"}
ALL_KEYS = {**WRITERS, **READERS}

_FULL_ACCESS = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
_READ_ONLY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:GetBucketLocation"], "Resource": "*"}],
}


class PresignedUrlRefused(Exception):
    """The URL would not be honoured by S3; the message says why."""


@dataclass(frozen=True)
class PresignedUrl:
    access_key: str
    host: str
    region: str
    signed_at: datetime
    expires_seconds: int

    @property
    def valid_until(self) -> datetime:
        return self.signed_at + timedelta(seconds=self.expires_seconds)


def _signature(url: str, secret_key: str, method: str) -> str:
    """The SigV4 query signature S3 computes for `url` (its own date, scope and host) with `secret_key`."""
    parts = urlsplit(url)
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    access_key, _, region, service, _ = params["X-Amz-Credential"].split("/")
    operation = [(name, value) for name, value in params.items() if not name.startswith("X-Amz-")]
    request = AWSRequest(method=method, url=urlunsplit(parts._replace(query=urlencode(operation, quote_via=quote))))
    request.context["timestamp"] = params["X-Amz-Date"]
    signer = S3SigV4QueryAuth(Credentials(access_key, secret_key), service, region, expires=int(params["X-Amz-Expires"]))
    # add_auth would stamp the current time; these are its steps with the URL's own timestamp.
    signer._modify_request_before_signing(request)
    canonical = signer.canonical_request(request)
    return str(signer.signature(signer.string_to_sign(request, canonical), request))


def verify_presigned_url(
    url: str,
    secrets: Mapping[str, str],
    *,
    host: str | None = None,
    now: datetime | None = None,
    method: str = "GET",
) -> PresignedUrl:
    """What S3 checks before honouring `url`: a known key, the signature of its secret, the date window and the host."""
    parts = urlsplit(url)
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    missing = {"X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires", "X-Amz-Signature"} - set(params)
    if missing:
        raise PresignedUrlRefused(f"not a SigV4 presigned URL: no {', '.join(sorted(missing))}")
    if params["X-Amz-Algorithm"] != "AWS4-HMAC-SHA256":
        raise PresignedUrlRefused(f"algorithm {params['X-Amz-Algorithm']!r}")
    if params.get("X-Amz-SignedHeaders") != "host":
        raise PresignedUrlRefused(f"signed headers {params.get('X-Amz-SignedHeaders')!r}, not 'host'")
    scope = params["X-Amz-Credential"].split("/")
    if len(scope) != 5 or scope[3:] != ["s3", "aws4_request"]:
        raise PresignedUrlRefused(f"credential scope {params['X-Amz-Credential']!r}")
    access_key, scope_date, region = scope[:3]
    if access_key not in secrets:
        raise PresignedUrlRefused(f"unknown access key {access_key!r}")
    signed_at = datetime.strptime(params["X-Amz-Date"], AMZ_DATE).replace(tzinfo=UTC)
    if scope_date != params["X-Amz-Date"][:8]:
        raise PresignedUrlRefused(f"credential date {scope_date} is not the signing date {params['X-Amz-Date']}")
    if host is not None and parts.netloc != host:
        raise PresignedUrlRefused(f"host {parts.netloc!r}, expected {host!r}")
    if not hmac.compare_digest(_signature(url, secrets[access_key], method), params["X-Amz-Signature"]):
        raise PresignedUrlRefused("signature does not match")
    signed = PresignedUrl(access_key, parts.netloc, region, signed_at, int(params["X-Amz-Expires"]))
    now = now or datetime.now(UTC)
    if not signed.signed_at - timedelta(minutes=15) <= now <= signed.valid_until:
        raise PresignedUrlRefused(f"expired: valid from {signed.signed_at} until {signed.valid_until}, now {now}")
    return signed


def _error(start_response: Callable[..., Any], code: str, message: str) -> Iterable[bytes]:
    body = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()
    start_response("403 Forbidden", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
    return [body]


class _PresignedUrlsChecked:
    """WSGI middleware: a query-signed request is verified here, then passed to moto signed in headers."""

    def __init__(self, app: Callable[..., Iterable[bytes]], secrets: Mapping[str, str]) -> None:
        self._app = app
        self._secrets = secrets

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        query = environ.get("QUERY_STRING", "")
        params = parse_qsl(query, keep_blank_values=True)
        if not any(name == "X-Amz-Signature" for name, _ in params):
            return self._app(environ, start_response)
        raw_path = environ.get("RAW_URI") or environ.get("REQUEST_URI") or environ["PATH_INFO"]
        path = raw_path.split("?", 1)[0]
        method = environ["REQUEST_METHOD"]
        url = f"http://{environ['HTTP_HOST']}{path}?{query}"
        try:
            signed = verify_presigned_url(url, self._secrets, method=method)
        except PresignedUrlRefused as refused:
            return _error(start_response, "AccessDenied", str(refused))
        rest = urlencode([(n, v) for n, v in params if not n.startswith("X-Amz-")], quote_via=quote)
        request = AWSRequest(method=method, url=f"http://{environ['HTTP_HOST']}{path}" + (f"?{rest}" if rest else ""))
        S3SigV4Auth(Credentials(signed.access_key, self._secrets[signed.access_key]), "s3", signed.region).add_auth(
            request
        )
        environ = dict(environ, QUERY_STRING=rest)
        environ["RAW_URI"] = environ["REQUEST_URI"] = path + (f"?{rest}" if rest else "")
        for name in ("Authorization", "X-Amz-Date", "X-Amz-Content-SHA256"):
            environ["HTTP_" + name.upper().replace("-", "_")] = request.headers[name]
        return self._app(environ, start_response)


class CheckedS3Server:
    """moto's S3 (and IAM) on loopback with authentication on and the users of `ALL_KEYS` made."""

    def __init__(self) -> None:
        from moto.moto_server.threaded_moto_server import ThreadedMotoServer

        secrets = ALL_KEYS

        class Server(ThreadedMotoServer):
            def _server_entry(self) -> None:
                from moto.moto_server.threaded_moto_server import MotoRequestHandler
                from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
                from werkzeug.serving import make_server

                app = _PresignedUrlsChecked(DomainDispatcherApplication(create_backend_app), secrets)
                self._server = make_server(self._ip_address, self._port, app, True, request_handler=MotoRequestHandler)
                self._server_ready_event.set()
                self._server.serve_forever()

        self._server = Server(ip_address="127.0.0.1", port=0, verbose=False)

    @property
    def endpoint(self) -> str:
        host, port = self._server.get_host_and_port()
        return f"{host}:{port}"

    def start(self) -> None:
        import boto3
        import requests

        self._server.start()
        url = f"http://{self.endpoint}"
        # Users are made with authentication off; then every call, the first included, is checked.
        requests.post(f"{url}/moto-api/reset-auth", data=b"inf", timeout=10).raise_for_status()
        iam = boto3.client(
            "iam", endpoint_url=url, region_name=REGION, aws_access_key_id="setup", aws_secret_access_key="setup"
        )
        for keys, policy in ((WRITERS, _FULL_ACCESS), (READERS, _READ_ONLY)):
            for access_key, secret_key in keys.items():
                self._add_user(iam, access_key, secret_key, policy)
        requests.post(f"{url}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()

    @staticmethod
    def _add_user(iam: Any, access_key: str, secret_key: str, policy: dict[str, object]) -> None:
        """An IAM user with `policy`, whose access key is given the fixed id and secret the tests sign with."""
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.iam.models import iam_backends

        iam.create_user(UserName=f"user-{access_key}")
        iam.put_user_policy(UserName=f"user-{access_key}", PolicyName="s3", PolicyDocument=json.dumps(policy))
        made = iam.create_access_key(UserName=f"user-{access_key}")["AccessKey"]["AccessKeyId"]
        backend = iam_backends[DEFAULT_ACCOUNT_ID]["aws"]
        key = backend.access_keys.pop(made)
        key.access_key_id, key.secret_access_key = access_key, secret_key
        backend.access_keys[access_key] = key

    def stop(self) -> None:
        import requests

        requests.post(f"http://{self.endpoint}/moto-api/reset-auth", data=b"inf", timeout=10)
        self._server.stop()
