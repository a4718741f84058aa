"""A tiny stand-in for the Hugging Face Hub's HTTP API: just what `huggingface_hub` calls for a push.

Run in a thread on 127.0.0.1 (a free port). It records every request (method, path, query, headers, body) and
every commit (header, files with their bytes, deletions), and keeps repos and branches in memory. Answers:

    GET  /api/whoami-v2                          user, orgs, token role (or `fail["whoami"]`)
    POST /api/repos/create                       {"url"}; 409 if it exists (or `fail["create"]`)
    GET  /api/models/{repo}[/revision/{rev}]     repo info; 404 with X-Error-Code: RepoNotFound if absent
    GET  /api/models/{repo}/refs                 branches
    POST /api/models/{repo}/branch/{branch}      201; 409 if it exists
    POST /api/validate-yaml                      {"errors": [], "warnings": []} (README.md metadata)
    GET  /api/agent-harnesses                    an empty registry (the client's agent detection, best-effort)
    POST /api/models/{repo}/preupload/{rev}      uploadMode "regular" for every file: contents come in the commit
    POST /api/models/{repo}/commit/{rev}         NDJSON header / file (base64) / deletedFile lines -> commitOid
    GET|HEAD /{repo}/resolve/{rev}/{file}        a JSON file put in `files[(repo, file)]` (a model's config.json)

Anything else is answered 404 and listed in `unexpected`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


class FakeHub:
    def __init__(self, *, user: str = "tester", orgs: dict[str, str] | None = None, role: str = "write"):
        self.user, self.role = user, role
        self.orgs = {"my-org": "write"} if orgs is None else orgs  # org -> roleInOrg
        self.fail: dict[str, tuple[int, str]] = {}  # "whoami" | "create" | "commit" -> (status, message)
        self.requests: list[dict[str, Any]] = []
        self.commits: list[dict[str, Any]] = []
        self.repos: dict[str, dict[str, Any]] = {}  # repo id -> {"visibility", "branches": {name: oid}}
        self.unexpected: list[str] = []
        self.files: dict[tuple[str, str], Any] = {}  # (repo id, file) -> JSON content served at /resolve/
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def paths(self) -> list[str]:
        return [f"{r['method']} {r['path']}" for r in self.requests]

    # ---------------------------------------------------------------- routes

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> tuple[int, Any, dict]:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if method == "GET" and path == "/api/whoami-v2":
            if "whoami" in self.fail:
                return self._error("whoami")
            return 200, self._whoami(), {}
        if method == "POST" and path == "/api/repos/create":
            if "create" in self.fail:
                return self._error("create")
            data = json.loads(body or b"{}")
            repo = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
            if repo in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo}"}, {}
            self.repos[repo] = {"visibility": data.get("visibility"), "branches": {"main": "0" * 40}}
            return 200, {"url": f"{self.url}/{repo}", "name": repo, "id": hashlib.sha1(repo.encode()).hexdigest()}, {}
        if method == "GET" and path == "/api/agent-harnesses":  # the client's best-effort agent detection
            return 200, {"standardEnvVars": [], "harnesses": {}}, {}
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}, {}
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            key = ("/".join(parts[:2]), "/".join(parts[4:]))
            if key not in self.files:
                return 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}
            etag = hashlib.sha1(json.dumps(self.files[key]).encode()).hexdigest()
            return 200, self.files[key], {"X-Repo-Commit": "1" * 40, "ETag": f'"{etag}"'}
        if len(parts) >= 4 and parts[:2] == ["api", "models"]:
            repo, rest = "/".join(parts[2:4]), parts[4:]
            info = self.repos.get(repo)
            if info is None:
                return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
            if method == "GET" and (not rest or rest[0] == "revision"):
                rev = "/".join(rest[1:]) or "main"
                if rev not in info["branches"]:
                    return 404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"}
                return 200, {"id": repo, "sha": info["branches"][rev], "private": info["visibility"] == "private"}, {}
            if method == "GET" and rest == ["refs"]:
                branches = [
                    {"name": b, "ref": f"refs/heads/{b}", "targetCommit": o} for b, o in info["branches"].items()
                ]
                return 200, {"branches": branches, "tags": [], "converts": []}, {}
            if method == "POST" and rest and rest[0] == "branch":
                branch = "/".join(rest[1:])
                if branch in info["branches"]:
                    return 409, {"error": f"Reference refs/heads/{branch} already exists"}, {}
                info["branches"][branch] = info["branches"]["main"]
                return 201, {}, {}
            if method == "POST" and rest and rest[0] == "preupload":
                files = json.loads(body)["files"]
                return 200, {"files": [_regular(f["path"]) for f in files], "commitOid": info["branches"]["main"]}, {}
            if method == "POST" and rest and rest[0] == "commit":
                return self._commit(repo, "/".join(rest[1:]), body)
        self.unexpected.append(f"{method} {path}")
        return 404, {"error": f"not implemented here: {method} {path}"}, {}

    def _whoami(self) -> dict[str, Any]:
        return {
            "type": "user",
            "name": self.user,
            "fullname": "Test User",
            "orgs": [{"type": "org", "name": o, "roleInOrg": r} for o, r in self.orgs.items()],
            "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": self.role}},
        }

    def _error(self, key: str) -> tuple[int, Any, dict]:
        status, message = self.fail[key]
        return status, {"error": message}, {"X-Error-Message": message}

    def _commit(self, repo: str, revision: str, body: bytes) -> tuple[int, Any, dict]:
        if "commit" in self.fail:
            return self._error("commit")
        branches = self.repos[repo]["branches"]
        if revision not in branches:
            return 404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"}
        header: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        deleted: list[str] = []
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            if item["key"] == "header":
                header = item["value"]
            elif item["key"] == "file":
                v = item["value"]
                assert v["encoding"] == "base64", v
                files[v["path"]] = base64.b64decode(v["content"])
            elif item["key"] in ("deletedFile", "deletedFolder"):
                deleted.append(item["value"]["path"])
            else:
                self.unexpected.append(f"commit line {item['key']}")
        oid = hashlib.sha1(body).hexdigest()
        branches[revision] = oid
        self.commits.append({"repo": repo, "revision": revision, "header": header, "files": files, "deleted": deleted})
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid, "success": True}, {}


def _regular(path: str) -> dict[str, Any]:
    return {"path": path, "uploadMode": "regular", "shouldIgnore": False, "oid": None}


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _serve(self, method: str) -> None:
            url = urlsplit(self.path)
            body = self._body()
            with hub.lock:
                hub.requests.append(
                    {
                        "method": method,
                        "path": url.path,
                        "query": parse_qs(url.query),
                        "headers": dict(self.headers.items()),
                        "body": body,
                    }
                )
                try:
                    status, payload, headers = hub.handle(method, url.path, parse_qs(url.query), body)
                except Exception as e:  # noqa: BLE001 - a bug here shows up as a 500 and in `unexpected`
                    hub.unexpected.append(f"{method} {url.path}: {type(e).__name__}: {e}")
                    status, payload, headers = 500, {"error": str(e)}, {}
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            self._serve("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._serve("POST")

        def do_HEAD(self) -> None:  # noqa: N802
            self._serve("HEAD")

        def do_PUT(self) -> None:  # noqa: N802
            self._serve("PUT")

        def do_DELETE(self) -> None:  # noqa: N802
            self._serve("DELETE")

    return Handler
