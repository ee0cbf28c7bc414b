"""A stand-in for the Hugging Face hub on a loopback port, for tests and benchmarks: it answers the routes
huggingface_hub calls (model_info, list_repo_tree, HEAD/GET /resolve with the hub's X-Repo-Commit, ETag,
X-Linked-Etag/X-Linked-Size headers and X-Error-Code errors), redirects LFS files to a second origin
(`localhost` instead of `127.0.0.1`, as the hub redirects to its CDN) that honours `Range`, and can cut
or stall a transfer to imitate a broken connection or a killed download. It also takes uploads the way
huggingface_hub's `create_repo` + `upload_folder` send them (POST /api/repos/create, /api/validate-yaml,
/api/models/ORG/NAME/preupload/REV answering "regular" for every file so no LFS/Xet storage is needed, and
/api/models/ORG/NAME/commit/REV with the ndjson body and base64 contents), with the write token required;
a repo created private answers only to the token.

    hub = FakeHub(); hub.add("org/name", {"config.json": b"{}"}); os.environ["HF_ENDPOINT"] = hub.url
"""
from __future__ import annotations

import base64
import functools
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


@functools.lru_cache(maxsize=256)  # the same file's hashes are asked for on every request: compute them once
def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@functools.lru_cache(maxsize=256)
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeHub:
    """repos[repo_id][branch] = {path: bytes}. Faults: `drop_after[path] = n` cuts the connection after n
    bytes (once); `stall_after[path] = n` sends n bytes then waits for `release` (a process to kill);
    `fail[path] = k` answers the next k requests for the file with 503; `stall_total = n` lets n bytes of file
    contents through in all (every file and request together, from when it is set), then holds every transfer
    until `release` and then sends the rest, setting `stalled` (to SIGKILL a download at a chosen byte offset,
    or to hold one while a second request arrives)."""

    def __init__(self):
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}
        self.gated: set[str] = set()
        self.private: set[str] = set()
        self.commits: list[list[str]] = []  # the paths each upload commit added or changed
        self.token = "hf_fake_token"
        self.log: list[tuple[str, str, str]] = []  # (method, path, Range header)
        self.drop_after: dict[str, int] = {}
        self.fail: dict[str, int] = {}
        self.stall_after: dict[str, int] = {}
        self.release = threading.Event()
        self.stall_total: int | None = None
        self.stalled = threading.Event()
        self._budget_lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.cdn = f"http://localhost:{self.port}"  # another origin, as the hub's CDN is
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, repo: str, files: dict[str, bytes], branch: str = "main") -> None:
        self.repos.setdefault(repo, {})[branch] = dict(files)

    def commit(self, repo: str, branch: str) -> str:
        files = self.repos[repo][branch]
        return hashlib.sha1(json.dumps({p: git_blob_sha1(d) for p, d in sorted(files.items())}).encode()).hexdigest()

    def gets(self, suffix: str) -> list[tuple[str, str, str]]:
        return [e for e in self.log if e[0] == "GET" and e[1].endswith(suffix)]

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def _find(self, repo: str, rev: str):
        """(files, commit) for a branch name or commit sha; raises KeyError naming what is missing."""
        if repo not in self.repos:
            raise KeyError("RepoNotFound")
        for branch, files in self.repos[repo].items():
            if rev in (branch, self.commit(repo, branch)):
                return files, self.commit(repo, branch)
        raise KeyError("RevisionNotFound")

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # headers and body go out in two writes: without TCP_NODELAY the body waits for the client's
            # delayed ACK of the headers (about 40 ms per request), as no real hub or CDN makes it wait
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._route(body=False)

            def do_GET(self):
                self._route(body=True)

            def do_POST(self):
                url = urlsplit(self.path)
                hub.log.append(("POST", unquote(url.path), ""))
                data = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                segs = [unquote(s) for s in url.path.strip("/").split("/")]
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._error(401, "Unauthorized", {"X-Error-Message": "Invalid credentials in Authorization header"})
                try:
                    if segs == ["api", "repos", "create"]:
                        return self._create(json.loads(data))
                    if segs == ["api", "validate-yaml"]:
                        return self._json({"errors": [], "warnings": []})
                    if len(segs) == 6 and segs[:2] == ["api", "models"] and segs[4] in ("preupload", "commit"):
                        repo, rev = "/".join(segs[2:4]), segs[5]
                        files, _ = hub._find(repo, rev)
                        if segs[4] == "preupload":
                            return self._json({"files": [
                                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                 "oid": git_blob_sha1(files[f["path"]]) if f["path"] in files else None}
                                for f in json.loads(data)["files"]]})
                        return self._commit(repo, rev, files, data)
                except KeyError as e:
                    return self._error(404, e.args[0])
                self._error(404, "NotFound")

            def _json(self, obj, status=200):
                self._send(status, {"Content-Type": "application/json"}, json.dumps(obj).encode())

            def _create(self, body):
                repo = "/".join(p for p in (body.get("organization"), body["name"]) if p)
                if repo in hub.repos:
                    return self._json({"error": "You already created this model repo", "url": f"{hub.url}/{repo}"}, 409)
                hub.add(repo, {})
                if body.get("visibility") == "private" or body.get("private"):
                    hub.private.add(repo)
                self._json({"url": f"{hub.url}/{repo}", "name": repo, "id": repo})

            def _commit(self, repo, rev, files, data):
                hub.commits.append([])
                for line in data.splitlines():
                    op = json.loads(line)
                    if op["key"] == "file":
                        files[op["value"]["path"]] = base64.b64decode(op["value"]["content"])
                        hub.commits[-1].append(op["value"]["path"])
                    elif op["key"] in ("deletedFile", "deletedFolder"):
                        path = op["value"]["path"].rstrip("/")
                        for p in [p for p in files if p == path or p.startswith(path + "/")]:
                            del files[p]
                    elif op["key"] != "header":  # lfsFile: preupload never asks for LFS here
                        return self._error(422, "UnsupportedOperation")
                branch = next(b for b, f in hub.repos[repo].items() if f is files)
                commit = hub.commit(repo, branch)
                self._json({"commitOid": commit, "commitUrl": f"{hub.url}/{repo}/commit/{commit}",
                            "pullRequestUrl": None})

            def _send(self, status, headers=None, data=b"", body=True):
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body and self.command != "HEAD":  # a HEAD answer has headers only
                    self.wfile.write(data)

            def _error(self, status, code, extra=None):
                self._send(status, {"X-Error-Code": code, "Content-Type": "application/json", **(extra or {})},
                           json.dumps({"error": code}).encode())

            def _route(self, body):
                url = urlsplit(self.path)
                hub.log.append((self.command, unquote(url.path), self.headers.get("Range", "")))
                segs = [unquote(s) for s in url.path.strip("/").split("/")]
                try:
                    if segs[0] == "cdn":
                        return self._cdn(segs[1], "/".join(segs[2:]), body)
                    if segs[:2] == ["api", "models"]:
                        return self._api(segs[2:], parse_qs(url.query))
                    if len(segs) >= 5 and segs[2] == "resolve":
                        return self._resolve("/".join(segs[:2]), segs[3], "/".join(segs[4:]), body)
                except KeyError as e:
                    return self._error(404, e.args[0])
                self._error(404, "NotFound")

            def _hidden(self, repo):
                """A private repo is invisible without the token (the hub answers 401 RepoNotFound)."""
                return repo in hub.private and self.headers.get("Authorization") != f"Bearer {hub.token}"

            def _api(self, segs, query):
                repo = "/".join(segs[:2])
                rev = segs[3] if len(segs) > 3 else "main"
                if self._hidden(repo):
                    return self._error(401, "RepoNotFound")
                files, commit = hub._find(repo, rev)
                if len(segs) > 2 and segs[2] == "tree":
                    entries = []
                    for path, data in sorted(files.items()):
                        e = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
                        if path.endswith(LFS_SUFFIXES):
                            e["lfs"] = {"oid": _sha256(data), "size": len(data), "pointerSize": 134}
                        entries.append(e)
                    return self._send(200, {"Content-Type": "application/json"}, json.dumps(entries).encode())
                info = {"_id": repo, "id": repo, "modelId": repo, "sha": commit, "private": repo in hub.private,
                        "gated": "auto" if repo in hub.gated else False, "disabled": False,
                        "siblings": [{"rfilename": p} for p in sorted(files)], "tags": []}
                self._send(200, {"Content-Type": "application/json"}, json.dumps(info).encode())

            def _resolve(self, repo, rev, path, body):
                if hub.fail.get(path, 0) > 0:
                    hub.fail[path] -= 1
                    return self._error(503, "ServiceUnavailable")
                if self._hidden(repo):
                    return self._error(401, "RepoNotFound")
                files, commit = hub._find(repo, rev)
                if repo in hub.gated and self.headers.get("Authorization") != f"Bearer {hub.token}":
                    return self._error(401, "GatedRepo", {"X-Error-Message": "Access to this repo is restricted"})
                if path not in files:
                    return self._error(404, "EntryNotFound", {"X-Repo-Commit": commit})
                data = files[path]
                headers = {"X-Repo-Commit": commit, "ETag": f'"{git_blob_sha1(data)}"', "Accept-Ranges": "bytes"}
                if path.endswith(LFS_SUFFIXES):
                    sha = _sha256(data)
                    headers.update({"Location": f"{hub.cdn}/cdn/{repo}/{rev}/{path}?sha={sha}",
                                    "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data))})
                    return self._send(302, headers, body=body)
                self._bytes(path, data, headers, body)

            def _cdn(self, org, rest, body):
                name, rev, path = rest.split("/", 2)
                files, _ = hub._find(f"{org}/{name}", rev)
                data = files[path]
                self._bytes(path, data, {"ETag": f'"{_sha256(data)}"', "Accept-Ranges": "bytes"},
                            body)

            def _bytes(self, path, data, headers, body):
                start, status = 0, 200
                rng = self.headers.get("Range", "")
                if rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                    status = 206
                    headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                chunk = data[start:]
                cut = hub.drop_after.pop(path, None) if body else None
                stall = hub.stall_after.pop(path, None) if body else None
                hold = False  # a stall_total pause: the transfer goes on after `release`
                if body and stall is None and hub.stall_total is not None:
                    with hub._budget_lock:  # take this transfer's share of the budget
                        allowed = max(0, min(len(chunk), hub.stall_total))
                        hub.stall_total -= allowed
                    if allowed < len(chunk):
                        stall, hold = allowed, True
                if cut is None and stall is None:
                    return self._send(status, headers, chunk, body)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(chunk)))
                self.end_headers()
                self.wfile.write(chunk[:cut if cut is not None else stall])
                self.wfile.flush()
                if stall is not None:
                    hub.stalled.set()  # after the bytes went out: the client holds them now
                    hub.release.wait(60)
                    if hold:
                        try:
                            self.wfile.write(chunk[stall:])
                        except OSError:  # the client was killed meanwhile
                            pass
                self.close_connection = True

        return Handler
