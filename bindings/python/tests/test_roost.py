"""Two Python clients against a real homeserver: what an app written in Python sees."""

import asyncio
import queue

import pytest

import roost
from conftest import (
    EVENT_TIMEOUT,
    alice_and_bob_in_a_group,
    is_message_id,
    next_event,
    next_other_event,
    run,
)


async def text_from(client: roost.RoostClient) -> tuple[str, str, str]:
    """The next event besides `Outgoing` ones, which must be a text message."""
    event = await next_other_event(client)
    assert event.is_message(), event
    assert event.content.is_text(), event.content
    return event.group, event.sender, event.content.text


def test_two_clients_talk_in_a_group_until_one_is_removed(server, profiles):
    async def scenario():
        config = server.config()
        alice = await roost.register(config, str(profiles / "alice"), "alice@localhost", "phone")
        bob = await roost.register(config, str(profiles / "bob"), "bob@localhost", "laptop")
        assert alice.client_id() == "alice@localhost/phone"
        assert bob.user_id() == "bob@localhost"

        group = await alice.create_group()
        assert await alice.groups() == [group]
        assert await alice.invite(group, ["bob@localhost"]) == ["bob@localhost/laptop"]

        joined = await next_event(bob)
        assert joined == roost.Event.JOINED(group=group, inviter="alice@localhost/phone")
        assert await bob.groups() == [group]
        assert sorted(await bob.members(group)) == ["alice@localhost/phone", "bob@localhost/laptop"]
        # Created at epoch 0; the invite's commit made epoch 1, for both.
        assert await alice.epoch(group) == 1 and await bob.epoch(group) == 1

        # Both ways, and several in a row arrive in the order they were sent.
        sent = await alice.send_text(group, "hello bob")
        event = await next_other_event(bob)
        assert event.is_message() and event.content.text == "hello bob", event
        # The message carries the id alice's send returned.
        assert event.id == sent
        await bob.send_text(group, "hi alice ✓")
        assert await text_from(alice) == (group, "bob@localhost/laptop", "hi alice ✓")
        for n in range(5):
            await alice.send_text(group, f"message {n}")
        assert [(await text_from(bob))[2] for _ in range(5)] == [f"message {n}" for n in range(5)]

        # Bytes that are no content encoding reach the other side as unreadable, not an error.
        await bob.send_bytes(group, b"\x00\x01raw")
        unreadable = await next_other_event(alice)
        assert unreadable.is_message() and unreadable.content.is_unreadable(), unreadable
        assert unreadable.content.bytes == b"\x00\x01raw"

        assert await alice.remove(group, ["bob@localhost"]) == ["bob@localhost/laptop"]
        removed = await next_other_event(bob)
        assert removed == roost.Event.REMOVED_FROM_GROUP(group=group, by="alice@localhost/phone")
        assert await bob.groups() == []
        assert await alice.members(group) == ["alice@localhost/phone"]
        assert await alice.epoch(group) == 2
        with pytest.raises(roost.RoostError.NotAMember) as refused:
            await bob.send_text(group, "still there?")
        assert refused.value.group == group
        with pytest.raises(roost.RoostError.NotAMember):
            await bob.epoch(group)

        await alice.close()
        await bob.close()

    run(scenario())


def test_keys_updated_by_either_side_move_both_to_a_new_epoch(server, profiles):
    async def scenario():
        alice, bob, group = await alice_and_bob_in_a_group(server.config(), profiles)
        assert await alice.update_keys(group) == 2
        await alice.send_text(group, "after my update")
        assert await text_from(bob) == (group, "alice@localhost/phone", "after my update")
        assert await bob.epoch(group) == 2
        assert await bob.update_keys(group) == 3
        await bob.send_text(group, "and mine")
        assert await text_from(alice) == (group, "bob@localhost/laptop", "and mine")
        assert await alice.epoch(group) == 3
        # A group of bob's that alice is not in.
        with pytest.raises(roost.RoostError.NotAMember):
            await alice.update_keys(await bob.create_group())
        await alice.close()
        await bob.close()

    run(scenario())


