//! Which web pages may talk to the engine, by their `Origin` header.
//!
//! Browsers send `Origin` with every WebSocket upgrade and every cross-site request, and any page
//! a developer opens may try `ws://127.0.0.1:8091/…`. So:
//!
//! - requests without `Origin` (host applications, Node clients, curl) and same-origin requests
//!   (the `Origin` names the host the request was sent to, as for the demo page) always pass;
//! - origins listed in `synchrony.allowed.origins` pass (`*` allows every origin);
//! - with no list configured, an engine without authentication (open, on loopback) lets only
//!   loopback origins in (`http://localhost:*`, `http://127.0.0.1:*`, `http://[::1]:*`), and an
//!   engine with authentication lets every origin in: its tokens decide.

use axum::http::HeaderMap;

/// The configured allow-list.
#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    /// Exact origins (`scheme://host[:port]`, no path), lower-cased; `*` for any.
    allowed: Vec<String>,
}

impl OriginPolicy {
    pub fn new(allowed: &[String]) -> Self {
        Self {
            allowed: allowed
                .iter()
                .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
                .filter(|o| !o.is_empty())
                .collect(),
        }
    }

    /// Whether a request with these headers may proceed; `open` is whether the engine runs
    /// without authentication.
    pub fn admits(&self, headers: &HeaderMap, open: bool) -> bool {
        let Some(origin) = headers.get("origin") else {
            return true;
        };
        let Ok(origin) = origin.to_str() else {
            return false;
        };
        let origin = origin.trim().to_ascii_lowercase();
        let host = headers
            .get("host")
            .and_then(|h| h.to_str().ok())
            .map(str::to_ascii_lowercase);
        // Same origin: a page the engine served itself. Without authentication only on a
        // loopback host name: a page of evil.example whose name was rebound to 127.0.0.1
        // sends Origin and Host both naming evil.example.
        if let (Some(host), Some(authority)) = (host, authority(&origin)) {
            if authority == host && (!open || is_loopback_origin(&origin)) {
                return true;
            }
        }
        if !self.allowed.is_empty() {
            return self.allowed.iter().any(|a| a == "*" || *a == origin);
        }
        !open || is_loopback_origin(&origin)
    }
}

/// `host[:port]` of `scheme://host[:port]`.
fn authority(origin: &str) -> Option<&str> {
    let (_, rest) = origin.split_once("://")?;
    Some(rest.trim_end_matches('/'))
}

fn is_loopback_origin(origin: &str) -> bool {
    let Some(rest) = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
    else {
        return false;
    };
    let host = if let Some(v6) = rest.strip_prefix('[') {
        match v6.split_once(']') {
            Some((addr, _)) => return addr == "::1",
            None => return false,
        }
    } else {
        rest.split(':').next().unwrap_or_default()
    };
    host == "localhost"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("host", host.parse().unwrap());
        if let Some(o) = origin {
            h.insert("origin", o.parse().unwrap());
        }
        h
    }

    #[test]
    fn open_engines_admit_only_loopback_pages_and_non_browsers() {
        let p = OriginPolicy::default();
        let host = "127.0.0.1:8091";
        for ok in [
            None,
            Some("http://127.0.0.1:8091"),
            Some("http://localhost:3000"),
            Some("http://127.0.0.2"),
            Some("http://[::1]:5173"),
        ] {
            assert!(p.admits(&headers(ok, host), true), "{ok:?}");
        }
        for bad in [
            "https://evil.example",
            "http://localhost.evil.example",
            "http://127.0.0.1.evil.example",
            "null",
            "http://[::2]:80",
        ] {
            assert!(!p.admits(&headers(Some(bad), host), true), "{bad}");
        }
        // With tokens, every page may try: the token decides.
        assert!(p.admits(&headers(Some("https://evil.example"), host), false));
    }

    #[test]
    fn a_configured_list_is_exact_and_applies_with_tokens_too() {
        let p = OriginPolicy::new(&["https://Wiki.example.com/".into()]);
        let host = "sync.example.com";
        assert!(p.admits(&headers(Some("https://wiki.example.com"), host), false));
        assert!(!p.admits(&headers(Some("https://wiki.example.com:8443"), host), false));
        assert!(!p.admits(&headers(Some("http://localhost:3000"), host), true));
        // Same origin passes (a page the engine served itself)...
        assert!(p.admits(&headers(Some("https://sync.example.com"), host), false));
        // ...but without authentication only on a loopback name: DNS rebinding makes any name
        // point at 127.0.0.1, and the page's Origin and Host then agree.
        let open = OriginPolicy::default();
        let rebound = headers(Some("http://evil.example:8091"), "evil.example:8091");
        assert!(!open.admits(&rebound, true));
        assert!(open.admits(&rebound, false));
        assert!(OriginPolicy::new(&["*".into()]).admits(&headers(Some("https://x.y"), host), true));
    }
}
