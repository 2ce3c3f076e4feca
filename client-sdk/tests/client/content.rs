//! Application-message content (PROTOCOL.md §4.5): text round-trips; a content type the
//! receiver does not know, and bytes that are no MessageContent, arrive as messages the app can
//! show as unsupported, with no error event, and the conversation goes on in both directions.

use roost_client::{Content, ContentError, ContentType, Event};

use crate::common::*;

/// The next message or group error of `group` (the test fails on an error event).
async fn next_message(client: &roost_client::Client, group: &roost_protocol::GroupId) -> Event {
    let event = wait_for(client, "message or error", |e| {
        e.group() == group && matches!(e, Event::Message { .. } | Event::GroupError { .. })
    })
    .await;
    assert!(
        matches!(event, Event::Message { .. }),
        "expected a message, got {event:?}"
    );
    event
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_unknown_content_types_and_raw_bytes_never_break_the_conversation() {
    let t = start_server().await;
    let (alice, bob, group) = t.alice_and_bob_in_a_group().await;

    alice.send_text(&group, "héllo\nbob").await.unwrap();
    let event = next_message(&bob, &group).await;
    assert_eq!(event.content(), Some(Ok(Content::text("héllo\nbob"))));
    let Event::Message { sender, bytes, .. } = &event else {
        unreachable!()
    };
    assert_eq!(sender, &client_id("alice", "phone"));
    // The wire plaintext: content type 1, then the UTF-8 text with its length.
    assert_eq!(bytes[..3], [0x00, 0x01, 10]);

    // A content type from a future version (e.g. an attachment).
    let future = Content::Unknown {
        content_type: ContentType(0x7f01),
        body: vec![1, 2, 3],
    };
    alice.send_content(&group, &future).await.unwrap();
    assert_eq!(next_message(&bob, &group).await.content(), Some(Ok(future)));

    // Raw bytes (what clients sent before §4.5): unreadable, still no error event.
    alice.send(&group, b"raw text").await.unwrap();
    assert_eq!(
        next_message(&bob, &group).await.content(),
        Some(Err(ContentError::Malformed))
    );

    // The conversation goes on, both ways.
    alice.send_text(&group, "still there?").await.unwrap();
    assert_eq!(
        next_message(&bob, &group).await.content(),
        Some(Ok(Content::text("still there?")))
    );
    bob.send_text(&group, "yes").await.unwrap();
    assert_eq!(
        next_message(&alice, &group).await.content(),
        Some(Ok(Content::text("yes")))
    );
}
