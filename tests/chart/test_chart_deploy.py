"""The chart's config is the one that runs: the rendered serveConfigV2 deployed on the test session's
Ray (as KubeRay deploys it: Serve's declarative config API, the pod's env for secrets), and a
generation through `loraserve gateway` started with the rendered Deployment's command and env.

What a cluster provides is put in by hand, and only that: the values of the Secrets the chart
refers to, the volume mounted at /data (a temporary folder here), and addresses: the Serve
Service's DNS name is loopback here and the pod's 0.0.0.0 listens on loopback.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray import serve
from ray.serve.schema import ServeDeploySchema

from loraserve.client import AsyncClient
from core.config import ENV_PREFIX, Settings
from serving.serve_config import serve_start_options
from serving.tiny import TinyModel
from tests.chart.charttest import CI_VALUES, Rendered, env_of, render
from tests.conftest import free_port
from tests.integration.test_generation_api import fetch, request
from tests.s3_server import verify_presigned_url

pytestmark = pytest.mark.integration

APP = "loraserve-chart"
BUCKET = "chart-outputs"
# The Secrets a cluster would hold, by name and key.
SECRETS = {"chart-s3": {"access-key": "testing", "secret-key": "testing"}}
MOUNT = "/data"


def resolve_env(container: dict[str, Any], data_dir: Path, rendered: Rendered) -> dict[str, str]:
    """The container's env as the pod would see it: secretKeyRefs read (from the cluster's Secrets and
    those the chart made), /data where the volume is."""
    secrets = {
        d["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in d.get("data", {}).items()}
        for d in rendered.documents
        if d["kind"] == "Secret"
    }
    secrets.update(SECRETS)
    env: dict[str, str] = {}
    for name, value in env_of(container).items():
        if isinstance(value, dict):
            ref = value["secretKeyRef"]
            value = secrets[ref["name"]][ref["key"]]
        if value == MOUNT or value.startswith(MOUNT + "/"):
            value = str(data_dir) + value[len(MOUNT) :]
        env[name] = value
    return env


def render_on_cpu(
    app: str, bucket: str, s3_endpoint: str, tiny_sdxl: TinyModel, workers: dict[str, int], **settings: Any
) -> Rendered:
    """The chart's CPU dev values as the tests here run them: external S3 (moto) instead of the in-chart
    MinIO, its keys in the cluster's Secret, the tiny model allowed, the gateway on free ports."""
    return render(
        CI_VALUES[0],
        values={
            "devMinio": {"enabled": False},
            "secrets": {"s3": {"existingSecret": "chart-s3"}},
            "settings": {
                "serve_app_name": app,
                "replica_num_gpus": 0,
                "device": "cpu",
                "s3_endpoint": s3_endpoint,
                "s3_secure": False,
                "s3_bucket": bucket,
                # Callers name the tiny model by its local path: only under listed folders.
                "allowed_local_roots": str(tiny_sdxl.pipeline_dir.parent),
                "shutdown_grace_seconds": 5.0,
                **settings,
            },
            "gateway": {"grpcPort": free_port(), "httpPort": free_port()},
            "workers": {**workers, "metricsPort": 0},
        },
    )


