//! A minimal HTTP/1.1 client for the engine's REST API on loopback (one request per connection).

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends one request; returns the status and the body.
pub async fn request(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: &[u8],
) -> Result<(u16, Vec<u8>)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("{url}: only http:// on loopback"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let mut stream = tokio::net::TcpStream::connect(authority)
        .await
        .with_context(|| format!("connect to {authority}"))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n",
        body.len()
    );
    if let Some(token) = token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut response = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(120),
        stream.read_to_end(&mut response),
    )
    .await
    .map_err(|_| anyhow!("{method} {url}: no answer in 120 s"))??;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("{method} {url}: malformed response"))?;
    let head = String::from_utf8_lossy(&response[..split]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("{method} {url}: no status"))?;
    let body = response[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        return Ok((status, dechunk(&body)?));
    }
    Ok((status, body))
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("malformed chunked body"))?;
        let size_text = std::str::from_utf8(&body[..line_end])?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)?;
        if size == 0 {
            return Ok(out);
        }
        let start = line_end + 2;
        if body.len() < start + size + 2 {
            bail!("truncated chunked body");
        }
        out.extend_from_slice(&body[start..start + size]);
        body = &body[start + size + 2..];
    }
}