def test_errors_are_typed(server, profiles):
    async def scenario():
        config = server.config()
        alice = await roost.register(config, str(profiles / "alice"), "alice@localhost", "phone")

        # The server's refusal carries its wire error code.
        with pytest.raises(roost.RoostError.Server) as exists:
            await roost.register(config, str(profiles / "alice2"), "alice@localhost", "tablet")
        assert (exists.value.code, exists.value.code_name) == (100, "USER_EXISTS")

        await alice.close()
        with pytest.raises(roost.RoostError.ProfileExists):
            await roost.register(config, str(profiles / "alice"), "carol@localhost", "phone")
        alice = await roost.open_profile(config, str(profiles / "alice"))
        # One client per profile at a time.
        with pytest.raises(roost.RoostError.ProfileInUse):
            await roost.open_profile(config, str(profiles / "alice"))
        with pytest.raises(roost.RoostError.NoProfile):
            await roost.open_profile(config, str(profiles / "nobody"))
        with pytest.raises(roost.RoostError.InvalidArgument) as bad_user:
            await roost.register(config, str(profiles / "x"), "no-domain", "phone")
        assert "no-domain" in bad_user.value.message
        with pytest.raises(roost.RoostError.WrongDomain):
            await roost.register(config, str(profiles / "y"), "dave@elsewhere.test", "phone")
        with pytest.raises(roost.RoostError.InvalidArgument):
            await alice.send_text("not a group id", "hi")
        with pytest.raises(roost.RoostError.InvalidOperation):
            await alice.remove(await alice.create_group(), ["alice@localhost"])

        # A server nobody answers on: a network error, after the SDK's retries.
        await alice.close()
        server.stop()
        unreachable = roost.ServerConfig(
            domain="localhost",
            addresses=[server.address],
            trust=config.trust,
            connect_timeout_ms=300,
            connect_attempts=1,
        )
        client = await roost.open_profile(unreachable, str(profiles / "alice"))
        with pytest.raises(roost.RoostError.Network) as network:
            await client.create_group()
        assert network.value.transient
        await client.close()
        with pytest.raises(roost.RoostError.Closed):
            await client.groups()

    run(scenario())


def test_a_closed_profile_opens_again_with_its_groups_and_undelivered_events(server, profiles):
    async def scenario():
        config = server.config()
        alice, bob, group = await alice_and_bob_in_a_group(config, profiles)
        await bob.close()

        await alice.send_text(group, "while you were away")
        bob = await roost.open_profile(config, str(profiles / "bob"))
        assert await bob.groups() == [group]
        # At least once: the event bob was handling when it closed comes again, then the rest.
        assert (await next_event(bob)).is_joined()
        assert await text_from(bob) == (group, "alice@localhost/phone", "while you were away")

        # A second device of alice, enrolled with the user key, sees the same user's devices.
        key = alice.user_key()
        assert key is not None
        tablet = await roost.add_device(config, str(profiles / "tablet"), key, "tablet")
        devices = await alice.devices()
        assert [(d.device, d.this_device) for d in devices] == [("phone", True), ("tablet", False)]
        await alice.remove_device("tablet")
        assert [d.device for d in await alice.devices()] == ["phone"]
        assert bob.user_key() is not None
        await tablet.close()
        await alice.close()
        await bob.close()

    run(scenario())


class Collector(roost.EventListener):
    """Collects events; fails on the first message it is offered, to see it offered again."""

    def __init__(self):
        self.events: "queue.Queue[roost.Event]" = queue.Queue()
        self.failed_once = False

    def on_event(self, event: roost.Event) -> None:
        if event.is_message() and not self.failed_once:
            self.failed_once = True
            raise RuntimeError("not now")
        self.events.put(event)


