"""Files between two Python clients through a real homeserver: send, receive, download."""

import hashlib
import os
import pathlib
import threading

import pytest

import roost
from conftest import alice_and_bob_in_a_group, is_message_id, next_event, next_other_event, run


class Progress(roost.ProgressListener):
    """Records every progress report, and the threads they came on."""

    def __init__(self):
        self.reports: list[tuple[int, int]] = []
        self.threads: set[int] = set()

    def on_progress(self, done: int, total: int) -> None:
        self.reports.append((done, total))
        self.threads.add(threading.get_ident())

    def check_complete(self, size: int) -> None:
        """Reports came, never went back, all of the same total, and the last is the whole file."""
        assert self.reports, "no progress reported"
        assert all(total == size for _, total in self.reports), self.reports
        done = [d for d, _ in self.reports]
        assert done == sorted(done), done
        assert self.reports[-1] == (size, size)
        assert threading.get_ident() not in self.threads, "called on the caller's thread"


class FailingProgress(roost.ProgressListener):
    def __init__(self):
        self.calls = 0

    def on_progress(self, done: int, total: int) -> None:
        self.calls += 1
        raise RuntimeError("the progress bar is gone")


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def attachment_from(client: roost.RoostClient, sender: str) -> roost.Attachment:
    event = await next_other_event(client)
    assert event.is_message(), event
    assert event.sender == sender
    assert event.content.is_attachment(), event.content
    return event.content.attachment


def tampered(attachment: roost.Attachment, field: str) -> roost.Attachment:
    """The attachment with one byte of its blob's read token or of its file key changed. The
    handle is the attachment's content encoding (docs/PROTOCOL.md §4.5.1): the BlobRef starts
    with the domain, followed by the address (32 bytes) and the token (32 bytes); then the
    encryption (2 bytes) and the key (32 bytes)."""
    handle = bytearray(attachment.handle)
    after_domain = handle.index(b"localhost") + len(b"localhost")
    offset = {"token": after_domain + 32, "key": after_domain + 64 + 2}[field]
    handle[offset + 5] ^= 0x01
    return roost.Attachment(
        name=attachment.name,
        safe_file_name=attachment.safe_file_name,
        media_type=attachment.media_type,
        size=attachment.size,
        handle=bytes(handle),
    )


def test_a_file_sent_by_one_client_is_downloaded_intact_by_the_other(server, tmp_path, profiles):
    outgoing = tmp_path / "outgoing"
    outgoing.mkdir()
    photo = outgoing / "holiday.png"
    photo.write_bytes(os.urandom(300 * 1024 + 7))  # 5 chunks, the last one partial
    empty = outgoing / "empty.txt"
    empty.write_bytes(b"")
    downloads = tmp_path / "downloads"
    downloads.mkdir()

    async def scenario():
        alice, bob, group = await alice_and_bob_in_a_group(server.config(), profiles)

        upload = Progress()
        sent = await alice.send_file(group, str(photo), upload)
        assert is_message_id(sent.id), sent.id
        size = photo.stat().st_size
        assert (sent.attachment.name, sent.attachment.media_type, sent.attachment.size) == (
            "holiday.png", "image/png", size)
        upload.check_complete(size)
        sent_empty = await alice.send_file(group, str(empty))  # no progress listener
        assert (sent_empty.attachment.name, sent_empty.attachment.size) == ("empty.txt", 0)
        assert sent_empty.attachment.media_type == "text/plain"
        await alice.flush()
        delivered = {(await next_event(alice)).id for _ in range(2)}
        assert delivered == {sent.id, sent_empty.id}

        # The receiver gets the attachment as the sender described it, and downloads it.
        received = await attachment_from(bob, "alice@localhost/phone")
        assert received == sent.attachment
        assert received.safe_file_name == "holiday.png"
        download = Progress()
        target = downloads / received.safe_file_name
        assert await bob.download(received, str(target), download) == size
        assert sha256(target) == sha256(photo)
        download.check_complete(size)
        assert sorted(p.name for p in downloads.iterdir()) == ["holiday.png"]

        received_empty = await attachment_from(bob, "alice@localhost/phone")
        assert received_empty == sent_empty.attachment
        empty_progress = Progress()
        assert await bob.download(received_empty, str(downloads / "empty.txt"), empty_progress) == 0
        assert (downloads / "empty.txt").read_bytes() == b""
        empty_progress.check_complete(0)

        # The sender can download what it sent, too (another device of alice would).
        again = downloads / "again.png"
        assert await alice.download(sent.attachment, str(again)) == size
        assert sha256(again) == sha256(photo)

        await alice.close()
        await bob.close()

    run(scenario())


def test_file_errors_are_typed(server, tmp_path, profiles):
    source = tmp_path / "report.pdf"
    source.write_bytes(os.urandom(70 * 1024))
    downloads = tmp_path / "downloads"
    downloads.mkdir()

    async def scenario():
        alice, bob, group = await alice_and_bob_in_a_group(server.config(), profiles)

        with pytest.raises(roost.RoostError.File) as missing:
            await alice.send_file(group, str(tmp_path / "no-such-file"))
        assert "no-such-file" in missing.value.message
        with pytest.raises(roost.RoostError.InvalidArgument):
            await alice.send_file("not a group id", str(source))

        sent = await alice.send_file(group, str(source))
        received = await attachment_from(bob, "alice@localhost/phone")
        assert received.media_type == "application/pdf"

        # A wrong read token: the homeserver has no such blob for it (BLOB_NOT_FOUND).
        with pytest.raises(roost.RoostError.Server) as unknown:
            await bob.download(tampered(received, "token"), str(downloads / "a.pdf"))
        assert (unknown.value.code, unknown.value.code_name) == (600, "BLOB_NOT_FOUND")
        # The right blob with a wrong key: the bytes do not authenticate, nothing is kept.
        progress = Progress()
        with pytest.raises(roost.RoostError.AttachmentCorrupt):
            await bob.download(tampered(received, "key"), str(downloads / "b.pdf"), progress)
        # A handle that is no attachment at all.
        garbage = roost.Attachment(name="x", safe_file_name="x", media_type="text/plain", size=1,
                                   handle=b"\x00\x02\x03abc")
        with pytest.raises(roost.RoostError.InvalidArgument):
            await bob.download(garbage, str(downloads / "c.pdf"))
        # A destination that cannot be written.
        with pytest.raises(roost.RoostError.File):
            await bob.download(received, str(downloads / "no-such-dir" / "d.pdf"))
        assert list(downloads.iterdir()) == []

        # The genuine attachment still downloads, even with a progress listener that fails.
        failing = FailingProgress()
        assert await bob.download(received, str(downloads / "e.pdf"), failing) == source.stat().st_size
        assert failing.calls > 0
        assert sha256(downloads / "e.pdf") == sha256(source)
        assert sent.attachment == received

        await alice.close()
        await bob.close()
        with pytest.raises(roost.RoostError.Closed):
            await bob.download(received, str(downloads / "f.pdf"))

    run(scenario())
