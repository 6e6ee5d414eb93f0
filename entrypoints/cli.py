"""The server's commands: serve, gateway, demo, make-tiny-model, serve-config (keys: keys_cli.py).

Each is an entry point of the `loraserve.commands` group (pyproject.toml), named after the command:
a function that adds the command's subparser to the `loraserve` command's (clients/python/loraserve/cli.py, in
the client distribution) and sets its `run`. Settings come from flags over `LORASERVE_*` env vars over a
`--config` file; each command takes as flags the settings its process reads (core.settings_cli).
Heavy imports (torch, Ray, diffusers) happen inside the commands that need them,
so adding these parsers keeps `loraserve generate` light.

`serve` and `gateway` stop the same way on SIGTERM (Kubernetes, systemd) and SIGINT (Ctrl-C):
new requests are refused, running ones get `shutdown_grace_seconds` to finish and go back to
the queue after that, then Serve and Ray go down; the exit status is 0.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import functools
import json
import logging
import signal
import socket
import tempfile
import urllib.parse
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.config import Settings
from core.settings_cli import COMMAND_READERS

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

log = logging.getLogger("loraserve")


def add_serve(sub: Subparsers) -> None:
    _add_server_command(sub, "serve", "gateway + local Ray + Serve workers + local storage on one machine")


def add_gateway(sub: Subparsers) -> None:
    _add_server_command(
        sub, "gateway", "only the gateway, in front of a running Serve gRPC ingress (SERVE_GRPC_HOST:SERVE_GRPC_PORT)"
    )


def add_demo(sub: Subparsers) -> None:
    _add_server_command(sub, "demo", "the whole path once: serve, make a tiny model, generate with a LoRA")


def add_make_tiny_model(sub: Subparsers) -> None:
    tiny = sub.add_parser("make-tiny-model", help="random-weight pipeline + LoRAs, for demos and tests")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument(
        "--family", choices=["sdxl", "sd15", "flux"], default="sdxl", help="flux: also one LoRA in each other layout"
    )
    tiny.add_argument("--loras", type=int, default=3)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--kohya-loras", type=int, default=0, metavar="N", help="also N kohya-format LoRAs (alpha 8)")
    tiny.add_argument("--embedding", action="store_true", help="also a two-vector embedding (tokens <s0> <s1>)")
    tiny.add_argument("--unet", action="store_true", help="also another U-Net that fits it, for unet_name")
    tiny.add_argument("--variant", metavar="NAME", help="also NAME (e.g. fp16) variant files, with other U-Net weights")
    tiny.add_argument(
        "--adapters",
        action="store_true",
        help="also build a ControlNet, an IP-Adapter + image encoder and (sd15) IC-Light models that fit it",
    )
    tiny.set_defaults(run=_make_tiny_model)


def add_serve_config(sub: Subparsers) -> None:
    serve_config = sub.add_parser(
        "serve-config", help="print the workers' Serve config (JSON) that these settings make: a RayService's serveConfigV2"
    )
    serve_config.add_argument("--proxy-host", default="0.0.0.0", help="address Serve's HTTP proxy listens on")
    Settings.add_arguments(serve_config, COMMAND_READERS["serve-config"])
    serve_config.set_defaults(run=functools.partial(_serve_config, serve_config))


def _add_server_command(sub: Subparsers, name: str, help: str) -> None:
    parser = sub.add_parser(name, help=help)
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's, the workers' and the libraries' output here too (default: only in DATA_DIR/logs/)",
    )
    Settings.add_arguments(parser, COMMAND_READERS[name])
    parser.set_defaults(run=functools.partial(_run_server, parser))


def _settings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Settings:
    """A bad setting is a usage error of the command (exit status 2), without the settings' long usage."""
    try:
        return Settings.from_args(args)
    except ValueError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")


