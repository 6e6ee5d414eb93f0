"""The real signal to the real process: `loraserve serve` and `loraserve gateway` start and stop cleanly.

Each server runs as a subprocess in a session of its own (as under systemd or as a container's
command). After SIGTERM or SIGINT it must exit 0, the request that was running must have finished
or be back in the queue, and none of its processes (Ray's GCS, raylet, agents, workers) may be
left running. A Ray node that does not come up is cleaned up and started again.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraserve.client import Client
from serving.tiny import TinyModel
from tests.conftest import WORKER_SECRET
from tests.integration.test_generation_api import request

pytestmark = pytest.mark.integration

START_SECONDS = 240.0
# Ray and Serve going down after the gateway has drained.
STOP_SECONDS = 60.0


def loopback_port() -> int:
    """A free port between Ray's worker ports (10002-19999) and Linux's ephemeral range (32768+), where
    Ray's GCS, raylet and agents pick theirs: a port chosen in either could be taken by Ray between
    choosing it and the gateway binding it."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20_000, 32_000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port in 20000-32000")


@dataclass
class Server:
    command: str
    process: subprocess.Popen[bytes]
    data_dir: Path
    grpc_port: int
    serve_grpc_port: int
    console: Path
    seen: dict[int, psutil.Process] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def console_text(self) -> str:
        return self.console.read_text(errors="replace")

    def note_processes(self) -> None:
        """Remembers every process below the server (psutil keys them by pid and start time)."""
        for child in psutil.Process(self.process.pid).children(recursive=True):
            self.seen.setdefault(child.pid, child)

    def survivors(self) -> list[str]:
        """Processes of this server still running: any process it had, or any in its process group."""
        alive = [p for p in self.seen.values() if _running(p)]
        for p in psutil.process_iter():
            try:
                if os.getpgid(p.pid) == self.process.pid and _running(p):
                    alive.append(p)
            except (ProcessLookupError, psutil.Error):
                continue
        return sorted({f"{p.pid} {_describe(p)}" for p in alive})


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _named(process: psutil.Process, name: str) -> bool:
    try:
        return process.name() == name
    except psutil.Error:
        return False


def _describe(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())[:120] or process.name()
    except psutil.Error:
        return "?"


