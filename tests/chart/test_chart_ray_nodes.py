"""The rendered serveConfigV2 on a Ray cluster of two nodes, as the chart's: a head that takes no work
(`--num-cpus=0`) and a worker node, each started with `ray start` and the env the chart gives its pod.
The worker node is killed while requests run and started again: every request the gateway accepted
completes, once, and Serve's replica comes back on the new node.

The cluster is this test's own (its own temporary folder, ports and processes, ended by process id;
`ray stop` would end every Ray on the machine). The chart's proxy_location EveryNode is HeadOnly here:
two nodes on one machine cannot both bind the proxies' ports; in a cluster each pod has its own address.
The config's /data is one folder here, which the old and the new worker node share (each pod mounts its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import pytest
import pytest_asyncio
from minio import Minio

from loraserve.client import AsyncClient
from core.config import ENV_PREFIX, Settings
from loraserve.v1 import generation_pb2
from serving.tiny import TinyModel
from tests.chart.charttest import Rendered
from tests.chart.test_chart_deploy import MOUNT, render_on_cpu, resolve_env, running_gateway
from tests.conftest import free_port
from tests.integration.test_generation_api import request

pytestmark = pytest.mark.integration

APP = "loraserve-nodes"
BUCKET = "chart-nodes"
# Long enough that the first request is still denoising when its node dies (64x64, the tiny model).
STEPS = 20
FINISH_SECONDS = 600
START_ATTEMPTS = 3
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
RAY_TOKEN = uuid.uuid4().hex
BIN = Path(sys.executable).parent
# A driver of this test's cluster in its own process (this one may hold the session's Ray), on the head
# node (Ray prefers the head among nodes of one host): it deploys the config with Serve's API, then answers
# each line it reads with where the replicas run and which worker nodes are alive.
DRIVER = """
import json, sys
import ray
from ray import serve
from ray.serve.context import _get_global_client
from ray.serve.schema import ServeDeploySchema

config = json.loads(sys.argv[2])
(app,) = config["applications"]
ray.init(address=sys.argv[1], log_to_driver=False)
serve.start(proxy_location="HeadOnly", http_options=config["http_options"], grpc_options=config["grpc_options"])
client = _get_global_client()
client.deploy_apps(ServeDeploySchema.model_validate({"applications": [app]}))
client._wait_for_application_running(app["name"], 240)
client.wait_for_proxies_serving(True)
print("DEPLOYED", flush=True)
for _ in sys.stdin:
    replicas = client.get_serve_details()["applications"][app["name"]]["deployments"]["Worker"]["replicas"]
    print("WHERE", json.dumps({
        "replicas": [(r["node_id"], r["state"]) for r in replicas],
        "workers": [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0],
    }), flush=True)
"""


class RayStartFailed(AssertionError):
    pass


class RayNode:
    """One `ray start --block` in its own session, and every process of it, found by process id."""

    def __init__(self, temp_dir: Path, args: list[str], env: dict[str, str]) -> None:
        ports = {
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
            "--metrics-export-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
        }
        command = [
            str(BIN / "ray"),
            "start",
            "--block",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
            "--node-ip-address=127.0.0.1",
            "--object-store-memory=100000000",
            # Workers bind ports the system picks: Ray's default range is shared with the session's Ray.
            "--min-worker-port=0",
            "--max-worker-port=0",
            *[f"{flag}={port}" for flag, port in ports.items()],
            *args,
        ]
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        self.output: list[str] = []
        started = threading.Event()

        def read() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self.output.append(line)
                if "--block" in line:
                    started.set()
            started.set()

        threading.Thread(target=read, daemon=True).start()
        started.wait(timeout=120)
        if self.process.poll() is not None or not started.is_set():
            with contextlib.suppress(AssertionError):
                self.kill()
            raise RayStartFailed("ray start did not start:\n" + "".join(self.output))

    def processes(self) -> list[psutil.Process]:
        """The node's processes still running: those under `ray start` and any of its session (Ray's
        workers lead their own process groups, so a process group is not enough)."""
        found: dict[int, psutil.Process] = {}
        try:
            root = psutil.Process(self.process.pid)
            found.update((p.pid, p) for p in [root, *root.children(recursive=True)])
        except psutil.NoSuchProcess:
            pass
        for process in psutil.process_iter():
            try:
                if os.getsid(process.pid) == self.process.pid:
                    found.setdefault(process.pid, process)
            except (ProcessLookupError, psutil.Error):
                continue
        return [p for p in found.values() if _running(p)]

    def kill(self) -> None:
        """What a pod's end does to its processes: all of them at once, no goodbye. Returns once none runs."""
        for _ in range(10):
            processes = self.processes()
            if not processes:
                break
            for process in processes:
                with contextlib.suppress(psutil.NoSuchProcess):
                    process.kill()
            psutil.wait_procs(processes, timeout=30)
        self.process.wait(timeout=30)
        assert not self.processes(), f"processes of a Ray node left running: {self.processes()}"


