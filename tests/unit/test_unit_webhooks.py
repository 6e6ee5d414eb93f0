"""Webhook signing and bodies without a gateway: fal's message and headers, the JWKS, the key made
in the data dir, and the body bytes for a result and for each kind of failure."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import nacl.exceptions
import nacl.signing
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.errors import InvalidArgument
from gateway.queue_options import validate_webhook_url
from gateway.store import RequestRecord, State
from gateway.webhook_signing import KEY_FILE, WebhookSigner
from gateway.webhooks import webhook_body
from core.config import Settings
from loraserve.v1 import flux_pb2, types_pb2, worker_pb2
from storage.object_store import LocalObjectStore


def test_headers_sign_fals_message_and_the_jwks_key_verifies_them_as_the_docs_decode_it() -> None:
    signer = WebhookSigner(Ed25519PrivateKey.generate())
    body = b'{"error": null, "request_id": "r1"}'
    headers = signer.headers("r1", "team-a", body, now=1_700_000_000.7)
    assert headers["X-Fal-Webhook-Request-Id"] == "r1"
    assert headers["X-Fal-Webhook-User-Id"] == "team-a"
    assert headers["X-Fal-Webhook-Timestamp"] == "1700000000"
    (key,) = signer.jwks()["keys"]
    # The docs' snippet: urlsafe_b64decode(x) with no re-padding.
    verify_key = nacl.signing.VerifyKey(base64.urlsafe_b64decode(key["x"]))
    message = f"r1\nteam-a\n1700000000\n{hashlib.sha256(body).hexdigest()}".encode()
    verify_key.verify(message, bytes.fromhex(headers["X-Fal-Webhook-Signature"]))
    with pytest.raises(nacl.exceptions.BadSignatureError):
        verify_key.verify(message.replace(b"team-a", b"team-b"), bytes.fromhex(headers["X-Fal-Webhook-Signature"]))
    assert signer.headers("r1", "team-a", body, now=1_700_000_001)["X-Fal-Webhook-Signature"] != (
        headers["X-Fal-Webhook-Signature"]
    ), "a new timestamp, a new signature"
    assert key["x"].endswith("=") and len(key["x"]) == 44
    expected = {"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig"}
    assert {k: key[k] for k in expected} == expected


def test_the_embedded_default_makes_a_private_key_once_in_the_data_dir(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    first = WebhookSigner.from_settings(settings)
    path = settings.data_dir / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = WebhookSigner.from_settings(settings)
    assert again.jwks() == first.jwks() and again.kid == first.kid


def test_a_key_file_from_the_operator_is_used_and_must_be_ed25519(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    pem = tmp_path / "signing.pem"
    pem.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    signer = WebhookSigner.from_settings(Settings(data_dir=tmp_path / "data", webhook_signing_key_file=str(pem)))
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert base64.urlsafe_b64decode(signer.jwks()["keys"][0]["x"]) == raw
    assert not (tmp_path / "data" / KEY_FILE).exists()
    # The same key as PEM text (the chart's Secret, as LORASERVE_WEBHOOK_SIGNING_KEY) takes precedence.
    from_text = WebhookSigner.from_settings(
        Settings(data_dir=tmp_path / "data", webhook_signing_key=pem.read_text(), webhook_signing_key_file="/nowhere")
    )
    assert from_text.jwks() == signer.jwks()

    other = tmp_path / "ec.pem"
    other.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(ValueError, match="not an Ed25519 private key"):
        WebhookSigner.from_settings(Settings(data_dir=tmp_path / "data", webhook_signing_key_file=str(other)))


def record(**fields: object) -> RequestRecord:
    base: dict[str, object] = dict(
        seq=1,
        id="req-1",
        state=State.COMPLETED,
        raw_input=b"",
        seed=7,
        model_key="k",
        created_at=1.0,
        started_at=2.0,
        finished_at=3.0,
        attempts=1,
        step=0,
        total_steps=0,
        raw_output=None,
        error=None,
        inference_seconds=0.5,
        tenant="team-a",
        webhook_url="https://h/hook",
    )
    base.update(fields)
    return RequestRecord(**base)  # type: ignore[arg-type]


@pytest.fixture
def files(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "files", "http://127.0.0.1:1", signing_key=b"k" * 32)


def test_the_payloads_file_urls_outlast_the_retries(files: LocalObjectStore) -> None:
    """Every attempt sends the first attempt's bytes: its URLs are signed for the whole retry window, not
    the store's hour."""
    stored = files.put("tenants/t/outputs/req-1/a.png", b"png", "image/png")
    output = types_pb2.GenerateOutput(images=[types_pb2.Image(url=stored.url, width=64, height=64)], seed=1)
    three_days = 3 * 24 * 3600.0
    body = json.loads(webhook_body(record(raw_output=output.SerializeToString()), files, three_days))
    url = body["payload"]["images"][0]["url"]
    expires = int(parse_qs(urlsplit(url).query)["expires"][0])
    assert expires >= files.clock() + three_days - 5
    assert files.key_for_url(url) == stored.key


