"""Session-wide fixtures: tiny models built once, and the real stack started once.

The stack is what `loraserve serve` runs — local Ray, Serve with its gRPC ingress, the
gateway on loopback — started in the test session's event loop, with the tiny models
loaded back by path through the normal loading code.
"""

from __future__ import annotations

import contextlib
import random
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest
import pytest_asyncio

from core.config import Settings

if TYPE_CHECKING:
    from gateway.server import Gateway
    from serving.tiny import TinyModel
    from tests.postgres_server import PostgresServer

# The session's workers and every gateway a test points at them share this (worker_shared_secret).
WORKER_SECRET = "test-worker-secret"


def require_tool(name: str) -> str:
    """The tool's path; scripts/test.sh installs it, so under it a missing tool fails."""
    import os
    import shutil

    path = shutil.which(name)
    if path is None:
        if os.environ.get("LORASERVE_REQUIRE_TOOLS"):
            pytest.fail(f"{name} is not installed (scripts/test.sh installs it)")
        pytest.skip(f"{name} not installed; scripts/test.sh installs it")
    return path


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked cuda is GPU-only code's own check: without a CUDA device it skips, saying so."""
    if item.get_closest_marker("cuda") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs CUDA")


def _ephemeral_ports_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_EPHEMERAL_START = _ephemeral_ports_start()
_ports = random.Random()
_handed_out: set[int] = set()


def free_port() -> int:
    """A port nothing binds, between Ray's worker ports (10002-19999) and the kernel's ephemeral range.

    A port from bind(0) lies in the ephemeral range, where any outgoing connection (Ray's processes make
    many) can take it before the server it was given to binds it ("Failed to bind to address")."""
    for _ in range(1000):
        port = _ports.randrange(20000, _EPHEMERAL_START)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port between 20000 and {_EPHEMERAL_START}")


def own_gateway_settings(base: Settings, folder: Path, **overrides: Any) -> Settings:
    """`base` for one more gateway beside the others a test or the session runs: free ports and a data dir of
    its own under `folder` (its SQLite store takes a lock on it), unless `overrides` name them, as a gateway
    meant to share another's store, files or ports does."""
    ports = {name: free_port() for name in ("grpc_port", "http_port") if name not in overrides}
    settings = base.replace(**ports, **overrides)
    if "data_dir" not in overrides:
        settings = settings.replace(data_dir=folder / f"gateway-{settings.grpc_port}")
    return settings


async def start_gateway(settings: Settings) -> Gateway:
    """A started gateway, for a test that stops it itself (mid-test, or with a grace period of its own)."""
    from gateway.server import Gateway

    gateway = Gateway(settings)
    await gateway.start()
    return gateway


@contextlib.asynccontextmanager
async def gateway_for(settings: Settings) -> AsyncIterator[Gateway]:
    """A started gateway, stopped at once (grace 0) however the block ends, so no test leaves one running."""
    gateway = await start_gateway(settings)
    try:
        yield gateway
    finally:
        await gateway.stop(grace_seconds=0)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-protocol server on loopback (moto's standalone server; no MinIO binary here).

    Signatures are checked: header-signed calls by moto with authentication on, presigned URLs by
    tests.s3_server's verifier; the keys and what each may do are tests.s3_server's `ALL_KEYS`.
    """
    from tests.s3_server import CheckedS3Server

    server = CheckedS3Server()
    server.start()
    yield server.endpoint
    server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server on loopback for the session (PATH's, Debian's or pgserver's: see
    tests/postgres_server.py's find_bin_dir; scripts/test.sh installs one where it can)."""
    from tests.postgres_server import PostgresServer, find_bin_dir

    import os

    bin_dir = find_bin_dir()
    if bin_dir is None:
        if os.environ.get("LORASERVE_REQUIRE_TOOLS"):
            pytest.fail("postgresql is not installed (scripts/test.sh installs it)")
        pytest.skip("postgresql not installed; scripts/test.sh installs it")
    with PostgresServer(bin_dir) as server:
        yield server


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> str:
    """A DSN to a new empty database on the session's server, so each test starts clean."""
    return postgres_server.fresh_database()


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    from serving.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-sdxl"), "sdxl", num_loras=3)


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    from serving.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-sd15"), "sd15", num_loras=2)


def tiny_flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where `tiny_flux` builds: the stack's `flux_model` names it before it exists, so only a session that
    sends FLUX requests (and asks for `tiny_flux` first) pays for building it."""
    return tmp_path_factory.getbasetemp() / "tiny-flux"


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    from serving.tiny import make_tiny_model

    return make_tiny_model(tiny_flux_dir(tmp_path_factory), "flux", num_loras=1)


@pytest.fixture(scope="session")
def flag_everything_checker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny safety checker that flags every image, so the censoring path is visible."""
    from serving.tiny import make_tiny_safety_checker

    return make_tiny_safety_checker(tmp_path_factory.mktemp("checker"), flag_everything=True)


@pytest.fixture(scope="session")
def stack_settings(tmp_path_factory: pytest.TempPathFactory, flag_everything_checker: Path) -> Settings:
    http_port = free_port()
    return Settings(
        safety_checker_path=str(flag_everything_checker),
        flux_model=str(tiny_flux_dir(tmp_path_factory) / "pipeline"),
        data_dir=tmp_path_factory.mktemp("data"),
        grpc_port=free_port(),
        http_port=http_port,
        ray_num_cpus=2,
        serve_grpc_port=free_port(),
        serve_http_port=free_port(),
        replica_num_cpus=1,
        worker_metrics_port=free_port(),
        # Test file servers listen on loopback; private networks stay refused.
        fetch_allowed_hosts="127.0.0.1",
        # The storage tests send small files in several parts, as fal's clients send large ones.
        upload_min_part_bytes=1,
        # The tiny models and LoRAs the tests name by path live in pytest's temp folders.
        allowed_local_roots=str(tmp_path_factory.getbasetemp()),
        device="cpu",
        shutdown_grace_seconds=5,
        worker_shared_secret=WORKER_SECRET,
    )


@pytest_asyncio.fixture(scope="session")
async def stack(stack_settings: Settings) -> AsyncIterator[object]:
    from entrypoints.embedded import EmbeddedService

    service = EmbeddedService(stack_settings)
    async with service:
        yield service


@pytest.fixture(scope="session")
def target(stack: object, stack_settings: Settings) -> str:
    return f"127.0.0.1:{stack_settings.grpc_port}"


def self_signed_cert(host: str, directory: Path, ip: str | None = None) -> tuple[Path, Path]:
    """A CA-capable self-signed certificate for `host` (and `ip`), as (cert.pem, key.pem) in `directory`."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.DNSName(host)]
    if ip is not None:
        names.append(x509.IPAddress(ipaddress.ip_address(ip)))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def read_image_bytes(settings: Settings, url: str) -> bytes:
    key = urlsplit(url).path.split("/files/", 1)[1]
    return (settings.files_dir / key).read_bytes()


@pytest.fixture
def files_dir(stack_settings: Settings) -> Path:
    return stack_settings.files_dir
