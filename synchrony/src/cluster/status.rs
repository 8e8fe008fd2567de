//! `synchrony cluster status`: a node's view of its cluster, fetched from
//! `GET {ctx}/v1/cluster` and printed as a table (or the JSON itself).

use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Fetches `{base}/v1/cluster` (`base` is `http://host:port{ctx}`), with an admin token when
/// the node enforces tokens.
pub async fn fetch(base: &str, token: Option<&str>) -> Result<Value, String> {
    let url: url::Url = format!("{}/v1/cluster", base.trim_end_matches('/'))
        .parse()
        .map_err(|e| format!("{base:?} is not a URL: {e}"))?;
    if url.scheme() != "http" {
        return Err(format!("{base:?}: only http:// URLs are supported"));
    }
    let host = url.host_str().ok_or("the URL has no host")?.to_owned();
    let port = url.port_or_known_default().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let mut request =
        hyper::Request::get(url.path()).header(hyper::header::HOST, format!("{host}:{port}"));
    if let Some(token) = token.filter(|t| !t.trim().is_empty()) {
        request = request.header(
            hyper::header::AUTHORIZATION,
            format!("Bearer {}", token.trim()),
        );
    }
    let request = request
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if status == hyper::StatusCode::UNAUTHORIZED || status == hyper::StatusCode::FORBIDDEN {
        return Err(format!(
            "{url} answered {status}: the node enforces tokens; pass an admin token with --token \
             or SYNCHRONY_ADMIN_TOKEN (`synchrony token --admin ...` mints one)"
        ));
    }
    if !status.is_success() {
        return Err(format!(
            "{url} answered {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    serde_json::from_slice(&body).map_err(|e| format!("{url} did not answer JSON: {e}"))
}

/// Why a view is not yet the settled one `--wait-live` waits for, if it is not.
pub fn unsettled(status: &Value, live: usize) -> Option<String> {
    if status["clustered"] != Value::Bool(true) {
        return Some("the node is not in a cluster".into());
    }
    let seen = status["live"].as_array().map_or(0, Vec::len);
    if seen < live {
        return Some(format!("{seen} live members of {live}"));
    }
    let members = status["members"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if let Some(m) = members.iter().find(|m| m["state"] != "alive") {
        return Some(format!("member {} is {}", m["id"], m["state"]));
    }
    if let Some(m) = members.iter().find(|m| m["link"] == Value::Bool(false)) {
        return Some(format!("the link to member {} is down", m["id"]));
    }
    None
}

/// Asks the node every half second until its view is settled (`live` members or more, every
/// member alive, every link up); unreachable nodes are asked again (one may be restarting).
/// Gives the last status once settled, else what was still missing after `within`.
pub async fn wait_until_settled(
    base: &str,
    token: Option<&str>,
    live: usize,
    within: std::time::Duration,
) -> Result<Value, String> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let missing = match fetch(base, token).await {
            Ok(status) => match unsettled(&status, live) {
                None => return Ok(status),
                Some(missing) => missing,
            },
            // A malformed URL or a refused token will not get better by waiting.
            Err(error) if error.contains("not a URL") || error.contains("enforces tokens") => {
                return Err(error)
            }
            Err(error) => error,
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "the cluster did not settle within {within:?}: {missing}"
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// Lays out rows under a header, each column as wide as its widest cell.
fn table<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let header = header.map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Engines sharing the database but not the cluster, if any (cluster panic).
fn strangers(status: &Value) -> String {
    let rows: Vec<[String; 4]> = status["strangers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            [
                s["node"].as_str().unwrap_or_default().to_owned(),
                match s["cluster"].as_str().unwrap_or_default() {
                    "" => "(standalone)".to_owned(),
                    name => name.to_owned(),
                },
                s["http_url"].as_str().unwrap_or_default().to_owned(),
                s["last_beat_ms_ago"].to_string(),
            ]
        })
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    format!(
        "\nCLUSTER PANIC: {} node(s) share this database without sharing this cluster; all keep serving\n{}",
        rows.len(),
        table(["NODE", "CLUSTER", "HTTP", "LAST_BEAT_MS"], &rows)
    )
}

/// The status as a table: one line per member, this node marked with `*`; then the strangers.
pub fn render(status: &Value) -> String {
    if status["clustered"] != Value::Bool(true) {
        return format!(
            "this node is not in a cluster (cluster.join.type is not set)\n{}",
            strangers(status)
        );
    }
    let me = status["self"].as_str().unwrap_or_default();
    let mut out = format!(
        "cluster {}  view epoch {}  live {}\n",
        status["name"].as_str().unwrap_or("?"),
        status["epoch"],
        status["live"].as_array().map_or(0, Vec::len),
    );
    let rows: Vec<[String; 8]> = status["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            let id = m["id"].as_str().unwrap_or_default();
            [
                format!("{}{}", if id == me { "*" } else { " " }, id),
                m["state"].as_str().unwrap_or_default().to_owned(),
                match m["link"] {
                    Value::Bool(true) => "up".to_owned(),
                    Value::Bool(false) => "DOWN".to_owned(),
                    _ => "-".to_owned(),
                },
                m["peer_address"].as_str().unwrap_or_default().to_owned(),
                m["http_url"].as_str().unwrap_or_default().to_owned(),
                m["documents"].to_string(),
                m["connections"].to_string(),
                m["uptime_seconds"].to_string(),
            ]
        })
        .collect();
    out.push_str(&table(
        [
            " NODE", "STATE", "LINK", "PEER", "HTTP", "DOCS", "CONNS", "UPTIME_S",
        ],
        &rows,
    ));
    out.push_str(&strangers(status));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_members_with_this_node_marked() {
        let status = serde_json::json!({
            "clustered": true, "self": "b", "name": "prod", "epoch": 4, "live": ["a", "b"],
            "members": [
                {"id": "b", "state": "alive", "peer_address": "10.0.0.2:25500",
                 "http_url": "http://10.0.0.2:8091/synchrony", "documents": 3, "connections": 10, "uptime_seconds": 60},
                {"id": "a", "state": "suspect", "link": false, "peer_address": "10.0.0.1:25500",
                 "http_url": "http://10.0.0.1:8091/synchrony", "documents": 1, "connections": 0, "uptime_seconds": 5},
            ],
            "strangers": [{"node": "x", "cluster": "staging", "http_url": "http://10.0.0.9:8091/synchrony",
                           "peer_addr": "10.0.0.9:25500", "last_beat_ms_ago": 700}]
        });
        let table = render(&status);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "cluster prod  view epoch 4  live 2");
        assert!(lines[1].starts_with(" NODE  STATE"), "{table}");
        assert!(
            lines[2].starts_with("*b     alive    -     10.0.0.2:25500"),
            "{table}"
        );
        assert!(lines[3].starts_with(" a     suspect  DOWN"), "{table}");
        assert!(lines[5].starts_with("CLUSTER PANIC: 1 node(s)"), "{table}");
        assert!(lines[7].starts_with("x     staging"), "{table}");
        assert!(render(&serde_json::json!({"clustered": false})).contains("not in a cluster"));
    }

    #[test]
    fn settled_means_enough_live_members_all_alive_and_linked() {
        let view = |live: &[&str], members: serde_json::Value| serde_json::json!({"clustered": true, "live": live, "members": members});
        let up = serde_json::json!([
            {"id": "a", "state": "alive", "link": null},
            {"id": "b", "state": "alive", "link": true},
        ]);
        assert_eq!(unsettled(&view(&["a", "b"], up.clone()), 2), None);
        assert_eq!(
            unsettled(&view(&["a", "b"], up), 3).as_deref(),
            Some("2 live members of 3")
        );
        let dead = serde_json::json!([
            {"id": "a", "state": "alive", "link": null},
            {"id": "b", "state": "alive", "link": true},
            {"id": "c", "state": "dead", "link": false},
        ]);
        assert_eq!(
            unsettled(&view(&["a", "b"], dead), 2).as_deref(),
            Some("member \"c\" is \"dead\"")
        );
        let down = serde_json::json!([
            {"id": "a", "state": "alive", "link": null},
            {"id": "b", "state": "alive", "link": false},
        ]);
        assert!(
            unsettled(&view(&["a", "b"], down), 2).is_some_and(|m| m.contains("link to member"))
        );
        assert!(unsettled(&serde_json::json!({"clustered": false}), 1).is_some());
    }
}