def start_server(
    command: str, data_dir: Path, *flags: str, serve_grpc_port: int = 0, env: dict[str, str] | None = None
) -> Server:
    """The common settings as env vars, which every command reads (each takes only its own as flags; a
    secret never as one), `flags` and `env` on top."""
    grpc_port = loopback_port()
    serve_grpc_port = serve_grpc_port or loopback_port()
    console = data_dir.parent / f"{data_dir.name}-{command}-console.txt"
    args = [sys.executable, "-m", "loraserve.cli", command, *flags]
    settings = {
        "DATA_DIR": str(data_dir),
        "GRPC_PORT": str(grpc_port),
        "HTTP_PORT": str(loopback_port()),
        "SERVE_GRPC_PORT": str(serve_grpc_port),
        "SERVE_HTTP_PORT": str(loopback_port()),
        "RAY_NUM_CPUS": "2",
        "DEVICE": "cpu",
        "WORKER_SHARED_SECRET": WORKER_SECRET,
    }
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        **{f"LORASERVE_{name}": value for name, value in settings.items()},
        **(env or {}),
    }
    with console.open("wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return Server(command, process, data_dir, grpc_port, serve_grpc_port, console)


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Started servers; any still running when the test ends (it failed) get SIGKILL with their processes."""
    started: list[Server] = []
    yield started
    for server in started:
        if server.process.poll() is None:
            server.note_processes()
            for p in [psutil.Process(server.process.pid), *server.seen.values()]:
                try:
                    p.kill()
                except psutil.Error:
                    continue
            server.process.wait()


def wait_serving(server: Server) -> None:
    """Polls the gRPC health check until SERVING; the process ending first fails with its console."""
    deadline = time.monotonic() + START_SECONDS
    # Short reconnect backoff: gRPC's default grows to minutes while nothing listens yet.
    backoff = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
               ("grpc.max_reconnect_backoff_ms", 500)]  # fmt: skip
    with grpc.insecure_channel(server.target, options=backoff) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if server.process.poll() is not None:
                pytest.fail(f"{server.command} exited {server.process.returncode}:\n{server.console_text()}")
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{server.command} not serving after {START_SECONDS} s:\n{server.console_text()}")
            time.sleep(0.2)  # poll interval, not synchronisation


def submit_and_wait_running(server: Server, body: dict[str, Any]) -> str:
    with Client(server.target) as client:
        request_id = client.submit(body)
        for status in client.stream_status(request_id):
            if status.HasField("progress"):
                return request_id
    pytest.fail(f"request {request_id} ended without running:\n{server.console_text()}")


def stop_with(server: Server, sig: signal.Signals, grace_seconds: float) -> None:
    """Sends `sig` and waits for the exit, as a service manager would before its SIGKILL; processes
    started meanwhile are noted too."""
    server.note_processes()
    server.process.send_signal(sig)
    deadline = time.monotonic() + grace_seconds + STOP_SECONDS
    while server.process.poll() is None:
        if time.monotonic() > deadline:
            pytest.fail(f"{server.command} still running after {sig.name}:\n{server.console_text()}")
        try:
            server.note_processes()
        except psutil.NoSuchProcess:
            continue
        time.sleep(0.2)  # poll interval, not synchronisation


def stored_state(data_dir: Path, request_id: str) -> tuple[str, str | None]:
    """(state, error_type) as the stopped gateway left them in its SQLite store."""
    with sqlite3.connect(f"file:{data_dir / 'requests.sqlite3'}?mode=ro", uri=True) as db:
        row = db.execute("SELECT state, error_type FROM requests WHERE id = ?", (request_id,)).fetchone()
    assert row is not None, request_id
    return row[0], row[1]


def assert_clean_exit(server: Server, sig: signal.Signals) -> None:
    console = server.console_text()
    assert server.process.returncode == 0, console
    assert f"{sig.name}: stopping" in console and "stopped" in console.splitlines()[-1], console
    assert "Traceback" not in console and "SIGTERM received at time" not in console, console
    assert server.survivors() == [], console


def test_sigterm_drains_the_gateway_alone_then_serve(
    servers: list[Server], tiny_sdxl: TinyModel, tmp_path: Path
) -> None:
    grace = 120.0
    serve = start_server("serve", tmp_path / "serve", "--shutdown-grace-seconds", str(grace))
    servers.append(serve)
    wait_serving(serve)
    console = serve.console_text()
    assert f"gRPC API on 127.0.0.1:{serve.grpc_port}" in console
    # Ray's own INFO lines go to the log files, not to the console.
    assert "Started a local Ray instance" not in console
    assert "Started a local Ray instance" in (serve.data_dir / "logs" / "output.log").read_text(errors="replace")

    gateway = start_server(
        "gateway", tmp_path / "gateway", "--shutdown-grace-seconds", str(grace), serve_grpc_port=serve.serve_grpc_port
    )
    servers.append(gateway)
    wait_serving(gateway)
    through_gateway = submit_and_wait_running(gateway, request(tiny_sdxl, num_inference_steps=40))
    stop_with(gateway, signal.SIGTERM, grace)
    assert_clean_exit(gateway, signal.SIGTERM)
    assert stored_state(gateway.data_dir, through_gateway) == ("COMPLETED", None)

    through_serve = submit_and_wait_running(serve, request(tiny_sdxl, num_inference_steps=40))
    stop_with(serve, signal.SIGTERM, grace)
    assert_clean_exit(serve, signal.SIGTERM)
    # The console followed the request to its end.
    for line in (f"request started request_id={through_serve}", f"request completed request_id={through_serve}"):
        assert line in serve.console_text()
    assert len(serve.seen) >= 4, serve.seen  # GCS, raylet, agents, workers: there was something to end
    assert stored_state(serve.data_dir, through_serve) == ("COMPLETED", None)
    # The workers' output lands in the data dir too.
    assert "ServeReplica:loraserve:Worker" in (serve.data_dir / "logs" / "output.log").read_text(errors="replace")


def test_sigint_requeues_what_does_not_finish_within_the_grace(
    servers: list[Server], tiny_sdxl: TinyModel, tmp_path: Path
) -> None:
    grace = 1.0
    serve = start_server("serve", tmp_path / "serve", "--shutdown-grace-seconds", str(grace))
    servers.append(serve)
    wait_serving(serve)
    # Tens of seconds on a CPU; its first step comes within seconds (512x512 takes minutes for one step).
    long = request(tiny_sdxl, num_inference_steps=150, image_size={"width": 256, "height": 256})
    running = submit_and_wait_running(serve, long)
    stop_with(serve, signal.SIGINT, grace)
    assert_clean_exit(serve, signal.SIGINT)
    assert stored_state(serve.data_dir, running) == ("IN_QUEUE", None)
    assert f"request back in the queue request_id={running}" in serve.console_text()


def test_sigterm_while_starting_stops_cleanly(servers: list[Server], tmp_path: Path) -> None:
    """A pod deleted while it starts: Ray is already running but the service is not ready yet."""
    serve = start_server("serve", tmp_path / "serve")
    servers.append(serve)
    deadline = time.monotonic() + START_SECONDS
    while not any("raylet" in _describe(p) for p in psutil.Process(serve.process.pid).children(recursive=True)):
        assert serve.process.poll() is None, serve.console_text()
        assert time.monotonic() < deadline, serve.console_text()
        time.sleep(0.1)  # poll interval, not synchronisation
    assert "loraserve ready" not in serve.console_text()
    stop_with(serve, signal.SIGTERM, START_SECONDS)
    assert_clean_exit(serve, signal.SIGTERM)
    assert "loraserve ready" not in serve.console_text()


def test_a_ray_node_that_does_not_come_up_is_cleaned_up_and_started_again(
    servers: list[Server], tmp_path: Path
) -> None:
    """The first raylet is frozen (SIGSTOP), so ray.init times out as on an overloaded machine
    ("The current node timed out during startup"); the next attempt must start and nothing of the
    first may be left."""
    serve = start_server("serve", tmp_path / "serve")
    servers.append(serve)
    deadline = time.monotonic() + START_SECONDS
    frozen: psutil.Process | None = None
    while frozen is None:
        assert serve.process.poll() is None, serve.console_text()
        assert time.monotonic() < deadline, serve.console_text()
        frozen = next((p for p in psutil.Process(serve.process.pid).children() if _named(p, "raylet")), None)
        time.sleep(0.02)  # poll interval, not synchronisation
    frozen.suspend()
    serve.note_processes()
    wait_serving(serve)
    console = serve.console_text()
    assert "WARNING Ray did not start attempt=1 of=3" in console and "timed out during startup" in console, console
    assert not _running(frozen)
    stop_with(serve, signal.SIGTERM, 30)
    assert_clean_exit(serve, signal.SIGTERM)


def test_demo_keeps_the_console_serve_keeps(servers: list[Server], tmp_path: Path) -> None:
    """The first command a newcomer runs: on the console only its own timed lines (no Ray, Serve,
    transformers or progress-bar output, which go to the log files), the image stored, and no
    process left behind."""
    demo = start_server("demo", tmp_path / "demo")
    servers.append(demo)
    deadline = time.monotonic() + START_SECONDS
    while demo.process.poll() is None:
        assert time.monotonic() < deadline, demo.console_text()
        try:
            demo.note_processes()
        except psutil.NoSuchProcess:
            continue
        time.sleep(0.2)  # poll interval, not synchronisation
    console = demo.console_text()
    assert demo.process.returncode == 0, console
    lines = console.splitlines()
    assert [line for line in lines if not re.match(r"\d\d:\d\d:\d\d \S", line)] == [], console
    stored = [line.split(" stored at ", 1)[1] for line in lines if " stored at " in line]
    assert len(stored) == 1 and Path(stored[0]).is_file(), console
    assert "Started a local Ray instance" in (demo.data_dir / "logs" / "output.log").read_text(errors="replace")
    assert demo.survivors() == [], console
