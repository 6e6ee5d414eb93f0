"""Fetching caller-supplied file inputs without letting callers reach into the network.

A URL in a request is an instruction from a stranger to make this machine open a
connection. So: http/https only; the host is resolved once, every address it resolves to
is checked (private, loopback, link-local, metadata, ... refused unless the operator
allows them) and the connection goes to that checked address, never to a second DNS
answer (DNS rebinding); redirects are followed by hand so every hop is checked the same
way before anything connects; sizes and times are capped. `data:` URIs and this
service's own stored files are read without any HTTP at all.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import quote, unquote, unquote_to_bytes, urljoin, urlsplit

import PIL.Image

from core import tracing
from core.redaction import redact_url
from storage.object_store import InvalidKey, ObjectNotFound

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]
ProgressCallback = Callable[[int, int | None], None]

# Cloud metadata and platform services, refused even with allow_private_networks: AWS/GCP/Azure/OCI
# 169.254.169.254 and AWS's neighbours (time sync, DNS, ECS/EKS credentials), AWS's IPv6 fd00:ec2::,
# Alibaba 100.100.100.200, Azure's WireServer 168.63.129.16 (a public address), Oracle's 192.0.0.192.
METADATA_NETWORKS: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = tuple(
    ipaddress.ip_network(network)
    for network in (
        "169.254.169.0/24",
        "169.254.170.0/24",
        "fd00:ec2::/64",
        "100.100.100.200/32",
        "168.63.129.16/32",
        "192.0.0.192/32",
    )
)
# Not globally reachable by IANA's special-purpose registries, yet `is_global` in the Pythons this runs on
# says they are: the IETF protocol assignments block (newer Pythons fix this; its two anycast addresses,
# 192.0.0.9 and .10, serve no files either).
_NOT_GLOBAL_NETWORKS = (ipaddress.ip_network("192.0.0.0/24"),)
# The only IPv6 addresses routed on the internet; the rest (site-local fec0::/10, local-use NAT64, ...) is not.
_IPV6_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
_NAT64_PREFIX = ipaddress.ip_network("64:ff9b::/96")
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
READ_CHUNK_BYTES = 64 * 1024
# Formats decoded by Pillow's own code; others (EPS runs Ghostscript) are never opened.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
USER_AGENT = "loraserve-fetch/1"
# Characters left as they are when re-quoting a path callers wrote with spaces etc.
_SAFE_URL_CHARS = "/%:@!$&'()*+,;=-._~"
# The one answer for a stored file a request may not use, whether it is missing or another tenant's.
NO_SUCH_STORED_FILE = "no such stored file (never uploaded, or deleted)"


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class FetchPolicy:
    """Limits for one kind of input (images and weights need different sizes).

    `timeout_seconds` bounds the connect and every read; `total_timeout_seconds` the whole
    transfer, so a server dribbling bytes cannot hold a worker. `allowed_hosts` are host
    names or IP literals, matched as written in the URL (not after DNS), that may resolve
    to private addresses: an operator's own file server, or loopback in tests. Cloud
    metadata addresses are refused even with `allow_private_networks`; only naming the
    host in `allowed_hosts` lets one through. `resolver` and `ssl_context` exist for tests
    and private CAs.
    """

    max_bytes: int = 50 * 1024 * 1024
    max_data_uri_bytes: int = 20 * 1024 * 1024
    timeout_seconds: float = 30.0
    total_timeout_seconds: float = 300.0
    allow_private_networks: bool = False
    allowed_hosts: frozenset[str] = frozenset()
    max_redirects: int = 5
    max_image_pixels: int = 4096 * 4096
    resolver: Resolver = field(default=system_resolver, compare=False)
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False)


class InputFetchError(Exception):
    """Any failure to use a file input; the gateway turns it into INVALID_ARGUMENT on `field`."""

    def __init__(self, field: str, url: str, reason: str) -> None:
        self.field = field
        self.url = redact_url(url)
        self.reason = reason
        super().__init__(f"{field}: cannot use {self.url}: {reason}")


class StoredFiles(Protocol):
    """What fetching needs from an object store to read this service's own URLs directly."""

    def key_for_url(self, url: str) -> str | None: ...

    def get(self, key: str) -> bytes: ...


class Sink(Protocol):
    def write(self, data: bytes, /) -> object: ...


def fetch_bytes(url: str, field: str, policy: FetchPolicy, *, store: StoredFiles | None = None) -> bytes:
    buffer = io.BytesIO()
    fetch_to(url, field, policy, buffer, store=store)
    return buffer.getvalue()


def fetch_image(url: str, field: str, policy: FetchPolicy, *, store: StoredFiles | None = None) -> PIL.Image.Image:
    return open_image(fetch_bytes(url, field, policy, store=store), field, policy, url=url)


