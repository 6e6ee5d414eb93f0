"""Fetching file inputs against real HTTP(S) servers on loopback: SSRF guard, limits, images."""

from __future__ import annotations

import base64
import socket
import ssl
import struct
import threading
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import pytest
from storage_testkit import FileServer, Route, png_bytes

from core.redaction import redact_url
from storage.fetch import FetchPolicy, InputFetchError, check_url, fetch_bytes, fetch_image, open_image, post
from storage.object_store import LocalObjectStore
from tests.conftest import self_signed_cert


def test_data_uri_gives_the_same_image_as_the_same_bytes_by_url(
    file_server: FileServer, loopback_policy: FetchPolicy
) -> None:
    data = png_bytes()
    file_server.routes["/in.png"] = Route(data, headers={"Content-Type": "image/png"})
    by_url = fetch_image(file_server.url("/in.png"), "image_url", loopback_policy)
    by_base64 = fetch_image(f"data:image/png;base64,{base64.b64encode(data).decode()}", "image_url", loopback_policy)
    by_percent = fetch_image(f"data:image/png,{quote_from_bytes(data)}", "image_url", loopback_policy)
    assert by_url.mode == by_base64.mode == by_percent.mode == "RGB"
    assert by_url.size == (16, 12)
    assert by_url.tobytes() == by_base64.tobytes() == by_percent.tobytes()


