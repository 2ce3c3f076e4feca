-- Issue 16: a commit stores what changed of its group's state instead of the whole snapshot
-- (server/src/storage/group_delta.rs). `groups.snapshot` is the base; each delta turns the
-- state of the version before into that of `version`. `groups.epoch` and `groups.version`
-- stay current. The deltas are deleted when the base is written again.
CREATE TABLE group_deltas (
    group_key BYTEA NOT NULL,
    version   BIGINT NOT NULL,
    delta     BYTEA NOT NULL,
    PRIMARY KEY (group_key, version)
);
