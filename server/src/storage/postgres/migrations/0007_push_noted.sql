-- roost schema, version 7: push wake-ups survive a node stopped between a queue commit and the
-- push outbox. noted_ms is the due time of the client's last scheduled wake-up: queue entries
-- enqueued up to then are covered by it; a later entry with no wake-up pending is one a
-- stopped node lost, scheduled again by the recovery sweep (see push). Existing
-- registrations start from their last wake-up sent.
ALTER TABLE push_registrations ADD COLUMN noted_ms BIGINT NOT NULL DEFAULT 0;
UPDATE push_registrations SET noted_ms = last_sent_ms;
