"""API keys, tenants and TLS through a real gateway in front of the session's Serve workers."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from gateway.auth import auth_required, new_key
from gateway.server import Gateway
from loraserve.client import AsyncClient, LoraServeError
from core.config import Settings
from loraserve.v1 import generation_pb2 as gen
from serving.tiny import TinyModel
from tests.conftest import gateway_for, own_gateway_settings, self_signed_cert
from tests.integration.test_generation_api import request

pytestmark = pytest.mark.integration


async def make_key(gateway: Gateway, tenant: str) -> str:
    key, secret = new_key(tenant)
    await gateway.store.add_key(key)
    return f"{key.id}:{secret}"


@pytest_asyncio.fixture
async def guarded(stack: object, stack_settings: Settings, tmp_path: Path) -> AsyncIterator[Gateway]:
    """A gateway bound to every interface: keys required."""
    async with gateway_for(own_gateway_settings(stack_settings, tmp_path, grpc_host="0.0.0.0")) as gateway:
        yield gateway


def target(gateway: Gateway) -> str:
    return f"127.0.0.1:{gateway.grpc_port}"


def test_keys_are_required_off_loopback_unless_turned_off_out_loud() -> None:
    assert not auth_required("127.0.0.1", insecure_no_auth=False)
    assert not auth_required("::1", insecure_no_auth=False)
    assert not auth_required("localhost", insecure_no_auth=False)
    assert auth_required("0.0.0.0", insecure_no_auth=False)
    assert auth_required("10.1.2.3", insecure_no_auth=False)
    assert auth_required("gateway.internal", insecure_no_auth=False)
    assert not auth_required("0.0.0.0", insecure_no_auth=True)


Call = Callable[[AsyncClient], Awaitable[Any]]


def every_rpc(request_id: str, body: dict[str, Any]) -> dict[str, Call]:
    async def stream(client: AsyncClient) -> None:
        async for _ in client.stream_status(request_id):
            pass

    return {
        "Submit": lambda c: c.submit(body),
        "Subscribe": lambda c: c.subscribe(body),
        "GetStatus": lambda c: c.status(request_id),
        "StreamStatus": stream,
        "GetResult": lambda c: c.result(request_id),
        "Cancel": lambda c: c.cancel(request_id),
        "Upload": lambda c: c.upload(b"\x89PNG\r\n\x1a\n" + b"0" * 64, file_name="x.png"),
    }


async def refused(call: Call, client: AsyncClient) -> LoraServeError:
    with pytest.raises(LoraServeError) as caught:
        await call(client)
    return caught.value


async def test_every_rpc_refuses_a_missing_wrong_or_revoked_key(guarded: Gateway, tiny_sdxl: TinyModel) -> None:
    good = await make_key(guarded, "team-a")
    revoked_key, revoked_secret = new_key("team-a")
    await guarded.store.add_key(revoked_key)
    await guarded.store.revoke_key(revoked_key.id)
    async with AsyncClient(target(guarded), key=good) as owner:
        request_id = await owner.submit(request(tiny_sdxl))
    cases = {
        "missing": ("", "API_KEY_MISSING"),
        "wrong secret": (good.split(":")[0] + ":not-the-secret", "API_KEY_INVALID"),
        "unknown id": ("lsk_0000000000000000:whatever", "API_KEY_INVALID"),
        "malformed": ("no-colon-here", "API_KEY_INVALID"),
        "revoked": (f"{revoked_key.id}:{revoked_secret}", "API_KEY_REVOKED"),
    }
    for case, (key, reason) in cases.items():
        async with AsyncClient(target(guarded), key=key) as client:
            for name, call in every_rpc(request_id, request(tiny_sdxl)).items():
                error = await refused(call, client)
                assert error.code == grpc.StatusCode.UNAUTHENTICATED, (case, name, error)
                assert error.reason == reason, (case, name, error)


async def test_a_tenant_sees_only_its_own_requests(guarded: Gateway, tiny_sdxl: TinyModel) -> None:
    key_a, key_b = await make_key(guarded, "team-a"), await make_key(guarded, "team-b")
    async with AsyncClient(target(guarded), key=key_a) as a, AsyncClient(target(guarded), key=key_b) as b:
        mine = await a.submit(request(tiny_sdxl), client_request_id="job-1")
        # Another tenant: NOT_FOUND on every RPC that names the id, worded as for an id that never existed.
        for name, call in every_rpc(mine, request(tiny_sdxl)).items():
            if name in ("Submit", "Subscribe", "Upload"):
                continue
            error = await refused(call, b)
            assert error.code == grpc.StatusCode.NOT_FOUND, (name, error)
            assert mine in error.message and error.reason == "REQUEST_NOT_FOUND"
        # client_request_id is per tenant: B's "job-1" is a request of its own.
        theirs = await b.submit(request(tiny_sdxl), client_request_id="job-1")
        assert theirs != mine
        # The same tenant retrying gets the same request; reusing the id for another input is refused.
        assert await a.submit(request(tiny_sdxl), client_request_id="job-1") == mine
        reused = await refused(lambda c: c.submit(request(tiny_sdxl, seed=99), client_request_id="job-1"), a)
        assert reused.code == grpc.StatusCode.ALREADY_EXISTS and mine in reused.message
        for client, request_id in ((a, mine), (b, theirs)):
            async for status in client.stream_status(request_id):
                final = status
            assert final.state == gen.REQUEST_STATE_COMPLETED and not final.HasField("error")
            assert (await client.result(request_id)).data.images


async def test_the_keys_command_makes_a_key_a_running_gateway_accepts(
    guarded: Gateway, tiny_sdxl: TinyModel
) -> None:
    """`loraserve keys` opens the store beside the gateway that holds the data dir."""
    command = [sys.executable, "-m", "loraserve.cli", "keys"]
    where = ["--data-dir", str(guarded.settings.data_dir)]
    created = subprocess.run(
        [*command, "create", "--tenant", "team-c", "--name", "ci", *where], capture_output=True, text=True, check=True
    )
    key = created.stdout.splitlines()[0]
    key_id = key.split(":")[0]
    async with AsyncClient(target(guarded), key=key) as client:
        request_id = await client.submit(request(tiny_sdxl))
        assert (await client.status(request_id)).request_id == request_id
    listed = subprocess.run([*command, "list", *where], capture_output=True, text=True, check=True).stdout
    assert key_id in listed and "team-c" in listed and "active" in listed
    assert key.split(":")[1] not in listed, "the secret is shown once, at creation"
    subprocess.run([*command, "revoke", key_id, *where], capture_output=True, text=True, check=True)
    assert "revoked" in subprocess.run([*command, "list", *where], capture_output=True, text=True).stdout


async def test_tls_with_client_certificates(stack: object, stack_settings: Settings, tmp_path: Path) -> None:
    server_cert, server_key = self_signed_cert("gateway.test", tmp_path / "server", ip="127.0.0.1")
    client_cert, client_key = self_signed_cert("caller.test", tmp_path / "client")
    settings = own_gateway_settings(
        stack_settings,
        tmp_path,
        tls_cert_file=str(server_cert),
        tls_key_file=str(server_key),
        tls_client_ca_file=str(client_cert),
    )
    async with gateway_for(settings) as gateway:
        tls = {"root_certificates": server_cert.read_bytes()}
        async with AsyncClient(target(gateway), **tls) as without_cert:
            assert (await refused(lambda c: c.status("x"), without_cert)).code == grpc.StatusCode.UNAVAILABLE
        async with AsyncClient(target(gateway)) as plaintext:
            assert (await refused(lambda c: c.status("x"), plaintext)).code == grpc.StatusCode.UNAVAILABLE
        mine = {**tls, "client_cert_chain": client_cert.read_bytes(), "client_private_key": client_key.read_bytes()}
        async with AsyncClient(target(gateway), **mine) as client:
            assert (await refused(lambda c: c.status("no-such-id"), client)).code == grpc.StatusCode.NOT_FOUND
