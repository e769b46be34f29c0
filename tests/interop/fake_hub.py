"""A local stand-in for the Hugging Face Hub's write API, enough for huggingface_hub 2.4's `HfApi.create_repo(...,
exist_ok=True)` and `HfApi.upload_folder(...)` with `HF_ENDPOINT=FakeHub.url`, so `monoscope push` runs its real
HTTP path offline.

What the client sends (read from huggingface_hub 2.4's hf_api.py, _commit_api.py and _upload_pipeline.py):

    POST /api/repos/create                         {"name", "organization", "visibility"?}: 200 {"url"}, or 409
                                                   when it exists (exist_ok swallows the 409)
    POST /api/{type}s/OWNER/NAME/preupload/REV     {"files": [{"path", "sample", "size"}]}: per file "regular"
                                                   (base64 in the commit), or "lfs" (with hf_xet installed, as it
                                                   is here, upload_folder then uploads through xet, not the LFS
                                                   batch API)
    POST /api/{type}s/OWNER/NAME/commit/REV        ndjson: a "header" line {"summary", "description"}, then
                                                   "file" (base64 content), "lfsFile", "deletedFile" and
                                                   "deletedFolder" lines: 200 {"commitUrl", "commitOid", ...}

This hub answers every preupload with "regular" (unless told `lfs(REPO)`), so file contents arrive inline in the
commit and neither xet nor LFS is involved; an "lfsFile" line is refused (it would mean the client uploaded bytes
elsewhere). It keeps every request (method, path, Authorization header, repository, status) and each repository's
files per revision. `fail(...)` makes one endpoint of one repository answer an error, as the Hub does (a JSON
{"error"} body and X-Error-Message).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

_REPO_API = re.compile(r"^/api/(models|datasets|spaces)/([^/]+/[^/]+)/(preupload|commit)/(.+)$")
_REPO_PATH = re.compile(r"^/api/(?:models|datasets|spaces)/([^/]+/[^/]+)(?:/|$)")
Answer = tuple[int, dict[str, Any], dict[str, str]]  # status, JSON body, headers


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query
    query: str
    authorization: str | None
    repo_id: str | None  # the repository it is about (the created one for /api/repos/create)
    status: int  # of the answer


@dataclass
class Commit:
    repo_id: str
    revision: str
    oid: str
    summary: str
    files: list[str]  # paths added by this commit
    url: str  # the commitUrl answered


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    revisions: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})  # revision -> path -> bytes
    head: dict[str, str] = field(default_factory=dict)  # revision -> last commit oid


class FakeHub:
    """The Hub's repo-creation, preupload and commit endpoints on 127.0.0.1 (a free port), in a thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: list[Request] = []
        self.repos: dict[str, Repo] = {}
        self.commits: list[Commit] = []
        self._fail: dict[tuple[str, str], tuple[int, str]] = {}
        self._lfs: set[str] = set()
        server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        server.daemon_threads = True
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def fail(self, endpoint: str, repo_id: str, status: int, message: str) -> FakeHub:
        """Answer `endpoint` ("create", "preupload" or "commit") for `repo_id` with `status` and `message`. The
        client retries 408, 429 and 5xx answers to preupload and commit with backoff (seconds each): use 4xx."""
        assert endpoint in ("create", "preupload", "commit"), endpoint
        with self._lock:
            self._fail[(endpoint, repo_id)] = (status, message)
        return self

    def lfs(self, repo_id: str) -> FakeHub:
        """Answer the preupload of `repo_id` with "lfs", as the Hub does for weights: with hf_xet installed the client
        then asks for a xet write token (GET /api/models/OWNER/NAME/xet-write-token/REV), which this hub has not."""
        with self._lock:
            self._lfs.add(repo_id)
        return self

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self._lock:
            return dict(self.repos[repo_id].revisions.get(revision, {}))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeHub:
        return self

    def __exit__(self, tp: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ endpoints
    def _failure(self, endpoint: str, repo_id: str) -> Answer | None:
        with self._lock:
            failure = self._fail.get((endpoint, repo_id))
        if failure is None:
            return None
        status, message = failure
        return status, {"error": message}, {"X-Error-Message": message}

    def _create(self, body: dict[str, Any]) -> Answer:
        repo_id = _created(body)
        repo_type = str(body.get("type") or "model")
        url = f"{self.url}/{repo_id}" if repo_type == "model" else f"{self.url}/{repo_type}s/{repo_id}"
        failure = self._failure("create", repo_id)
        if failure is not None:
            return failure
        with self._lock:
            if repo_id in self.repos:
                msg = f"You already created this {repo_type} repo"
                return 409, {"error": msg, "url": url}, {"X-Error-Message": msg}
            self.repos[repo_id] = Repo(repo_id, repo_type, body.get("visibility") == "private")
        return 200, {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]}, {}

    def _repo_or_404(self, repo_id: str) -> Repo | Answer:
        with self._lock:
            repo = self.repos.get(repo_id)
        if repo is None:
            msg = "Repository not found"
            return 404, {"error": msg}, {"X-Error-Code": "RepoNotFound", "X-Error-Message": msg}
        return repo

    def _preupload(self, repo_id: str, body: dict[str, Any]) -> Answer:
        repo = self._repo_or_404(repo_id)
        if not isinstance(repo, Repo):
            return repo
        failure = self._failure("preupload", repo_id)
        if failure is not None:
            return failure
        with self._lock:
            mode = "lfs" if repo_id in self._lfs else "regular"
        files = [{"path": f["path"], "uploadMode": mode, "shouldIgnore": False} for f in body["files"]]
        return 200, {"files": files}, {}

    def _commit(self, repo_id: str, revision: str, raw: bytes) -> Answer:
        repo = self._repo_or_404(repo_id)
        if not isinstance(repo, Repo):
            return repo
        failure = self._failure("commit", repo_id)
        if failure is not None:
            return failure
        lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return 400, {"error": "the first line of a commit must be its header"}, {}
        summary = str(lines[0]["value"]["summary"])
        added: dict[str, bytes] = {}
        deleted: list[tuple[str, bool]] = []
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file" and value.get("encoding") == "base64":
                added[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append((value["path"].rstrip("/"), key == "deletedFolder"))
            else:  # lfsFile: the bytes would have gone to LFS or xet storage, which this hub does not have
                return 422, {"error": f"this fake hub takes inline files only, not {key}"}, {}
        with self._lock:
            tree = dict(repo.revisions.get(revision, {}))
            for path, folder in deleted:
                tree = {p: b for p, b in tree.items() if p != path and not (folder and p.startswith(path + "/"))}
            tree.update(added)
            parent = repo.head.get(revision, "")
            digest = hashlib.sha1(parent.encode() + summary.encode())
            for path in sorted(tree):
                digest.update(path.encode() + b"\0" + hashlib.sha1(tree[path]).digest())
            oid = digest.hexdigest()
            repo.revisions[revision] = tree
            repo.head[revision] = oid
            prefix = self.url if repo.repo_type == "model" else f"{self.url}/{repo.repo_type}s"
            url = f"{prefix}/{repo_id}/commit/{oid}"
            self.commits.append(Commit(repo_id, revision, oid, summary, sorted(added), url))
        return 200, {"success": True, "commitOid": oid, "commitUrl": url, "hookOutput": "", "pullRequestUrl": None}, {}

    def _route(self, method: str, path: str, raw: bytes) -> Answer:
        if method == "POST" and path == "/api/repos/create":
            return self._create(json.loads(raw))
        m = _REPO_API.match(path)
        if method == "POST" and m is not None:
            _, repo_id, action, revision = m.groups()
            revision = unquote(revision)
            if action == "preupload":
                return self._preupload(repo_id, json.loads(raw))
            return self._commit(repo_id, revision, raw)
        return 404, {"error": f"the fake hub has no {method} {path}"}, {}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the Hub: the client reuses its connections

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        chunk = self.rfile.read(size + 2)[:size]  # each chunk ends with CRLF
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return bytes(out)
                        out += chunk
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _serve(self) -> None:
                split = urlsplit(self.path)
                raw = self._body()
                try:
                    status, payload, headers = hub._route(self.command, split.path, raw)
                except (KeyError, TypeError, ValueError) as e:  # a request this hub does not understand
                    status, payload, headers = 400, {"error": f"bad request: {e!r}"}, {}
                with hub._lock:
                    hub.requests.append(Request(self.command, split.path, split.query,
                                                self.headers.get("Authorization"), _repo_of(split.path, raw), status))
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _serve

        return Handler


def _created(body: dict[str, Any]) -> str:
    """The repository id a /api/repos/create body asks for."""
    return f"{body['organization']}/{body['name']}" if body.get("organization") else str(body["name"])


def _repo_of(path: str, raw: bytes) -> str | None:
    if path == "/api/repos/create":
        try:
            return _created(json.loads(raw))
        except (KeyError, TypeError, ValueError):
            return None
    m = _REPO_PATH.match(path)
    return m.group(1) if m else None
