"""A real S3 server process on 127.0.0.1 for the tests: nanio (PyPI), which stores to disk and checks
request signatures. Started per test session; stopped, by PID, when it ends. `Nanio` is one a test can kill and
start again (an outage); `backdate` ages an object."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

ACCESS_KEY = "loraflow-test-access"
SECRET_KEY = "loraflow-test-secret-0123456789"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def nanio_server(data_dir: Path) -> Iterator[str]:
    """Yields the endpoint URL once the server answers."""
    port = free_port()
    env = {**os.environ, "NANIO_ACCESS_KEY": ACCESS_KEY, "NANIO_SECRET_KEY": SECRET_KEY}
    log = open(data_dir.parent / f"nanio-{port}.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "nanio", "serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nanio did not start; see {log.name}")
                time.sleep(0.2)
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


def s3_env(endpoint: str, secret: str = SECRET_KEY) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def use_s3_here(endpoint: str, monkeypatch: Any) -> Any:
    """This process's S3 clients (boto3's, loraflow's store) talk to `endpoint` with the test keys until the test
    ends; returns a boto3 client for it."""
    import boto3

    for name, value in s3_env(endpoint).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # it keeps the first credentials it found, for good
    return boto3.client("s3")


class Nanio:
    """A nanio process a test can SIGKILL and start again on the same port and data dir: an S3 outage.

    `pid` may be adopted from a process started elsewhere (the local stack's, from its pid file)."""

    def __init__(self, data_dir: Path, port: int | None = None, access_key: str = ACCESS_KEY,
                 secret_key: str = SECRET_KEY, log: Path | None = None, pid: int | None = None):
        self.data_dir, self.port = data_dir, port or free_port()
        self.keys = {"NANIO_ACCESS_KEY": access_key, "NANIO_SECRET_KEY": secret_key}
        self.log = log or data_dir.parent / f"nanio-{self.port}.log"
        self.process: subprocess.Popen | None = None
        self.pid = pid

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> None:
        """Start it and return once it accepts connections."""
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "nanio", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                 "--data-dir", str(self.data_dir)],
                env={**os.environ, **self.keys}, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)  # as the stack's own (setsid): a signal to the tests' group never reaches it
        self.pid = self.process.pid
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nanio did not start on port {self.port}; see {self.log}")
                time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no handler runs, a request in flight is cut off and its temporary file stays on disk."""
        assert self.pid is not None
        os.kill(self.pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=10)
        else:  # adopted: not our child, so wait until the pid is gone
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(self.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def backdate(data_dir: Path, bucket: str, key: str, days: float) -> None:
    """Make nanio report the object as last modified `days` ago (its sidecar metadata and the file's mtime): how a
    test gives a store objects of different ages without waiting for them."""
    import json
    from datetime import datetime, timedelta, timezone

    when = datetime.now(timezone.utc) - timedelta(days=days)
    sidecar = data_dir / bucket / ".nanio-meta" / f"{key}.json"
    if sidecar.is_file():
        meta = json.loads(sidecar.read_text())
        meta["last_modified"] = when.isoformat()
        sidecar.write_text(json.dumps(meta))
    os.utime(data_dir / bucket / key, (when.timestamp(), when.timestamp()))
