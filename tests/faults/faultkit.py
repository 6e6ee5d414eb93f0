"""What the fault tests share: services run as real processes and killed for real, Serve's actors
found and SIGKILLed, and waiting on outcomes with deadlines (never on time passing)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import psutil
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraserve.client import AsyncClient
from loraserve.v1 import generation_pb2 as gen
from serving.tiny import TinyModel
from storage.object_store import output_prefix
from tests.integration.test_signals import Server

T = TypeVar("T")

COMPLETED = gen.REQUEST_STATE_COMPLETED
IN_PROGRESS = gen.REQUEST_STATE_IN_PROGRESS
FINISHED = (gen.REQUEST_STATE_COMPLETED, gen.REQUEST_STATE_CANCELLED)

# A 2-core machine shared with other work: a local Ray node and Serve can take minutes to come up.
START_SECONDS = 300.0
# Everything submitted in one test finishing, faults and restarts included.
FINISH_SECONDS = 300.0
POLL_SECONDS = 0.2
IMAGE_SUFFIXES = (".png", ".jpg")


def body(model: TinyModel, seed: int, steps: int = 3) -> dict[str, Any]:
    """A tiny job (64x64, a few steps) with its own seed, so every request is a distinct run."""
    return {
        "model_name": str(model.pipeline_dir),
        "prompt": "a photo of a red house",
        "image_size": {"width": 64, "height": 64},
        "num_inference_steps": steps,
        "seed": seed,
    }


async def eventually(check: Callable[[], Awaitable[T | None]], what: str, timeout: float = FINISH_SECONDS) -> T:
    """Polls `check` until it returns something other than None; fails naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(POLL_SECONDS)  # poll interval, not synchronisation


async def statuses(client: AsyncClient, request_ids: Iterable[str]) -> dict[str, gen.RequestStatus]:
    return {request_id: await client.status(request_id) for request_id in request_ids}


async def running(client: AsyncClient, request_ids: Iterable[str], *, min_step: int = 0) -> str | None:
    """A request handed to a worker (with `min_step` steps reported: a replica is denoising it), if any.

    Polled, so a short denoising can slip between two polls: tests wait for a step only with jobs
    long enough to be seen; with a queue of jobs, one is almost always in progress."""
    for request_id, status in (await statuses(client, request_ids)).items():
        if status.state == IN_PROGRESS and status.progress.step >= min_step:
            return request_id
    return None


class StepWatch:
    """Follows requests' status streams, so a denoising step is seen the moment the gateway records it
    (polling can miss a short denoising altogether on a fast machine)."""

    def __init__(self, client: AsyncClient, request_ids: Iterable[str]) -> None:
        self._client = client
        self._stepped = asyncio.Event()
        self._tasks = [asyncio.create_task(self._follow(request_id)) for request_id in request_ids]

    async def _follow(self, request_id: str) -> None:
        async for status in self._client.stream_status(request_id):
            if status.state == IN_PROGRESS and status.progress.step >= 1:
                self._stepped.set()

    async def next_step(self, what: str, timeout: float = FINISH_SECONDS) -> None:
        """Returns once any of the requests reports a step after this call."""
        self._stepped.clear()
        try:
            await asyncio.wait_for(self._stepped.wait(), timeout)
        except TimeoutError:
            pytest.fail(f"not within {timeout:g} s: {what}")

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def all_finished(client: AsyncClient, request_ids: list[str]) -> dict[str, gen.RequestStatus]:
    """Waits until every request has ended; polls, so a gateway that restarts meanwhile does not matter."""

    async def check() -> dict[str, gen.RequestStatus] | None:
        current = await statuses(client, request_ids)
        return current if all(s.state in FINISHED for s in current.values()) else None

    return await eventually(check, f"all {len(request_ids)} requests finished")


def output_files(files_dir: Path, request_id: str) -> list[str]:
    """The images the workers stored for one request: each completed run stores its own set, under new
    names (the local store's metadata files beside them are not counted)."""
    folder = files_dir / output_prefix("", request_id)
    return sorted(p.name for p in folder.iterdir() if p.suffix in IMAGE_SUFFIXES) if folder.is_dir() else []


def processes_of(server: Server) -> list[psutil.Process]:
    """The server's processes still running: any it had, or any in its process group."""
    alive = {p.pid: p for p in server.seen.values() if _running(p)}
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == server.process.pid and _running(p):
                alive.setdefault(p.pid, p)
        except (ProcessLookupError, psutil.Error):
            continue
    return list(alive.values())


def _running(process: psutil.Process) -> bool:
    """Alive and the same process (psutil compares the start time, so a reused pid does not count)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def note_processes(server: Server) -> None:
    """Server.note_processes, for a server that may have died already."""
    with contextlib.suppress(psutil.NoSuchProcess):
        server.note_processes()


async def wait_serving(service: Server) -> None:
    """Polls the gRPC health check until SERVING without blocking the event loop (a gateway of the test
    process may run on it); the process ending first fails with its console."""

    async def check() -> bool | None:
        if service.process.poll() is not None:
            pytest.fail(f"{service.command} exited {service.process.returncode}:\n{service.console_text()[-6000:]}")
        try:
            async with grpc.aio.insecure_channel(service.target) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return None
        return True if reply.status == health_pb2.HealthCheckResponse.SERVING else None

    await eventually(check, f"{service.command} serving on {service.target}", timeout=START_SECONDS)
    service.note_processes()


async def sigkill(service: Server) -> None:
    """SIGKILL to the service's process group and to every process it had: nothing gets to clean up,
    as when a node dies. Returns once none of them runs (a Ray node left behind would keep ports
    and CPUs)."""
    note_processes(service)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(service.process.pid, signal.SIGKILL)
    await asyncio.to_thread(service.process.wait)

    async def gone() -> bool | None:
        left = processes_of(service)
        for p in left:
            try:
                p.kill()
            except psutil.Error:
                continue
        return True if not left else None

    await eventually(gone, f"every process of {service.command} ended", timeout=60)


def kill_leftovers(services: Iterable[Server]) -> None:
    """For teardown after a failure: SIGKILL whatever the services still run."""
    for service in services:
        if service.process.poll() is None:
            note_processes(service)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(service.process.pid, signal.SIGKILL)
            service.process.wait()
        for p in processes_of(service):
            try:
                p.kill()
            except psutil.Error:
                continue


async def serve_actor_pids(name_part: str) -> dict[str, int]:
    """Live Serve actors of the test session's Ray whose name contains `name_part`, with their process ids."""
    pids: dict[str, int] = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if name_part not in entry["name"]:
            continue
        try:
            actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
            # A lambda travels by value; a function of this module would have to be importable in the actor.
            pid = actor.__ray_call__.remote(lambda _actor: os.getpid())
            pids[entry["name"]] = await asyncio.wait_for(pid, timeout=30)
        except (ValueError, TimeoutError, ray.exceptions.RayError):
            continue  # gone between the listing and the call
    return pids


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