@pytest.mark.parametrize(
    ("location", "why"),
    [
        ("http://10.0.0.1/x.png", "10.0.0.1 is a private address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a cloud metadata address"),
        ("http://[fd00:ec2::254]/latest/", "fd00:ec2::254 is a cloud metadata address"),
        ("http://localhost:{port}/in.png", "localhost resolves to"),
        ("http://[::ffff:127.0.0.1]:{port}/in.png", "a loopback address"),
        ("http://0.0.0.0:{port}/in.png", "an unspecified address"),
        ("file:///etc/passwd", "only http and https"),
    ],
)
def test_redirect_to_a_private_address_is_refused_before_connecting(
    file_server: FileServer, loopback_policy: FetchPolicy, location: str, why: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    file_server.routes["/in.png"] = Route(png_bytes())
    file_server.routes["/go"] = Route(status=302, headers={"Location": location.format(port=file_server.port)})
    connected: list[tuple[str, int]] = []
    connect = socket.create_connection

    def counted(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        connected.append(address)
        return connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", counted)
    with pytest.raises(InputFetchError) as caught:
        fetch_bytes(file_server.url("/go"), "image_url", loopback_policy)
    # The only connection was the one that got the redirect: nothing tried to reach the target.
    assert connected == [("127.0.0.1", file_server.port)]
    assert why in caught.value.reason
    assert caught.value.reason.startswith("redirected to ")
    assert file_server.hits["/in.png"] == 0
    assert str(caught.value).startswith(f"image_url: cannot use {file_server.url('/go')}: redirected to ")


def test_loopback_is_refused_unless_listed_or_private_networks_allowed(
    file_server: FileServer, loopback_policy: FetchPolicy
) -> None:
    file_server.routes["/in.png"] = Route(png_bytes())
    strict = replace(loopback_policy, allowed_hosts=frozenset())
    with pytest.raises(InputFetchError, match="127.0.0.1 is a loopback address; refused"):
        fetch_bytes(file_server.url("/in.png"), "image_url", strict)
    assert file_server.hits["/in.png"] == 0
    open_network = replace(strict, allow_private_networks=True)
    assert fetch_bytes(file_server.url("/in.png"), "image_url", open_network) == png_bytes()
    with pytest.raises(InputFetchError, match="cloud metadata address"):
        fetch_bytes("http://169.254.169.254/latest/meta-data/", "image_url", open_network)


@pytest.mark.parametrize(
    ("address", "why"),
    [
        # Azure's WireServer: a public address that answers only from inside Azure.
        ("168.63.129.16", "a cloud metadata address"),
        # Oracle Cloud's metadata service.
        ("192.0.0.192", "a cloud metadata address"),
        # The rest of the IETF protocol assignments block, and IPv6 site-local: not reachable on the internet.
        ("192.0.0.100", "not a public address"),
        ("fec0::1", "not a public address"),
    ],
)
def test_addresses_no_internet_file_lives_at_are_refused(
    loopback_policy: FetchPolicy, address: str, why: str
) -> None:
    """By address and through a name resolving to it, for inputs and webhooks alike (`post`, `check_url`)."""
    resolving = replace(loopback_policy, resolver=lambda host, port: [address])
    literal = f"http://[{address}]/x" if ":" in address else f"http://{address}/x"
    for url, policy in ((literal, loopback_policy), ("http://files.example/x", resolving)):
        with pytest.raises(InputFetchError, match=why):
            fetch_bytes(url, "image_url", policy)
        with pytest.raises(InputFetchError, match=why):
            check_url(url, "webhook_url", policy)
        with pytest.raises(InputFetchError, match=why):
            post(url, b"{}", {}, "webhook_url", policy)
    if why == "a cloud metadata address":
        with pytest.raises(InputFetchError, match=why):
            fetch_bytes("http://files.example/x", "image_url", replace(resolving, allow_private_networks=True))


def test_a_redirect_from_https_to_http_is_refused(tmp_path: Path, loopback_policy: FetchPolicy) -> None:
    cert_file, key_file = self_signed_cert("files.test", tmp_path)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert_file, key_file)
    secure, plain = FileServer(tls=server_tls), FileServer()
    plain.routes["/in.png"] = Route(png_bytes())
    secure.routes["/in.png"] = Route(png_bytes())
    secure.start()
    plain.start()
    try:
        secure.routes["/down"] = Route(status=302, headers={"Location": plain.url("/in.png")})
        secure.routes["/same"] = Route(status=302, headers={"Location": "/in.png"})
        policy = replace(
            loopback_policy,
            allowed_hosts=frozenset({"files.test", "127.0.0.1"}),
            resolver=lambda host, port: ["127.0.0.1"],
            ssl_context=ssl.create_default_context(cafile=str(cert_file)),
        )
        base = f"https://files.test:{secure.port}"
        with pytest.raises(InputFetchError, match="downgrade to plain http is refused"):
            fetch_bytes(f"{base}/down", "image_url", policy)
        assert plain.hits["/in.png"] == 0
        # https to https still follows; plain http may still redirect to plain http.
        assert fetch_bytes(f"{base}/same", "image_url", policy) == png_bytes()
    finally:
        secure.stop()
        plain.stop()


def test_a_name_resolving_to_any_private_address_is_refused(loopback_policy: FetchPolicy) -> None:
    policy = replace(loopback_policy, resolver=lambda host, port: ["93.184.216.34", "10.1.2.3"])
    with pytest.raises(InputFetchError, match=r"images\.example resolves to 10\.1\.2\.3, which is a private address"):
        fetch_bytes("http://images.example/a.png", "image_url", policy)


def test_connects_to_the_checked_address_and_sends_the_host_name(
    file_server: FileServer, loopback_policy: FetchPolicy
) -> None:
    lookups: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        lookups.append(host)
        return ["127.0.0.1"]

    file_server.routes["/in.png"] = Route(png_bytes())
    policy = replace(loopback_policy, resolver=resolver, allowed_hosts=frozenset({"files.test"}))
    assert fetch_bytes(file_server.url("/in.png", host="files.test"), "image_url", policy) == png_bytes()
    assert lookups == ["files.test"]
    assert file_server.host_headers == [f"files.test:{file_server.port}"]


def test_redirect_chain_is_capped(file_server: FileServer, loopback_policy: FetchPolicy) -> None:
    file_server.routes["/loop"] = Route(status=307, headers={"Location": "/loop"})
    with pytest.raises(InputFetchError, match="more than 3 redirects"):
        fetch_bytes(file_server.url("/loop"), "image_url", loopback_policy)
    assert file_server.hits["/loop"] == 4


def test_a_relative_redirect_is_followed(file_server: FileServer, loopback_policy: FetchPolicy) -> None:
    file_server.routes["/old"] = Route(status=301, headers={"Location": "/new.png"})
    file_server.routes["/new.png"] = Route(png_bytes())
    assert fetch_bytes(file_server.url("/old"), "image_url", loopback_policy) == png_bytes()


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "file:///etc/passwd", "gopher://example.com/"])
def test_only_http_and_https_urls_are_accepted(url: str, loopback_policy: FetchPolicy) -> None:
    with pytest.raises(InputFetchError, match="only http and https URLs are accepted"):
        fetch_bytes(url, "image_url", loopback_policy)


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversize_download_is_refused(file_server: FileServer, loopback_policy: FetchPolicy, chunked: bool) -> None:
    file_server.routes["/big"] = Route(b"x" * 1_200_000, chunked=chunked)
    expected = "the file is 1200000 bytes, more than" if not chunked else "the file is more than the limit"
    with pytest.raises(InputFetchError, match=expected):
        fetch_bytes(file_server.url("/big"), "image_url", loopback_policy)