@tracing.traced("storage.fetch")
def fetch_to(
    url: str,
    field: str,
    policy: FetchPolicy,
    out: Sink,
    *,
    store: StoredFiles | None = None,
    on_progress: ProgressCallback | None = None,
) -> int:
    """Writes the input's bytes to `out` and returns how many; nothing is written past a limit."""
    tracing.annotate(field=field)
    if url[:5].lower() == "data:":
        data = decode_data_uri(url, field, policy.max_data_uri_bytes)
    elif store is not None and (key := store.key_for_url(url)) is not None:
        data = _read_stored(store, key, url, field, policy.max_bytes)
    else:
        return _download(url, field, policy, out, on_progress)
    out.write(data)
    if on_progress is not None:
        on_progress(len(data), len(data))
    return len(data)


def check_url(url: str, field: str, policy: FetchPolicy, *, resolve: bool = True) -> None:
    """Refuses `url` as a fetch or `post` would, without connecting. `resolve=False` looks nothing up (a
    host name is checked when the URL is used): for a URL kept to be used later, e.g. a webhook's."""
    _check_target(url, url, field, policy, resolve=resolve)


def post(url: str, body: bytes, headers: Mapping[str, str], field: str, policy: FetchPolicy) -> int:
    """POSTs `body` to a caller's URL behind the fetch guard (every address checked, the connection pinned
    to a checked one); returns the HTTP status. Redirects are not followed: a POST goes where it was
    registered. Each step waits at most `policy.timeout_seconds`, the whole exchange `total_timeout_seconds`."""
    deadline = _Deadline(time.monotonic() + policy.total_timeout_seconds, _too_long(policy))
    target = _check_target(url, url, field, policy)
    tls = (policy.ssl_context or ssl.create_default_context()) if target.scheme == "https" else None
    connection = _PinnedConnection(target, _remaining(deadline, policy, url, field), tls)
    try:
        with _network_errors(url, field, policy, deadline):
            sent = {"Host": target.host_header, "User-Agent": USER_AGENT, **headers}
            connection.request("POST", target.request_path, body=body, headers=sent)
            response = connection.getresponse()
            if connection.pinned is not None:
                connection.pinned.settimeout(_remaining(deadline, policy, url, field))
            # Only the status counts; a little of the reply is read so the receiver is not cut off mid-write.
            response.read(READ_CHUNK_BYTES)
        return response.status
    finally:
        connection.close()


def decode_data_uri(uri: str, field: str, max_bytes: int) -> bytes:
    """`data:[type][;params][;base64],payload`; sizes are checked before decoding where possible."""
    header, comma, payload = uri[5:].partition(",")
    if not comma:
        raise InputFetchError(field, uri, "a data URI needs a comma before its data")
    if header.lower().endswith(";base64"):
        text = re.sub(r"\s+", "", unquote(payload) if "%" in payload else payload)
        if len(text) * 3 // 4 > max_bytes:
            raise InputFetchError(field, uri, f"the data is larger than the limit of {max_bytes} bytes")
        try:
            data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except binascii.Error:
            raise InputFetchError(field, uri, "the data is not valid base64") from None
    else:
        data = unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise InputFetchError(field, uri, f"the data is larger than the limit of {max_bytes} bytes")
    if not data:
        raise InputFetchError(field, uri, "the data URI is empty")
    return data


def open_image(data: bytes, field: str, policy: FetchPolicy, *, url: str = "") -> PIL.Image.Image:
    """Reads the size from the header and refuses before decoding, so a bomb never inflates.

    `Image.MAX_IMAGE_PIXELS` is left alone (it is process-wide); Pillow's own bomb error,
    raised at twice that, is reported the same way.
    """
    shown = url or "the image"
    try:
        image = PIL.Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except PIL.Image.DecompressionBombError:
        raise InputFetchError(field, shown, f"the image has more than {policy.max_image_pixels} pixels") from None
    except (PIL.UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise InputFetchError(
            field, shown, f"not an image in a supported format ({', '.join(IMAGE_FORMATS)})"
        ) from None
    width, height = image.size
    if width * height > policy.max_image_pixels:
        raise InputFetchError(
            field,
            shown,
            f"the image is {width}x{height} = {width * height} pixels, more than the limit of "
            f"{policy.max_image_pixels}",
        )
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, EOFError, PIL.Image.DecompressionBombError) as exc:
        raise InputFetchError(field, shown, f"the {image.format} image is damaged or truncated ({exc})") from None
    return image if image.mode == "RGB" else image.convert("RGB")