def _make_tiny_model(args: argparse.Namespace) -> int:
    from serving.tiny import make_tiny_model

    model = make_tiny_model(args.dir, args.family, args.loras, args.seed)
    print(model.pipeline_dir)
    for path in model.lora_paths:
        print(path)
    for path in _tiny_fixtures(args, model.pipeline_dir):
        print(path)
    if args.adapters:
        from serving.tiny_adapters import describe, make_tiny_adapters

        print(describe(make_tiny_adapters(args.dir / "adapters", model.pipeline_dir, args.family, args.seed)))
    return 0


def _serve_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from serving.serve_config import serve_config

    settings = _settings(parser, args)
    print(json.dumps(serve_config(settings, http_host=args.proxy_host), indent=2))
    return 0


def _tiny_fixtures(args: argparse.Namespace, pipeline_dir: Path) -> list[Path]:
    """The make-tiny-model extras for unet_name, variant, kohya LoRAs and embeddings; FLUX's single-file transformer
    and LoRA layouts."""
    from serving.tiny import make_tiny_embedding, make_tiny_lora, make_tiny_unet, make_tiny_variant

    if args.family == "flux":
        from serving.tiny_flux import SINGLE_FILE_NAME, make_tiny_flux_layouts

        if args.kohya_loras or args.embedding or args.unet or args.variant or args.adapters:
            raise SystemExit("make-tiny-model --family flux: only --loras and --seed apply")
        return [pipeline_dir.parent / SINGLE_FILE_NAME, *make_tiny_flux_layouts(args.dir / "loras", args.seed)]

    paths = [
        make_tiny_lora(
            args.dir / "loras" / f"kohya_{i}.safetensors",
            args.family,
            seed=args.seed * 1000 + 500 + i,
            lora_format="kohya",
            alpha=8,
        )
        for i in range(args.kohya_loras)
    ]
    if args.embedding:
        paths.append(make_tiny_embedding(args.dir / "embeddings", args.family, seed=args.seed + 1))
    if args.unet:
        paths.append(make_tiny_unet(args.dir / "unet", args.family, seed=args.seed + 1))
    if args.variant:
        paths.append(make_tiny_variant(pipeline_dir, args.variant, seed=args.seed + 1))
    return paths


