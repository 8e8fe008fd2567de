//! The demo editor page at `{ctx}/demo/`, embedded in the binary.
//!
//! The assets are built from `client-js/demo/` by `npm run build:demo` and committed, so building
//! the engine never needs npm. They are gzipped once, on first request, for clients that accept it.

use std::sync::OnceLock;

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

struct Asset {
    name: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

const ASSETS: [Asset; 3] = [
    Asset {
        name: "index.html",
        content_type: "text/html; charset=utf-8",
        bytes: include_bytes!("../assets/demo/index.html"),
    },
    Asset {
        name: "demo.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../assets/demo/demo.js"),
    },
    Asset {
        name: "demo.css",
        content_type: "text/css; charset=utf-8",
        bytes: include_bytes!("../assets/demo/demo.css"),
    },
];

/// The page may talk only to this engine; styles inline because CodeMirror injects its own.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; connect-src 'self'; \
     style-src 'self' 'unsafe-inline'; img-src 'self' data:; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

/// Each asset prepared once: its gzip form and a validator.
struct Prepared {
    gzip: Vec<u8>,
    etag: HeaderValue,
}

fn prepared(index: usize) -> &'static Prepared {
    static PREPARED: OnceLock<Vec<Prepared>> = OnceLock::new();
    let all = PREPARED.get_or_init(|| {
        ASSETS
            .iter()
            .map(|asset| {
                use std::io::Write;
                let mut encoder =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
                // Writing to a Vec cannot fail.
                let gzip = encoder
                    .write_all(asset.bytes)
                    .and_then(|()| encoder.finish())
                    .unwrap_or_default();
                let etag = HeaderValue::from_str(&format!("\"{:016x}\"", fnv1a(asset.bytes)))
                    .unwrap_or_else(|_| HeaderValue::from_static("\"0\""));
                Prepared { gzip, etag }
            })
            .collect()
    });
    &all[index]
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The demo's routes, to be nested under the context path.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        // Relative, so it works under any context path: `{ctx}/demo` → `{ctx}/demo/`.
        .route("/demo", get(|| async { Redirect::permanent("demo/") }))
        .route(
            "/demo/",
            get(|headers: HeaderMap| async move { serve("index.html", &headers) }),
        )
        .route(
            "/demo/{file}",
            get(|Path(file): Path<String>, headers: HeaderMap| async move {
                serve(&file, &headers)
            }),
        )
}

fn serve(name: &str, headers: &HeaderMap) -> Response {
    let Some(index) = ASSETS.iter().position(|a| a.name == name) else {
        return (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::json!({"type": "not-found", "message": format!("no demo asset {name:?}")})
                .to_string(),
        )
            .into_response();
    };
    let asset = &ASSETS[index];
    let prepared = prepared(index);
    let mut response = if headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v == prepared.etag)
    {
        StatusCode::NOT_MODIFIED.into_response()
    } else if accepts_gzip(headers) && !prepared.gzip.is_empty() {
        let mut r = prepared.gzip.clone().into_response();
        r.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        r
    } else {
        asset.bytes.into_response()
    };
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    h.insert(header::ETAG, prepared.etag.clone());
    h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if asset.name == "index.html" {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        );
    }
    response
}

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';');
            let name = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    == Some(0.0)
            });
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !refused
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_encoding(value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static(value));
        h
    }

    #[test]
    fn gzip_is_negotiated() {
        assert!(accepts_gzip(&with_encoding("gzip, deflate, br")));
        assert!(accepts_gzip(&with_encoding("br;q=1.0, GZIP;q=0.5")));
        assert!(accepts_gzip(&with_encoding("*")));
        assert!(!accepts_gzip(&with_encoding("gzip;q=0, br")));
        assert!(!accepts_gzip(&with_encoding("br")));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }

    #[test]
    fn every_asset_compresses_and_round_trips() {
        use std::io::Read;
        for (index, asset) in ASSETS.iter().enumerate() {
            let mut decoded = Vec::new();
            flate2::read::GzDecoder::new(prepared(index).gzip.as_slice())
                .read_to_end(&mut decoded)
                .unwrap_or_default();
            assert_eq!(decoded, asset.bytes, "{}", asset.name);
        }
    }

    #[test]
    fn the_page_loads_the_bundled_script_and_styles() {
        let page = std::str::from_utf8(ASSETS[0].bytes).unwrap_or_default();
        assert!(page.contains("src=\"demo.js\""));
        assert!(page.contains("href=\"demo.css\""));
    }
}