def test_a_slow_server_times_out(file_server: FileServer, loopback_policy: FetchPolicy) -> None:
    """The server answers only when the test lets it, after the client has given up on its own."""
    answer = threading.Event()
    file_server.routes["/slow.png"] = Route(png_bytes(), hold=answer)
    try:
        with pytest.raises(InputFetchError, match=r"no answer within 0\.5 s"):
            fetch_bytes(file_server.url("/slow.png"), "image_url", loopback_policy)
    finally:
        answer.set()
    assert file_server.hits["/slow.png"] == 1


def test_a_dribbling_server_hits_the_total_deadline(file_server: FileServer, loopback_policy: FetchPolicy) -> None:
    """A hundred 4 KiB pieces 0.2 s apart, each within the 0.5 s read timeout: the client stops at its 0.7 s."""
    file_server.routes["/drip"] = Route(b"x" * 409_600, chunked=True, piece_delay_seconds=0.2)
    policy = replace(loopback_policy, total_timeout_seconds=0.7)
    with pytest.raises(InputFetchError, match=r"the transfer took longer than 0\.7 s"):
        fetch_bytes(file_server.url("/drip"), "image_url", policy)
    # Counted when the client gave up (the server stops at its next writes to the closed connection).
    assert file_server.pieces_sent["/drip"] < 50


def test_errors_name_the_field_and_a_redacted_url(file_server: FileServer, loopback_policy: FetchPolicy) -> None:
    with pytest.raises(InputFetchError) as caught:
        fetch_bytes(file_server.url("/missing.png?X-Amz-Signature=s3cret"), "loras[1].path", loopback_policy)
    assert (
        str(caught.value)
        == f"loras[1].path: cannot use {file_server.url('/missing.png')}: the server answered 404 Not Found"
    )
    assert redact_url("https://user:pa55@host.example/a.png?token=t#frag") == "https://host.example/a.png"
    with pytest.raises(InputFetchError, match="user name or password"):
        fetch_bytes("http://user:pa55@127.0.0.1/a.png", "image_url", loopback_policy)


def test_data_uri_limits(loopback_policy: FetchPolicy) -> None:
    policy = replace(loopback_policy, max_data_uri_bytes=1000)
    too_big = "data:image/png;base64," + base64.b64encode(b"\0" * 1001).decode()
    with pytest.raises(InputFetchError, match="larger than the limit of 1000 bytes") as caught:
        fetch_bytes(too_big, "image_url", policy)
    assert "AAAA" not in str(caught.value)
    with pytest.raises(InputFetchError, match="not valid base64"):
        fetch_bytes("data:image/png;base64,@@@@", "image_url", policy)
    with pytest.raises(InputFetchError, match="needs a comma"):
        fetch_bytes("data:image/png;base64", "image_url", policy)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a huge size but holds a few bytes of pixel data: a bomb's header."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_refused_from_its_header(file_server: FileServer, loopback_policy: FetchPolicy) -> None:
    file_server.routes["/bomb.png"] = Route(_png_header_only(9_000, 9_000))
    with pytest.raises(InputFetchError, match=r"9000x9000 = 81000000 pixels, more than the limit of 65536"):
        fetch_image(file_server.url("/bomb.png"), "image_url", loopback_policy)
    # Past Pillow's own hard limit (2 x MAX_IMAGE_PIXELS) it is still our clear error.
    with pytest.raises(InputFetchError, match="more than 65536 pixels"):
        open_image(_png_header_only(20_000, 20_000), "image_url", loopback_policy)
    with pytest.raises(InputFetchError, match="257x256"):
        open_image(png_bytes((257, 256)), "image_url", loopback_policy)


