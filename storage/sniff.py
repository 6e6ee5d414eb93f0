"""Telling what a file is from its first bytes, because names and declared types come from callers."""

from __future__ import annotations

SNIFF_BYTES = 64
SAFETENSORS_CONTENT_TYPE = "application/x-safetensors"
# The safetensors format itself refuses headers larger than this.
MAX_SAFETENSORS_HEADER_BYTES = 100 * 1024 * 1024

_IMAGE_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


def looks_like_safetensors(head: bytes, size: int | None = None) -> bool:
    """An 8-byte little-endian header length, then a JSON object; pickle zips and tar files fail this."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    header_length = int.from_bytes(head[:8], "little")
    fits = size is None or header_length + 8 <= size
    return 2 <= header_length <= MAX_SAFETENSORS_HEADER_BYTES and fits


def sniff_content_type(head: bytes) -> str | None:
    """The type the bytes prove, or None when they prove nothing (then the caller decides)."""
    for magic, content_type in _IMAGE_MAGIC:
        if head.startswith(magic):
            return content_type
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if looks_like_safetensors(head):
        return SAFETENSORS_CONTENT_TYPE
    if _looks_like_json(head):
        return "application/json"
    return None


def _looks_like_json(head: bytes) -> bool:
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n")
    if text[:1] not in (b"{", b"["):
        return False
    try:
        text.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut off by the sniff window is still UTF-8.
        return exc.start >= len(text) - 3
    return True
