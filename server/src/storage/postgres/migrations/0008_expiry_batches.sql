-- Issue 16: the expiry sweep reads only what expired. Queue entries, dedup records and
-- ordinary KeyPackages already have an index by time (0001); the last-resort KeyPackages
-- (one per client) had none, so every sweep read all of them.
CREATE INDEX last_resort_by_expiry ON last_resort (not_after);