def test_non_images_and_damaged_images_are_refused(loopback_policy: FetchPolicy) -> None:
    with pytest.raises(InputFetchError, match="not an image in a supported format"):
        open_image(b"<html>hello</html>", "mask_url", loopback_policy, url="https://example.com/a.png")
    with pytest.raises(InputFetchError, match="damaged or truncated"):
        open_image(png_bytes((64, 64))[:-40], "mask_url", loopback_policy)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    with pytest.raises(InputFetchError, match="not an image in a supported format"):
        open_image(eps, "mask_url", loopback_policy)


def test_own_stored_files_are_read_from_the_store_without_http(tmp_path: Path, loopback_policy: FetchPolicy) -> None:
    store = LocalObjectStore(tmp_path, "http://files.invalid:1")
    stored = store.put("uploads/abc/in.png", png_bytes(), "image/png")
    assert fetch_bytes(stored.url, "image_url", loopback_policy, store=store) == png_bytes()
    with pytest.raises(InputFetchError, match="no such stored file"):
        fetch_bytes(store.url("uploads/abc/other.png"), "image_url", loopback_policy, store=store)
    with pytest.raises(InputFetchError, match="cannot resolve host"):
        fetch_bytes(stored.url, "image_url", loopback_policy)


def test_https_checks_the_certificate_against_the_host_name_not_the_address(
    tmp_path: Path, loopback_policy: FetchPolicy
) -> None:
    cert_file, key_file = self_signed_cert("files.test", tmp_path)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert_file, key_file)
    server = FileServer(tls=server_tls)
    server.routes["/in.png"] = Route(png_bytes())
    server.start()
    try:
        policy = replace(
            loopback_policy,
            allowed_hosts=frozenset({"files.test", "other.test"}),
            resolver=lambda host, port: ["127.0.0.1"],
            ssl_context=ssl.create_default_context(cafile=str(cert_file)),
        )
        url = f"https://files.test:{server.port}/in.png"
        assert fetch_bytes(url, "image_url", policy) == png_bytes()
        with pytest.raises(InputFetchError, match="TLS failed"):
            fetch_bytes(f"https://other.test:{server.port}/in.png", "image_url", policy)
    finally:
        server.stop()


def test_files_of_one_request_share_its_input_deadline(file_server: FileServer, loopback_policy: FetchPolicy) -> None:
    """Each dribbling file stays inside its own transfer limit; together they pass the request's deadline."""
    from storage.fetch import input_deadline

    # Eight 4 KiB pieces 0.3 s apart: 2.4 s a file, well inside its own 30 s.
    file_server.routes["/drip"] = Route(b"x" * 32_768, chunked=True, piece_delay_seconds=0.3)
    policy = replace(loopback_policy, total_timeout_seconds=30)
    with input_deadline(3.6):
        fetch_bytes(file_server.url("/drip"), "loras[0].path", policy)
        with pytest.raises(InputFetchError, match=r"resolving the request's inputs took longer than 3\.6 s") as late:
            fetch_bytes(file_server.url("/drip"), "loras[1].path", policy)
    assert late.value.field == "loras[1].path"
    # Outside the block the per-transfer limit alone applies again.
    assert len(fetch_bytes(file_server.url("/drip"), "loras[2].path", policy)) == 32_768
