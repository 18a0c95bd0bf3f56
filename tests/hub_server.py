"""A small Hugging Face Hub on 127.0.0.1 for tests: the real huggingface_hub client talks to it through
HF_ENDPOINT, and it records every request (method, path, headers, body).

It serves what `create_repo`, `create_branch`, `upload_folder` and `snapshot_download` call in
huggingface_hub 2.4: POST /api/repos/create, POST /api/models/{id}/branch/{branch}, POST
/api/validate-yaml, POST /api/models/{id}/preupload/{rev} (every file "regular": its bytes travel
base64-encoded in the commit, so no large-file or xet storage is needed), POST
/api/models/{id}/commit/{rev} (an ndjson body), GET /api/models/{id}[/revision/{rev}], GET
/api/models/{id}/tree/{rev}, and HEAD/GET /{id}/resolve/{rev}/{file}. Unknown routes answer 404.

`fail_status` makes every request answer that HTTP status (a Hub having an outage).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from huggingface_hub.utils.sha import git_hash


class FakeHub:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.repos: dict[str, dict[str, Any]] = {}
        self.commits: dict[str, dict[str, bytes]] = {}  # commit sha -> the files at that commit
        self.fail_status: int | None = None
        self.lock = threading.Lock()
        self.url = ""
        self._server: ThreadingHTTPServer | None = None

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _handle(self) -> None:
                body = self._read_body()
                with hub.lock:
                    hub.requests.append({"method": self.command, "path": self.path,
                                         "headers": dict(self.headers.items()), "body": body})  # fmt: skip
                    status, headers, payload = hub.answer(self.command, self.path, body)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"  # kept after stop(), for messages naming it
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- state
    def _commit(self, repo_id: str, branch: str, files: dict[str, bytes]) -> str:
        sha = hashlib.sha1(f"{repo_id}:{len(self.commits)}".encode()).hexdigest()
        self.commits[sha] = dict(files)
        self.repos[repo_id]["branches"][branch] = sha
        return sha

    def seed(self, repo_id: str, files: dict[str, bytes]) -> None:
        """A repo that already holds `files` on main (what someone else pushed)."""
        with self.lock:
            self.repos[repo_id] = {"private": False, "branches": {}}
            self._commit(repo_id, "main", files)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of a repo at a branch or commit."""
        repo = self.repos[repo_id]
        return self.commits[repo["branches"].get(revision, revision)]

    def commit_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if "/commit/" in r["path"] and r["method"] == "POST"]

    # ---------------------------------------------------------------- routing
    def answer(self, method: str, raw_path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        if self.fail_status is not None:
            return self._json({"error": "the fake Hub is down"}, self.fail_status)
        split = urlsplit(raw_path)
        parts = [unquote(p) for p in split.path.strip("/").split("/")]
        query = parse_qs(split.query)
        if parts[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create(json.loads(body))
        if parts[:2] == ["api", "validate-yaml"]:
            return self._json({"errors": [], "warnings": []})
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            if repo_id not in self.repos:
                return self._json({"error": "Repository not found"}, 404, {"X-Error-Code": "RepoNotFound"})
            return self._repo_api(method, repo_id, rest, body, query)
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]))
        return self._json({"error": f"no route {method} {split.path}"}, 404)

    def _json(self, obj: Any, status: int = 200, headers: dict | None = None):
        return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(obj).encode()

    def _create(self, payload: dict) -> tuple[int, dict[str, str], bytes]:
        repo_id = f"{payload['organization']}/{payload['name']}"
        if repo_id in self.repos:
            return self._json(
                {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, 409
            )
        self.repos[repo_id] = {"private": payload.get("visibility") == "private", "branches": {}}
        self._commit(
            repo_id, "main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
        )
        return self._json({"url": f"{self.url}/{repo_id}", "name": repo_id})

    def _repo_api(self, method, repo_id, rest, body, query):
        repo = self.repos[repo_id]
        if method == "GET" and (not rest or rest[0] == "revision"):
            revision = rest[1] if rest else "main"
            if revision not in repo["branches"] and revision not in self.commits:
                return self._json({"error": "Invalid rev id"}, 404, {"X-Error-Code": "RevisionNotFound"})
            sha = repo["branches"].get(revision, revision)
            siblings = [{"rfilename": p} for p in sorted(self.commits[sha])]
            return self._json({"id": repo_id, "private": repo["private"], "sha": sha, "siblings": siblings})
        if method == "GET" and rest and rest[0] == "tree":
            files = self.files(repo_id, rest[1])
            return self._json([{"type": "file", "path": p, "size": len(c), "oid": git_hash(c)}
                               for p, c in sorted(files.items())])  # fmt: skip
        if method == "POST" and rest and rest[0] == "branch":
            if rest[1] in repo["branches"]:
                return self._json({"error": "Reference already exists"}, 409)
            repo["branches"][rest[1]] = repo["branches"]["main"]
            return self._json({})
        if method == "POST" and rest and rest[0] == "preupload":
            files = self.files(repo_id, rest[1])
            asked = json.loads(body)["files"]
            return self._json({"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                 "oid": git_hash(files[f["path"]]) if f["path"] in files else None}
                for f in asked
            ]})  # fmt: skip
        if method == "POST" and rest and rest[0] == "commit":
            return self._apply_commit(repo_id, rest[1], body)
        return self._json({"error": f"no route {method} {rest}"}, 404)

    def _apply_commit(self, repo_id: str, revision: str, body: bytes):
        if revision not in self.repos[repo_id]["branches"]:
            return self._json(
                {"error": f"Invalid rev id: {revision}"}, 404, {"X-Error-Code": "RevisionNotFound"}
            )
        files = dict(self.files(repo_id, revision))
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                files.pop(item["value"]["path"], None)
            elif item["key"] != "header":
                return self._json(
                    {"error": f"this fake Hub takes regular files only, not {item['key']}"}, 400
                )
        sha = self._commit(repo_id, revision, files)
        return self._json({"commitUrl": f"{self.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                           "pullRequestUrl": None})  # fmt: skip

    def _resolve(self, repo_id: str, revision: str, path: str):
        if repo_id not in self.repos:
            return self._json({"error": "Repository not found"}, 404, {"X-Error-Code": "RepoNotFound"})
        sha = self.repos[repo_id]["branches"].get(revision, revision)
        content = self.commits.get(sha, {}).get(path)
        if content is None:
            return self._json({"error": "Entry not found"}, 404, {"X-Error-Code": "EntryNotFound"})
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{git_hash(content)}"',
            "Content-Type": "application/octet-stream",
        }
        return 200, headers, content