@pytest.fixture(scope="module")
def rendered(stack_settings: Settings, s3_endpoint: str, tiny_sdxl: TinyModel) -> Rendered:
    return render_on_cpu(
        APP,
        BUCKET,
        s3_endpoint,
        tiny_sdxl,
        # The Serve instance of the session is already up on these ports.
        {"serveGrpcPort": stack_settings.serve_grpc_port, "serveHttpPort": stack_settings.serve_http_port},
        replica_num_cpus=0.5,
        retry_backoff_max_seconds=2.0,
        # Serve autoscaling: the deployments entry overrides what build_app set from defaults.
        min_replicas=1,
        max_replicas=2,
    )


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def chart_workers(
    stack: object, stack_settings: Settings, rendered: Rendered, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, Any]]:
    """The rendered serveConfigV2, deployed the way KubeRay does it (the Serve REST API's apply_config)."""
    from ray.serve.context import _get_global_client

    config = rendered.serve_config
    # The proxies the chart configures are those `loraserve serve` started this session's Serve with.
    running = serve_start_options(stack_settings, http_host="0.0.0.0")
    assert config["grpc_options"] == running["grpc_options"]
    assert config["http_options"] == running["http_options"]
    (app,) = config["applications"]
    worker_data = tmp_path_factory.mktemp("chart-worker-data")
    assert app["args"]["data_dir"] == MOUNT
    app["args"]["data_dir"] = str(worker_data)
    worker_container = rendered.ray_pod_templates()["cpu"]["spec"]["containers"][0]
    app["runtime_env"] = {"env_vars": resolve_env(worker_container, worker_data, rendered)}
    client = _get_global_client()
    await asyncio.to_thread(client.deploy_apps, ServeDeploySchema.model_validate({"applications": [app]}))
    # Until then Serve's gRPC proxy knows one app only, and sends every call to it, whatever its name.
    await asyncio.to_thread(client._wait_for_application_running, APP, 240)
    await asyncio.to_thread(client.wait_for_proxies_serving, True)
    details = await asyncio.to_thread(client.get_serve_details)
    deployed = details["applications"][APP]["deployments"]["Worker"]["deployment_config"]
    (rendered_deployment,) = app["deployments"]
    assert deployed["autoscaling_config"]["max_replicas"] == rendered_deployment["autoscaling_config"]["max_replicas"] == 2
    assert deployed["ray_actor_options"]["num_cpus"] == rendered_deployment["ray_actor_options"]["num_cpus"] == 0.5
    assert deployed["max_ongoing_requests"] == rendered_deployment["max_ongoing_requests"]
    yield config
    await asyncio.to_thread(serve.delete, APP)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def chart_gateway(
    chart_workers: dict[str, Any], rendered: Rendered, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Settings]:
    """`loraserve gateway` as the rendered Deployment runs it: its command, its env."""
    container = rendered.gateway_container
    data_dir = tmp_path_factory.mktemp("chart-gateway-data")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(resolve_env(container, data_dir, rendered))
    serve_service = rendered.rayservice["spec"]["serveService"]["metadata"]["name"]
    assert env[ENV_PREFIX + "SERVE_GRPC_HOST"] == serve_service
    assert env[ENV_PREFIX + "GRPC_HOST"] == env[ENV_PREFIX + "HTTP_HOST"] == "0.0.0.0"
    async with running_gateway(container, env) as settings:
        yield settings


@contextlib.asynccontextmanager
async def running_gateway(container: dict[str, Any], env: dict[str, str]) -> AsyncIterator[Settings]:
    """The rendered gateway container's command with `env`, on loopback (its pod listens on every address,
    and its Serve host is a Service name), until it serves health; stopped by SIGTERM as the kubelet does."""
    env = {
        **env,
        ENV_PREFIX + "SERVE_GRPC_HOST": "127.0.0.1",
        ENV_PREFIX + "GRPC_HOST": "127.0.0.1",
        ENV_PREFIX + "HTTP_HOST": "127.0.0.1",
    }
    command = [str(Path(sys.executable).parent / container["command"][0]), *container["command"][1:]]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    settings = Settings.from_env(env)
    try:
        await wait_serving(settings.grpc_port, process)
        yield settings
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = await asyncio.to_thread(process.communicate, timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = await asyncio.to_thread(process.communicate)
        print(output)


async def wait_serving(port: int, process: subprocess.Popen[str]) -> None:
    """What the readiness probe asks: the standard health service, overall status."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(120):
            if process.poll() is not None:
                raise AssertionError(f"loraserve gateway exited {process.returncode}: {process.stdout and process.stdout.read()}")
            try:
                response = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1, wait_for_ready=True)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                continue
    raise AssertionError("the gateway never reported SERVING")


async def test_a_generation_runs_through_the_rendered_gateway_and_serve_config(
    chart_gateway: Settings, tiny_sdxl: TinyModel, s3_endpoint: str
) -> None:
    async with AsyncClient(f"127.0.0.1:{chart_gateway.grpc_port}") as client:
        result = await asyncio.wait_for(
            client.subscribe(request(tiny_sdxl, loras=[{"path": str(tiny_sdxl.lora_paths[0]), "scale": 0.7}])),
            timeout=280,
        )
    (image,) = result.data.images
    assert image.url.startswith(f"http://{s3_endpoint}/{BUCKET}/")
    # Signed with the key of the chart's S3 secret (the server refuses a URL that fails this, too).
    assert verify_presigned_url(image.url, {"testing": "testing"}, host=s3_endpoint).access_key == "testing"
    assert len(await fetch(image.url)) == image.file_size > 0
    status = serve.status().applications[APP]
    assert status.status == "RUNNING"
    assert status.deployments["Worker"].status == "HEALTHY"
