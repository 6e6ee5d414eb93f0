"""The `loraserve` command: serve, gateway, generate, make-tiny-model, demo, serve-config.

Settings come from `LORASERVE_*` env vars with flags over them (core.config).
Heavy imports (torch, Ray, diffusers) happen inside the subcommands that need them, so
`loraserve generate` stays a light gRPC client.

`serve` and `gateway` stop the same way on SIGTERM (Kubernetes, systemd) and SIGINT (Ctrl-C):
new requests are refused, running ones get `shutdown_grace_seconds` to finish and go back to
the queue after that, then Serve and Ray go down; the exit status is 0.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import logging
import signal
import socket
import sys
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from loraserve import keys_cli
from core.config import Settings
from loraserve.schema import IMAGE_SIZE_PRESETS
from loraserve.v1 import types_pb2

log = logging.getLogger("loraserve")
# `generate --endpoint`: the members of fal's fal-ai/lora family (fal-ai/lora/image-to-image, …).
FAL_ENDPOINTS = {
    "text-to-image": types_pb2.ENDPOINT_UNSPECIFIED,
    "image-to-image": types_pb2.ENDPOINT_IMAGE_TO_IMAGE,
    "inpaint": types_pb2.ENDPOINT_INPAINT,
}


def parse_lora(value: str) -> dict[str, object]:
    """`PATH[:SCALE]`; a colon that is not followed by a number stays in the path (URLs)."""
    path, sep, scale = value.rpartition(":")
    if sep:
        try:
            return {"path": path, "scale": float(scale)}
        except ValueError:
            pass
    return {"path": value}


def parse_size(value: str) -> str | dict[str, int]:
    if value in IMAGE_SIZE_PRESETS:
        return value
    width, sep, height = value.lower().partition("x")
    if not sep or not (width.isascii() and width.isdigit() and height.isascii() and height.isdigit()):
        raise argparse.ArgumentTypeError(f"--size must be one of {', '.join(IMAGE_SIZE_PRESETS)} or WxH, got {value!r}")
    return {"width": int(width), "height": int(height)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="gateway + local Ray + Serve workers + local storage on one machine")
    _add_verbose(serve)
    Settings.add_arguments(serve)

    gateway = sub.add_parser(
        "gateway", help="only the gateway, in front of a running Serve gRPC ingress (SERVE_GRPC_HOST:SERVE_GRPC_PORT)"
    )
    _add_verbose(gateway)
    Settings.add_arguments(gateway)

    gen = sub.add_parser("generate", help="generate images through the gRPC API")
    gen.add_argument("prompt", nargs="?", help="required unless --input gives one")
    gen.add_argument(
        "--input",
        type=Path,
        metavar="REQUEST.json",
        help="a request body as fal's API takes it (fal-ai/lora JSON); the other options override its fields",
    )
    gen.add_argument("--endpoint", choices=list(FAL_ENDPOINTS), default="text-to-image", help="which of fal-ai/lora's family")
    gen.add_argument("--model", help="Hugging Face ID, URL or path of the base model (required unless --input gives one)")
    gen.add_argument("--lora", action="append", default=[], type=parse_lora, metavar="PATH[:SCALE]")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--size", type=parse_size, help="preset or WxH (default square_hd)")
    gen.add_argument("--steps", type=int)
    gen.add_argument("--guidance-scale", type=float)
    gen.add_argument("--negative-prompt")
    gen.add_argument("--num-images", type=int)
    gen.add_argument("--format", choices=["png", "jpeg"])
    gen.add_argument("--out", type=Path, default=Path("."), help="folder for the images")
    gen.add_argument("--target", default="127.0.0.1:50051", help="gateway gRPC address")

    tiny = sub.add_parser("make-tiny-model", help="random-weight pipeline + LoRAs, for demos and tests")
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--family", choices=["sdxl", "sd15"], default="sdxl")
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

    demo = sub.add_parser("demo", help="the whole path once: serve, make a tiny model, generate with a LoRA")
    _add_verbose(demo)
    Settings.add_arguments(demo)

    serve_config = sub.add_parser(
        "serve-config", help="print the workers' Serve config (JSON) that these settings make: a RayService's serveConfigV2"
    )
    serve_config.add_argument("--proxy-host", default="0.0.0.0", help="address Serve's HTTP proxy listens on")
    Settings.add_arguments(serve_config)
    keys_cli.add_parser(sub)
    return parser


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's, the workers' and the libraries' output here too (default: only in DATA_DIR/logs/)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in SERVER_COMMANDS:
        try:
            settings = Settings.from_args(args)
        except ValueError as exc:
            parser.error(str(exc))
        return _run_server(args.command, settings, verbose=args.verbose)
    elif args.command == "generate":
        return _generate(args)
    elif args.command == "keys":
        return keys_cli.run(args)
    elif args.command == "make-tiny-model":
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
    elif args.command == "serve-config":

        from serving.serve_config import serve_config

        try:
            settings = Settings.from_args(args)
        except ValueError as exc:
            parser.error(str(exc))
        print(json.dumps(serve_config(settings, http_host=args.proxy_host), indent=2))
    return 0


def _tiny_fixtures(args: argparse.Namespace, pipeline_dir: Path) -> list[Path]:
    """The make-tiny-model extras for unet_name, variant, kohya LoRAs and embeddings."""
    from serving.tiny import make_tiny_embedding, make_tiny_lora, make_tiny_unet, make_tiny_variant

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


def _run_server(command: str, settings: Settings, *, verbose: bool) -> int:
    """The commands that start a service share one console: its own lines and everyone's errors."""
    from core.logs import setup_logging

    logs = setup_logging(settings.data_dir, settings.log_level, verbose=verbose)
    more = f"; Ray and library output: {logs.output_file}" if logs.output_file else ""
    log.info(f"logs: {logs.log_file}{more}")
    try:
        return asyncio.run(SERVER_COMMANDS[command](settings))
    except Exception as exc:
        # The console shows the error in a line (a traceback when verbose), the log file the traceback.
        log.error(f"loraserve {command} failed", exc_info=exc)
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
    from loraserve.embedded import EmbeddedService

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


