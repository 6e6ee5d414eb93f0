"""The `loraserve` command: `generate` here, and every command another installed distribution adds.

The server distribution adds serve, gateway, demo, make-tiny-model, serve-config and keys as
entry points of the `loraserve.commands` group, each named after its command: a function that takes
this parser's subparsers, adds its own and sets `run` (argparse.Namespace -> exit status) on it.
With only this client installed, those commands say which distribution to install.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from collections.abc import Sequence
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from loraserve.request.schema import IMAGE_SIZE_PRESETS
from loraserve.v1 import flux_pb2, types_pb2

COMMANDS_GROUP = "loraserve.commands"
# The commands the server distribution adds, named when it is not installed.
SERVER_COMMANDS = ("serve", "gateway", "demo", "make-tiny-model", "serve-config", "keys")
SERVER_INSTALL = "pip install loraserve; from a checkout of the repository: pip install ./clients/python ."
# `generate --endpoint`: the members of fal's fal-ai/lora family (fal-ai/lora/image-to-image, …).
FAL_ENDPOINTS = {
    "text-to-image": types_pb2.ENDPOINT_UNSPECIFIED,
    "image-to-image": types_pb2.ENDPOINT_IMAGE_TO_IMAGE,
    "inpaint": types_pb2.ENDPOINT_INPAINT,
}
# `generate --app`: fal-ai/lora (its member picked by --endpoint) or a member of FLUX.1's fal-ai/flux-lora family.
FAL_APPS = ("fal-ai/lora", "fal-ai/flux-lora", "fal-ai/flux-lora/image-to-image", "fal-ai/flux-lora/inpainting")
# fal-ai/lora's options that a FLUX request has no field for (it runs on the server's `flux_model`).
NOT_FOR_FLUX = {"model": "--model", "negative_prompt": "--negative-prompt"}


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
    commands = _installed_commands()
    parser = argparse.ArgumentParser(
        prog="loraserve",
        description=__doc__.splitlines()[0],
        epilog=None if commands else f"server commands ({', '.join(SERVER_COMMANDS)}): {SERVER_INSTALL}",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate images through the gRPC API")
    gen.add_argument("prompt", nargs="?", help="required unless --input gives one")
    gen.add_argument(
        "--input",
        type=Path,
        metavar="REQUEST.json",
        help="a request body as fal's API takes it (fal-ai/lora JSON); the other options override its fields",
    )
    gen.add_argument("--endpoint", choices=list(FAL_ENDPOINTS), default="text-to-image", help="which of fal-ai/lora's family")
    gen.add_argument(
        "--app",
        choices=FAL_APPS,
        default="fal-ai/lora",
        help="whose request body this is; FLUX.1 requests run on the server's flux_model (no --model)",
    )
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
    gen.set_defaults(run=_generate)
    for command in commands:
        command.load()(sub)
    return parser


def _installed_commands() -> list[EntryPoint]:
    return sorted(entry_points(group=COMMANDS_GROUP), key=lambda command: command.name)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    if command in SERVER_COMMANDS and command not in {c.name for c in _installed_commands()}:
        print(
            f"error: `loraserve {command}` comes with the server distribution (loraserve), which is not installed "
            f"here; install it beside this client: {SERVER_INSTALL}",
            file=sys.stderr,
        )
        return 2
    args = build_parser().parse_args(argv)
    return int(args.run(args))


def refused_for_flux(args: argparse.Namespace) -> list[str]:
    """fal-ai/lora's options given with a FLUX app: refused rather than ignored, as no FLUX field takes them."""
    if args.app == FAL_APPS[0]:
        return []
    refused = [option for name, option in NOT_FOR_FLUX.items() if getattr(args, name) is not None]
    if args.endpoint != "text-to-image":
        refused.append("--endpoint (the sub-path of --app picks the member)")
    return refused


def build_input(args: argparse.Namespace, request: dict[str, object]) -> types_pb2.GenerateInput | flux_pb2.FluxInput:
    """`request` (--input's body) with the options given over its fields, read as the body of `--app`: the same
    reading of fal's JSON as the gateway's HTTP side, unknown or mistyped fields named (InvalidInput)."""
    from loraserve.request import flux
    from loraserve.request.fal_json import parse_input

    is_flux = args.app != FAL_APPS[0]
    given = {
        "model_name": args.model,
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "loras": args.lora or None,
        "image_size": args.size,
        "output_format" if is_flux else "image_format": args.format,
        "seed": args.seed,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "num_images": args.num_images,
    }
    body = {**request, **{k: v for k, v in given.items() if v is not None}}
    if is_flux:
        endpoint = flux.endpoint_for(args.app.removeprefix(flux.APP_ID))
        assert endpoint is not None, "FAL_APPS are flux.ENDPOINTS' paths"
        return flux.parse_flux_input(body, endpoint)
    return parse_input(body, FAL_ENDPOINTS[args.endpoint])


def _generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from loraserve.client import Client, LoraServeError
    from loraserve.request.violations import InvalidInput
    from loraserve.v1 import generation_pb2

    request: dict[str, object] = json.loads(args.input.read_text()) if args.input else {}
    if not isinstance(request, dict):
        print(f"error: {args.input} must hold a JSON object", file=sys.stderr)
        return 2
    refused = refused_for_flux(args)
    if refused:
        print(f"error: {', '.join(refused)}: not for {args.app}", file=sys.stderr)
        return 2
    try:
        inp = build_input(args, request)
    except InvalidInput as exc:
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


if __name__ == "__main__":
    sys.exit(main())
