-- Agents ever seen by the server. Connection state lives in the dispatcher;
-- last_seen_ms is refreshed on every heartbeat and on disconnect.
CREATE TABLE agents (
    id TEXT PRIMARY KEY NOT NULL,
    concurrency INTEGER NOT NULL,
    first_seen_ms BIGINT NOT NULL,
    last_seen_ms BIGINT NOT NULL
);

-- Commands and their lifecycle: PENDING -> RUNNING -> COMPLETED | FAILED,
-- or PENDING -> CANCELLED. `attempts` is the fencing token of the current or
-- last RUNNING attempt.
CREATE TABLE commands (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    command_type TEXT NOT NULL,
    payload TEXT NOT NULL,
    idempotent BOOLEAN NOT NULL,
    target_agent_id TEXT,
    assigned_agent_id TEXT,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    status_reason TEXT,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);

CREATE INDEX commands_by_status ON commands (status, id);
CREATE INDEX commands_by_assigned_agent ON commands (assigned_agent_id, status);
CREATE INDEX commands_by_target_agent ON commands (target_agent_id, status);
