"""A local stand-in for the Hugging Face Hub on 127.0.0.1, for the real huggingface_hub client.

It serves fixture repositories (local directories) the way the hub does for the requests
huggingface_hub makes:

- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``: the commit ``sha`` and the
  ``siblings`` (with sizes, and ``lfs`` for weight files), ``cardData`` (license).
- ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``: ``X-Repo-Commit``, ``ETag``, ``X-Linked-Size`` /
  ``X-Linked-Etag`` for weight files, and ``206`` with ``Content-Range`` for range requests.

It counts the safetensors bytes it serves beyond each file's header (``weight_bytes``): what a plan
must not fetch.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FakeHub:
    def __init__(self):
        self.repos: dict[str, tuple[str, Path, dict]] = {}  # repo_id -> (sha, dir, card data)
        self.weight_bytes = 0
        self.header_bytes = 0
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def add(self, repo_id: str, directory: Path, license: str | None = None) -> str:
        """Serve ``directory`` as ``repo_id``; the commit sha is derived from the contents."""
        h = hashlib.sha1()
        for f in sorted(Path(directory).rglob("*")):
            if f.is_file():
                h.update(f.relative_to(directory).as_posix().encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
        sha = h.hexdigest()
        self.repos[repo_id] = (sha, Path(directory), {"license": license} if license else {})
        return sha

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def reset_counts(self) -> None:
        with self._lock:
            self.weight_bytes = 0
            self.header_bytes = 0
            self.requests.clear()

    def start(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, str(v))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head and body:
                    self.wfile.write(body)

            def _error(self, code: int, err: str, msg: str, head: bool = False):
                self._send(code, json.dumps({"error": msg}).encode(), {"X-Error-Code": err, "X-Error-Message": msg,
                                                                        "Content-Type": "application/json"}, head)

            def _route(self, head: bool):
                path = self.path.split("?", 1)[0]
                with hub._lock:
                    hub.requests.append(f"{self.command} {self.path} {self.headers.get('Range', '')}")
                m = re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)/?$", path)
                if m:
                    return self._tree(m.group(1), m.group(2), head)
                m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/(.+))?$", path)
                if m:
                    return self._api(m.group(1), m.group(2), head)
                m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
                if m:
                    return self._file(m.group(1), m.group(2), m.group(3), head)
                self._error(404, "EntryNotFound", f"no route {path}", head)

            def _repo(self, repo_id: str, rev: str | None, head: bool):
                if repo_id not in hub.repos:
                    self._error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}.", head)
                    return None
                sha, d, card = hub.repos[repo_id]
                if rev not in (None, "main", sha):
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
                    return None
                return sha, d, card

            def _tree(self, repo_id: str, rev: str, head: bool):
                r = self._repo(repo_id, rev, head)
                if r is None:
                    return
                entries = []
                for f in sorted(r[1].rglob("*")):
                    if f.is_file():
                        data = f.read_bytes()
                        e = {"type": "file", "path": f.relative_to(r[1]).as_posix(), "size": len(data),
                             "oid": hashlib.sha1(data).hexdigest()}
                        if f.suffix == ".safetensors":
                            e["lfs"] = {"size": len(data), "oid": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
                        entries.append(e)
                self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, head)

            def _api(self, repo_id: str, rev: str | None, head: bool):
                r = self._repo(repo_id, rev, head)
                if r is None:
                    return
                sha, d, card = r
                siblings = []
                for f in sorted(d.rglob("*")):
                    if not f.is_file():
                        continue
                    size = f.stat().st_size
                    sib = {"rfilename": f.relative_to(d).as_posix(), "size": size,
                           "blobId": hashlib.sha1(f.read_bytes()).hexdigest()}
                    if f.suffix == ".safetensors":
                        sib["lfs"] = {"size": size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "pointerSize": 134}
                    siblings.append(sib)
                body = {"_id": sha[:24], "id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                        "siblings": siblings, "tags": [f"license:{card['license']}"] if card.get("license") else [],
                        "cardData": card}
                self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)

            def _file(self, repo_id: str, rev: str, name: str, head: bool):
                r = self._repo(repo_id, rev, head)
                if r is None:
                    return
                sha, d, _ = r
                f = d / name
                if not f.is_file():
                    self._error(404, "EntryNotFound", f"Entry not found: {name}", head)
                    return
                data = f.read_bytes()
                size = len(data)
                etag = hashlib.sha256(data).hexdigest()
                headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                           "Content-Type": "application/octet-stream"}
                if f.suffix == ".safetensors":
                    headers.update({"X-Linked-Size": size, "X-Linked-Etag": f'"{etag}"'})
                rng = self.headers.get("Range")
                start, end, code = 0, size - 1, 200
                if rng:
                    m = re.match(r"bytes=(\d*)-(\d*)$", rng.strip())
                    if m and m.group(1):
                        start = int(m.group(1))
                        end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                        code = 206
                        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
                body = data[start:end + 1]
                if not head and f.suffix == ".safetensors":
                    hdr_end = 8 + int.from_bytes(data[:8], "little")
                    beyond = max(0, end + 1 - max(start, hdr_end))
                    with hub._lock:
                        hub.weight_bytes += beyond
                        hub.header_bytes += len(body) - beyond
                self._send(code, body, headers, head)

            def do_GET(self):
                self._route(head=False)

            def do_HEAD(self):
                self._route(head=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
