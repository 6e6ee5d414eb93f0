"""loraserve.cli argument parsers: `--lora PATH[:SCALE]` and `--size PRESET|WxH`."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from loraserve.cli import build_parser, parse_lora, parse_size

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
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(value)


def test_generate_command_uses_both_parsers() -> None:
    args = build_parser().parse_args(
        ["generate", "a house", "--model", "org/m", "--lora", "a.safetensors:0.5", "--lora", "http://h:1/b", "--size", "640x480"]
    )
    assert args.lora == [{"path": "a.safetensors", "scale": 0.5}, {"path": "http://h:1/b"}]
    assert args.size == {"width": 640, "height": 480}
    assert build_parser().parse_args(["generate", "p", "--model", "m"]).size == "square_hd"


def test_generate_command_rejects_bad_size(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["generate", "p", "--model", "m", "--size", "big"])
    assert caught.value.code == 2
    assert "--size must be one of" in capsys.readouterr().err
