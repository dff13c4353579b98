"""A stand-in for the Hugging Face Hub's HTTP API, on 127.0.0.1, that records what it receives.

No machine here reaches the real Hub, so push-hub is tested against this: `HF_ENDPOINT` points
huggingface_hub at it. It answers the calls an upload makes: create the repo, validate the model card's YAML, ask for upload
modes (every file goes "regular", inline in the commit), and the commit (NDJSON, files base64-encoded) to a revision;
and what promotion adds: create a branch (`POST /api/models/<repo>/branch/<branch>`) and tag a commit
(`POST /api/models/<repo>/tag/<revision>`). It records which revision each commit went to, the branches and the tags.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote


@dataclass
class HubRecord:
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)  # (method, path, headers)
    repos: dict[str, dict[str, Any]] = field(default_factory=dict)  # repo_id -> create payload
    files: dict[str, dict[str, bytes]] = field(default_factory=dict)  # repo_id -> path -> content
    commits: list[dict[str, Any]] = field(default_factory=list)  # {repo, revision, oid, paths}, in order
    branches: dict[str, dict[str, str]] = field(default_factory=dict)  # repo_id -> branch -> starting point
    tags: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # repo_id -> tag -> {revision, message}

    def revisions(self, repo_id: str) -> list[str]:
        """The revision of each commit to `repo_id`, in order (main, candidates/<run>, ...)."""
        return [c["revision"] for c in self.commits if c["repo"] == repo_id]


class HubStandIn:
    def __init__(self) -> None:
        self.record = HubRecord()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "HubStandIn":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        record, base_url = self.record, lambda: self.url

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def reply(self, status: int, payload: dict[str, Any]) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                record.requests.append(("GET", self.path, dict(self.headers)))
                self.reply(404, {"error": "not found"})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                record.requests.append(("POST", self.path, dict(self.headers)))
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
                    record.repos[repo_id] = payload
                    return self.reply(200, {"url": f"{base_url()}/{repo_id}", "name": repo_id})
                if path == "/api/validate-yaml":  # the model card's metadata block is checked before upload
                    return self.reply(200, {"errors": [], "warnings": []})
                if "/preupload/" in path:
                    files = json.loads(body)["files"]
                    return self.reply(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                    ]})
                if "/commit/" in path:
                    repo_id, revision = path.split("/api/models/")[1].split("/commit/")
                    stored = record.files.setdefault(repo_id, {})
                    paths = []
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item.get("key") == "file":
                            stored[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                            paths.append(item["value"]["path"])
                    oid = hashlib.sha1(body).hexdigest()
                    record.commits.append({"repo": repo_id, "revision": unquote(revision), "oid": oid, "paths": paths})
                    return self.reply(200, {"commitUrl": f"{base_url()}/{repo_id}/commit/{oid}", "commitOid": oid})
                if "/branch/" in path:
                    repo_id, branch = path.split("/api/models/")[1].split("/branch/")
                    branches = record.branches.setdefault(repo_id, {})
                    if unquote(branch) in branches:
                        return self.reply(409, {"error": "branch already exists"})
                    branches[unquote(branch)] = (json.loads(body) if body else {}).get("startingPoint", "main")
                    return self.reply(200, {})
                if "/tag/" in path:
                    repo_id, revision = path.split("/api/models/")[1].split("/tag/")
                    payload = json.loads(body)
                    tags = record.tags.setdefault(repo_id, {})
                    if payload["tag"] in tags:
                        return self.reply(409, {"error": "tag already exists"})
                    tags[payload["tag"]] = {"revision": unquote(revision), "message": payload.get("message")}
                    return self.reply(200, {})
                self.reply(404, {"error": f"stand-in does not know {path}"})

        return Handler
