"""Servers and builders shared by the storage tests.

A plain module rather than conftest, so test modules and spawned processes can import it.
"""

from __future__ import annotations

import hashlib
import io
import json
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import PIL.Image
from safetensors.numpy import save


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_seconds: float = 0.0
    chunked: bool = False
    # Chunked only: a pause before each 4 KiB piece, for a server that dribbles.
    piece_delay_seconds: float = 0.0
    # Set: the answer waits until the test sets it (or a minute passes), so the test decides when it comes.
    hold: threading.Event | None = None


class FileServer:
    """Serves whatever a test puts in `routes` on 127.0.0.1; counts hits (and chunked pieces sent) and records Host headers."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: Counter[str] = Counter()
        self.pieces_sent: Counter[str] = Counter()
        self.host_headers: list[str] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        if tls is not None:
            # Handshake in the handler thread, so a client refusing the certificate blocks nothing.
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True, do_handshake_on_connect=False)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _record(self, path: str, host: str) -> Route:
        with self._lock:
            self.hits[path] += 1
            self.host_headers.append(host)
        return self.routes.get(path, Route(b"not found", status=404))

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_HEAD(self) -> None:
                route = server.routes.get(self.path.split("?", 1)[0], Route(b"not found", status=404))
                self.send_response(route.status)
                for name, value in route.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(route.body)))
                self.send_header("Connection", "close")
                self.end_headers()

            def do_GET(self) -> None:
                route = server._record(self.path.split("?", 1)[0], self.headers.get("Host", ""))
                time.sleep(route.delay_seconds)
                if route.hold is not None:
                    route.hold.wait(timeout=60)
                self.send_response(route.status)
                for name, value in route.headers.items():
                    self.send_header(name, value)
                self.send_header("Connection", "close")
                if route.chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for start in range(0, len(route.body), 4096):
                        piece = route.body[start : start + 4096]
                        time.sleep(route.piece_delay_seconds)
                        self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                        with server._lock:
                            server.pieces_sent[self.path.split("?", 1)[0]] += 1
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.send_header("Content-Length", str(len(route.body)))
                    self.end_headers()
                    self.wfile.write(route.body)

            def log_message(self, format: str, *args: object) -> None:
                pass

            def handle(self) -> None:
                # Clients giving up (timeouts, size limits, bad certificates) is what tests provoke.
                try:
                    super().handle()
                except OSError:
                    pass

        return Handler


def png_bytes(size: tuple[int, int] = (16, 12), color: tuple[int, int, int] = (200, 30, 40)) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def safetensors_bytes(values: int = 1000, seed: int = 0) -> bytes:
    weights = np.random.default_rng(seed).standard_normal(values).astype(np.float32)
    return save({"lora_down.weight": weights})


class HubMirror:
    """A local server answering as the Hugging Face Hub does for one model repo, for huggingface_hub's own client.

    The model API (`/api/models/<repo>`, with the listed sizes, which may be larger than the
    bytes: an SDXL-sized listing without SDXL-sized files), the tree API snapshot_download
    lists through, and `/<repo>/resolve/<revision>/<path>` with the headers the client checks.
    `downloads` is every file fetched through `resolve`, in order.
    """

    SHA = "a" * 40

    def __init__(self, server: FileServer, repo_id: str, files: dict[str, bytes], sizes: dict[str, int]) -> None:
        self.server, self.repo_id, self.files = server, repo_id, files
        listed = [{"rfilename": path, "size": sizes.get(path, len(data))} for path, data in files.items()]
        info = json.dumps({"id": repo_id, "sha": self.SHA, "siblings": listed}).encode()
        tree = [
            {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            for path, data in files.items()
        ]
        json_headers = {"Content-Type": "application/json"}
        for route in (f"/api/models/{repo_id}", f"/api/models/{repo_id}/revision/main"):
            server.routes[route] = Route(info, headers=json_headers)
        server.routes[f"/api/models/{repo_id}/tree/{self.SHA}"] = Route(json.dumps(tree).encode(), headers=json_headers)
        for path, data in files.items():
            headers = {"X-Repo-Commit": self.SHA, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
            for revision in ("main", self.SHA):
                server.routes[f"/{repo_id}/resolve/{revision}/{path}"] = Route(data, headers=headers)

    @property
    def endpoint(self) -> str:
        return self.server.url("").rstrip("/")

    @property
    def downloads(self) -> list[str]:
        prefixes = [f"/{self.repo_id}/resolve/{revision}/" for revision in ("main", self.SHA)]
        return sorted(
            path.removeprefix(prefix)
            for path, hits in self.server.hits.items()
            for prefix in prefixes
            if path.startswith(prefix)
            for _ in range(hits)
        )