def _running(process: psutil.Process) -> bool:
    """Alive and the same process (psutil compares start times, so a reused pid does not count)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def pod_env(container: dict[str, Any], data_dir: Path, rendered: Rendered) -> dict[str, str]:
    """The container's env as the pod sees it, and Ray's token as KubeRay gives it to every Ray container
    with authOptions mode token (never the token file in $HOME another Ray on this machine uses)."""
    assert rendered.rayservice["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    env = {k: v for k, v in os.environ.items() if not k.startswith((ENV_PREFIX, "RAY_"))}
    env.update(resolve_env(container, data_dir, rendered))
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": RAY_TOKEN})
    return env


@pytest.fixture(scope="module")
def rendered(s3_endpoint: str, tiny_sdxl: TinyModel) -> Rendered:
    return render_on_cpu(
        APP,
        BUCKET,
        s3_endpoint,
        tiny_sdxl,
        {"serveGrpcPort": free_port(), "serveHttpPort": free_port()},
        replica_num_cpus=1,
        retry_backoff_max_seconds=1.0,
    )


class Cluster:
    """The head (no CPUs: it takes no work, as the chart's) and one worker node, in one temporary folder."""

    def __init__(self, root: Path, rendered: Rendered) -> None:
        self.root = root
        self.rendered = rendered
        self.templates = rendered.ray_pod_templates()
        self.nodes: list[RayNode] = []

    def start_head(self) -> None:
        head_params = self.rendered.rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]
        assert head_params["num-cpus"] == "0"
        env = pod_env(self.templates["head"]["spec"]["containers"][0], self.root / "head-data", self.rendered)

        def args() -> list[str]:
            gcs_port = free_port()
            self.address = f"127.0.0.1:{gcs_port}"
            return [
                "--head",
                f"--port={gcs_port}",
                "--num-cpus=0",
                "--include-dashboard=false",
                f"--ray-client-server-port={free_port()}",
            ]

        self._start("head", args, env)

    def start_worker(self) -> None:
        """A worker node as a new pod of the worker group starts it: a fresh Ray node (its own folder)."""
        env = pod_env(self.templates["cpu"]["spec"]["containers"][0], self.root / "worker-data", self.rendered)
        args = [f"--address={self.address}", "--num-cpus=1"]
        self.worker = self._start(f"worker{len(self.nodes)}", lambda: args, env)

    def _start(self, name: str, args: Callable[[], list[str]], env: dict[str, str]) -> RayNode:
        """Again, as the kubelet restarts a pod's container, when the raylet did not register with the GCS within
        Ray's fixed 30 s ("The current node timed out during startup"), which happens on a busy machine."""
        failures: list[str] = []
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                node = RayNode(self.root / f"{name}-{attempt}", args(), env)
            except RayStartFailed as exc:
                if "timed out during startup" not in str(exc):
                    raise
                failures.append(str(exc)[-2000:])
                continue
            self.nodes.append(node)
            return node
        raise AssertionError(f"the {name} node did not start in {START_ATTEMPTS} tries:\n" + "\n".join(failures))

    def deploy(self, config: dict[str, Any]) -> None:
        """Starts the driver; returns once Serve runs the app and its proxies serve."""
        self.driver_log = (self.root / "driver.log").open("w")
        self.driver = subprocess.Popen(
            [sys.executable, "-c", DRIVER, self.address, json.dumps(config)],
            env=pod_env({}, self.root, self.rendered),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.driver_log,
            text=True,
        )
        self.answers: queue.Queue[str] = queue.Queue()

        def read() -> None:
            assert self.driver.stdout is not None
            for line in self.driver.stdout:
                self.answers.put(line)
            self.answers.put("")

        threading.Thread(target=read, daemon=True).start()
        self._answer("DEPLOYED")

    def _answer(self, prefix: str) -> str:
        while True:
            try:
                line = self.answers.get(timeout=300)
            except queue.Empty:
                line = ""
            if not line:
                raise AssertionError("the driver did not answer:\n" + (self.root / "driver.log").read_text()[-6000:])
            if line.startswith(prefix):
                return line.removeprefix(prefix).strip()

    def where(self) -> dict[str, Any]:
        """Serve's replicas as (node id, state), and the worker nodes alive."""
        assert self.driver.stdin is not None
        self.driver.stdin.write("where\n")
        self.driver.stdin.flush()
        answer: dict[str, Any] = json.loads(self._answer("WHERE"))
        return answer

    def stop(self) -> None:
        """The driver first (it ends when its input does), then every node."""
        if hasattr(self, "driver"):
            with contextlib.suppress(BrokenPipeError):
                assert self.driver.stdin is not None
                self.driver.stdin.close()
            try:
                self.driver.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.driver.kill()
                self.driver.wait()
            self.driver_log.close()
        for node in reversed(self.nodes):
            node.kill()


