"""TEST DOUBLE of the Hugging Face Hub HTTP API, for the test suite only.

This is not a Hub implementation. It answers just the routes that the real `huggingface_hub` client (2.4) calls to
create a repo, commit files, inspect a repo and download files, so that tests can push and pull models and pipelines
over real HTTP without mocking any client function:

- `POST /api/repos/create`, `POST /api/validate-yaml` (accepts any model card);
- `GET /api/{models,datasets}/{repo}` and `.../revision/{rev}` (repo info, `siblings`);
- `GET /api/{models,datasets}/{repo}/tree/{rev}[/{path}]` (`recursive` supported, `expand` refused);
- `POST .../preupload/{rev}` (answers "regular" for every file, so the client never takes the LFS or Xet path) and
  `POST .../commit/{rev}` (NDJSON: `header`, `file` with base64 content, `deletedFile`, `deletedFolder`);
- `HEAD`/`GET /[datasets/]{repo}/resolve/{rev}/{path}` with `ETag`, `X-Repo-Commit`, `Content-Length` and `Range`.

Limits, on purpose: no authentication (any token is accepted), no LFS or Xet storage, no pull requests, no branch
creation (only `main`), no git objects (a commit id is a 40-hex name, not a git hash). Everything lives in memory and
is lost on `stop()`. The server only listens on the loopback interface.

`use_local_hub` points the client (and the HfApi singletons that huggingface_hub and transformers keep) at a running
server for one pytest test; `set_hub_offline` switches the client to offline mode the same way.
"""

import base64
import binascii
import hashlib
import ipaddress
import itertools
import json
import re
import sys
import threading
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, unquote, urlsplit


DUMMY_TOKEN = "hf_local_test_double_token"
DEFAULT_USER = "test-user"

# How the client spells each supported repo type: `/api/{type}s/{repo}/...` and `/{prefix}{repo}/resolve/...`.
_API_TYPES = {"models": "model", "datasets": "dataset"}
_RESOLVE_PREFIXES = {"model": "", "dataset": "datasets/"}

# What the Hub puts in a new repo's first commit (trimmed): LFS rules for common binary formats.
_INITIAL_GITATTRIBUTES = b"".join(
    f"*.{ext} filter=lfs diff=lfs merge=lfs -text\n".encode()
    for ext in ("bin", "ckpt", "h5", "npy", "onnx", "pt", "pth", "safetensors", "zip")
)

# Modules that copy `huggingface_hub.constants.HF_HUB_OFFLINE` at import time and read the copy later.
_OFFLINE_FLAG_COPIES = (
    "diffusers.utils.hub_utils",
    "diffusers.loaders.lora_base",
    "diffusers.models.attention_dispatch",
)


