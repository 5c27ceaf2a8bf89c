-- Submissions made with an Idempotency-Key header: a retried request with the
-- same key returns the commands created the first time instead of new ones.
CREATE TABLE submissions (
    idempotency_key TEXT PRIMARY KEY NOT NULL,
    request TEXT NOT NULL,
    created_commands TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL
);
