//! Files (PROTOCOL.md §4.5.1-2): `send_file` encrypts and uploads, the receiver gets an
//! attachment and `download` gives back the same bytes; a tampered attachment is refused and
//! leaves no file.

use roost_client::{Content, DownloadTarget, Event, FileSource};

use crate::common::*;

pub(crate) fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub(crate) async fn next_attachment(
    client: &roost_client::Client,
    group: &roost_protocol::GroupId,
) -> roost_client::Attachment {
    let event = wait_for(client, "message", |e| {
        e.group() == group && matches!(e, Event::Message { .. })
    })
    .await;
    match event.content() {
        Some(Ok(Content::Attachment(attachment))) => attachment,
        other => panic!("expected an attachment, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sent_file_arrives_as_an_attachment_and_downloads_byte_identical() {
    let t = start_server().await;
    let (alice, bob, group) = t.alice_and_bob_in_a_group().await;
    let dir = tempfile::tempdir().unwrap();

    // Sizes around the chunk boundary, and an empty file.
    for (i, len) in [0usize, 1, 65_536, 65_537, 3 * 1024 * 1024 + 11]
        .into_iter()
        .enumerate()
    {
        let bytes = pseudo_random(len, i as u64 + 1);
        let path = dir.path().join(format!("photo-{i}.jpg"));
        std::fs::write(&path, &bytes).unwrap();
        let mut last = (0, 0);
        let (_, sent) = alice
            .send_file(
                &group,
                FileSource::path(&path).await.unwrap(),
                |done, total| last = (done, total),
            )
            .await
            .unwrap();
        assert_eq!(last.0, last.1, "progress ends at the total");
        assert_eq!(last.1, roost_client::attachment::ciphertext_len(len as u64));

        let got = next_attachment(&bob, &group).await;
        assert_eq!(got, sent);
        assert_eq!(got.size, len as u64);
        assert_eq!(got.name(), format!("photo-{i}.jpg"));
        assert_eq!(got.media_type(), "image/jpeg");
        let target = dir.path().join(format!("received-{i}"));
        let size = bob
            .download(&got, DownloadTarget::Path(target.clone()), |_, _| {})
            .await
            .unwrap();
        assert_eq!(size, len as u64);
        assert!(
            std::fs::read(&target).unwrap() == bytes,
            "{len} B file differs"
        );
    }

    // From a reader, into a writer.
    let bytes = pseudo_random(200_000, 99);
    let (_, sent) = alice
        .send_file(
            &group,
            FileSource::reader(
                std::io::Cursor::new(bytes.clone()),
                200_000,
                "voice.ogg",
                "audio/ogg",
            ),
            |_, _| {},
        )
        .await
        .unwrap();
    let got = next_attachment(&bob, &group).await;
    assert_eq!(got, sent);
    let mut out = Vec::new();
    bob.download(&got, DownloadTarget::Writer(&mut out), |_, _| {})
        .await
        .unwrap();
    assert!(out == bytes);

    // A wrong key: the chunks do not authenticate, and no file is left behind.
    let mut tampered = got.clone();
    tampered.key[0] ^= 1;
    let target = dir.path().join("tampered");
    let err = bob
        .download(&tampered, DownloadTarget::Path(target.clone()), |_, _| {})
        .await
        .unwrap_err();
    assert!(
        matches!(err, roost_client::ClientError::AttachmentCorrupt(_)),
        "{err}"
    );
    assert!(!target.exists());
    assert!(!dir.path().join("tampered.part").exists());
    // A wrong read token: the server does not serve it.
    let mut stolen = got.clone();
    stolen.blob.token[0] ^= 1;
    let err = bob
        .download(&stolen, DownloadTarget::Writer(&mut Vec::new()), |_, _| {})
        .await
        .unwrap_err();
    assert_eq!(
        err.server_code(),
        Some(roost_protocol::ErrorCode::BLOB_NOT_FOUND)
    );
}