def test_a_result_is_fals_ok_body_keys_sorted_with_default_separators(files: LocalObjectStore) -> None:
    output = types_pb2.GenerateOutput(
        images=[types_pb2.Image(url="https://cdn.example/a.png", width=64, height=64, content_type="image/png")],
        seed=2**40,
        has_nsfw_concepts=[False],
    )
    body = webhook_body(record(raw_output=output.SerializeToString()), files)
    parsed = json.loads(body)
    assert body == json.dumps(parsed, sort_keys=True).encode()
    assert body.startswith(b'{"error": null, "gateway_request_id": "req-1", "payload": {')
    assert body.endswith(b', "request_id": "req-1", "status": "OK"}')
    assert parsed["payload"]["seed"] == 2**40 and parsed["payload"]["has_nsfw_concepts"] == [False]
    assert parsed["payload"]["images"][0]["url"] == "https://cdn.example/a.png"


def test_a_flux_results_payload_is_fal_flux_loras_output(files: LocalObjectStore) -> None:
    queued = worker_pb2.QueuedFluxInput(input=flux_pb2.FluxInput(prompt="a cat"))
    output = types_pb2.GenerateOutput(
        images=[types_pb2.Image(url="https://cdn.example/a.jpg", width=64, height=48, content_type="image/jpeg")],
        seed=5,
        has_nsfw_concepts=[False],
    )
    done = record(raw_input=queued.SerializeToString(), raw_output=output.SerializeToString())
    assert json.loads(webhook_body(done, files))["payload"] == {
        "images": [{"url": "https://cdn.example/a.jpg", "width": 64, "height": 48, "content_type": "image/jpeg"}],
        "timings": {"inference": 0.5},
        "seed": 5,
        "has_nsfw_concepts": [False],
        "prompt": "a cat",
    }


@pytest.mark.parametrize(
    ("error_type", "status"),
    [
        ("INVALID_INPUT", 422),
        ("ADAPTER_LOAD_FAILED", 422),
        ("CANCELLED", 499),
        ("START_TIMEOUT", 504),
        ("WORKER_FAILED", 500),
    ],
)
def test_a_failure_is_fals_error_body_with_the_result_routes_status(
    files: LocalObjectStore, error_type: str, status: int
) -> None:
    failed = record(error=types_pb2.RequestError(type=error_type, message="what went wrong"))
    parsed = json.loads(webhook_body(failed, files))
    assert parsed["status"] == "ERROR" and parsed["error"] == f"Invalid status code: {status}"
    assert set(parsed) == {"error", "gateway_request_id", "payload", "request_id", "status"}
    if status == 422:
        assert parsed["payload"] == {"detail": [{"loc": ["body"], "msg": "what went wrong", "type": "value_error"}]}
    else:
        assert parsed["payload"]["detail"] == "what went wrong" and parsed["payload"]["error_type"]


def test_submit_refuses_webhook_urls_that_can_never_be_used() -> None:
    strict = Settings()
    validate_webhook_url("", strict)
    validate_webhook_url("https://hooks.example.com/a?b=c&d=e", strict)
    # A name is not resolved at submit: it is checked when the webhook is sent.
    validate_webhook_url("http://localhost:8080/hook", strict)
    for url, why in (
        ("http://127.0.0.1:8080/hook", "loopback"),
        ("http://[::1]/hook", "refused"),
        ("http://192.168.1.2/hook", "private"),
        ("gopher://example.com/", "http and https"),
        ("https://" + "a" * 3000 + ".example.com/", "longer than"),
    ):
        with pytest.raises(InvalidArgument) as refused:
            validate_webhook_url(url, strict)
        (violation,) = refused.value.violations
        assert violation.field == "webhook_url" and why in violation.description, (url, violation)
    validate_webhook_url("http://127.0.0.1:8080/hook", Settings(fetch_allowed_hosts="127.0.0.1"))
    validate_webhook_url("http://192.168.1.2/hook", Settings(allow_private_networks=True))


def test_a_webhook_url_is_kept_in_its_ascii_form_or_refused() -> None:
    settings = Settings()
    assert validate_webhook_url("https://hooks.example/a?x=é", settings) == "https://hooks.example/a?x=%C3%A9"
    assert validate_webhook_url("https://bücher.example/h", settings) == "https://xn--bcher-kva.example/h"
    with pytest.raises(InvalidArgument) as refused:
        validate_webhook_url("https://é..x/h", settings)
    (violation,) = refused.value.violations
    assert violation.field == "webhook_url" and "internationalised" in violation.description


def test_an_output_that_cannot_become_json_is_delivered_with_fals_payload_error(
    files: LocalObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.webhooks

    def unserialisable(_: types_pb2.GenerateOutput) -> dict[str, object]:
        return {"images": [object()]}

    monkeypatch.setattr(gateway.webhooks, "output_json", unserialisable)
    done = record(raw_output=types_pb2.GenerateOutput(seed=1).SerializeToString())
    parsed = json.loads(webhook_body(done, files))
    assert parsed == {
        "error": None,
        "gateway_request_id": "req-1",
        "payload": None,
        "payload_error": gateway.webhooks.PAYLOAD_ERROR,
        "request_id": "req-1",
        "status": "OK",
    }
