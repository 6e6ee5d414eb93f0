"""Starts (or joins) Ray, Serve with its gRPC ingress, and the worker app; stops them leaving no process behind.

A local Ray node is several processes (GCS, raylet, its dashboard and runtime-env agents, the
workers, a reaper). `ray.shutdown()` ends the ones the driver started itself, but the raylet's own
children outlive it, and a start that times out leaves whatever it had started running. So both
paths note the processes first and end what is left afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import psutil
import ray
from ray import serve
from ray.serve.config import HTTPOptions, gRPCOptions

from core.config import Settings
from serving.app import build_app
from serving.serve_config import application_config, serve_start_options

log = logging.getLogger(__name__)

# How long processes get to end after SIGTERM before they get SIGKILL.
TERMINATE_SECONDS = 5.0


class WorkersStartError(RuntimeError):
    """Ray or Serve did not come up; the message says what failed, one line per attempt."""


def start_workers(settings: Settings) -> None:
    settings = settings.with_embedded_local_roots()
    if not ray.is_initialized():
        _start_ray(settings)
    # The same proxies, app name and route prefix as the chart's serveConfigV2 (serving.serve_config).
    options = serve_start_options(settings, http_host="127.0.0.1")
    serve.start(
        http_options=HTTPOptions(**options["http_options"]), grpc_options=gRPCOptions(**options["grpc_options"])
    )
    app = application_config(settings)
    serve.run(build_app(settings), name=app["name"], route_prefix=app["route_prefix"])
    log.info("workers ready", extra={"app": settings.serve_app_name, "grpc_port": settings.serve_grpc_port})


def _start_ray(settings: Settings) -> None:
    """ray.init, again after a failed attempt: on a busy machine a local node's raylet sometimes does not
    register with the GCS within Ray's 30 s ("The current node timed out during startup"); a new
    node (new session dir, new ports) usually does."""
    init_args: dict[str, object] = {"address": settings.ray_address or None, "include_dashboard": False}
    if not settings.ray_address and settings.ray_num_cpus:
        init_args["num_cpus"] = settings.ray_num_cpus
    failures: list[str] = []
    attempts = max(1, settings.ray_start_attempts)
    for attempt in range(1, attempts + 1):
        before = {p.pid for p in _descendants([psutil.Process()])}
        try:
            ray.init(**init_args)  # type: ignore[arg-type]
            return
        except Exception as exc:  # ray.init raises a bare Exception when the node times out
            failures.append(f"attempt {attempt}/{attempts}: {type(exc).__name__}: {exc}")
            leftovers = [p for p in _descendants([psutil.Process()]) if p.pid not in before]
            ray.shutdown()
            ended = end_processes(leftovers)
            log.warning(
                "Ray did not start",
                extra={"attempt": attempt, "of": attempts, "error": str(exc), "leftover_processes_ended": ended},
            )
    where = f"joining {settings.ray_address}" if settings.ray_address else "starting a local Ray node"
    raise WorkersStartError(f"{where} failed {attempts} time(s):\n  " + "\n  ".join(failures))


def stop_workers() -> None:
    """Serve and Ray down, then whatever the local node left running (the raylet's agents survive it)."""
    processes = ray_node_processes()
    try:
        if ray.is_initialized():
            serve.shutdown()
    finally:
        ray.shutdown()
        ended = end_processes(processes)
        if ended:
            log.info("ended processes the Ray node left behind", extra={"count": ended})


def ray_node_processes() -> list[psutil.Process]:
    """The processes of the Ray node this driver started, with their descendants; none when it joined a cluster."""
    node = ray._private.worker._global_node  # no public API lists them
    if node is None:
        return []
    roots: list[psutil.Process] = []
    for infos in node.all_processes.values():
        for info in infos:
            try:
                roots.append(psutil.Process(info.process.pid))
            except psutil.NoSuchProcess:
                continue
    return roots + _descendants(roots)


def _descendants(roots: Iterable[psutil.Process]) -> list[psutil.Process]:
    found: list[psutil.Process] = []
    for root in roots:
        try:
            found.extend(root.children(recursive=True))
        except psutil.NoSuchProcess:
            continue
    return found


def end_processes(processes: Iterable[psutil.Process]) -> int:
    """SIGTERM, then SIGKILL what is still there after TERMINATE_SECONDS; returns how many were alive."""
    alive = [p for p in processes if _running(p)]
    for process in alive:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            continue
    _, stubborn = psutil.wait_procs(alive, timeout=TERMINATE_SECONDS)
    for process in stubborn:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(stubborn, timeout=TERMINATE_SECONDS)
    return len(alive)


def _running(process: psutil.Process) -> bool:
    """Alive and the same process (psutil compares the start time, so a reused pid does not count)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
