-- roost schema, version 3: push notifications. A registration is sealed by the node with
-- the push key (the database never sees a token in clear); last_sent_ms starts the
-- coalescing interval. push_jobs is the push outbox: at most one pending wake-up per client,
-- claimed by pushing due_ms past a lease.
CREATE TABLE push_registrations (
    client_num   BIGINT PRIMARY KEY,
    sealed       BYTEA NOT NULL,
    last_sent_ms BIGINT NOT NULL
);

CREATE TABLE push_jobs (
    client_num BIGINT PRIMARY KEY,
    due_ms     BIGINT NOT NULL,
    attempts   INTEGER NOT NULL,
    -- messages arrived while the wake-up was claimed: finishing it schedules the next
    again      BOOLEAN NOT NULL DEFAULT FALSE
);

CREATE INDEX push_jobs_by_due ON push_jobs (due_ms);
