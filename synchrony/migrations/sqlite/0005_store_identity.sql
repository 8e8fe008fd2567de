-- Which database this is: one row, written by the first engine that starts on it. Cluster nodes
-- compare it when they link, so that a node started on another database (a forgotten URL, a
-- different PostgreSQL database) is refused instead of serving empty pages.
CREATE TABLE IF NOT EXISTS store_identity (
    singleton   INTEGER PRIMARY KEY CHECK (singleton = 1),
    id          TEXT    NOT NULL,
    created_at  BIGINT  NOT NULL
);
