-- roost schema, version 5: fan-outs accepted but not yet queued (lazy fan-out of commits; see
-- docs/ARCHITECTURE.md). Written in the transaction that accepts the commit, under the group
-- row's lock, so a group's records are numbered in the order its commits were accepted; turned
-- into queue entries (oldest first) and deleted in one later transaction.
CREATE SEQUENCE fanout_pending_seq;

CREATE TABLE fanout_pending (
    id        BIGINT PRIMARY KEY DEFAULT nextval('fanout_pending_seq'),
    group_key BYTEA NOT NULL,
    record    BYTEA NOT NULL -- TLS-encoded pending fan-outs of one operation
);

CREATE INDEX fanout_pending_by_group ON fanout_pending (group_key, id);
