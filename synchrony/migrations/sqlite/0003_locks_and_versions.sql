-- Maintenance locks (POST {ctx}/v1/hub-lock-state): one row per locked document, doc_id '*' for
-- the app-wide lock. A lock ends when its row is deleted or when expires_at (ms) has passed.
CREATE TABLE IF NOT EXISTS doc_locks (
    lock_id    TEXT    NOT NULL,
    doc_id     TEXT    NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (lock_id, doc_id)
);

-- Named versions: a document's whole state (a Yjs update) as it was when a host marked it.
CREATE TABLE IF NOT EXISTS doc_versions (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    doc_id     TEXT    NOT NULL,
    label      TEXT    NOT NULL,
    created_by TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    data       BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS doc_versions_doc_id ON doc_versions (doc_id, id);
