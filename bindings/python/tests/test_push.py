"""Push registration from Python against a real homeserver. Every endpoint here is on
127.0.0.1, and no test makes the homeserver send a wake-up (no message lands while a
registration exists)."""

import base64
import json
import os
import socket

import pytest

import roost
from conftest import Server, run

P256DH = b"\x04" + os.urandom(64)  # the shape the homeserver checks: uncompressed P-256
AUTH = os.urandom(16)


def web_push(endpoint: str) -> roost.PushTarget:
    return roost.PushTarget.WEB_PUSH(endpoint=endpoint, p256dh=P256DH, auth=AUTH)


def test_push_info_and_refused_registrations(server, profiles):
    async def scenario():
        alice = await roost.register(
            server.config(), str(profiles / "alice"), "alice@localhost", "phone"
        )
        # The defaults: Web Push on (with a VAPID key), APNs and FCM off.
        info = await alice.push_info()
        assert len(info.vapid_public_key) == 65 and info.vapid_public_key[0] == 4
        assert (info.apns, info.fcm) == (False, False)

        # Loopback is in the default forbidden ranges, and plain http is never accepted.
        for endpoint in ["https://127.0.0.1:9/push/1", "http://127.0.0.1:9/push/1"]:
            with pytest.raises(roost.RoostError.Server) as rejected:
                await alice.register_push(web_push(endpoint))
            assert (rejected.value.code, rejected.value.code_name) == (620, "PUSH_ENDPOINT_REJECTED")
        for target in [
            roost.PushTarget.APNS(device_token=os.urandom(32), topic="org.example.app"),
            roost.PushTarget.FCM(token="fcm-registration-token"),
        ]:
            with pytest.raises(roost.RoostError.Server) as disabled:
                await alice.register_push(target)
            assert (disabled.value.code, disabled.value.code_name) == (621, "PUSH_PROVIDER_DISABLED")
        # Nothing was stored by the refusals.
        assert await alice.unregister_push() is False
        await alice.close()

    run(scenario())


def test_a_registration_is_stored_until_unregistered(tmp_path, profiles):
    # A homeserver that allows loopback endpoints; the port is held by this test, so nothing
    # else could answer there.
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    server = Server(tmp_path / "server", config='[push]\nforbidden_ranges = ["10.0.0.0/8"]\n')

    def b64url(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    async def scenario():
        alice = await roost.register(
            server.config(), str(profiles / "alice"), "alice@localhost", "phone"
        )
        subscription = json.dumps({
            "endpoint": f"https://127.0.0.1:{port}/push/alice",
            "expirationTime": None,
            "keys": {"p256dh": b64url(P256DH), "auth": b64url(AUTH)},
        })
        target = roost.web_push_target(subscription)
        assert target == web_push(f"https://127.0.0.1:{port}/push/alice")
        with pytest.raises(roost.RoostError.InvalidArgument):
            roost.web_push_target('{"endpoint": "https://127.0.0.1/x"}')

        await alice.register_push(target)
        await alice.register_push(target)  # replacing is allowed
        assert await alice.unregister_push() is True
        assert await alice.unregister_push() is False
        await alice.close()

    try:
        run(scenario())
    finally:
        server.stop()
        holder.close()
