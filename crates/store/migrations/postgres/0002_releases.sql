-- Releases as durable state machines: the machine's state as one JSON
-- document with a version for optimistic writes, a lease so that one worker
-- runs each release, the journal of its steps, and the events that moved
-- it (read by the SSE stream). Times are Unix milliseconds (UTC).
CREATE TABLE releases (
    id            TEXT    NOT NULL PRIMARY KEY,
    app           TEXT    NOT NULL,
    env           TEXT    NOT NULL,
    state_json    TEXT    NOT NULL,
    status        TEXT    NOT NULL,
    finished      BIGINT  NOT NULL,
    version       BIGINT  NOT NULL,
    lease_owner   TEXT,
    lease_expires BIGINT,
    created_at    BIGINT  NOT NULL,
    created_by    TEXT    NOT NULL,
    updated_at    BIGINT  NOT NULL
);
CREATE INDEX releases_app ON releases (app, env, created_at);
CREATE INDEX releases_unfinished ON releases (finished, created_at);

CREATE TABLE release_journal (
    release_id  TEXT   NOT NULL REFERENCES releases (id),
    step        TEXT   NOT NULL,
    action_json TEXT   NOT NULL,
    status      TEXT   NOT NULL,
    planned_at  BIGINT NOT NULL,
    done_at     BIGINT,
    error       TEXT,
    PRIMARY KEY (release_id, step)
);

CREATE TABLE release_events (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    release_id TEXT   NOT NULL REFERENCES releases (id),
    at         BIGINT NOT NULL,
    body_json  TEXT   NOT NULL
);
CREATE INDEX release_events_release ON release_events (release_id, id);
