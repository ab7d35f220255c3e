"""A small Hugging Face Hub-compatible HTTP server on 127.0.0.1 for push/pull tests.

It answers the endpoints huggingface_hub 2.x and transformers 5.x use for a model repository (as their
clients call them): create repo, repo info, YAML validation, preupload, commit, tree,
paths-info, whoami and ``resolve`` (HEAD/GET). By default every file is uploaded in the "regular" mode
(base64 inside the commit), so neither LFS nor Xet is involved. With ``HubServer(lfs=(".safetensors",))``
files with those endings are answered "lfs", as the real Hub does, and travel through the LFS batch API
and a PUT (the client needs ``HF_HUB_DISABLE_XET=1`` then). Storage is in memory, one snapshot per commit.

Fault injection: ``server.fail_next("commit", 500)`` makes the next commit answer 500 without applying it.
``server.requests`` logs ``(method, path)`` of every request.

Run on its own (prints the endpoint): ``python tests/hub_server.py [PORT]``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: content}
    history: list[str] = field(default_factory=list)  # oldest first; the last one is "main"

    @property
    def head(self) -> str:
        return self.history[-1]


class HubState:
    def __init__(self, lfs: tuple[str, ...] = ()) -> None:
        self.lfs = tuple(lfs)
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content
        self.repos: dict[str, Repo] = {}
        self.lock = threading.Lock()
        self.failures: dict[str, list[int]] = {}
        self.requests: list[tuple[str, str]] = []

    def new_repo(self, repo_id: str) -> Repo:
        repo = Repo(repo_id)
        sha = hashlib.sha1(f"init {repo_id} {uuid.uuid4()}".encode()).hexdigest()
        repo.commits[sha] = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
        repo.history.append(sha)
        self.repos[repo_id] = repo
        return repo


class HubServer:
    """The server, started on a free port of 127.0.0.1 in a background thread (`start` / `stop`)."""

    def __init__(self, port: int = 0, lfs: tuple[str, ...] = ()) -> None:
        self.state = HubState(lfs)
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def requests(self) -> list[tuple[str, str]]:
        return self.state.requests

    def start(self) -> HubServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def fail_next(self, route: str, status: int = 500) -> None:
        """Answer `status` to the next request of `route` ("commit", "preupload", "resolve", ...)."""
        with self.state.lock:
            self.state.failures.setdefault(route, []).append(status)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.state.repos[repo_id]
        return dict(repo.commits[repo.head if revision == "main" else revision])

    def commits(self, repo_id: str) -> list[str]:
        return list(self.state.repos[repo_id].history)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState

    def log_message(self, format, *args) -> None:  # quiet
        pass

    # ---- plumbing ----

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        ctype: str = "application/json",
    ):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _error(
        self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        h = dict(headers or {})
        if code:
            h["X-Error-Code"] = code
        h["X-Error-Message"] = message
        self._json(status, {"error": message}, h)

    def _injected(self, route: str) -> bool:
        with self.state.lock:
            queue = self.state.failures.get(route)
            status = queue.pop(0) if queue else None
        if status is None:
            return False
        self._error(status, f"injected failure of {route} (test hub server)")
        return True

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._error(404, f"Repository Not Found for url: {self.path}.", "RepoNotFound")
        return repo

    def _snapshot(self, repo: Repo, revision: str) -> tuple[str, dict[str, bytes]] | None:
        revision = unquote(revision)
        sha = repo.head if revision == "main" else revision
        if sha not in repo.commits:
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return None
        return sha, repo.commits[sha]

    # ---- dispatch ----

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        self.state.requests.append((self.command, self.path))
        body = self._body() if self.command in ("POST", "PUT") else b""
        parts = [p for p in path.split("/") if p]
        try:
            if path == "/api/whoami-v2":
                return self._json(200, {"type": "user", "name": "tester", "orgs": []})
            if path == "/api/validate-yaml":
                return self._json(200, {"errors": [], "warnings": []})
            if path == "/api/repos/create" and self.command == "POST":
                return self._create(json.loads(body or b"{}"))
            if (
                len(parts) == 6
                and parts[1].endswith(".git")
                and parts[2:] == ["info", "lfs", "objects", "batch"]
            ):
                return self._lfs_batch(json.loads(body))
            if len(parts) == 2 and parts[0] == "lfs-upload" and self.command == "PUT":
                return self._lfs_put(parts[1], body)
            if len(parts) >= 4 and parts[0] == "api" and parts[1] == "models":
                return self._api(parts[2] + "/" + parts[3], parts[4:], query, body)
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve(
                    parts[0] + "/" + parts[1], parts[3], "/".join(unquote(p) for p in parts[4:])
                )
            self._error(404, f"no route for {self.command} {path} (test hub server)")
        except (ValueError, KeyError) as err:
            self._error(400, f"bad request: {err}")

    # ---- routes ----

    def _create(self, data: dict) -> None:
        name, org = data.get("name"), data.get("organization")
        repo_id = f"{org}/{name}" if org else name
        url = {"url": f"http://{self.headers.get('Host')}/{repo_id}", "name": repo_id}
        with self.state.lock:
            if repo_id in self.state.repos:
                return self._json(409, {"error": "You already created this model repo", **url})
            self.state.new_repo(repo_id)
        self._json(200, url)

    def _api(self, repo_id: str, rest: list[str], query: dict, body: bytes) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        if not rest or rest[0] == "revision":
            snap = self._snapshot(repo, rest[1] if len(rest) > 1 else "main")
            if snap is None:
                return
            sha, files = snap
            siblings = [
                {"rfilename": p, "size": len(c), "blobId": git_blob_sha1(c)} for p, c in sorted(files.items())
            ]
            return self._json(
                200,
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": sha,
                    "private": False,
                    "disabled": False,
                    "gated": False,
                    "tags": [],
                    "downloads": 0,
                    "likes": 0,
                    "lastModified": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
                    "siblings": siblings,
                },
            )
        route, revision = rest[0], (rest[1] if len(rest) > 1 else "main")
        if route == "preupload":
            if self._injected("preupload"):
                return
            files = repo.commits[repo.head]
            answer = []
            for f in json.loads(body)["files"]:
                old = files.get(f["path"])
                lfs = f["path"].endswith(self.state.lfs) if self.state.lfs else False
                oid = (
                    None if old is None else (hashlib.sha256(old).hexdigest() if lfs else git_blob_sha1(old))
                )
                answer.append(
                    {
                        "path": f["path"],
                        "uploadMode": "lfs" if lfs else "regular",
                        "shouldIgnore": False,
                        "oid": oid,
                    }
                )
            return self._json(200, {"files": answer})
        if route == "commit":
            if self._injected("commit"):
                return
            return self._commit(repo, unquote(revision), body)
        if route in ("tree", "paths-info"):
            snap = self._snapshot(repo, revision)
            if snap is None:
                return
            sha, files = snap
            if route == "paths-info":
                form = parse_qs(body.decode())
                return self._json(
                    200, [e for p in form.get("paths", []) for e in _entries(files, p, exact=True)]
                )
            folder = "/".join(unquote(p) for p in rest[2:])
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            entries = _tree(files, folder, recursive)
            if entries is None:
                return self._error(404, f"Entry not found: {folder}", "EntryNotFound", {"X-Repo-Commit": sha})
            return self._json(200, entries)
        self._error(404, f"no route {route} (test hub server)")

    def _commit(self, repo: Repo, revision: str, body: bytes) -> None:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        with self.state.lock:
            if revision != "main" and revision != repo.head:
                return self._error(400, f"can only commit to main, not {revision}")
            files = dict(repo.commits[repo.head])
            summary = ""
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "header":
                    summary = value.get("summary", "")
                    parent = value.get("parentCommit")
                    if parent and parent != repo.head:
                        return self._error(412, "A commit has happened since. Please refresh and try again.")
                elif key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "lfsFile":
                    content = self.state.lfs_objects.get(value["oid"])
                    if content is None or len(content) != value["size"]:
                        return self._error(
                            400, f"LFS object {value['oid']} of {value['path']} was never uploaded"
                        )
                    files[value["path"]] = content
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: c for p, c in files.items() if not p.startswith(prefix)}
                else:
                    return self._error(400, f"unsupported commit operation {key!r} (test hub server)")
            sha = hashlib.sha1(f"{repo.head} {summary} {uuid.uuid4()}".encode()).hexdigest()
            repo.commits[sha] = files
            repo.history.append(sha)
        host = self.headers.get("Host")
        self._json(
            200,
            {
                "commitOid": sha,
                "commitUrl": f"http://{host}/{repo.repo_id}/commit/{sha}",
                "pullRequestUrl": None,
            },
        )

    # LFS batch API (basic transfer) and the upload target it hands out

    def _lfs_batch(self, data: dict) -> None:
        host = self.headers.get("Host")
        objects = []
        for obj in data.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.state.lfs_objects:
                entry["actions"] = {
                    "upload": {"href": f"http://{host}/lfs-upload/{obj['oid']}", "header": {}}
                }
            objects.append(entry)
        body = json.dumps({"transfer": "basic", "objects": objects}).encode()
        self._send(200, body, ctype="application/vnd.git-lfs+json")

    def _lfs_put(self, oid: str, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, f"LFS upload does not match its oid {oid}")
        with self.state.lock:
            self.state.lfs_objects[oid] = body
        self._send(200, b"")

    def _resolve(self, repo_id: str, revision: str, filename: str) -> None:
        if self._injected("resolve"):
            return
        repo = self._repo(repo_id)
        if repo is None:
            return
        snap = self._snapshot(repo, revision)
        if snap is None:
            return
        sha, files = snap
        if filename not in files:
            return self._error(404, f"Entry not found: {filename}", "EntryNotFound", {"X-Repo-Commit": sha})
        content = files[filename]
        lfs = bool(self.state.lfs) and filename.endswith(self.state.lfs)
        etag = hashlib.sha256(content).hexdigest() if lfs else git_blob_sha1(content)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        self._send(200, content, headers, ctype="application/octet-stream")


def _entries(files: dict[str, bytes], path: str, exact: bool = False) -> list[dict]:
    path = path.strip("/")
    if path in files:
        c = files[path]
        return [{"type": "file", "path": path, "size": len(c), "oid": git_blob_sha1(c)}]
    if any(p.startswith(path + "/") for p in files):
        return [{"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()}]
    return []


def _tree(files: dict[str, bytes], folder: str, recursive: bool) -> list[dict] | None:
    folder = folder.strip("/")
    prefix = folder + "/" if folder else ""
    below = sorted(p for p in files if p.startswith(prefix))
    if folder and not below:
        return None
    out, seen = [], set()
    for p in below:
        rest = p[len(prefix) :]
        if not recursive and "/" in rest:
            d = prefix + rest.split("/")[0]
            if d not in seen:
                seen.add(d)
                out.extend(_entries(files, d))
            continue
        out.extend(_entries(files, p))
    return out


if __name__ == "__main__":
    import sys

    server = HubServer(int(sys.argv[1]) if len(sys.argv) > 1 else 0).start()
    print(f"HF_ENDPOINT={server.endpoint}", flush=True)
    print("serving; Ctrl-C to stop", flush=True)
    try:
        server.thread.join()
    except KeyboardInterrupt:
        server.stop()
