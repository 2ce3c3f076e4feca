-- roost schema, version 6: send counters (SendCounted; see docs/PROTOCOL.md §7.4). member:
-- SHA-256 of (sender, group); counter: the highest accepted; receipt and answer: the digest and
-- answer of the message that carried it. Written with that message's receipt; never pruned.
CREATE TABLE send_counters (
    member  BYTEA PRIMARY KEY,
    counter BIGINT NOT NULL,
    receipt BYTEA NOT NULL,
    answer  BIGINT NOT NULL
);
