"""A stand-in for the Hugging Face Hub on 127.0.0.1, serving local folders as model repositories: just
what `huggingface_hub.snapshot_download` calls (the revision info and tree APIs, and the resolve URLs,
HEAD and GET with ranges). Point HF_ENDPOINT at `url`; `requests` lists the paths asked for."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubStandIn:
    def __init__(self, repos: dict[str, Path]):
        self.repos = repos  # "ORG/NAME" -> folder
        self.requests: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo: str) -> list[Path]:
        folder = self.repos[repo]
        return sorted(p for p in folder.rglob("*") if p.is_file())

    def answer(self, path: str) -> tuple[int, dict, bytes]:
        """(status, headers, body) of a GET; HEAD drops the body."""
        for repo, folder in self.repos.items():
            if path in (f"/api/models/{repo}/revision/main", f"/api/models/{repo}/revision/{COMMIT}"):
                siblings = [{"rfilename": str(p.relative_to(folder))} for p in self.files(repo)]
                return _json({"id": repo, "modelId": repo, "sha": COMMIT, "siblings": siblings})
            if path.startswith(f"/api/models/{repo}/tree/"):
                return _json([_tree_entry(p, folder) for p in self.files(repo)])
            for prefix in (f"/{repo}/resolve/main/", f"/{repo}/resolve/{COMMIT}/"):
                if path.startswith(prefix) and (folder / path[len(prefix) :]).is_file():
                    data = (folder / path[len(prefix) :]).read_bytes()
                    headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{_oid(data)}"'}
                    return 200, headers, data
        return 404, {"X-Error-Code": "RepoNotFound"}, b'{"error": "Repository not found"}'


def _oid(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _tree_entry(path: Path, folder: Path) -> dict:
    data = path.read_bytes()
    return {"type": "file", "oid": _oid(data), "size": len(data), "path": str(path.relative_to(folder))}


def _json(value) -> tuple[int, dict, bytes]:
    return 200, {"Content-Type": "application/json", "X-Repo-Commit": COMMIT}, json.dumps(value).encode()


def _handler(hub: HubStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self._reply(with_body=False)

        def do_GET(self) -> None:
            self._reply(with_body=True)

        def _reply(self, with_body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append(f"{self.command} {path}")
            status, headers, body = hub.answer(path)
            start = _range_start(self.headers.get("Range"))
            if start and status == 200:
                status, body = 206, body[start:]
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    return Handler


def _range_start(header: str | None) -> int:
    """`bytes=N-` -> N (snapshot_download resumes a partial file so)."""
    if not header or not header.startswith("bytes="):
        return 0
    return int(header[len("bytes=") :].split("-")[0] or 0)
