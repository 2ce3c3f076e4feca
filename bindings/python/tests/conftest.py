"""Fixtures: a real `roost serve` process on a free port of 127.0.0.1, one per test.

The server binary is $ROOST_BIN if set, else the workspace's target/debug/roost, built with
cargo when missing (so `pytest bindings/python/tests` works on a fresh clone).
"""

import asyncio
import json
import os
import pathlib
import signal
import subprocess
import threading
import time

import pytest

import roost

REPO = pathlib.Path(__file__).resolve().parents[3]
START_TIMEOUT = 60.0


def roost_binary() -> pathlib.Path:
    configured = os.environ.get("ROOST_BIN")
    if configured:
        return pathlib.Path(configured)
    binary = REPO / "target" / "debug" / "roost"
    if not binary.exists():
        subprocess.run(
            ["cargo", "build", "-p", "roost-server", "--bin", "roost"], cwd=REPO, check=True
        )
    return binary


class Server:
    """A running homeserver for the domain `localhost`."""

    def __init__(self, data: pathlib.Path):
        self.data = data
        self.start()

    def start(self) -> None:
        """Starts (or restarts, on the same data directory) the server, on a new free port."""
        data = self.data
        self.process = subprocess.Popen(
            [
                str(roost_binary()),
                "serve",
                "--data", str(data),
                "--listen", "127.0.0.1:0",
                "--domain", "localhost",
                "--log-format", "json",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "RUST_LOG": "info"},
        )
        self.log: list[str] = []
        started = threading.Event()
        self.address = ""
        self.certificate = ""

        def read_log() -> None:
            assert self.process.stderr is not None
            for raw in self.process.stderr:
                line = raw.decode("utf-8", "replace")
                self.log.append(line)
                try:
                    fields = json.loads(line).get("fields", {})
                except json.JSONDecodeError:
                    continue
                if fields.get("message") == "homeserver listening":
                    self.address = fields["local_addr"]
                    self.certificate = fields["certificate"]
                    started.set()

        threading.Thread(target=read_log, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT
        while not started.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("roost serve did not start:\n" + "".join(self.log))

    def config(self) -> roost.ServerConfig:
        return roost.ServerConfig(
            domain="localhost",
            addresses=[self.address],
            trust=roost.Trust.PINNED_CERTIFICATE_FILE(path=self.certificate),
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def server(tmp_path):
    server = Server(tmp_path / "server")
    yield server
    server.stop()


@pytest.fixture
def profiles(tmp_path) -> pathlib.Path:
    path = tmp_path / "profiles"
    path.mkdir()
    return path


def run(coroutine):
    """Runs one test's coroutine on a fresh event loop."""
    return asyncio.run(coroutine)
