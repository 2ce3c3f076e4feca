-- roost schema, version 2: receipts of accepted DS requests (idempotent submission; see
-- docs/PROTOCOL.md). key: SHA-256 digest of the request; answer: its original answer.
CREATE TABLE receipts (
    key         BYTEA PRIMARY KEY,
    accepted_ms BIGINT NOT NULL,
    answer      BIGINT NOT NULL
);

CREATE INDEX receipts_by_time ON receipts (accepted_ms);
