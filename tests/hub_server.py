"""A small stdlib HTTP server speaking the parts of the Hub API that huggingface_hub's upload path uses.

Routes (huggingface_hub 2.x, with HF_HUB_DISABLE_XET so large files take the LFS path):
  POST /api/repos/create                               create a model repo (409 if it exists)
  POST /api/validate-yaml                              README metadata check (always valid; recorded)
  POST /api/models/{repo}/branch/{branch}              create a branch from main
  POST /api/models/{repo}/preupload/{rev}              upload mode per file (lfs for *.safetensors/*.gguf/
                                                       *.bin or >= lfs_threshold bytes, else regular)
  POST /{repo}.git/info/lfs/objects/batch              LFS batch: an upload href per object not yet stored
  PUT  /lfs-upload/{oid}                               LFS object body (sha256 checked)
  POST /api/models/{repo}/commit/{rev}                 NDJSON commit: header, file (base64), lfsFile, deletedFile
  GET  /api/models/{repo}[/revision/{rev}]             repo info (sha, siblings)
  HEAD/GET /{repo}/resolve/{rev}/{path}                file bytes with X-Repo-Commit and ETag
Anything else: 404 with a JSON body. 127.0.0.1 only. `required_token` makes every API call demand
`Authorization: Bearer <token>`. Every request is logged in `server.state.requests`.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlparse

_REPO = r"(?P<repo>[^/]+/[^/]+?)"


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit oid


@dataclass
class HubState:
    required_token: str | None = None
    lfs_threshold: int = 10 * 1024 * 1024
    repos: dict[str, Repo] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    auth_headers: list[str] = field(default_factory=list)
    validated_yaml: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def commit_count(self, repo_id: str) -> int:
        """Commits on `repo_id` after the initial empty one."""
        return sum(1 for c in self.commits.values() if c.oid.startswith(repo_id + ":") and c.parent is not None)

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return self.commits[repo.branches[rev]].files


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    server: "HubServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    # --- helpers --------------------------------------------------------------------------------------------
    @property
    def state(self) -> HubState:
        return self.server.state

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None,
              raw: bytes | None = None, head: bool = False) -> None:
        data = raw if raw is not None else json.dumps(body if body is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization")
        if auth:
            self.state.auth_headers.append(auth)
        if self.state.required_token is None:
            return True
        if auth != f"Bearer {self.state.required_token}":
            self._send(401, {"error": "Invalid credentials in Authorization header"})
            return False
        return True

    @property
    def base(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def _route(self, method: str) -> None:
        path = unquote(urlparse(self.path).path)
        with self.state.lock:
            self.state.requests.append((method, path))
        for pattern, handler_method, fn in _ROUTES:
            m = re.fullmatch(pattern, path)
            if m and handler_method == method:
                if fn not in ("lfs_put", "resolve") and not self._authorized():
                    return
                getattr(self, "r_" + fn)(**m.groupdict())
                return
        self._send(404, {"error": f"no route {method} {path}"})

    def do_GET(self) -> None:
        self._route("GET")

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    # --- routes -----------------------------------------------------------------------------------------------
    def r_create(self) -> None:
        req = json.loads(self._body() or b"{}")
        repo_id = f"{req.get('organization') or 'user'}/{req['name']}"
        with self.state.lock:
            if repo_id in self.state.repos:
                self._send(409, {"error": "You already created this model repo", "url": f"{self.base}/{repo_id}"})
                return
            oid = f"{repo_id}:0"
            self.state.commits[oid] = Commit(oid, None, "initial commit", {})
            private = req.get("visibility") == "private" or bool(req.get("private"))
            self.state.repos[repo_id] = Repo(repo_id, private, {"main": oid})
        self._send(200, {"url": f"{self.base}/{repo_id}", "name": repo_id})

    def r_validate_yaml(self) -> None:
        req = json.loads(self._body() or b"{}")
        self.state.validated_yaml.append(req.get("content", ""))
        self._send(200, {"errors": [], "warnings": []})

    def r_branch(self, repo: str, branch: str) -> None:
        self._body()
        with self.state.lock:
            r = self.state.repos.get(repo)
            if r is None:
                self._send(404, {"error": "Repository not found"})
                return
            if branch in r.branches:
                self._send(409, {"error": "Branch already exists"})
                return
            r.branches[branch] = r.branches["main"]
        self._send(200, {})

    def r_preupload(self, repo: str, rev: str) -> None:
        req = json.loads(self._body() or b"{}")
        if repo not in self.state.repos:
            self._send(404, {"error": "Repository not found"})
            return
        files = []
        for f in req.get("files", []):
            lfs = f["path"].endswith((".safetensors", ".gguf", ".bin")) or f["size"] >= self.state.lfs_threshold
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": None})
        self._send(200, {"files": files, "commitOid": self.state.repos[repo].branches.get(rev)})

    def r_lfs_batch(self, repo: str) -> None:
        req = json.loads(self._body() or b"{}")
        objects = []
        for o in req.get("objects", []):
            entry: dict[str, Any] = {"oid": o["oid"], "size": o["size"], "authenticated": True}
            if o["oid"] not in self.state.lfs:
                entry["actions"] = {"upload": {"href": f"{self.base}/lfs-upload/{o['oid']}", "header": {}}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects})

    def r_lfs_put(self, oid: str) -> None:
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            self._send(400, {"error": "sha256 mismatch"})
            return
        with self.state.lock:
            self.state.lfs[oid] = data
        self._send(200, {})

    def r_commit(self, repo: str, rev: str) -> None:
        body = self._body()
        r = self.state.repos.get(repo)
        if r is None:
            self._send(404, {"error": "Repository not found"})
            return
        if rev not in r.branches:
            self._send(404, {"error": f"Invalid rev id: {rev}"})
            return
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x["key"] == "header"), {})
        with self.state.lock:
            parent = r.branches[rev]
            files = dict(self.state.commits[parent].files)
            for item in lines:
                v = item["value"]
                if item["key"] == "file":
                    files[v["path"]] = base64.b64decode(v["content"])
                elif item["key"] == "lfsFile":
                    if v["oid"] not in self.state.lfs:
                        self._send(422, {"error": f"LFS object {v['oid']} was not uploaded"})
                        return
                    files[v["path"]] = self.state.lfs[v["oid"]]
                elif item["key"] in ("deletedFile", "deletedFolder"):
                    files.pop(v["path"], None)
            n = sum(1 for c in self.state.commits if c.startswith(repo + ":"))
            oid = f"{repo}:{n}"
            self.state.commits[oid] = Commit(oid, parent, header.get("summary", ""), files)
            r.branches[rev] = oid
        hex_oid = hashlib.sha1(oid.encode()).hexdigest()
        self.server.oid_alias[hex_oid] = oid
        self._send(200, {"commitUrl": f"{self.base}/{repo}/commit/{hex_oid}", "commitOid": hex_oid,
                         "pullRequestUrl": None})

    def _resolve_rev(self, repo: str, rev: str) -> Commit | None:
        r = self.state.repos.get(repo)
        if r is None:
            return None
        oid = r.branches.get(rev) or self.server.oid_alias.get(rev)
        return self.state.commits.get(oid) if oid else None

    def r_info(self, repo: str, rev: str = "main") -> None:
        c = self._resolve_rev(repo, rev or "main")
        if c is None:
            self._send(404, {"error": "Repository not found"})
            return
        self._send(200, {"id": repo, "modelId": repo, "sha": hashlib.sha1(c.oid.encode()).hexdigest(),
                         "private": self.state.repos[repo].private,
                         "siblings": [{"rfilename": p} for p in sorted(c.files)]})

    def r_info_rev(self, repo: str, rev: str) -> None:
        self.r_info(repo, rev)

    def r_resolve(self, repo: str, rev: str, file: str) -> None:
        head = self.command == "HEAD"
        c = self._resolve_rev(repo, rev)
        if c is None or file not in c.files:
            self._send(404, {"error": "Entry not found"}, headers={"X-Error-Code": "EntryNotFound"}, head=head)
            return
        data = c.files[file]
        sha = hashlib.sha256(data).hexdigest()
        lfs = sha in self.state.lfs
        etag = sha if lfs else _git_blob_sha1(data)
        headers = {"X-Repo-Commit": hashlib.sha1(c.oid.encode()).hexdigest(), "ETag": f'"{etag}"'}
        if lfs:
            headers.update({"X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data))})
        self._send(200, raw=data, headers=headers, head=head)


_ROUTES = [
    (r"/api/repos/create", "POST", "create"),
    (r"/api/validate-yaml", "POST", "validate_yaml"),
    (rf"/api/models/{_REPO}/branch/(?P<branch>.+)", "POST", "branch"),
    (rf"/api/models/{_REPO}/preupload/(?P<rev>.+)", "POST", "preupload"),
    (rf"/{_REPO}\.git/info/lfs/objects/batch", "POST", "lfs_batch"),
    (r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "PUT", "lfs_put"),
    (rf"/api/models/{_REPO}/commit/(?P<rev>.+)", "POST", "commit"),
    (rf"/api/models/{_REPO}/revision/(?P<rev>.+)", "GET", "info_rev"),
    (rf"/api/models/{_REPO}", "GET", "info"),
    (rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", "GET", "resolve"),
    (rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", "HEAD", "resolve"),
]


class HubServer(ThreadingHTTPServer):
    """`with HubServer() as hub: HfApi(endpoint=hub.url)`; state in `hub.state`."""

    daemon_threads = True

    def __init__(self, required_token: str | None = None, lfs_threshold: int = 10 * 1024 * 1024):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = HubState(required_token=required_token, lfs_threshold=lfs_threshold)
        self.oid_alias: dict[str, str] = {}
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "HubServer":
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
        self.server_close()