def _generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from gateway.errors import InvalidArgument
    from gateway.fal_json import parse_input
    from loraserve.client import Client, LoraServeError
    from loraserve.v1 import generation_pb2

    request: dict[str, object] = json.loads(args.input.read_text()) if args.input else {}
    if not isinstance(request, dict):
        print(f"error: {args.input} must hold a JSON object", file=sys.stderr)
        return 2
    given = {
        "model_name": args.model,
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "loras": args.lora or None,
        "image_size": args.size,
        "image_format": args.format,
        "seed": args.seed,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "num_images": args.num_images,
    }
    request.update({k: v for k, v in given.items() if v is not None})
    try:
        # The same reading of fal's JSON as the gateway's HTTP side: unknown or mistyped fields named.
        inp = parse_input(request, FAL_ENDPOINTS[args.endpoint])
    except InvalidArgument as exc:
        print("error: invalid request", file=sys.stderr)
        for violation in exc.violations:
            print(f"  {violation.field}: {violation.description}", file=sys.stderr)
        return 1
    bar = tqdm(total=0, unit="step", desc="queued")

    def on_update(status: generation_pb2.RequestStatus) -> None:
        for entry in status.logs:
            bar.write(entry.message, file=sys.stderr)
        if status.state == generation_pb2.REQUEST_STATE_IN_QUEUE:
            bar.set_description(f"queued (position {status.queue_position})")
        elif status.HasField("progress"):
            bar.set_description("generating")
            bar.total = status.progress.total
            bar.n = status.progress.step
            bar.refresh()

    try:
        with Client(args.target) as client:
            result = client.subscribe(inp, on_queue_update=on_update, logs=True)
    except LoraServeError as exc:
        bar.close()
        print(f"error: {exc}", file=sys.stderr)
        for name, why in exc.field_violations.items():
            print(f"  {name}: {why}", file=sys.stderr)
        return 1
    bar.close()
    args.out.mkdir(parents=True, exist_ok=True)
    for image in result.data.images:
        target = args.out / image.file_name
        with urllib.request.urlopen(image.url) as response:
            target.write_bytes(response.read())
        print(f"{target}  {image.width}x{image.height}  {image.url}")
    print(f"request {result.request_id} seed {result.data.seed}")
    return 0


async def _demo(settings: Settings) -> int:
    """Start the embedded service, make a tiny SDXL model, generate with a LoRA through gRPC."""
    from loraserve.client import AsyncClient
    from loraserve.embedded import EmbeddedService
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


if __name__ == "__main__":
    sys.exit(main())
