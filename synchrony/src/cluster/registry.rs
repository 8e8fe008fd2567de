//! Membership through a Redis registry (`cluster.join.type=redis`, `cluster.join.redis.url`).
//!
//! Every [`REFRESH`] each node, in one atomic pipeline, renews its own entry (a sorted set
//! `synchrony:{cluster}:members` scored by expiry time, and its peer address in the hash
//! `synchrony:{cluster}:addrs`), drops entries past their expiry, and reads the live ones. It
//! dials every member it reads and tells the membership core which ids are registered: a
//! member whose entry expired (its node died, or lost Redis for longer than
//! [`Timeouts::failure`](super::membership::Timeouts)) is dead even if a link lingers. A node
//! leaving cleanly removes its entry at once.
//!
//! While Redis is unreachable the last list read stays in force (links still decide who is
//! alive), and a WARN says so every 30 s.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::aio::ConnectionManager;

use super::Cluster;

/// How often the entry is renewed and the registry read.
pub const REFRESH: Duration = Duration::from_secs(1);
/// Bound on each round trip to Redis.
const DEADLINE: Duration = Duration::from_secs(2);
const WARN_EVERY: Duration = Duration::from_secs(30);

fn keys(cluster: &Cluster) -> (String, String) {
    let prefix = format!("synchrony:{}", cluster.settings.name);
    (format!("{prefix}:members"), format!("{prefix}:addrs"))
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Renews this node's entry and returns the live members' ids and addresses.
async fn refresh(
    conn: &mut ConnectionManager,
    cluster: &Cluster,
) -> redis::RedisResult<Vec<(String, String)>> {
    let (members, addrs) = keys(cluster);
    let now = unix_ms();
    let ttl = cluster.settings.timeouts.failure.as_millis() as i64;
    let me = cluster.me();
    let (expired, live): (Vec<String>, Vec<String>) = redis::pipe()
        .atomic()
        .zadd(&members, me, now + ttl)
        .ignore()
        .hset(&addrs, me, &cluster.settings.peer_addr)
        .ignore()
        .zrangebyscore(&members, "-inf", now)
        .zrangebyscore(&members, now, "+inf")
        .query_async(conn)
        .await?;
    if !expired.is_empty() {
        let _: () = redis::pipe()
            .atomic()
            .zrem(&members, &expired)
            .ignore()
            .hdel(&addrs, &expired)
            .ignore()
            .query_async(conn)
            .await?;
    }
    if live.is_empty() {
        return Ok(Vec::new());
    }
    let peers: Vec<Option<String>> = redis::cmd("HMGET")
        .arg(&addrs)
        .arg(&live)
        .query_async(conn)
        .await?;
    Ok(live
        .into_iter()
        .zip(peers)
        .filter_map(|(id, addr)| Some((id, addr?)))
        .collect())
}

pub(crate) async fn run(cluster: Arc<Cluster>, url: String) {
    let client = match redis::Client::open(url.as_str()) {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "cluster.join.redis.url is not usable; Redis membership is off");
            return;
        }
    };
    let mut conn: Option<ConnectionManager> = None;
    let mut warned: Option<Instant> = None;
    let mut every = tokio::time::interval(REFRESH);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = cluster.cancel.cancelled() => return,
        }
        // A leaving node has removed its entry (`deregister`): renewing it would put it back
        // until it expired.
        if cluster.leaving.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        if conn.is_none() {
            conn = tokio::time::timeout(DEADLINE, client.get_connection_manager())
                .await
                .ok()
                .and_then(Result::ok);
        }
        let outcome = match conn.as_mut() {
            Some(conn) => tokio::time::timeout(DEADLINE, refresh(conn, &cluster))
                .await
                .map_err(|_| format!("no answer within {DEADLINE:?}"))
                .and_then(|r| r.map_err(|e| e.to_string())),
            None => Err("cannot connect".to_owned()),
        };
        match outcome {
            Ok(members) => {
                if warned.take().is_some() {
                    tracing::info!("Redis registry reachable again");
                }
                let ids: Vec<String> = members.iter().map(|(id, _)| id.clone()).collect();
                cluster.update_membership(|m, now| m.registry(ids, now));
                for (id, addr) in members {
                    if id != cluster.me() {
                        cluster.dial(addr);
                    }
                }
            }
            Err(error) => {
                if warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                    tracing::warn!(%error, "Redis registry (cluster.join.redis.url) unreachable; keeping the last member list");
                    warned = Some(Instant::now());
                }
            }
        }
    }
}

/// Removes this node's entry (a clean stop), within [`DEADLINE`].
pub(crate) async fn deregister(cluster: &Cluster, url: &str) {
    let (members, addrs) = keys(cluster);
    let me = cluster.me().to_owned();
    let work = async {
        let client = redis::Client::open(url)?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::pipe()
            .atomic()
            .zrem(&members, &me)
            .ignore()
            .hdel(&addrs, &me)
            .ignore()
            .query_async::<()>(&mut conn)
            .await
    };
    match tokio::time::timeout(DEADLINE, work).await {
        Ok(Ok(())) => tracing::info!("left the Redis registry"),
        Ok(Err(error)) => {
            tracing::warn!(%error, "could not leave the Redis registry; the entry expires by itself")
        }
        Err(_) => tracing::warn!("Redis did not answer; the registry entry expires by itself"),
    }
}
