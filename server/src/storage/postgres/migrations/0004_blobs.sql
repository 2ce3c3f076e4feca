-- roost schema, version 4: blobs (attachments) of the PostgreSQL engine (see
-- server/src/blob/postgres.rs and docs/ARCHITECTURE.md). An upload writes its chunks and its
-- blobs row in one transaction: chunks without a committed blobs row never exist. data_id
-- names an upload's chunks (the address is known only once every byte was hashed).
CREATE SEQUENCE blob_data_seq;

CREATE TABLE blob_chunks (
    data_id BIGINT NOT NULL,
    seq     BIGINT NOT NULL, -- chunk number: bytes [seq * chunk_size, ...) of the blob
    bytes   BYTEA NOT NULL,
    PRIMARY KEY (data_id, seq)
);
-- Ciphertext does not compress: store out of line without trying, and read ranges by slice.
ALTER TABLE blob_chunks ALTER COLUMN bytes SET STORAGE EXTERNAL;

CREATE TABLE blobs (
    address      BYTEA PRIMARY KEY, -- SHA-256 of the bytes
    data_id      BIGINT NOT NULL,
    chunk_size   INTEGER NOT NULL,
    owner        TEXT NOT NULL,
    token        BYTEA NOT NULL,
    size         BIGINT NOT NULL,
    created_secs BIGINT NOT NULL
);

CREATE INDEX blobs_by_created ON blobs (created_secs);

-- Bytes of stored blobs per owner, for the quota of the whole domain.
CREATE TABLE blob_usage (
    owner TEXT PRIMARY KEY,
    bytes BIGINT NOT NULL
);
