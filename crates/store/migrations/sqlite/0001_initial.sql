-- Apps, their immutable profile revisions, environments, targets, the audit
-- log and API tokens. Times are Unix milliseconds (UTC).
CREATE TABLE apps (
    name             TEXT    NOT NULL PRIMARY KEY,
    team             TEXT    NOT NULL,
    owners_json      TEXT    NOT NULL,
    labels_json      TEXT    NOT NULL,
    description      TEXT,
    current_revision BIGINT  NOT NULL,
    digest           TEXT    NOT NULL,
    created_at       BIGINT  NOT NULL,
    created_by       TEXT    NOT NULL,
    updated_at       BIGINT  NOT NULL,
    updated_by       TEXT    NOT NULL,
    deleted_at       BIGINT,
    deleted_by       TEXT
);
CREATE INDEX apps_team ON apps (team, name);

CREATE TABLE app_owners (
    app   TEXT NOT NULL REFERENCES apps (name),
    owner TEXT NOT NULL,
    PRIMARY KEY (app, owner)
);
CREATE INDEX app_owners_owner ON app_owners (owner, app);

CREATE TABLE app_labels (
    app   TEXT NOT NULL REFERENCES apps (name),
    key   TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (app, key)
);
CREATE INDEX app_labels_key_value ON app_labels (key, value, app);

CREATE TABLE revisions (
    app            TEXT   NOT NULL REFERENCES apps (name),
    number         BIGINT NOT NULL,
    digest         TEXT   NOT NULL,
    profile_text   TEXT   NOT NULL,
    profile_json   TEXT   NOT NULL,
    author         TEXT   NOT NULL,
    message        TEXT,
    rolled_back_to BIGINT,
    created_at     BIGINT NOT NULL,
    PRIMARY KEY (app, number)
);

CREATE TABLE environments (
    name        TEXT   NOT NULL PRIMARY KEY,
    tier        TEXT   NOT NULL,
    description TEXT,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);

CREATE TABLE targets (
    name        TEXT   NOT NULL PRIMARY KEY,
    kind        TEXT   NOT NULL,
    environment TEXT,
    config_json TEXT   NOT NULL,
    description TEXT,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);

CREATE TABLE audit_events (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    at            BIGINT NOT NULL,
    actor         TEXT   NOT NULL,
    action        TEXT   NOT NULL,
    resource_kind TEXT   NOT NULL,
    resource      TEXT   NOT NULL,
    revision      BIGINT,
    digest_before TEXT,
    digest_after  TEXT,
    detail_json   TEXT   NOT NULL
);
CREATE INDEX audit_events_resource ON audit_events (resource_kind, resource, id);
CREATE INDEX audit_events_actor ON audit_events (actor, id);

CREATE TABLE api_tokens (
    id           TEXT   NOT NULL PRIMARY KEY,
    secret_hash  TEXT   NOT NULL UNIQUE,
    subject      TEXT   NOT NULL,
    subject_kind TEXT   NOT NULL,
    teams_json   TEXT   NOT NULL,
    role         TEXT   NOT NULL,
    description  TEXT,
    created_at   BIGINT NOT NULL,
    created_by   TEXT   NOT NULL,
    revoked_at   BIGINT
);
