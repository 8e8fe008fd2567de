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
//!
//! Redis is not trusted. Each entry's address is signed with the cluster secret, like multicast
//! announcements: `v1|<peer address>|<expiry ms>|<HMAC-SHA256 over the cluster name, the node id,
//! the address and the expiry>`. An unsigned, forged or expired entry is ignored with a WARN (at
//! most every 30 s per id), so whoever can write to Redis cannot point nodes at a relay; and
//! since the registry only finds members and the sealed links prove them alive, emptying it
//! makes no linked member dead (see [`super::membership`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use redis::aio::ConnectionManager;
use sha2::Sha256;

use super::handshake::shown;
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

use crate::util::clock::unix_ms;

fn entry_mac(secret: &[u8], cluster: &str, id: &str, addr: &str, expiry: i64) -> Hmac<Sha256> {
    // An HMAC key may have any length: `new_from_slice` cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap_or_else(|_| unreachable!());
    for part in [
        b"synchrony-registry/1".as_slice(),
        cluster.as_bytes(),
        id.as_bytes(),
        addr.as_bytes(),
    ] {
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part);
    }
    mac.update(&expiry.to_be_bytes());
    mac
}

/// This node's signed entry.
pub fn sign_entry(secret: &[u8], cluster: &str, id: &str, addr: &str, expiry: i64) -> String {
    let mac = entry_mac(secret, cluster, id, addr, expiry)
        .finalize()
        .into_bytes();
    format!("v1|{addr}|{expiry}|{}", hex_encode(&mac))
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The address of a member's entry, if its signature holds and it has not expired; else why not.
pub fn verify_entry(
    secret: &[u8],
    cluster: &str,
    id: &str,
    entry: &str,
    now: i64,
) -> Result<String, &'static str> {
    let mut parts = entry.split('|');
    let (Some("v1"), Some(addr), Some(expiry), Some(mac), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err("unsigned or malformed");
    };
    let expiry: i64 = expiry.parse().map_err(|_| "malformed expiry")?;
    let mac = hex_decode(mac).ok_or("malformed signature")?;
    entry_mac(secret, cluster, id, addr, expiry)
        .verify_slice(&mac)
        .map_err(|_| "bad signature (not signed with this cluster's secret)")?;
    if expiry < now {
        return Err("expired");
    }
    Ok(addr.to_owned())
}

/// Renews this node's entry and returns the registered ids and their (unverified) entries.
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
        .hset(
            &addrs,
            me,
            sign_entry(
                &cluster.settings.secret,
                &cluster.settings.name,
                me,
                &cluster.settings.peer_addr,
                now + ttl,
            ),
        )
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
    let mut forged: std::collections::HashMap<String, Instant> = std::collections::HashMap::new();
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
                let now = unix_ms();
                let mut verified = Vec::new();
                for (id, entry) in members {
                    let settings = &cluster.settings;
                    match verify_entry(&settings.secret, &settings.name, &id, &entry, now) {
                        Ok(addr) => verified.push((id, addr)),
                        Err(why) => {
                            // One WARN per id every 30 s, for at most 1,024 ids at once (a
                            // registry full of junk must not flood the log); the rest at debug.
                            if forged.len() >= 1024 {
                                forged.retain(|_, at| at.elapsed() < WARN_EVERY);
                            }
                            let due = forged.get(&id).is_none_or(|at| at.elapsed() >= WARN_EVERY);
                            if due && forged.len() < 1024 {
                                tracing::warn!(id = %shown(&id), entry = %shown(&entry), why, "ignored a Redis registry entry");
                                forged.insert(id, Instant::now());
                            } else {
                                tracing::debug!(id = %shown(&id), why, "ignored a Redis registry entry");
                            }
                        }
                    }
                }
                let ids: Vec<String> = verified.iter().map(|(id, _)| id.clone()).collect();
                cluster.update_membership(|m, now| m.registry(ids, now));
                for (id, addr) in verified {
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_signed_and_forgeries_refused() {
        let secret = b"0123456789abcdef";
        let entry = sign_entry(secret, "prod", "node-a", "10.0.0.1:25500", 2_000);
        assert_eq!(
            verify_entry(secret, "prod", "node-a", &entry, 1_000),
            Ok("10.0.0.1:25500".into())
        );
        assert_eq!(
            verify_entry(secret, "prod", "node-a", &entry, 3_000),
            Err("expired")
        );
        assert!(verify_entry(b"0123456789abcdeX", "prod", "node-a", &entry, 1_000).is_err());
        assert!(
            verify_entry(secret, "prod", "node-b", &entry, 1_000).is_err(),
            "another id"
        );
        assert!(verify_entry(secret, "staging", "node-a", &entry, 1_000).is_err());
        let moved = entry.replace("10.0.0.1", "10.6.6.6");
        assert!(
            verify_entry(secret, "prod", "node-a", &moved, 1_000).is_err(),
            "another address"
        );
        let later = entry.replace("|2000|", "|9000|");
        assert!(
            verify_entry(secret, "prod", "node-a", &later, 1_000).is_err(),
            "a longer life"
        );
        assert_eq!(
            verify_entry(secret, "prod", "node-a", "10.0.0.1:25500", 1_000),
            Err("unsigned or malformed")
        );
    }
}
