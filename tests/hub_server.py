"""A real, local HTTP server speaking the part of the Hugging Face Hub protocol that
huggingface_hub 2.4 and transformers 5 use to upload and download model repositories.

Test support, not a test file. It runs on 127.0.0.1 (port chosen by the OS) in a thread and keeps
every repository in a temporary directory with a commit history, so tests exercise the real
``HfApi.upload_folder`` / ``push_to_hub`` / ``from_pretrained`` / ``snapshot_download`` code paths
over HTTP instead of mocks. Stdlib only.

Protocol covered (checked against huggingface_hub 2.4's hf_api.py, _commit_api.py, file_download.py,
_snapshot_download.py and utils/_http.py):
- ``POST /api/repos/create`` -> ``{"url"}``; 409 with the url when the repo exists (``exist_ok``).
- ``POST /api/validate-yaml``: 400 with ``{"errors": [...]}`` when the README front matter is no dict.
- ``POST /api/{type}s/{repo}/preupload/{rev}``: every file "regular" (so no LFS / xet), with the
  oid of the file already on the branch so unchanged files are skipped by the client.
- ``POST /api/{type}s/{repo}/commit/{rev}``: NDJSON header / file (base64) / deletedFile /
  deletedFolder lines -> ``{"commitOid", "commitUrl"}``.
- ``POST /api/{type}s/{repo}/branch/{branch}``: 409 when it exists.
- ``GET /api/{type}s/{repo}[/revision/{rev}]`` with ``sha``, ``siblings`` and the card metadata.
- ``GET /api/{type}s/{repo}/tree/{rev}[/{path}]?recursive=``, ``/refs``, ``/commits/{rev}``.
- ``HEAD``/``GET /[{type}s/]{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag`` (the git
  blob sha1, as the Hub gives for non-LFS files), ``Content-Length``, and ``X-Error-Code``
  ``RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound`` on a 404.
- ``GET /api/whoami-v2``.
Writes need ``Authorization: Bearer <token>`` with a known token (401 otherwise, with the Hub's
"Invalid credentials" message for a wrong one); private repos are hidden (404) from other users.
``fail_next(endpoint, status)`` makes the next request to an endpoint fail, to test error paths.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

REPO_TYPES = ("model", "dataset", "space")
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
YAML_BLOCK = re.compile(r"\A---\s*\n(.*?)\n---\s*(\n|\Z)", re.DOTALL)


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: the Hub's ETag and ``oid`` for a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def card_metadata(readme: bytes | None) -> dict | None:
    """The YAML front matter of a README as a dict, None when there is none; ValueError if it is no dict."""
    if readme is None:
        return None
    match = YAML_BLOCK.match(readme.decode("utf-8-sig"))
    if match is None:
        return None
    data = yaml.safe_load(match.group(1))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("The README metadata block must be a YAML mapping.")
    return data


class HubError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None, commit: str | None = None):
        super().__init__(message)
        self.status, self.message, self.error_code, self.commit = status, message, error_code, commit


@dataclass
class Repo:
    """A repository on disk: ``objects/<blob sha1>``, ``commits/<sha>.json``, ``refs.json``."""

    root: Path
    repo_type: str
    repo_id: str
    owner: str
    private: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def create(self) -> None:
        for folder in ("objects", "commits"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self._write_refs({})
        self.commit("main", "initial commit", {".gitattributes": GITATTRIBUTES}, set(), set(), author=self.owner)

    # ---- storage
    def _refs(self) -> dict[str, str]:
        return json.loads((self.root / "refs.json").read_text())

    def _write_refs(self, refs: dict[str, str]) -> None:
        (self.root / "refs.json").write_text(json.dumps(refs))

    def resolve(self, revision: str) -> str:
        """A branch name or a full / 7+ character commit sha -> the commit sha."""
        refs = self._refs()
        if revision in refs:
            return refs[revision]
        if re.fullmatch(r"[0-9a-f]{7,40}", revision):
            matches = [p.stem for p in (self.root / "commits").glob(f"{revision}*.json")]
            if len(matches) == 1:
                return matches[0]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def read_commit(self, sha: str) -> dict:
        return json.loads((self.root / "commits" / f"{sha}.json").read_text())

    def files(self, sha: str) -> dict[str, str]:
        """path -> blob sha1 of the tree at commit `sha`."""
        return self.read_commit(sha)["files"]

    def blob(self, oid: str) -> bytes:
        return (self.root / "objects" / oid).read_bytes()

    def branches(self) -> dict[str, str]:
        return self._refs()

    def create_branch(self, branch: str, starting_point: str | None) -> None:
        with self.lock:
            refs = self._refs()
            if branch in refs:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            refs[branch] = self.resolve(starting_point or "main")
            self._write_refs(refs)

    def commit(self, branch: str, message: str, additions: dict[str, bytes], deleted_files: set[str],
               deleted_folders: set[str], parent_commit: str | None = None, author: str = "") -> str:
        with self.lock:
            refs = self._refs()
            if branch not in refs and refs:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            parent = refs.get(branch)
            if parent_commit is not None and parent is not None and not parent.startswith(parent_commit):
                raise HubError(412, f"A commit has happened since. Please refresh and try again (head is {parent}).")
            files = dict(self.files(parent)) if parent else {}
            for path in deleted_files:
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
            for folder in deleted_folders:
                prefix = folder.rstrip("/") + "/"
                files = {path: oid for path, oid in files.items() if not path.startswith(prefix)}
            for path, data in additions.items():
                oid = git_blob_sha1(data)
                (self.root / "objects" / oid).write_bytes(data)
                files[path] = oid
            record = {"parent": parent, "message": message, "files": files, "time": time.time(), "author": author}
            sha = hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()
            (self.root / "commits" / f"{sha}.json").write_text(json.dumps(record))
            refs[branch] = sha
            self._write_refs(refs)
            return sha

    def history(self, branch: str = "main") -> list[str]:
        """Commit shas from the head of `branch` back to the first commit."""
        shas, sha = [], self.resolve(branch)
        while sha:
            shas.append(sha)
            sha = self.read_commit(sha)["parent"]
        return shas


class LocalHub:
    """The server. ``with LocalHub(tokens={"tok": "user"}) as hub: hub.endpoint ...``."""

    def __init__(self, tokens: dict[str, str] | None = None, root: str | Path | None = None):
        self.tokens = dict(tokens or {"hf_local_test_token": "test-user"})
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="local_hub_"))
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status), for debugging tests
        self._failures: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def token(self) -> str:
        return next(iter(self.tokens))

    def start(self) -> "LocalHub":
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- test controls
    def fail_next(self, endpoint: str, status: int = 500, times: int = 1) -> None:
        """Answer the next `times` requests to `endpoint` ("create", "preupload", "commit", "resolve",
        "info", "tree", "refs", "commits", "validate-yaml", "branch", "whoami") with HTTP `status`."""
        with self._lock:
            self._failures.setdefault(endpoint, []).extend([status] * times)

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def take_failure(self, endpoint: str) -> int | None:
        with self._lock:
            queue = self._failures.get(endpoint)
            return queue.pop(0) if queue else None

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        """The stored repo (KeyError if absent), for assertions on history and contents."""
        return self.repos[(repo_type, repo_id)]

    def create_repo(self, repo_type: str, repo_id: str, owner: str, private: bool) -> tuple[Repo, bool]:
        with self._lock:
            key = (repo_type, repo_id)
            if key in self.repos:
                return self.repos[key], False
            repo = Repo(self.root / f"{repo_type}s" / repo_id, repo_type, repo_id, owner, private)
            repo.create()
            self.repos[key] = repo
            return repo, True

    def repo_url(self, repo_type: str, repo_id: str) -> str:
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return f"{self.endpoint}/{prefix}{repo_id}"


def _make_handler(hub: LocalHub):
    class Handler(_HubHandler):
        pass

    Handler.hub = hub
    return Handler


class _HubHandler(BaseHTTPRequestHandler):
    hub: LocalHub
    protocol_version = "HTTP/1.1"  # keep-alive; every answer carries Content-Length

    def log_message(self, format, *args):  # quiet: tests read hub.requests instead
        pass

    # ---- plumbing
    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.hub.requests.append((self.command, self.path, status))

    def _json(self, status: int, payload, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _error(self, error: HubError) -> None:
        headers = {"X-Error-Message": error.message}
        if error.error_code:
            headers["X-Error-Code"] = error.error_code
        if error.commit:
            headers["X-Repo-Commit"] = error.commit
        self._json(error.status, {"error": error.message}, headers)

    def _user(self, required: bool) -> str | None:
        """The user owning the bearer token; 401 for a wrong token, or a missing one when `required`."""
        header = self.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            user = self.hub.tokens.get(header[len("Bearer "):].strip())
            if user is None:
                raise HubError(401, "Invalid credentials in Authorization header")
            return user
        if required:
            raise HubError(401, "Invalid username or password.")
        return None

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        segments = url.path.strip("/").split("/")  # still quoted: a revision may contain %2F
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        try:
            body = self._body()
            route = self._route(method, segments)
            if route is None:
                raise HubError(404, f"Not handled by the local test hub: {method} {url.path}")
            name, handler, args = route
            status = self.hub.take_failure(name)
            if status is not None:
                raise HubError(status, f"Injected failure of the '{name}' endpoint (HTTP {status}).")
            handler(*args, body=body, query=query)
        except HubError as error:
            self._error(error)
        except Exception as error:  # a bug here must show up as a 500 with its message, not a hang
            self._error(HubError(500, f"{type(error).__name__}: {error}"))

    def _route(self, method: str, seg: list[str]):
        """(endpoint name, handler, args) for the request, or None."""
        if seg[:1] == ["api"]:
            rest = seg[1:]
            if method == "POST" and rest == ["repos", "create"]:
                return "create", self.api_create, ()
            if method == "POST" and rest == ["validate-yaml"]:
                return "validate-yaml", self.api_validate_yaml, ()
            if method == "GET" and rest == ["whoami-v2"]:
                return "whoami", self.api_whoami, ()
            if len(rest) >= 3 and rest[0].rstrip("s") in REPO_TYPES:
                repo_type, repo_id, tail = rest[0][:-1], f"{unquote(rest[1])}/{unquote(rest[2])}", rest[3:]
                if method == "GET" and not tail:
                    return "info", self.api_info, (repo_type, repo_id, "main")
                if method == "GET" and len(tail) == 2 and tail[0] == "revision":
                    return "info", self.api_info, (repo_type, repo_id, unquote(tail[1]))
                if method == "GET" and tail == ["refs"]:
                    return "refs", self.api_refs, (repo_type, repo_id)
                if method == "GET" and len(tail) == 2 and tail[0] == "commits":
                    return "commits", self.api_commits, (repo_type, repo_id, unquote(tail[1]))
                if method == "GET" and len(tail) >= 2 and tail[0] == "tree":
                    path = unquote("/".join(tail[2:]))
                    return "tree", self.api_tree, (repo_type, repo_id, unquote(tail[1]), path)
                if method == "POST" and len(tail) == 2 and tail[0] in ("preupload", "commit", "branch"):
                    handler = {"preupload": self.api_preupload, "commit": self.api_commit,
                               "branch": self.api_branch}[tail[0]]
                    return tail[0], handler, (repo_type, repo_id, unquote(tail[1]))
            return None
        repo_type = "model"
        if seg and seg[0] in ("datasets", "spaces"):
            repo_type, seg = seg[0][:-1], seg[1:]
        if method in ("GET", "HEAD") and len(seg) >= 5 and seg[2] == "resolve":
            repo_id, revision = f"{unquote(seg[0])}/{unquote(seg[1])}", unquote(seg[3])
            path = unquote("/".join(seg[4:]))
            return "resolve", self.resolve_file, (repo_type, repo_id, revision, path)
        return None

    def _repo(self, repo_type: str, repo_id: str, user: str | None, write: bool = False) -> Repo:
        repo = self.hub.repos.get((repo_type, repo_id))
        visible = repo is not None and (not repo.private or user == repo.owner)
        if not visible:
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        if write and user != repo.owner:
            raise HubError(403, f"You don't have the rights to write to {repo_id}.")
        return repo

    # ---- endpoints
    def api_whoami(self, body: bytes, query: dict) -> None:
        user = self._user(required=True)
        self._json(200, {"type": "user", "name": user, "fullname": user, "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {"role": "write"}}})

    def api_create(self, body: bytes, query: dict) -> None:
        user = self._user(required=True)
        payload = json.loads(body or b"{}")
        repo_type = payload.get("type") or "model"
        namespace = payload.get("organization") or user
        if namespace != user:
            raise HubError(403, f"You don't have the rights to create a repo under the namespace '{namespace}'.")
        name = payload.get("name") or ""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}", name):
            raise HubError(400, f"Invalid repo name: {name!r}")
        repo_id = f"{namespace}/{name}"
        _, created = self.hub.create_repo(repo_type, repo_id, user, payload.get("visibility") == "private")
        url = self.hub.repo_url(repo_type, repo_id)
        if not created:  # the Hub's 409 carries the url too; create_repo(exist_ok=True) reads it
            message = f"You already created this {repo_type} repo"
            self._json(409, {"error": message, "url": url}, {"X-Error-Message": message})
            return
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def api_validate_yaml(self, body: bytes, query: dict) -> None:
        payload = json.loads(body or b"{}")
        try:
            card_metadata(payload.get("content", "").encode())
        except (ValueError, yaml.YAMLError) as error:
            self._json(400, {"errors": [{"message": str(error)}], "warnings": []})
            return
        self._json(200, {"errors": [], "warnings": []})

    def api_branch(self, repo_type: str, repo_id: str, branch: str, body: bytes, query: dict) -> None:
        repo = self._repo(repo_type, repo_id, self._user(required=True), write=True)
        payload = json.loads(body or b"{}")
        repo.create_branch(branch, payload.get("startingPoint"))
        self._json(200, {})

    def api_preupload(self, repo_type: str, repo_id: str, revision: str, body: bytes, query: dict) -> None:
        repo = self._repo(repo_type, repo_id, self._user(required=True), write=True)
        try:
            existing = repo.files(repo.resolve(revision))
        except HubError:
            existing = {}  # a branch about to be created
        files = json.loads(body)["files"]
        self._json(200, {"files": [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": existing.get(f["path"])}
            for f in files
        ]})

    def api_commit(self, repo_type: str, repo_id: str, revision: str, body: bytes, query: dict) -> None:
        user = self._user(required=True)
        repo = self._repo(repo_type, repo_id, user, write=True)
        if query.get("create_pr"):
            raise HubError(400, "create_pr is not supported by the local test hub.")
        header, additions, deleted_files, deleted_folders = {}, {}, set(), set()
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"Unsupported encoding for {value['path']}: {value.get('encoding')}")
                additions[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                deleted_files.add(value["path"])
            elif key == "deletedFolder":
                deleted_folders.add(value["path"])
            else:
                raise HubError(400, f"Unsupported commit operation '{key}' (the local hub asks for regular uploads).")
        if not header.get("summary"):
            raise HubError(400, "The commit header needs a summary (commit message).")
        if "README.md" in additions:
            try:
                card_metadata(additions["README.md"])
            except (ValueError, yaml.YAMLError) as error:
                raise HubError(400, f"Invalid metadata in README.md: {error}") from error
        sha = repo.commit(revision, header["summary"], additions, deleted_files, deleted_folders,
                          header.get("parentCommit"), author=user)
        self._json(200, {"success": True, "commitOid": sha, "pullRequestUrl": None, "hookOutput": "",
                         "commitUrl": f"{self.hub.repo_url(repo_type, repo_id)}/commit/{sha}"})

    def api_info(self, repo_type: str, repo_id: str, revision: str, body: bytes, query: dict) -> None:
        repo = self._repo(repo_type, repo_id, self._user(required=False))
        sha = repo.resolve(revision)
        files = repo.files(sha)
        card = None
        if "README.md" in files:
            try:
                card = card_metadata(repo.blob(files["README.md"]))
            except (ValueError, yaml.YAMLError):
                card = None
        info = {
            "id": repo_id, "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "author": repo.owner,
            "sha": sha, "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
            "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(repo.read_commit(sha)["time"])),
            "tags": list((card or {}).get("tags") or []),
            "siblings": [{"rfilename": path} for path in sorted(files)],
        }
        if repo_type == "model":
            info["modelId"] = repo_id
            for key in ("library_name", "pipeline_tag"):
                if card and card.get(key):
                    info[key] = card[key]
            if "config.json" in files:
                info["config"] = json.loads(repo.blob(files["config.json"]))
        if card is not None:
            info["cardData"] = card
        self._json(200, info)

    def api_refs(self, repo_type: str, repo_id: str, body: bytes, query: dict) -> None:
        repo = self._repo(repo_type, repo_id, self._user(required=False))
        branches = [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": sha}
                    for name, sha in sorted(repo.branches().items())]
        self._json(200, {"branches": branches, "tags": [], "converts": [], "pullRequests": []})

    def api_commits(self, repo_type: str, repo_id: str, revision: str, body: bytes, query: dict) -> None:
        repo = self._repo(repo_type, repo_id, self._user(required=False))
        commits = []
        for sha in repo.history(revision):
            record = repo.read_commit(sha)
            commits.append({
                "id": sha, "title": record["message"], "message": "", "authors": [{"user": record["author"]}],
                "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(record["time"])),
            })
        self._json(200, commits)

    def api_tree(self, repo_type: str, repo_id: str, revision: str, path: str, body: bytes, query: dict) -> None:
        repo = self._repo(repo_type, repo_id, self._user(required=False))
        files = repo.files(repo.resolve(revision))
        recursive = query.get("recursive", "false").lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in files):
            raise HubError(404, f"Path {path} not found", "EntryNotFound")
        entries, folders = [], set()
        for file_path, oid in sorted(files.items()):
            if not file_path.startswith(prefix):
                continue
            relative = file_path[len(prefix):]
            parts = relative.split("/")
            for depth in range(1, len(parts)):
                folder = prefix + "/".join(parts[:depth])
                if (recursive or depth == 1) and folder not in folders:
                    folders.add(folder)
                    entries.append({"type": "directory", "oid": git_blob_sha1(folder.encode()), "size": 0,
                                    "path": folder})
            if recursive or len(parts) == 1:
                entries.append({"type": "file", "oid": oid, "size": len(repo.blob(oid)), "path": file_path})
        self._json(200, entries)

    def resolve_file(self, repo_type: str, repo_id: str, revision: str, path: str, body: bytes, query: dict) -> None:
        repo = self._repo(repo_type, repo_id, self._user(required=False))
        sha = repo.resolve(revision)
        oid = repo.files(sha).get(path)
        if oid is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", commit=sha)
        data = repo.blob(oid)
        self._send(200, data, {"X-Repo-Commit": sha, "ETag": f'"{oid}"', "Accept-Ranges": "none"},
                   content_type="application/octet-stream")
