"""loraserve.cli with the server's commands (entrypoints/): argument parsers (`--lora PATH[:SCALE]`,
`--size PRESET|WxH`, subcommands) and the server logs (core.logs)."""

from __future__ import annotations

import argparse
import json
import logging
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from loraserve.cli import COMMANDS_GROUP, SERVER_COMMANDS, build_input, build_parser, main, parse_lora, parse_size
from loraserve.v1 import flux_pb2, types_pb2
from core.config import Settings
from core.logs import ConsoleFormatter, RequestLines

LORAS: list[tuple[str, dict[str, Any]]] = [
    ("style.safetensors", {"path": "style.safetensors"}),
    ("style.safetensors:0.5", {"path": "style.safetensors", "scale": 0.5}),
    ("/abs/dir/style.safetensors:-1", {"path": "/abs/dir/style.safetensors", "scale": -1.0}),
    ("org/repo:2", {"path": "org/repo", "scale": 2.0}),
    ("http://host/x.safetensors", {"path": "http://host/x.safetensors"}),
    ("https://host/a/b/x.safetensors", {"path": "https://host/a/b/x.safetensors"}),
    ("http://host:8080/x.safetensors", {"path": "http://host:8080/x.safetensors"}),
    ("http://host:8080/x.safetensors:0.7", {"path": "http://host:8080/x.safetensors", "scale": 0.7}),
    ("http://host/x.safetensors:1e-1", {"path": "http://host/x.safetensors", "scale": 0.1}),
    ("name:with:colons", {"path": "name:with:colons"}),
]


@pytest.mark.parametrize(("value", "expected"), LORAS, ids=[v for v, _ in LORAS])
def test_parse_lora(value: str, expected: dict[str, Any]) -> None:
    assert parse_lora(value) == expected


SIZES: list[tuple[str, Any]] = [
    ("square_hd", "square_hd"),
    ("landscape_16_9", "landscape_16_9"),
    ("512x768", {"width": 512, "height": 768}),
    ("1024X576", {"width": 1024, "height": 576}),
    ("64x64", {"width": 64, "height": 64}),
]


@pytest.mark.parametrize(("value", "expected"), SIZES, ids=[v for v, _ in SIZES])
def test_parse_size(value: str, expected: Any) -> None:
    assert parse_size(value) == expected


BAD_SIZES = ["", "huge", "SQUARE_HD", "512", "512x", "x512", "512x768x2", "-512x768", "512.0x768", " 512x768", "512 x 768", "axb"]


@pytest.mark.parametrize("value", BAD_SIZES, ids=repr)
def test_parse_size_bad_value(value: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="--size must be one of"):
        parse_size(value)


@pytest.mark.parametrize("value", ["²x8", "8x³"])
def test_parse_size_non_decimal_digits(value: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=f"--size must be one of .* or WxH, got {value!r}"):
        parse_size(value)


def test_generate_command_uses_both_parsers() -> None:
    args = build_parser().parse_args(
        ["generate", "a house", "--model", "org/m", "--lora", "a.safetensors:0.5", "--lora", "http://h:1/b", "--size", "640x480"]
    )
    assert args.lora == [{"path": "a.safetensors", "scale": 0.5}, {"path": "http://h:1/b"}]
    assert args.size == {"width": 640, "height": 480}
    # Unset: fal's default (square_hd) or what --input's request says.
    assert build_parser().parse_args(["generate", "p", "--model", "m"]).size is None


def test_generate_input_takes_fal_json_and_names_its_bad_fields(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"model_name": "m", "prompt": "p", "image_size": {"width": 64}, "colour": "red"}))
    assert main(["generate", "--input", str(request), "--target", "127.0.0.1:1"]) == 1
    err = capsys.readouterr().err
    assert "input.image_size.height: field required" in err and "input.colour: extra fields not permitted" in err


def test_generate_sends_a_flux_request_for_a_flux_app(tmp_path: Path) -> None:
    request = {"image_url": "https://h/a.png", "mask_url": "https://h/m.png", "strength": 0.6}
    args = build_parser().parse_args(
        ["generate", "a fox", "--app", "fal-ai/flux-lora/inpainting", "--lora", "f.safetensors:0.8", "--format", "png",
         "--steps", "4", "--seed", "7"]
    )
    inp = build_input(args, request)
    assert isinstance(inp, flux_pb2.FluxInput)
    assert (inp.endpoint, inp.prompt, inp.image_url, inp.mask_url, round(inp.strength, 3)) == (
        flux_pb2.FLUX_ENDPOINT_INPAINTING, "a fox", "https://h/a.png", "https://h/m.png", 0.6
    )
    assert (inp.num_inference_steps, inp.seed, inp.output_format) == (4, 7, "png")
    assert [(lora.path, round(lora.scale, 3)) for lora in inp.loras] == [("f.safetensors", 0.8)]
    plain = build_input(build_parser().parse_args(["generate", "a fox", "--app", "fal-ai/flux-lora"]), {})
    assert isinstance(plain, flux_pb2.FluxInput) and plain.endpoint == flux_pb2.FLUX_ENDPOINT_UNSPECIFIED
    # fal-ai/lora stays the default.
    sd = build_input(build_parser().parse_args(["generate", "a fox", "--model", "m", "--format", "png"]), {})
    assert isinstance(sd, types_pb2.GenerateInput) and sd.model_name == "m"


