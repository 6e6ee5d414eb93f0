"""Two gateways on one PostgreSQL queue in front of the session's Serve workers: the one running a request
is SIGKILLed (`loraserve gateway` as a process of its own) and the other takes the request back once its
lease has run out and finishes it, each request producing exactly one set of outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.server import Gateway
from gateway.store import State
from loraserve.client import AsyncClient
from core.config import Settings
from serving.tiny import TinyModel
from tests.faults.faultkit import COMPLETED, all_finished, body, eventually, output_files, sigkill, wait_serving
from tests.integration.test_signals import Server, loopback_port, start_server

pytestmark = pytest.mark.integration

LEASE_SECONDS = 3.0


@pytest.mark.timeout(600)
async def test_gateway_sigkilled_mid_request_the_other_finishes_it_once(
    services: list[Server],
    stack: object,
    stack_settings: Settings,
    postgres_dsn: str,
    tiny_sdxl: TinyModel,
    tmp_path: Path,
) -> None:
    doomed = start_server(
        "gateway",
        tmp_path / "doomed",
        "--lease-seconds",
        str(LEASE_SECONDS),
        serve_grpc_port=stack_settings.serve_grpc_port,
        env={"LORASERVE_STORE_URL": postgres_dsn},
    )
    services.append(doomed)
    survivor = Gateway(
        stack_settings.replace(
            data_dir=tmp_path / "survivor",
            grpc_port=loopback_port(),
            http_port=loopback_port(),
            store_url=postgres_dsn,
            lease_seconds=LEASE_SECONDS,
        )
    )
    await survivor.start()
    try:
        await wait_serving(doomed)
        async with AsyncClient(f"127.0.0.1:{survivor.grpc_port}") as client:
            # ~3 s each here: long enough to be caught mid-run; both gateways take requests from the queue.
            ids = [await client.submit(body(tiny_sdxl, seed=6000 + i, steps=30)) for i in range(8)]

            async def run_by_doomed() -> str | None:
                """A request the doomed gateway is running, with a step reported (the worker is on it)."""
                for rid in ids:
                    record = await survivor.store.get(rid)
                    if (
                        record is not None
                        and record.state == State.IN_PROGRESS
                        and record.owner not in ("", survivor.store.owner)
                        and record.step >= 1
                    ):
                        return rid
                return None

            victim = await eventually(run_by_doomed, "the doomed gateway running a request")
            await sigkill(doomed)
            finals = await all_finished(client, ids)
        failed = {rid: (s.state, s.error.message) for rid, s in finals.items() if s.state != COMPLETED or s.HasField("error")}
        assert not failed, failed
        record = await survivor.store.get(victim)
        assert record is not None and record.attempts == 2, record
    finally:
        await survivor.stop(grace_seconds=5)
    # The victim's first run was cut off with its gateway (Serve cancels a call whose caller is gone)
    # and wrote nothing; every request's one run wrote one image.
    counts = {rid: len(output_files(stack_settings.files_dir, rid)) for rid in ids}
    assert all(n == 1 for n in counts.values()), counts
