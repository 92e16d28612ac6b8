//! The web playground at `/`: one HTML page, its script, style sheet and icon, compiled into the
//! binary (no CDN: it works offline and behind a firewall). The page uses only the public API
//! (`/info`, `/v1/images/generations`, `/v1/images/edits`), so it needs no key to load; the
//! API calls it makes carry the key the user types. Every asset is sent with a strict
//! Content-Security-Policy (scripts and styles from this server only, no inline code, no
//! framing), `nosniff`, and an `ETag` so a reload costs a 304.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::state::AppState;

/// The policy of every playground response: nothing but this server, no inline script or style,
/// images also from `blob:`/`data:` (previews and uploads), no framing, no form posts.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static str,
}

/// The page and what it loads; the paths are those `index.html` names.
const ASSETS: [Asset; 4] = [
    Asset {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_str!("../playground/index.html"),
    },
    Asset {
        path: "/playground/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../playground/app.js"),
    },
    Asset {
        path: "/playground/app.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../playground/app.css"),
    },
    Asset {
        path: "/playground/icon.svg",
        content_type: "image/svg+xml",
        body: include_str!("../playground/icon.svg"),
    },
];

/// Total size of the embedded assets, in bytes.
pub fn total_bytes() -> usize {
    ASSETS.iter().map(|a| a.body.len()).sum()
}

/// The playground's routes (no API key: the page holds no data; its API calls are checked).
pub fn routes() -> Router<AppState> {
    ASSETS.iter().fold(Router::new(), |router, asset| {
        router.route(
            asset.path,
            get(move |headers: HeaderMap| serve(asset, headers)),
        )
    })
}

/// A weak validator from the content (FNV-1a, stable across runs and builds of the same file).
fn etag(body: &str) -> String {
    let hash = body.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("\"{hash:016x}\"")
}

async fn serve(asset: &'static Asset, headers: HeaderMap) -> Response {
    let tag = etag(asset.body);
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag || t.trim() == "*"));
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, asset.content_type)], asset.body).into_response()
    };
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(value) = HeaderValue::from_str(&tag) {
        h.insert(header::ETAG, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assets_are_small_and_name_each_other() {
        assert!(total_bytes() < 150 * 1024, "{} bytes", total_bytes());
        let html = ASSETS[0].body;
        for asset in &ASSETS[1..] {
            assert!(
                html.contains(asset.path),
                "index.html does not load {}",
                asset.path
            );
        }
    }

    /// `on…=` attributes (inline event handlers) in `html`.
    fn inline_handlers(html: &str) -> Vec<&str> {
        html.match_indices(" on")
            .map(|(i, _)| &html[i + 1..])
            .filter_map(|rest| {
                let name_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
                rest[name_len..].starts_with('=').then(|| &rest[..name_len])
            })
            .collect()
    }

    #[test]
    fn nothing_inline_that_the_policy_would_block() {
        let html = ASSETS[0].body;
        assert!(!html.contains("<script>"), "inline script");
        assert!(!html.contains("<style"), "inline style");
        assert!(!html.contains(" style="), "inline style attribute");
        assert_eq!(inline_handlers(html), Vec::<&str>::new());
        assert_eq!(
            inline_handlers("<a onclick=\"x()\">on the left</a>"),
            ["onclick"]
        );
        for asset in &ASSETS {
            let foreign = asset
                .body
                .replace("http://www.w3.org/2000/svg", "")
                .contains("://");
            assert!(!foreign, "{} names another origin", asset.path);
        }
    }

    #[test]
    fn etag_follows_the_content() {
        assert_eq!(etag("a"), etag("a"));
        assert_ne!(etag("a"), etag("b"));
    }
}