@pytest.fixture(scope="module")
def cluster(rendered: Rendered) -> Iterator[Cluster]:
    """This test's own cluster: its own folder under /tmp (Ray's socket paths must stay short), ports and
    processes; nothing of it is left when the module ends."""
    root = Path(tempfile.mkdtemp(prefix="lsray-", dir="/tmp"))
    cluster = Cluster(root, rendered)
    try:
        cluster.start_head()
        cluster.start_worker()
        config = rendered.serve_config
        (app,) = config["applications"]
        assert app["args"]["data_dir"] == MOUNT
        app["args"]["data_dir"] = str(root / "worker-data")
        cluster.deploy(config)
        yield cluster
    finally:
        try:
            cluster.stop()
        finally:
            shutil.rmtree(root)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def gateway(
    cluster: Cluster, rendered: Rendered, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Settings]:
    """`loraserve gateway` with the rendered Deployment's command and env."""
    container = rendered.gateway_container
    env = pod_env(container, tmp_path_factory.mktemp("nodes-gateway-data"), rendered)
    async with running_gateway(container, env) as settings:
        yield settings


def counters(http_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^(loraserve_[a-z_]+_total(?:\{[^}]*\})?) ([0-9.e+]+)$", line)
        if match:
            found[match.group(1)] = float(match.group(2))
    return found


def stored_images(s3_endpoint: str, request_id: str) -> list[str]:
    """The image objects the workers stored for one request: each run to the end stores its own."""
    client = Minio(s3_endpoint, access_key="testing", secret_key="testing", secure=False, region="us-east-1")
    names = [o.object_name for o in client.list_objects(BUCKET, recursive=True) if o.object_name is not None]
    return sorted(n for n in names if f"/outputs/{request_id}/" in n and n.endswith(IMAGE_SUFFIXES))


async def ended(client: AsyncClient, request_id: str) -> generation_pb2.RequestStatus:
    """The request's last status: its stream ends when the request does."""
    last = None
    async for status in client.stream_status(request_id):
        last = status
    assert last is not None
    return last


async def test_requests_survive_the_worker_node_dying_and_the_replica_comes_back_on_the_new_one(
    cluster: Cluster, gateway: Settings, tiny_sdxl: TinyModel, s3_endpoint: str
) -> None:
    before = await asyncio.to_thread(cluster.where)
    (old_node,) = before["workers"]
    assert before["replicas"] == [[old_node, "RUNNING"]]

    async with AsyncClient(f"127.0.0.1:{gateway.grpc_port}") as client:
        running = await client.submit(request(tiny_sdxl, seed=1, num_inference_steps=STEPS))
        async for status in client.stream_status(running):
            if status.state == generation_pb2.REQUEST_STATE_IN_PROGRESS and status.progress.step >= 1:
                break
        await asyncio.to_thread(cluster.worker.kill)
        # Accepted while no node can run it.
        waiting = await client.submit(request(tiny_sdxl, seed=2, num_inference_steps=STEPS))
        await asyncio.to_thread(cluster.start_worker)
        ids = [running, waiting]
        last = await asyncio.wait_for(asyncio.gather(*(ended(client, i) for i in ids)), FINISH_SECONDS)
        # Ended as completed without an error (a failed request ends COMPLETED with its error, as fal's).
        completed = (generation_pb2.REQUEST_STATE_COMPLETED, False)
        assert [(s.state, s.HasField("error")) for s in last] == [completed] * 2, last
        results = [await client.result(i) for i in ids]

    # Once: one image stored per request (a run cut off by the node's death stored none), the one returned.
    for request_id, result in zip(ids, results, strict=True):
        (image,) = result.data.images
        assert stored_images(s3_endpoint, request_id) == [urlsplit(image.url).path.removeprefix(f"/{BUCKET}/")]
    metrics = await asyncio.to_thread(counters, gateway.http_port)
    assert metrics["loraserve_requests_submitted_total"] == 2
    finished = {k: v for k, v in metrics.items() if k.startswith("loraserve_requests_finished_total") and v}
    assert list(finished.values()) == [2] and 'outcome="completed"' in next(iter(finished)), metrics
    # The running request's worker call broke with its node and was run again.
    assert metrics.get("loraserve_worker_retries_total", 0) >= 1, metrics

    after = await asyncio.to_thread(cluster.where)
    (new_node,) = after["workers"]
    assert new_node != old_node
    assert after["replicas"] == [[new_node, "RUNNING"]]
