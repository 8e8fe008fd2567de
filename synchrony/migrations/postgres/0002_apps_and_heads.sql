-- Apps registered by hosts (POST {ctx}/v1/apps/secret); tokens with iss = app_id are HS256 with secret.
CREATE TABLE IF NOT EXISTS app_secrets (
    app_id     TEXT   PRIMARY KEY,
    secret     TEXT   NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- The highest update-log id merged into a snapshot: with the log's own ids it gives each document
-- a durable head sequence that only grows.
ALTER TABLE doc_snapshots ADD COLUMN IF NOT EXISTS head BIGINT NOT NULL DEFAULT 0;
