"""A local stand-in for the Hugging Face hub's file endpoints, on 127.0.0.1 only.

It answers ``GET /api/models/{repo}[/revision/{revision}]`` (the file list
``snapshot_download`` reads), and ``HEAD`` and ``GET /{repo}/resolve/{revision}/{filename}`` the way huggingface_hub
expects (``file_download.get_hf_file_metadata``): ``X-Repo-Commit``, ``X-Linked-Etag`` (the
sha256 of an LFS file), ``X-Linked-Size``, ``ETag``, ``Content-Length``; ``GET`` honours
``Range``. Switches make it cut a transfer half way, serve damaged bytes, or refuse.

    with HubServer() as hub:
        hub.add("org/repo", "model.gguf", data)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from urllib.parse import unquote

COMMIT = "c0ffee" * 6 + "abcd"   # 40 hex digits, what the hub sends as X-Repo-Commit


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class HubServer:
    """Files by repo and name; every request is logged as (method, path, Range)."""

    def __init__(self) -> None:
        self.files: dict[tuple[str, str], bytes] = {}
        self.corrupt: set[str] = set()      # filenames served with one byte flipped
        self.cut: set[str] = set()          # filenames whose first GET stops half way
        self.requests: list[tuple[str, str, str]] = []
        self.bytes_sent = 0
        self._lock = threading.Lock()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, repo: str, filename: str, data: bytes) -> None:
        self.files[(repo, filename)] = data

    def gets(self, filename: str) -> list[tuple[str, str, str]]:
        return [r for r in self.requests if r[0] == "GET" and r[1].endswith("/" + filename)]

    def _find(self, path: str) -> tuple[str, bytes | None]:
        # /{org}/{name}/resolve/{revision}/{filename}
        parts = unquote(path.split("?")[0]).lstrip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return "", None
        repo, filename = "/".join(parts[:2]), "/".join(parts[4:])
        return filename, self.files.get((repo, filename))

    def _handler(self):
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                with hub._lock:
                    hub.requests.append((self.command, self.path, self.headers.get("Range", "")))
                if self.path.startswith("/api/models/"):
                    self._repo_info()
                    return
                filename, data = hub._find(self.path)
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                described = data                       # the headers describe the good file
                if filename in hub.corrupt:
                    data = data[:-1] + bytes([data[-1] ^ 0xFF])
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("X-Linked-Etag", f'"{sha256(described)}"')
                self.send_header("X-Linked-Size", str(len(described)))
                self.send_header("ETag", f'"{sha256(described)}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if not body:
                    return
                chunk = data[start:]
                if filename in hub.cut and not rng:
                    hub.cut.discard(filename)
                    chunk = chunk[: len(chunk) // 2]    # then the connection drops
                    self.close_connection = True
                with hub._lock:
                    hub.bytes_sent += len(chunk)
                self.wfile.write(chunk)
                self.wfile.flush()

            def _repo_info(self) -> None:
                # GET /api/models/{org}/{name}[/revision/{rev}] (the repo's commit) and
                # /api/models/{org}/{name}/tree/{rev} (its files): what snapshot_download reads.
                parts = unquote(self.path.split("?")[0]).split("/")[3:]
                repo = "/".join(parts[:2])
                names = [f for r, f in hub.files if r == repo]
                if len(parts) > 2 and parts[2] == "tree":
                    info: object = [
                        {"type": "file", "path": f, "size": len(hub.files[(repo, f)]),
                         "oid": hashlib.sha1(hub.files[(repo, f)]).hexdigest(),
                         "lfs": {"size": len(hub.files[(repo, f)]), "pointerSize": 134,
                                 "oid": sha256(hub.files[(repo, f)])}} for f in names]
                else:
                    info = {"id": repo, "sha": COMMIT,
                            "siblings": [{"rfilename": f} for f in names]}
                body = json.dumps(info).encode()
                self.send_response(200 if names else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
