"""Whole processes SIGKILLed: the embedded service with jobs queued and running, and the Ray cluster under a
gateway. Each runs `loraserve serve` as a subprocess with a Ray node of its own, so killing it leaves the
test session's service alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.server import Gateway
from loraserve.client import AsyncClient
from core.config import Settings
from loraserve.v1 import generation_pb2 as gen
from serving.tiny import TinyModel
from storage.object_store import output_prefix
from tests.conftest import WORKER_SECRET
from tests.faults.faultkit import (
    COMPLETED,
    all_finished,
    body,
    eventually,
    output_files,
    running,
    sigkill,
    statuses,
    wait_serving,
)
from tests.integration.test_signals import Server, loopback_port, start_server

pytestmark = pytest.mark.integration

JOBS = 30


def assert_all_completed(finals: dict[str, gen.RequestStatus]) -> None:
    failed = {rid: (s.state, s.error.message) for rid, s in finals.items() if s.state != COMPLETED or s.HasField("error")}
    assert not failed, failed


@pytest.mark.timeout(900)
async def test_service_sigkilled_with_jobs_queued_and_running_loses_none_and_runs_none_twice(
    services: list[Server], tiny_sdxl: TinyModel, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    files_dir = data_dir / "files"
    keys = [f"crash-{i}" for i in range(JOBS)]
    first = start_server("serve", data_dir, "--shutdown-grace-seconds", "5")
    services.append(first)
    await wait_serving(first)
    async with AsyncClient(first.target) as client:
        ids = [await client.submit(body(tiny_sdxl, seed=4000 + i), client_request_id=key) for i, key in enumerate(keys)]

        async def some_done_one_running() -> bool | None:
            done = sum(s.state == COMPLETED for s in (await statuses(client, ids)).values())
            return True if done >= 1 and await running(client, ids) else None

        await eventually(some_done_one_running, "a request completed and another one in progress")
        before = await statuses(client, ids)
        done_before = {
            rid: [image.file_name for image in (await client.result(rid)).data.images]
            for rid, status in before.items()
            if status.state == COMPLETED
        }
    await sigkill(first)
    assert len(done_before) < JOBS, "everything had finished before the kill: nothing was in flight"

    second = start_server("serve", data_dir, "--shutdown-grace-seconds", "5")
    services.append(second)
    await wait_serving(second)
    async with AsyncClient(second.target) as client:
        again = [await client.submit(body(tiny_sdxl, seed=4000 + i), client_request_id=key) for i, key in enumerate(keys)]
        assert again == ids
        assert_all_completed(await all_finished(client, ids))
        results = {rid: [image.file_name for image in (await client.result(rid)).data.images] for rid in ids}
        # Resubmitted once finished: the same requests, already completed, so nothing is queued to run.
        third = [await client.submit(body(tiny_sdxl, seed=4000 + i), client_request_id=key) for i, key in enumerate(keys)]
        assert third == ids
        assert all(s.state == COMPLETED for s in (await statuses(client, ids)).values())

    for rid in ids:
        assert len(results[rid]) == 1 and set(results[rid]) <= set(output_files(files_dir, rid)), rid
    assert {rid: results[rid] for rid in done_before} == done_before
    # One run per request, except that the one replica's call in flight at the kill may have stored its
    # image before its result reached the store: that request ran again after the restart.
    extra = {rid: files for rid in ids if len(files := output_files(files_dir, rid)) != 1}
    assert len(extra) <= 1 and all(len(files) == 2 for files in extra.values()), extra
    assert extra.keys().isdisjoint(done_before)


@pytest.mark.timeout(900)
async def test_ray_cluster_killed_and_started_again_under_a_gateway(
    services: list[Server], tiny_sdxl: TinyModel, tmp_path: Path
) -> None:
    first = start_server("serve", tmp_path / "cluster-1", "--shutdown-grace-seconds", "5")
    services.append(first)
    await wait_serving(first)
    settings = Settings(
        data_dir=tmp_path / "gateway",
        grpc_port=loopback_port(),
        http_port=loopback_port(),
        serve_grpc_port=first.serve_grpc_port,
        # Probes of the unreachable workers back off to at most this: the test waits for the second cluster.
        retry_backoff_seconds=0.5,
        retry_backoff_max_seconds=5.0,
        shutdown_grace_seconds=5,
        worker_shared_secret=WORKER_SECRET,  # what start_server gives the clusters' workers
    )
    gateway = Gateway(settings)
    await gateway.start()
    try:
        async with AsyncClient(f"127.0.0.1:{gateway.grpc_port}") as client:
            ids = [await client.submit(body(tiny_sdxl, seed=5000 + i)) for i in range(12)]
            await eventually(lambda: running(client, ids), "a request handed to the workers")
            await sigkill(first)  # GCS, raylet, Serve's controller, proxy and replica: the whole cluster
            second = start_server(
                "serve", tmp_path / "cluster-2", "--shutdown-grace-seconds", "5", serve_grpc_port=first.serve_grpc_port
            )
            services.append(second)
            await wait_serving(second)
            assert_all_completed(await all_finished(client, ids))
            for rid in ids:
                image = (await client.result(rid)).data.images[0]
                folder = output_prefix("", rid)
                stored = [d / "files" / folder / image.file_name for d in (first.data_dir, second.data_dir)]
                assert any(path.is_file() for path in stored), rid
    finally:
        await gateway.stop(grace_seconds=5)
