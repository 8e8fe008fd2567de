-- The append-only update log: every accepted Yjs update (v1 encoding), in commit order per document.
CREATE TABLE IF NOT EXISTS doc_updates (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    doc_id     TEXT    NOT NULL,
    data       BLOB    NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS doc_updates_doc_id ON doc_updates (doc_id, id);

-- One compacted state per document: a Yjs update holding everything merged so far.
CREATE TABLE IF NOT EXISTS doc_snapshots (
    doc_id     TEXT    PRIMARY KEY,
    data       BLOB    NOT NULL,
    merged     INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
