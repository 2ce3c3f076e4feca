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
    """A running homeserver for the domain `localhost`; `config`: the text of a configuration
    file (TOML) to start it with, else the defaults."""

    def __init__(self, data: pathlib.Path, config: "str | None" = None):
        self.data = data
        self.config_file = None
        if config is not None:
            data.mkdir(parents=True, exist_ok=True)
            self.config_file = data.parent / (data.name + ".toml")
            self.config_file.write_text(config)
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
                *(["--config", str(self.config_file)] if self.config_file else []),
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


EVENT_TIMEOUT = 20.0


async def next_event(client: roost.RoostClient) -> roost.Event:
    return await asyncio.wait_for(client.next_event(), EVENT_TIMEOUT)


async def next_other_event(client: roost.RoostClient) -> roost.Event:
    """The next event that is not about this client's own sent messages (`Outgoing`)."""
    while (event := await next_event(client)).is_outgoing():
        assert event.state == roost.OutgoingState.SENT(), event
    return event


async def alice_and_bob_in_a_group(
    config: roost.ServerConfig, profiles: pathlib.Path
) -> "tuple[roost.RoostClient, roost.RoostClient, str]":
    """Registers alice (device `phone`) and bob (`laptop`); alice creates a group and invites
    bob, who has taken his `Joined` event."""
    alice = await roost.register(config, str(profiles / "alice"), "alice@localhost", "phone")
    bob = await roost.register(config, str(profiles / "bob"), "bob@localhost", "laptop")
    group = await alice.create_group()
    await alice.invite(group, ["bob@localhost"])
    assert (await next_event(bob)).is_joined()
    return alice, bob, group


def is_message_id(text: str) -> bool:
    return len(text) == 16 and all(c in "0123456789abcdef" for c in text)


def run(coroutine):
    """Runs one test's coroutine on a fresh event loop."""
    return asyncio.run(coroutine)
