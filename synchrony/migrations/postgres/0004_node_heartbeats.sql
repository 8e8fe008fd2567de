-- Every engine using this database says it is alive here every few seconds, so that engines that
-- share the database but not a cluster (cluster panic) find each other.
CREATE TABLE IF NOT EXISTS node_heartbeats (
    node_id    TEXT    PRIMARY KEY,
    cluster    TEXT    NOT NULL,
    http_url   TEXT    NOT NULL,
    peer_addr  TEXT    NOT NULL,
    beat_at    BIGINT  NOT NULL
);