def _read_stored(store: StoredFiles, key: str, url: str, field: str, max_bytes: int) -> bytes:
    try:
        data = store.get(key)
    except (ObjectNotFound, InvalidKey):
        raise InputFetchError(field, url, NO_SUCH_STORED_FILE) from None
    if len(data) > max_bytes:
        raise InputFetchError(field, url, f"the file is {len(data)} bytes, more than the limit of {max_bytes}")
    return data


@dataclass(frozen=True)
class _Target:
    """One checked hop: where to connect (a vetted address) and what to ask for."""

    scheme: str
    host: str
    port: int
    address: str
    request_path: str

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


class _PinnedConnection(http.client.HTTPConnection):
    """Connects to the vetted address; TLS still checks the certificate against the host name."""

    def __init__(self, target: _Target, timeout: float, tls: ssl.SSLContext | None) -> None:
        super().__init__(target.address, target.port, timeout=timeout)
        self._target = target
        self._tls = tls
        # http.client drops `sock` when the response takes the connection over; reads still use it.
        self.pinned: socket.socket | None = None

    def connect(self) -> None:
        sock = socket.create_connection((self._target.address, self._target.port), self.timeout)
        if self._tls is not None:
            sock = self._tls.wrap_socket(sock, server_hostname=self._target.host)
        self.sock = self.pinned = sock


@dataclass(frozen=True)
class _Deadline:
    at: float
    # What ran out, for the error: this transfer's limit, or the request's input resolution.
    why: str


_input_deadline: ContextVar[_Deadline | None] = ContextVar("input_deadline", default=None)


@contextmanager
def input_deadline(seconds: float) -> Iterator[None]:
    """Every transfer inside (and in threads started with this context) ends by one shared deadline:
    a request's whole input resolution, so a URL that trickles a byte per read timeout cannot hold a
    worker for the per-transfer limit once per file. `seconds <= 0`: no shared deadline."""
    shared = _Deadline(time.monotonic() + seconds, f"resolving the request's inputs took longer than {seconds:g} s")
    token = _input_deadline.set(shared if seconds > 0 else None)
    try:
        yield
    finally:
        _input_deadline.reset(token)