def test_a_listener_gets_every_event_in_order_even_after_failing(server, profiles):
    async def scenario():
        config = server.config()
        alice = await roost.register(config, str(profiles / "alice"), "alice@localhost", "phone")
        bob = await roost.register(config, str(profiles / "bob"), "bob@localhost", "laptop")
        collector = Collector()
        bob.set_event_listener(collector)
        with pytest.raises(roost.RoostError.InvalidOperation):
            await bob.next_event()

        group = await alice.create_group()
        await alice.invite(group, ["bob@localhost"])
        for n in range(4):
            await alice.send_text(group, f"m{n}")

        def take() -> roost.Event:
            return collector.events.get(timeout=EVENT_TIMEOUT)

        received = [await asyncio.to_thread(take) for _ in range(5)]
        assert received[0] == roost.Event.JOINED(group=group, inviter="alice@localhost/phone")
        assert [event.content.text for event in received[1:]] == ["m0", "m1", "m2", "m3"]
        assert collector.failed_once

        bob.clear_event_listener()
        await alice.send_text(group, "to next_event again")
        assert (await text_from(bob))[2] == "to next_event again"
        await alice.close()
        await bob.close()

    run(scenario())


def test_a_message_sent_while_the_server_is_down_is_delivered_after_it_returns(server, profiles):
    async def scenario():
        alice, bob, group = await alice_and_bob_in_a_group(server.config(), profiles)

        # Online: the id comes back at once, then an event says it was sent.
        sent = await alice.send_text(group, "online")
        assert is_message_id(sent), sent
        await alice.flush()
        assert await next_event(alice) == roost.Event.OUTGOING(
            group=group, id=sent, state=roost.OutgoingState.SENT()
        )
        assert await alice.outbox() == []
        assert (await text_from(bob))[2] == "online"
        await alice.close()
        await bob.close()

        # Offline: queued in the profile, listed by outbox(), flush() reports the network.
        server.stop()
        offline = roost.ServerConfig(
            domain="localhost",
            addresses=[server.address],
            trust=server.config().trust,
            connect_timeout_ms=300,
            connect_attempts=1,
        )
        alice = await roost.open_profile(offline, str(profiles / "alice"))
        queued = await alice.send_text(group, "while the server was down")
        assert is_message_id(queued) and queued != sent
        [waiting] = await alice.outbox()
        assert (waiting.id, waiting.group, waiting.state) == (queued, group, roost.OutgoingState.QUEUED())
        assert waiting.queued_at_ms > 0
        with pytest.raises(roost.RoostError.Network):
            await alice.flush()
        await alice.close()

        # Back (on a new port): the restarted app delivers it, and bob reads it.
        server.start()
        alice = await roost.open_profile(server.config(), str(profiles / "alice"))
        await alice.flush()
        assert await alice.outbox() == []
        events = [await next_event(alice), await next_event(alice)]
        assert roost.Event.OUTGOING(group=group, id=queued, state=roost.OutgoingState.SENT()) in events
        bob = await roost.open_profile(server.config(), str(profiles / "bob"))
        assert (await text_from(bob))[2] == "online"  # at least once: the one it was handling
        assert await text_from(bob) == (group, "alice@localhost/phone", "while the server was down")
        assert await alice.dismiss(queued) is False  # only failed messages can be dismissed
        with pytest.raises(roost.RoostError.InvalidArgument):
            await alice.dismiss("not-an-id")
        await alice.close()
        await bob.close()

    run(scenario())


def test_an_abandoned_wait_loses_no_event_and_close_wakes_a_waiting_one(server, profiles):
    async def scenario():
        alice, bob, group = await alice_and_bob_in_a_group(server.config(), profiles)

        # A timed-out wait is cancelled on the SDK side too: the next message is not taken by
        # it and is there for the next call.
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(bob.next_event(), 0.2)
        await alice.send_text(group, "after the timeout")
        assert (await text_from(bob))[2] == "after the timeout"

        waiting = asyncio.ensure_future(bob.next_event())
        await asyncio.sleep(0.2)
        await bob.close()
        with pytest.raises(roost.RoostError.Closed):
            await asyncio.wait_for(waiting, EVENT_TIMEOUT)
        await alice.close()

    run(scenario())