def _git_blob_id(content: bytes) -> str:
    """Git's object id of a blob: what the Hub reports as a regular file's `oid` and `ETag`."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _now() -> str:
    """Current UTC time in the Hub's format, `2024-01-31T12:00:00.123Z`."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class _HubError(Exception):
    """An error answer: HTTP status, the `X-Error-Code` the client maps to an exception class, and a message."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.commit = commit  # sent as `X-Repo-Commit`, lets the client cache a missing file's absence


@dataclass(frozen=True)
class _Commit:
    sha: str
    title: str
    date: str
    files: dict[str, bytes]  # the whole tree at this commit: path in repo -> content


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, _Commit] = field(default_factory=dict)  # sha -> commit
    branches: dict[str, str] = field(default_factory=dict)  # branch name -> head sha

    def resolve(self, revision: str) -> _Commit:
        """The commit a branch name or a full 40-hex commit id points to."""
        sha = self.branches.get(revision, revision)
        if sha not in self.commits:
            raise _HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return self.commits[sha]


class _HubState:
    """All repos of one server, guarded by one lock (handler threads run concurrently)."""

    def __init__(self, user: str):
        self.user = user
        self.lock = threading.Lock()
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self._commit_counter = itertools.count()

    def repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise _HubError(404, f"Repository not found: {repo_type} {repo_id}", code="RepoNotFound")
        return repo

    def new_commit(self, repo: _Repo, parent: str | None, title: str, files: dict[str, bytes]) -> _Commit:
        """Record a commit on `main` and return it. Its id hashes a counter, so two commits never share one."""
        blob_ids = sorted((path, _git_blob_id(content)) for path, content in files.items())
        seed = json.dumps([repo.repo_type, repo.repo_id, parent, title, blob_ids, next(self._commit_counter)])
        commit = _Commit(sha=hashlib.sha1(seed.encode()).hexdigest(), title=title, date=_now(), files=files)
        repo.commits[commit.sha] = commit
        repo.branches["main"] = commit.sha
        return commit


class _HubRequestHandler(BaseHTTPRequestHandler):
    server: "_LoopbackHTTPServer"
    # HTTP/1.0: one request per connection, so no idle keep-alive connection outlives `stop()`.
    protocol_version = "HTTP/1.0"

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def log_message(self, format, *args):  # keep test output quiet; `LocalHubServer.requests` records calls
        pass

    # -- routing ------------------------------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        # Split before unquoting: the client quotes revisions and tree paths with `safe=""`, so `%2F` stays inside
        # its segment.
        segments = [unquote(part) for part in url.path.strip("/").split("/")]
        state = self.server.state
        with state.lock:
            state.requests.append((method, url.path))
            try:
                # Read the whole body first, even for a request that fails: unread bytes would reset the connection.
                self.body = self._read_body() if method == "POST" else b""
                self._route(method, segments)
            except _HubError as error:
                self._send_error(error, head_only=method == "HEAD")
            except Exception as error:  # a bug in the double: answer it instead of dropping the connection
                traceback.print_exc()
                self._send_error(_HubError(500, f"test double failed: {error!r}"), head_only=method == "HEAD")

    def _route(self, method: str, segments: list[str]) -> None:
        if segments[0] == "api":
            return self._route_api(method, segments[1:])
        repo_type = "model"
        if segments[0] == "datasets":
            repo_type, segments = "dataset", segments[1:]
        if method in ("GET", "HEAD") and len(segments) >= 5 and segments[2] == "resolve":
            repo = self.server.state.repo(repo_type, "/".join(segments[:2]))
            return self._resolve(repo, segments[3], "/".join(segments[4:]), head_only=method == "HEAD")
        raise _HubError(404, f"Route not served by the test double: {method} {self.path}")

    def _route_api(self, method: str, segments: list[str]) -> None:
        route = (method, *segments[:2])
        if route == ("POST", "repos", "create"):
            return self._create_repo(self._json_body())
        if route == ("POST", "validate-yaml"):
            return self._send_json({"errors": [], "warnings": []})
        if len(segments) >= 3 and segments[0] in _API_TYPES:
            repo = self.server.state.repo(_API_TYPES[segments[0]], "/".join(segments[1:3]))
            action, args = (segments[3], segments[4:]) if len(segments) > 3 else (None, [])
            if method == "GET" and action is None:
                return self._repo_info(repo, "main")
            if method == "GET" and action == "revision" and len(args) == 1:
                return self._repo_info(repo, args[0])
            if method == "GET" and action == "tree" and args:
                return self._tree(repo, args[0], "/".join(args[1:]))
            if method == "POST" and action == "preupload" and len(args) == 1:
                return self._preupload(repo, args[0], self._json_body())
            if method == "POST" and action == "commit" and len(args) == 1:
                return self._commit(repo, args[0], self.body)
        raise _HubError(404, f"Route not served by the test double: {method} {self.path}")

    # -- endpoints ----------------------------------------------------------------------------------------------

    def _create_repo(self, payload: dict) -> None:
        state = self.server.state
        repo_type = payload.get("type") or "model"
        if repo_type not in _RESOLVE_PREFIXES:
            raise _HubError(400, f"type must be one of {sorted(_RESOLVE_PREFIXES)} here, got {repo_type!r}")
        name = payload.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
            raise _HubError(400, f"name must be a repo name of letters, digits, '_', '.' or '-', got {name!r}")
        repo_id = f"{payload.get('organization') or state.user}/{name}"
        url = f"{self.server.endpoint}/{_RESOLVE_PREFIXES[repo_type]}{repo_id}"
        if (repo_type, repo_id) in state.repos:
            # The client reads `url` from this 409 answer too when it is called with `exist_ok=True`.
            return self._send_json({"error": "You already created this repo", "url": url}, status=409)
        repo = _Repo(repo_type, repo_id, private=payload.get("visibility") == "private", created_at=_now())
        state.repos[(repo_type, repo_id)] = repo
        state.new_commit(repo, None, "initial commit", {".gitattributes": _INITIAL_GITATTRIBUTES})
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _repo_info(self, repo: _Repo, revision: str) -> None:
        if "expand" in self.query:
            raise _HubError(400, "expand is not supported by this test double")
        commit = repo.resolve(revision)
        with_blobs = self.query.get("blobs", "false").lower() == "true"
        siblings = [
            {"rfilename": path, **({"size": len(content), "blobId": _git_blob_id(content)} if with_blobs else {})}
            for path, content in sorted(commit.files.items())
        ]
        self._send_json(
            {
                "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "author": repo.repo_id.split("/")[0],
                "sha": commit.sha,
                "lastModified": commit.date,
                "createdAt": repo.created_at,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
            }
        )

    def _tree(self, repo: _Repo, revision: str, folder: str) -> None:
        if self.query.get("expand", "false").lower() == "true":
            raise _HubError(400, "expand=true is not supported by this test double")
        recursive = self.query.get("recursive", "false").lower() == "true"
        commit = repo.resolve(revision)
        folder = folder.strip("/")
        prefix = f"{folder}/" if folder else ""
        below = {path[len(prefix) :]: content for path, content in commit.files.items() if path.startswith(prefix)}
        if not below:
            raise _HubError(404, f"{folder!r} does not exist on {revision!r}", code="EntryNotFound", commit=commit.sha)
        entries: dict[str, dict] = {}
        for relative, content in below.items():
            parts = PurePosixPath(relative).parts
            # Folders on the way to the file; a non-recursive listing keeps only the first level.
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                sub = prefix + "/".join(parts[:depth])
                entries[sub] = {"type": "directory", "path": sub, "oid": self._folder_id(commit, sub)}
            if recursive or len(parts) == 1:
                path = prefix + relative
                entries[path] = {"type": "file", "path": path, "oid": _git_blob_id(content), "size": len(content)}
        self._send_json([entries[path] for path in sorted(entries)])

    def _preupload(self, repo: _Repo, revision: str, payload: dict) -> None:
        if "create_pr" in self.query:
            raise _HubError(400, "create_pr is not supported by this test double")
        commit = repo.resolve(revision)
        files = payload.get("files")
        if not isinstance(files, list) or not all(isinstance(f, dict) and "path" in f for f in files):
            raise _HubError(400, "files must be a list of objects with a 'path'")
        answers = []
        for file in files:
            existing = commit.files.get(file["path"])
            oid = _git_blob_id(existing) if existing is not None else None  # lets the client skip unchanged files
            answers.append({"path": file["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        self._send_json({"files": answers, "commitOid": commit.sha})

    def _commit(self, repo: _Repo, revision: str, body: bytes) -> None:
        if "create_pr" in self.query:
            raise _HubError(400, "create_pr is not supported by this test double")
        if revision not in repo.branches:
            raise _HubError(404, f"Branch not found: {revision!r}", code="RevisionNotFound")
        head = repo.commits[repo.branches[revision]]
        files = dict(head.files)
        header = None
        for key, value in _ndjson_operations(body):
            if header is None and key != "header":
                raise _HubError(400, "commit payload must start with a 'header' line")
            if key == "header":
                header = value
                parent = value.get("parentCommit")
                if parent is not None and parent != head.sha:
                    raise _HubError(412, f"parentCommit {parent} is not the head of {revision!r} ({head.sha})")
                continue
            path = _checked_repo_path(value.get("path"))
            if key == "file":
                files[path] = _decode_file_content(value)
            elif key == "deletedFile":
                if path not in files:
                    raise _HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                inside = [p for p in files if p.startswith(path.rstrip("/") + "/")]
                if not inside:
                    raise _HubError(404, f"A folder with this name doesn't exist: {path}", code="EntryNotFound")
                for p in inside:
                    del files[p]
            else:  # lfsFile included: the preupload answer never asks for LFS
                raise _HubError(400, f"commit operation {key!r} is not supported by this test double")
        if header is None:
            raise _HubError(400, "commit payload is empty: it needs at least a 'header' line")
        commit = self.server.state.new_commit(repo, head.sha, header.get("summary") or "", files)
        url_prefix = f"{self.server.endpoint}/{_RESOLVE_PREFIXES[repo.repo_type]}{repo.repo_id}"
        self._send_json(
            {
                "success": True,
                "commitOid": commit.sha,
                "commitUrl": f"{url_prefix}/commit/{commit.sha}",
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    def _resolve(self, repo: _Repo, revision: str, path: str, head_only: bool) -> None:
        commit = repo.resolve(revision)
        content = commit.files.get(path)
        if content is None:
            raise _HubError(404, f"Entry not found: {path}", code="EntryNotFound", commit=commit.sha)
        headers = {
            "ETag": f'"{_git_blob_id(content)}"',
            "X-Repo-Commit": commit.sha,
            "Accept-Ranges": "bytes",
        }
        start, end = 0, len(content)
        status = 200
        byte_range = _parse_range(self.headers.get("Range"), len(content))
        if byte_range is not None:
            start, end = byte_range
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(content)}"
        self._send(status, content[start:end], "application/octet-stream", headers, head_only=head_only)

    # -- helpers ------------------------------------------------------------------------------------------------

    @staticmethod
    def _folder_id(commit: _Commit, folder: str) -> str:
        """A stable 40-hex id for a folder's content (not git's tree hash)."""
        inside = sorted((p, _git_blob_id(c)) for p, c in commit.files.items() if p.startswith(folder + "/"))
        return hashlib.sha1(json.dumps(inside).encode()).hexdigest()

    def _read_body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise _HubError(411, "the test double needs a Content-Length header on request bodies")
        return self.rfile.read(int(length))

    def _json_body(self) -> dict:
        try:
            payload = json.loads(self.body or b"{}")
        except json.JSONDecodeError as error:
            raise _HubError(400, f"request body is not JSON: {error}") from error
        if not isinstance(payload, dict):
            raise _HubError(400, "request body must be a JSON object")
        return payload

    def _send_json(self, payload, status: int = 200) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", {})

    def _send_error(self, error: _HubError, head_only: bool) -> None:
        headers = {"X-Error-Message": str(error).encode("ascii", "backslashreplace").decode()}
        if error.code is not None:
            headers["X-Error-Code"] = error.code
        if error.commit is not None:
            headers["X-Repo-Commit"] = error.commit
        body = json.dumps({"error": str(error)}).encode()
        self._send(error.status, body, "application/json", headers, head_only=head_only)

    def _send(self, status: int, body: bytes, content_type: str, headers: dict, head_only: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if not head_only:
            self.wfile.write(body)


def _checked_repo_path(path) -> str:
    """A relative POSIX path inside the repo, or a 400 error."""
    if not isinstance(path, str) or not path or path.startswith("/") or ".." in PurePosixPath(path).parts:
        raise _HubError(400, f"path must be a relative path inside the repo, got {path!r}")
    return path


def _ndjson_operations(body: bytes):
    """`(key, value)` of each line of a commit payload (one JSON object a line)."""
    for line in body.splitlines():
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise _HubError(400, f"commit payload line is not JSON: {error}") from error
        if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
            raise _HubError(400, "each commit payload line must be an object with 'key' and an object 'value'")
        yield item.get("key"), item["value"]


def _decode_file_content(value: dict) -> bytes:
    encoding = value.get("encoding", "utf-8")
    content = value.get("content", "")
    if encoding == "base64":
        try:
            return base64.b64decode(content, validate=True)
        except binascii.Error as error:
            raise _HubError(400, f"file content is not valid base64: {error}") from error
    if encoding == "utf-8":
        return content.encode()
    raise _HubError(400, f"file encoding must be 'base64' or 'utf-8', got {encoding!r}")


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """`(start, end)` (end exclusive) of a single `bytes=` range; None to send the whole file."""
    if header is None:
        return None
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        return None  # multiple or malformed ranges: HTTP allows answering with the whole file
    first, last = match.groups()
    if first == "":  # suffix range: the last N bytes
        start, end = max(size - int(last), 0), size
    else:
        start, end = int(first), size if last == "" else min(int(last) + 1, size)
    if start >= end:
        raise _HubError(416, f"Range {header!r} is outside a file of {size} bytes")
    return start, end


class _LoopbackHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    state: _HubState
    endpoint: str


class LocalHubServer:
    """TEST DOUBLE of the Hugging Face Hub API: an in-memory, loopback-only HTTP server for tests.

    Not a Hub implementation: see this module's docstring for the routes it answers and what it leaves out.

    Use as `with LocalHubServer() as hub:` or `hub = LocalHubServer().start(); ...; hub.stop()`; point the client at
    `hub.endpoint` (the `local_hub` fixture in `conftest.py` does both). `requests` lists the `(method, path)` of
    every request received, in order.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, user: str = DEFAULT_USER):
        address = ipaddress.ip_address(host)  # a name such as "localhost" raises ValueError here too
        if address.version != 4 or not address.is_loopback:
            raise ValueError(f"host must be an IPv4 loopback address such as '127.0.0.1', got {host!r}")
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in [0, 65535] (0 picks a free port), got {port}")
        self._address = (host, port)
        self._state = _HubState(user)
        self._httpd: _LoopbackHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "LocalHubServer":
        if self._httpd is not None:
            raise RuntimeError("LocalHubServer is already running")
        httpd = _LoopbackHTTPServer(self._address, _HubRequestHandler)
        host, port = httpd.server_address[:2]
        httpd.state = self._state
        httpd.endpoint = f"http://{host}:{port}"
        # A short poll interval keeps `stop()` fast: `shutdown()` waits for the loop to notice.
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="local-hub", daemon=True
        )
        self._thread.start()
        self._httpd = httpd
        return self

    def stop(self) -> None:
        """Stop serving and close the socket; calling it again does nothing."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)
        self._httpd = None

    @property
    def endpoint(self) -> str:
        if self._httpd is None:
            raise RuntimeError("LocalHubServer is not running: call start() first")
        return self._httpd.endpoint

    @property
    def requests(self) -> list[tuple[str, str]]:
        with self._state.lock:
            return list(self._state.requests)

    def __enter__(self) -> "LocalHubServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def use_local_hub(monkeypatch, endpoint: str, hf_home: str | Path) -> None:
    """Point `huggingface_hub` (and libraries built on it) at `endpoint`, with an isolated cache under `hf_home`.

    Sets the environment variables for code that reads them at call time, and patches `huggingface_hub.constants`
    and the HfApi singletons, which were filled at import time. Everything goes through `monkeypatch`, so it is
    undone at the end of the test. Call `forget_hub_clients()` after stopping the server.
    """
    from huggingface_hub import close_session, constants, hf_api

    hf_home = Path(hf_home)
    hub_cache = str(hf_home / "hub")
    for name, value in {
        "HF_ENDPOINT": endpoint,
        "HF_TOKEN": DUMMY_TOKEN,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": hub_cache,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "NO_PROXY": "127.0.0.1,localhost",
    }.items():
        monkeypatch.setenv(name, value)
    for name, value in {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": hub_cache,
        "HUGGINGFACE_HUB_CACHE": hub_cache,
        "HF_ASSETS_CACHE": str(hf_home / "assets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(hf_home / ".agent_harnesses.json"),
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_XET": True,
    }.items():
        monkeypatch.setattr(constants, name, value)
    set_hub_offline(monkeypatch, False)
    # Module-level helpers such as `huggingface_hub.create_repo` are bound to this instance.
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None:  # transformers builds its HfApi once, on first use
        monkeypatch.setattr(transformers_hub, "_hf_api", None)
    close_session()  # the shared HTTP client is rebuilt on next use, with the environment set above


def set_hub_offline(monkeypatch, offline: bool = True) -> None:
    """Switch the client's offline mode (`HF_HUB_OFFLINE`) in the environment, the constants and the known copies."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    for module_name in _OFFLINE_FLAG_COPIES:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, "HF_HUB_OFFLINE"):
            monkeypatch.setattr(module, "HF_HUB_OFFLINE", offline)


def forget_hub_clients() -> None:
    """Drop client state tied to a stopped server: pooled HTTP connections and transformers' HfApi singleton."""
    from huggingface_hub import close_session

    close_session()
    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None:
        transformers_hub._hf_api = None