def test_generate_refuses_fal_ai_lora_options_for_a_flux_app(capsys: pytest.CaptureFixture[str]) -> None:
    """A FLUX request runs on the server's flux_model: a --model would be silently ignored, so it is refused."""
    argv = ["generate", "p", "--app", "fal-ai/flux-lora", "--model", "m", "--endpoint", "inpaint"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "--endpoint" in err and "not for fal-ai/flux-lora" in err


def test_generate_command_rejects_bad_size(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["generate", "p", "--model", "m", "--size", "big"])
    assert caught.value.code == 2
    assert "--size must be one of" in capsys.readouterr().err


def test_help_lists_generate_and_every_command_the_server_distribution_adds(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import distribution

    # The server's commands reach the client's `loraserve` only through its entry points.
    registered = {e.name for e in distribution("loraserve").entry_points if e.group == COMMANDS_GROUP}
    assert registered == set(SERVER_COMMANDS)
    with pytest.raises(SystemExit) as caught:
        main(["--help"])
    assert caught.value.code == 0
    listed = capsys.readouterr().out
    assert all(f"\n    {command} " in listed for command in ("generate", *SERVER_COMMANDS)), listed


def test_gateway_and_serve_commands_take_settings_and_verbose() -> None:
    args = build_parser().parse_args(["gateway", "--serve-grpc-host", "workers.svc", "--serve-grpc-port", "9001"])
    settings = Settings.from_args(args, env={})
    assert (args.command, args.verbose) == ("gateway", False)
    assert (settings.serve_grpc_host, settings.serve_grpc_port) == ("workers.svc", 9001)
    assert build_parser().parse_args(["serve", "--verbose"]).verbose is True


def test_a_bad_setting_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["gateway", "--shutdown-grace-seconds", "soon"])
    assert caught.value.code == 2
    assert "shutdown_grace_seconds" in capsys.readouterr().err


def _record(name: str, level: int, msg: str, exc_info: Any = None, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord(name, level, __file__, 1, msg, (), exc_info)
    record.__dict__.update(extra)
    return record


def test_console_lines_carry_extras_and_levels_from_warning_up() -> None:
    formatter = ConsoleFormatter(tracebacks=False)
    info = formatter.format(_record("gateway.server", logging.INFO, "gateway started", grpc_port=50051))
    assert info.endswith(" gateway started grpc_port=50051") and "INFO" not in info
    assert " WARNING worker call failed" in formatter.format(_record("gateway.dispatcher", logging.WARNING, "worker call failed"))


def test_console_shows_an_error_in_one_line_unless_tracebacks_are_asked_for() -> None:
    try:
        raise RuntimeError("the current node timed out")
    except RuntimeError:
        record = _record("loraserve", logging.ERROR, "loraserve serve failed", exc_info=sys.exc_info())
    short = ConsoleFormatter(tracebacks=False).format(record)
    assert short.endswith("loraserve serve failed (RuntimeError: the current node timed out)")
    assert "Traceback" not in short
    assert "Traceback" in ConsoleFormatter(tracebacks=True).format(record)


LOGGING_SCRIPT = """
import logging, os, sys
from pathlib import Path
from core.logs import setup_logging
setup = setup_logging(Path(sys.argv[1]), verbose=sys.argv[2] == "verbose")
logging.getLogger("gateway.server").info("gateway started")
logging.getLogger("ray.serve").info("library chatter")
logging.getLogger("ray.serve").warning("library warning")
logging.getLogger("ray").error("library error")
os.write(2, b"raw stderr from C\\n")
print("raw stdout")
"""


def _run_logging_script(data_dir: Path, mode: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", LOGGING_SCRIPT, str(data_dir), mode], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def test_console_keeps_own_lines_and_errors_the_rest_goes_to_data_dir_logs(tmp_path: Path) -> None:
    console = _run_logging_script(tmp_path, "quiet")
    assert "gateway started" in console and "library error" in console
    for chatter in ("library chatter", "library warning", "raw stderr from C", "raw stdout"):
        assert chatter not in console
    records = [json.loads(line) for line in (tmp_path / "logs" / "loraserve.log").read_text().splitlines()]
    assert [r["msg"] for r in records] == ["gateway started", "library chatter", "library warning", "library error"]
    output = (tmp_path / "logs" / "output.log").read_text()
    assert "raw stderr from C" in output and "raw stdout" in output


def test_verbose_console_shows_everything(tmp_path: Path) -> None:
    console = _run_logging_script(tmp_path, "verbose")
    for line in ("gateway started", "library chatter", "library warning", "library error", "raw stderr from C"):
        assert line in console
    assert not (tmp_path / "logs" / "output.log").exists()


LEFTOVER = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"]


def test_end_processes_kills_what_ignores_sigterm() -> None:
    import psutil

    from serving import runtime

    stubborn = subprocess.Popen(LEFTOVER)
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        processes = [psutil.Process(stubborn.pid), psutil.Process(polite.pid)]
        assert runtime.end_processes(processes) == 2
        # end_processes reaped them (Popen.wait would only see 0); one ignored SIGTERM, so SIGKILL ended it.
        assert not any(p.is_running() for p in processes)
        assert runtime.end_processes(processes) == 0
    finally:
        for process in (stubborn, polite):
            process.kill()
            process.wait()


class FailingRayInit:
    """ray.init that leaves a process behind and times out `failures` times, then succeeds."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[dict[str, Any]] = []
        self.leftovers: list[subprocess.Popen[bytes]] = []

    def __call__(self, **kwargs: Any) -> None:
        self.calls.append(kwargs)
        if len(self.calls) <= self.failures:
            self.leftovers.append(subprocess.Popen(LEFTOVER))
            raise Exception("The current node timed out during startup.")


@pytest.fixture
def ray_init(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int], FailingRayInit]]:
    from serving import runtime

    made: list[FailingRayInit] = []

    def make(failures: int) -> FailingRayInit:
        fake = FailingRayInit(failures)
        monkeypatch.setattr(runtime.ray, "init", fake)
        monkeypatch.setattr(runtime, "TERMINATE_SECONDS", 0.5)
        made.append(fake)
        return fake

    yield make
    for fake in made:
        for process in fake.leftovers:
            process.kill()
            process.wait()


def test_a_timed_out_ray_start_is_cleaned_up_and_tried_again(
    ray_init: Callable[[int], FailingRayInit], caplog: pytest.LogCaptureFixture
) -> None:
    import psutil

    from serving import runtime

    fake = ray_init(2)
    runtime._start_ray(Settings(ray_start_attempts=3, ray_num_cpus=2))
    assert len(fake.calls) == 3
    assert fake.calls[0] == {"address": None, "include_dashboard": False, "num_cpus": 2}
    # What each failed attempt left running (ignoring SIGTERM) was ended before the next one.
    assert not any(psutil.pid_exists(process.pid) for process in fake.leftovers)
    assert [r.getMessage() for r in caplog.records if r.name == "serving.runtime"] == ["Ray did not start"] * 2


def test_ray_that_never_starts_says_what_failed(ray_init: Callable[[int], FailingRayInit]) -> None:
    from serving import runtime

    fake = ray_init(5)
    with pytest.raises(runtime.WorkersStartError) as failed:
        runtime._start_ray(Settings(ray_start_attempts=2))
    assert len(fake.calls) == 2
    assert str(failed.value) == (
        "starting a local Ray node failed 2 time(s):\n"
        "  attempt 1/2: Exception: The current node timed out during startup.\n"
        "  attempt 2/2: Exception: The current node timed out during startup."
    )


def test_request_lines_follow_a_request_by_quarters(caplog: pytest.LogCaptureFixture) -> None:
    lines = RequestLines(logging.getLogger("gateway.dispatcher"))
    with caplog.at_level(logging.INFO):
        lines.started("r1", 1)
        for step in (1, 3, 9, 10, 11, 24, 40):  # the worker's progress events skip steps
            lines.progress("r1", step, 40)
        lines.completed("r1", 2.345)
        lines.forget("r1")
        lines.progress("r2", 5, 0)
        lines.failed("r2", "WORKER_FAILED: replica died")
        lines.back_in_queue("r3", "not finished within the shutdown grace")
    assert [(r.getMessage(), getattr(r, "step", None)) for r in caplog.records] == [
        ("request started", None),
        ("request progress", "10/40"),
        ("request progress", "24/40"),
        ("request progress", "40/40"),
        ("request completed", None),
        ("request failed", None),
        ("request back in the queue", None),
    ]
    assert caplog.records[-3].__dict__["seconds"] == 2.35 and caplog.records[-2].levelno == logging.WARNING


def test_a_taken_port_fails_the_start_before_anything_runs(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "loraserve.cli", "gateway", "--data-dir", str(tmp_path), "--http-port", "0",
             "--grpc-port", str(port)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert result.returncode == 1
    assert f"already in use: 127.0.0.1:{port} (grpc_port); is another loraserve running?" in result.stderr
    assert "gateway started" not in result.stderr
