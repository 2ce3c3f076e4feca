-- roost schema, version 1. Forward-only: later versions are new files, never edits of this one.
-- Unsigned 64-bit numbers of the services are stored as BIGINT (they stay below 2^63).
-- Portable to Postgres-wire distributed engines except where noted in docs/ARCHITECTURE.md.

-- Facts about the deployment every node checks at start: the domain, the AS public key.
CREATE TABLE roost_meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- Authentication Service.
CREATE TABLE users (
    name       TEXT PRIMARY KEY,
    user_key   BYTEA NOT NULL,
    created_ms BIGINT NOT NULL
);

CREATE TABLE token_uses (
    hash TEXT PRIMARY KEY,
    uses BIGINT NOT NULL
);

CREATE SEQUENCE client_num_seq;

-- Removed clients stay (revoked) so their device name is never reused. Names sort bytewise
-- (COLLATE "C"), as the embedded engine lists a user's devices; an engine whose default
-- ordering is bytewise needs no collation here.
CREATE TABLE clients (
    user_name  TEXT COLLATE "C" NOT NULL,
    device     TEXT COLLATE "C" NOT NULL,
    client_num BIGINT NOT NULL UNIQUE,
    credential BYTEA NOT NULL, -- TLS-encoded ClientCredential
    revoked    BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (user_name, device)
);

-- Queuing Service. One head row per active client's queue: the highest seq assigned and the
-- entries held. Seqs are assigned by updating this row inside the writing transaction, so
-- they are gap-free in commit order whichever node writes.
CREATE TABLE queue_heads (
    client_num BIGINT PRIMARY KEY,
    head       BIGINT NOT NULL,
    held       BIGINT NOT NULL
);

CREATE SEQUENCE payload_id_seq;

-- A fanned-out payload is stored once; refs counts the queue entries naming it.
CREATE TABLE payloads (
    id   BIGINT PRIMARY KEY,
    body BYTEA NOT NULL, -- TLS-encoded QueuePayload
    refs BIGINT NOT NULL
);

CREATE TABLE queue_entries (
    client_num   BIGINT NOT NULL,
    seq          BIGINT NOT NULL,
    payload_id   BIGINT NOT NULL,
    timestamp_ms BIGINT NOT NULL,
    message_id   BYTEA NOT NULL,
    PRIMARY KEY (client_num, seq)
);
CREATE INDEX queue_entries_by_time ON queue_entries (timestamp_ms);

-- Enqueue idempotency by (client, message id).
CREATE TABLE queue_dedup (
    client_num   BIGINT NOT NULL,
    message_id   BYTEA NOT NULL,
    seq          BIGINT NOT NULL,
    timestamp_ms BIGINT NOT NULL,
    PRIMARY KEY (client_num, message_id)
);
CREATE INDEX queue_dedup_by_time ON queue_dedup (timestamp_ms);

-- KeyPackage service. Ordinary KeyPackages are handed out oldest (lowest seq) first; a claim
-- deletes the one it hands out. Expired ones stay until a claim of their client or the purge.
CREATE SEQUENCE key_package_seq;

CREATE TABLE key_packages (
    client_num BIGINT NOT NULL,
    seq        BIGINT NOT NULL,
    not_after  BIGINT NOT NULL,
    body       BYTEA NOT NULL,
    PRIMARY KEY (client_num, seq)
);
CREATE INDEX key_packages_by_expiry ON key_packages (not_after);

CREATE TABLE last_resort (
    client_num BIGINT PRIMARY KEY,
    not_after  BIGINT NOT NULL,
    body       BYTEA NOT NULL
);

-- Delivery Service: hosted groups. `version` is bumped by every write of the state; every DS
-- write checks it (see server/src/delivery).
CREATE TABLE groups (
    key      BYTEA PRIMARY KEY, -- MLS group id (TLS-encoded GroupId)
    epoch    BIGINT NOT NULL,
    version  BIGINT NOT NULL,
    snapshot BYTEA NOT NULL
);

-- Federation outbox: one entry per (message, destination domain) and up to 1,024 of its
-- recipients there, sent in seq order.
CREATE SEQUENCE outbox_seq;

CREATE TABLE outbox (
    domain   TEXT COLLATE "C" NOT NULL,
    seq      BIGINT NOT NULL,
    delivery BYTEA NOT NULL, -- TLS-encoded Delivery
    PRIMARY KEY (domain, seq)
);

-- Which node drains a destination's outbox, until when (ms since the epoch, the database's
-- clock). A node takes a free or expired lease, renews its own with every batch it reads, and
-- drops it when it finds nothing left to send.
CREATE TABLE outbox_leases (
    domain     TEXT COLLATE "C" PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_ms BIGINT NOT NULL
);

-- QueueAck for many queues in one statement: deletes each queue's entries up to its seq,
-- releases their payloads (locked in id order, as every writer of payloads does) and lowers
-- the queues' held counts. Returns the clients whose queue is gone (client removed). The
-- caller has locked the queues' head rows in ascending order. PL/pgSQL: see
-- docs/ARCHITECTURE.md for distributed engines.
CREATE FUNCTION roost_ack(p_clients BIGINT[], p_up_tos BIGINT[]) RETURNS SETOF BIGINT
LANGUAGE plpgsql AS $$
DECLARE
    nums BIGINT[];
    ids BIGINT[];
BEGIN
    RETURN QUERY
        SELECT c FROM unnest(p_clients) AS c
        WHERE NOT EXISTS (SELECT 1 FROM queue_heads AS h WHERE h.client_num = c);
    WITH a AS (
        SELECT * FROM unnest(p_clients, p_up_tos) AS a (client_num, up_to)
    ), gone AS (
        DELETE FROM queue_entries AS e USING a
        WHERE e.client_num = a.client_num AND e.seq <= a.up_to
        RETURNING e.client_num, e.payload_id
    )
    SELECT array_agg(client_num), array_agg(payload_id ORDER BY payload_id)
    INTO nums, ids FROM gone;
    IF nums IS NULL THEN
        RETURN;
    END IF;
    UPDATE queue_heads AS h SET held = GREATEST(h.held - t.n, 0)
    FROM (SELECT c, count(*) AS n FROM unnest(nums) AS c GROUP BY c) AS t
    WHERE h.client_num = t.c;
    PERFORM 1 FROM payloads WHERE id = ANY(ids) ORDER BY id FOR UPDATE;
    UPDATE payloads AS p SET refs = p.refs - t.n
    FROM (SELECT id, count(*) AS n FROM unnest(ids) AS id GROUP BY id) AS t
    WHERE p.id = t.id;
    DELETE FROM payloads WHERE id = ANY(ids) AND refs <= 0;
END
$$;