def _download(url: str, field: str, policy: FetchPolicy, out: Sink, on_progress: ProgressCallback | None) -> int:
    deadline = _Deadline(time.monotonic() + policy.total_timeout_seconds, _too_long(policy))
    shared = _input_deadline.get()
    if shared is not None and shared.at < deadline.at:
        deadline = shared
    current = url
    for _hop in range(policy.max_redirects + 1):
        target = _check_target(current, url, field, policy)
        tls = (policy.ssl_context or ssl.create_default_context()) if target.scheme == "https" else None
        connection = _PinnedConnection(target, _remaining(deadline, policy, url, field), tls)
        try:
            with _network_errors(url, field, policy, deadline):
                connection.request(
                    "GET",
                    target.request_path,
                    headers={"Host": target.host_header, "User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
                )
                response = connection.getresponse()
            if response.status in REDIRECT_STATUSES:
                location = response.getheader("Location")
                if not location:
                    raise InputFetchError(field, url, f"the server answered {response.status} without a Location")
                current = urljoin(current, location)
                if target.scheme == "https" and urlsplit(current).scheme.lower() != "https":
                    # What TLS protected (the path, a signed query) would cross the network in the clear.
                    raise InputFetchError(
                        field, url, f"redirected from https to {redact_url(current)}: a downgrade to plain http is refused"
                    )
                continue
            if response.status != 200:
                raise InputFetchError(field, url, f"the server answered {response.status} {response.reason}")
            return _read_body(connection, response, url, field, policy, out, on_progress, deadline)
        finally:
            connection.close()
    raise InputFetchError(field, url, f"more than {policy.max_redirects} redirects")


@contextmanager
def _network_errors(url: str, field: str, policy: FetchPolicy, deadline: _Deadline) -> Iterator[None]:
    """Only network steps are wrapped: a full local disk is the service's fault, not the caller's."""
    try:
        yield
    except TimeoutError:
        if time.monotonic() >= deadline.at:
            raise InputFetchError(field, url, deadline.why) from None
        raise InputFetchError(field, url, f"no answer within {policy.timeout_seconds:g} s") from None
    except ssl.SSLError as exc:
        raise InputFetchError(field, url, f"TLS failed: {exc.reason or exc}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise InputFetchError(field, url, f"the transfer failed: {type(exc).__name__}: {exc}") from None


def _read_body(
    connection: _PinnedConnection,
    response: http.client.HTTPResponse,
    url: str,
    field: str,
    policy: FetchPolicy,
    out: Sink,
    on_progress: ProgressCallback | None,
    deadline: _Deadline,
) -> int:
    encoding = (response.getheader("Content-Encoding") or "identity").strip().lower()
    if encoding != "identity":
        raise InputFetchError(field, url, f"the server sent a {encoding}-encoded body; only plain bodies are accepted")
    total = _content_length(response)
    if total is not None and total > policy.max_bytes:
        raise InputFetchError(field, url, f"the file is {total} bytes, more than the limit of {policy.max_bytes}")
    size = 0
    while True:
        with _network_errors(url, field, policy, deadline):
            if connection.pinned is not None:
                # Each read waits at most the per-step timeout, and never past the deadline.
                connection.pinned.settimeout(_remaining(deadline, policy, url, field))
            chunk = response.read1(READ_CHUNK_BYTES)
        if not chunk:
            break
        size += len(chunk)
        if size > policy.max_bytes:
            raise InputFetchError(field, url, f"the file is more than the limit of {policy.max_bytes} bytes")
        out.write(chunk)
        if on_progress is not None:
            on_progress(size, total)
    if size == 0:
        raise InputFetchError(field, url, "the server sent an empty file")
    return size


def _content_length(response: http.client.HTTPResponse) -> int | None:
    raw = response.getheader("Content-Length")
    if raw is None or not raw.strip().isdigit():
        return None
    return int(raw)


def _remaining(deadline: _Deadline, policy: FetchPolicy, url: str, field: str) -> float:
    """The socket timeout for the next step: the per-step limit, or less when the deadline is near."""
    left = deadline.at - time.monotonic()
    if left <= 0:
        raise InputFetchError(field, url, deadline.why)
    return min(policy.timeout_seconds, left)


def _too_long(policy: FetchPolicy) -> str:
    return f"the transfer took longer than {policy.total_timeout_seconds:g} s"


def _check_target(current: str, url: str, field: str, policy: FetchPolicy, *, resolve: bool = True) -> _Target:
    """Everything is decided on the parsed host that is then connected to, so parser tricks gain nothing.
    `resolve=False` (only for `check_url`) leaves a host name unchecked and the target without an address."""
    hop = "" if current == url else f"redirected to {redact_url(current)}: "
    parts = urlsplit(current)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise InputFetchError(field, url, f"{hop}only http and https URLs are accepted")
    if parts.username is not None or parts.password is not None:
        raise InputFetchError(field, url, f"{hop}URLs with a user name or password are refused")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise InputFetchError(field, url, f"{hop}the URL has no host")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise InputFetchError(field, url, f"{hop}the URL has an invalid port") from None
    literal = _ip_literal(host)
    if literal is not None:
        addresses = [literal]
    else:
        addresses = _resolve(host, port, url, field, hop, policy) if resolve else []
    if host not in {allowed.lower() for allowed in policy.allowed_hosts}:
        for address in addresses:
            reason = _refusal(address, policy.allow_private_networks)
            if reason is not None:
                what = host if literal is not None else f"{host} resolves to {address}, which"
                raise InputFetchError(field, url, f"{hop}{what} is {reason}; refused")
    path = quote(parts.path or "/", safe=_SAFE_URL_CHARS) + (f"?{parts.query}" if parts.query else "")
    return _Target(
        scheme=scheme, host=host, port=port, address=str(addresses[0]) if addresses else "", request_path=path
    )


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _resolve(host: str, port: int, url: str, field: str, hop: str, policy: FetchPolicy) -> list[IPAddress]:
    """Odd spellings (`2130706433`, `0x7f.1`) reach the resolver and come back as the address they mean."""
    try:
        found = [ipaddress.ip_address(address.split("%", 1)[0]) for address in policy.resolver(host, port)]
    except (OSError, UnicodeError, ValueError) as exc:
        raise InputFetchError(field, url, f"{hop}cannot resolve host {host!r} ({exc})") from None
    if not found:
        raise InputFetchError(field, url, f"{hop}host {host!r} has no address")
    return found


def _refusal(address: IPAddress, allow_private_networks: bool) -> str | None:
    """Why this address may not be contacted, or None; IPv6 forms that embed an IPv4 are judged by it."""
    address = _embedded_ipv4(address) or address
    if any(address in network for network in METADATA_NETWORKS):
        return "a cloud metadata address"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_reserved:
        return "a reserved address"
    if allow_private_networks:
        return None
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_private:
        return "a private address"
    if (
        not address.is_global
        or any(address in network for network in _NOT_GLOBAL_NETWORKS)
        or (isinstance(address, ipaddress.IPv6Address) and address not in _IPV6_GLOBAL_UNICAST)
    ):
        return "not a public address"
    return None


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64_PREFIX:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None