def _run_server(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """The commands that start a service share one console: its own lines and everyone's errors."""
    from core.logs import setup_logging

    settings = _settings(parser, args)
    logs = setup_logging(settings.data_dir, settings.log_level, verbose=args.verbose)
    more = f"; Ray and library output: {logs.output_file}" if logs.output_file else ""
    log.info(f"logs: {logs.log_file}{more}")
    try:
        return asyncio.run(SERVER_COMMANDS[args.command](settings))
    except Exception as exc:
        # The console shows the error in a line (a traceback when verbose), the log file the traceback.
        log.error(f"loraserve {args.command} failed", exc_info=exc)
        return 1
class StopSignals:
    """SIGTERM and SIGINT ask for one graceful stop; a repeated signal does not cut the grace short."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self.install()

    def install(self) -> None:
        """Again after ray.init: Ray's core worker installs a failure-signal handler for SIGTERM that
        prints a stack trace and lets the process die undrained."""
        for sig in self.SIGNALS:
            self._loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.received.is_set():
            log.warning(f"{sig.name} again: already stopping")
            return
        log.info(f"{sig.name}: stopping")
        self.received.set()


def _stopping(settings: Settings) -> None:
    log.info(
        f"stopping: new requests are refused; running requests have {settings.shutdown_grace_seconds:g} s "
        "to finish, then go back to the queue"
    )


def _ready(settings: Settings, grpc_port: int) -> None:
    log.info(
        f"loraserve ready: gRPC API on {settings.grpc_host}:{grpc_port}, HTTP (files, health, metrics) on "
        f"{settings.http_host}:{settings.http_port}, files served as {settings.files_base_url}"
    )


# The ports each server command binds, by setting, with the host it binds them on.
SERVE_PORTS = {"grpc_port": "grpc_host", "http_port": "http_host", "serve_grpc_port": "", "serve_http_port": ""}
GATEWAY_PORTS = {"grpc_port": "grpc_host", "http_port": "http_host"}


class PortsInUse(RuntimeError):
    pass


def check_ports(settings: Settings, ports: dict[str, str]) -> None:
    """Fails before anything starts when a port is taken (most often by an instance still running):
    gRPC binds with SO_REUSEPORT and would share it silently, and Serve's proxy fails inside Ray."""
    taken = []
    for port_name, host_name in ports.items():
        port = getattr(settings, port_name)
        host = getattr(settings, host_name) if host_name else "127.0.0.1"
        if not port:
            continue
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    taken.append(f"{host}:{port} ({port_name})")
    if taken:
        raise PortsInUse(f"already in use: {', '.join(taken)}; is another loraserve running?")


async def _serve(settings: Settings) -> int:
    from entrypoints.embedded import EmbeddedService

    check_ports(settings, SERVE_PORTS)
    signals = StopSignals()
    service = EmbeddedService(settings)
    log.info("starting Ray and the Serve workers")
    await service.start()
    signals.install()
    if not signals.received.is_set():  # a stop asked for while starting waited for the start to end
        _ready(settings, service.gateway.grpc_port)
    await signals.received.wait()
    _stopping(settings)
    await service.stop()
    log.info("stopped")
    return 0


async def _gateway(settings: Settings) -> int:
    from gateway.server import Gateway

    check_ports(settings, GATEWAY_PORTS)
    signals = StopSignals()
    gateway = Gateway(settings)
    await gateway.start()
    log.info(f"workers: Serve gRPC ingress at {settings.serve_grpc_host}:{settings.serve_grpc_port}")
    _ready(settings, gateway.grpc_port)
    await signals.received.wait()
    _stopping(settings)
    await gateway.stop()
    log.info("stopped")
    return 0


async def _demo(settings: Settings) -> int:
    """Start the embedded service, make a tiny SDXL model, generate with a LoRA through gRPC."""
    from entrypoints.embedded import EmbeddedService
    from loraserve.client import AsyncClient
    from serving.tiny import make_tiny_model

    workdir = Path(tempfile.mkdtemp(prefix="loraserve-demo-"))
    model = await asyncio.to_thread(make_tiny_model, workdir / "tiny-sdxl", "sdxl", 2)
    log.info(f"tiny model: {model.pipeline_dir}")
    async with EmbeddedService(settings) as service:
        async with AsyncClient(f"127.0.0.1:{service.gateway.grpc_port}") as client:
            result = await client.subscribe(
                {
                    "model_name": str(model.pipeline_dir),
                    "prompt": "a photo of a red house",
                    "loras": [{"path": str(model.lora_paths[0]), "scale": 0.8}],
                    "image_size": {"width": 64, "height": 64},
                    "num_inference_steps": 4,
                    "seed": 42,
                },
                on_queue_update=lambda s: log.info(f"client: {generation_state_name(s.state)} {_progress(s)}".rstrip()),
            )
    for image in result.data.images:
        key = urllib.parse.urlsplit(image.url).path.split("/files/", 1)[1]
        log.info(f"image: {image.url}")
        log.info(f"stored at {settings.files_dir.resolve() / key}")
    return 0


# What each command that starts a service runs, once its console and log files are set up.
SERVER_COMMANDS: dict[str, Callable[[Settings], Coroutine[Any, Any, int]]] = {
    "serve": _serve,
    "gateway": _gateway,
    "demo": _demo,
}


def generation_state_name(state: int) -> str:
    from loraserve.v1 import generation_pb2

    return generation_pb2.RequestState.Name(state).removeprefix("REQUEST_STATE_")


def _progress(status: object) -> str:
    progress = getattr(status, "progress", None)
    return f"step {progress.step}/{progress.total}" if progress is not None and progress.total else ""
