"""The rendered gateway container passes its own probes: `loraserve gateway` started with the
container's command, args and env, probed as the kubelet probes it, for the chart's defaults and
each ci/ values file.

What a cluster provides is put in by hand, and only that: the Secrets' values (test files here), each
volume at a temporary folder, and addresses: the pod's 0.0.0.0 is loopback, S3 and PostgreSQL are the
test session's, and the Serve Service's name is a loopback port where nothing listens (the gateway
starts, and stays ready, before any worker is up).
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from grpc_health.v1 import health_pb2, health_pb2_grpc

from core.config import ENV_PREFIX
from tests.chart.charttest import VALUE_SETS, Rendered, env_of, render
from tests.conftest import free_port, self_signed_cert

# The pod's IP as the kubelet puts it in the Host header (it connects there); loopback stands in for it.
POD_IP = "10.244.0.7"
KUBELET_USER_AGENT = "kube-probe/1.33"


def _pem_ed25519() -> str:
    key = Ed25519PrivateKey.generate()
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def cluster_secrets(tls_dir: Path, postgres_dsn: str) -> dict[str, dict[str, str]]:
    """The Secrets the ci/ files name, by name and key, with test values (S3 keys moto accepts)."""
    cert, key = self_signed_cert("gateway.images.svc", tls_dir / "pair", ip="127.0.0.1")
    ca, _ = self_signed_cert("clients-ca", tls_dir / "ca")
    writer = {"access-key": "testing", "secret-key": "testing", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    return {
        "loraserve-s3": writer,
        "s3-writer": writer,
        "s3-reader": {"access-key": "reader", "secret-key": "reader-secret"},
        "loraserve-postgresql": {"dsn": postgres_dsn},
        "pg-app": {"uri": postgres_dsn},
        "loraserve-hf": {"token": "hf_test"},
        "hf": {"token": "hf_test"},
        "loraserve-grpc-tls": {"tls.crt": cert.read_text(), "tls.key": key.read_text(), "ca.crt": ca.read_text()},
        "loraserve-webhooks": {"ed25519-private-key": _pem_ed25519()},
        "loraserve-workers": {"secret": "probe-test-worker-secret"},
    }


class Pod:
    """The rendered gateway container's volumes as folders and its env as the pod sees it."""

    def __init__(self, rendered: Rendered, secrets: dict[str, dict[str, str]], root: Path) -> None:
        self.container = rendered.gateway_container
        pod_spec = rendered.gateway["spec"]["template"]["spec"]
        self.secrets = {
            d["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in d.get("data", {}).items()}
            | dict(d.get("stringData", {}))
            for d in rendered.documents
            if d["kind"] == "Secret"
        }
        self.secrets.update(secrets)
        volumes = {v["name"]: v for v in pod_spec["volumes"]}
        self.mounts: dict[str, Path] = {}
        for mount in self.container["volumeMounts"]:
            folder = root / mount["name"]
            folder.mkdir()
            volume = volumes[mount["name"]]
            if "secret" in volume:
                for file_name, text in self.secret(volume["secret"]["secretName"]).items():
                    (folder / file_name).write_text(text)
            self.mounts[mount["mountPath"]] = folder

    def secret(self, name: str) -> dict[str, str]:
        assert name in self.secrets, f"the test has no value for the Secret {name!r}: add it to cluster_secrets"
        return self.secrets[name]

    def path(self, value: str) -> str:
        """A container path as the test's folder (longest mount first)."""
        for mount_path in sorted(self.mounts, key=len, reverse=True):
            if value == mount_path or value.startswith(mount_path + "/"):
                return str(self.mounts[mount_path]) + value[len(mount_path) :]
        return value

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for name, value in env_of(self.container).items():
            if isinstance(value, dict):
                ref = value["secretKeyRef"]
                value = self.secret(ref["name"])[ref["key"]]
            env[name] = self.path(value)
        return env

    def port(self, port: int | str) -> int:
        if isinstance(port, int):
            return port
        (number,) = [p["containerPort"] for p in self.container["ports"] if p["name"] == port]
        return int(number)


async def kubelet_probe(pod: Pod, probe: dict[str, Any]) -> str | None:
    """One probe as the kubelet runs it; None on success, else why it failed. httpGet: the scheme,
    port and path given, Host the pod's IP, success on 200-399, HTTPS without verifying the certificate.
    grpc: plain text (the kubelet's gRPC probe has no TLS), the health service's Check for `service`."""
    timeout = probe.get("timeoutSeconds", 1)
    if "httpGet" in probe:
        get = probe["httpGet"]
        scheme = get.get("scheme", "HTTP").lower()
        port = pod.port(get["port"])
        headers = {"Host": f"{POD_IP}:{port}", "User-Agent": KUBELET_USER_AGENT, "Accept": "*/*"}
        headers.update({h["name"]: h["value"] for h in get.get("httpHeaders", [])})
        context: ssl.SSLContext | bool = False
        if scheme == "https":
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
                async with session.get(
                    f"{scheme}://127.0.0.1:{port}{get.get('path', '/')}", headers=headers, ssl=context, allow_redirects=False
                ) as response:
                    if 200 <= response.status < 400:
                        return None
                    return f"HTTP {response.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return f"{type(exc).__name__}: {exc}"
    check = probe["grpc"]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{pod.port(check['port'])}") as channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=check.get("service", "")), timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            return f"gRPC {exc.code().name}"
    return None if response.status == health_pb2.HealthCheckResponse.SERVING else f"health {response.status}"


async def run_probe(pod: Pod, process: subprocess.Popen[str], name: str) -> None:
    """As the kubelet: every periodSeconds until it passes, at most failureThreshold times."""
    probe = pod.container[name]
    failures: list[str] = []
    for _ in range(probe.get("failureThreshold", 3)):
        if process.poll() is not None:
            raise AssertionError(f"the gateway exited {process.returncode} during its {name}")
        failure = await kubelet_probe(pod, probe)
        if failure is None:
            return
        failures.append(failure)
        # The kubelet's own period between attempts: this is the probe's schedule, not a guess at readiness.
        await asyncio.sleep(probe.get("periodSeconds", 10))
    raise AssertionError(f"{name} failed {len(failures)} times (the kubelet gives up): {failures[-3:]}")


@pytest_asyncio.fixture(loop_scope="session")
async def gateway_pod(
    request: pytest.FixtureRequest, s3_endpoint: str, postgres_server: Any, tmp_path: Path
) -> AsyncIterator[tuple[Pod, subprocess.Popen[str]]]:
    name: str = request.param
    rendered = render(*VALUE_SETS[name], values={"gateway": {"grpcPort": free_port(), "httpPort": free_port()}})
    secrets = cluster_secrets(tmp_path / "made", postgres_server.fresh_database())
    # The in-chart MinIO is moto here: its root user is one moto knows.
    for minio in (d for d in rendered.documents if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-minio")):
        secrets[minio["metadata"]["name"]] = {"root-user": "testing", "root-password": "testing"}
    (tmp_path / "volumes").mkdir()
    pod = Pod(rendered, secrets, tmp_path / "volumes")
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    pod_env = pod.env()
    assert pod_env[ENV_PREFIX + "GRPC_HOST"] == pod_env[ENV_PREFIX + "HTTP_HOST"] == "0.0.0.0"
    env.update(pod_env)
    env.update(
        {
            ENV_PREFIX + "GRPC_HOST": "127.0.0.1",
            ENV_PREFIX + "HTTP_HOST": "127.0.0.1",
            ENV_PREFIX + "S3_ENDPOINT": s3_endpoint,
            ENV_PREFIX + "S3_SECURE": "false",
            ENV_PREFIX + "SERVE_GRPC_HOST": "127.0.0.1",
            ENV_PREFIX + "SERVE_GRPC_PORT": str(free_port()),
        }
    )
    # The image's temporary folder is the /tmp volume; its $HOME is not writable.
    env["TMPDIR"] = pod.path("/tmp")
    command = pod.container["command"]
    executable = str(Path(sys.executable).parent / command[0])
    process = subprocess.Popen(
        [executable, *command[1:], *pod.container.get("args", [])],
        env=env,
        cwd=pod.path("/tmp"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield pod, process
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.to_thread(process.communicate, timeout=60)
        print(output)


@pytest.mark.parametrize("gateway_pod", list(VALUE_SETS), indirect=True)
async def test_the_gateway_passes_the_probes_its_container_declares(
    gateway_pod: tuple[Pod, subprocess.Popen[str]],
) -> None:
    pod, process = gateway_pod
    await run_probe(pod, process, "startupProbe")
    await run_probe(pod, process, "readinessProbe")
    await run_probe(pod, process, "livenessProbe")
