//! The web playground at `/`: embedded assets, security headers, no key needed for the page,
//! `--no-playground`. (The page itself is driven in a real browser by tests/playground.sh.)

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use sana_server::playground::CONTENT_SECURITY_POLICY;

use crate::common::*;

const ASSETS: [(&str, &str); 4] = [
    ("/", "text/html; charset=utf-8"),
    ("/playground/app.js", "text/javascript; charset=utf-8"),
    ("/playground/app.css", "text/css; charset=utf-8"),
    ("/playground/icon.svg", "image/svg+xml"),
];

#[tokio::test]
async fn the_page_and_its_assets_carry_a_strict_policy() {
    let server = server(&[]).await;
    let mut total = 0;
    for (path, content_type) in ASSETS {
        let answer = call(&server.app, get(path)).await;
        assert_eq!(answer.status, StatusCode::OK, "{path}");
        assert_eq!(answer.header("content-type"), Some(content_type), "{path}");
        assert_eq!(
            answer.header("content-security-policy"),
            Some(CONTENT_SECURITY_POLICY),
            "{path}"
        );
        assert_eq!(answer.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(answer.header("x-frame-options"), Some("DENY"));
        assert_eq!(answer.header("cache-control"), Some("no-cache"));
        total += answer.body.len();

        // A reload with the validator costs a 304 and no body.
        let etag = answer.header("etag").expect("an ETag").to_owned();
        let again = Request::get(path)
            .header(header::IF_NONE_MATCH, &etag)
            .body(Body::empty())
            .unwrap();
        let answer = call(&server.app, again).await;
        assert_eq!(answer.status, StatusCode::NOT_MODIFIED, "{path}");
        assert!(answer.body.is_empty());
    }
    assert!(total < 150 * 1024, "the playground is {total} bytes");
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(CONTENT_SECURITY_POLICY.contains(directive), "{directive}");
    }
    let html = call(&server.app, get("/")).await;
    let html = std::str::from_utf8(&html.body).unwrap();
    assert!(html.contains(r#"<script src="/playground/app.js" defer></script>"#));
}

#[tokio::test]
async fn the_page_needs_no_key_but_says_the_api_does() {
    let keyed = server(&["--api-key", "sk-one"]).await;
    for (path, _) in ASSETS {
        assert_eq!(
            call(&keyed.app, get(path)).await.status,
            StatusCode::OK,
            "{path}"
        );
    }
    let health = call(&keyed.app, get("/health")).await.json();
    assert_eq!(health["api_key_required"], true);
    call(&keyed.app, get("/info")).await.expect_error(
        StatusCode::UNAUTHORIZED,
        "authentication",
        None,
    );

    let open = server(&[]).await;
    assert_eq!(
        call(&open.app, get("/health")).await.json()["api_key_required"],
        false
    );
}

#[tokio::test]
async fn no_playground_turns_it_off() {
    let server = server(&["--no-playground"]).await;
    for (path, _) in ASSETS {
        call(&server.app, get(path))
            .await
            .expect_error(StatusCode::NOT_FOUND, "not_found", None);
    }
    assert_eq!(
        call(&server.app, get("/health")).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn info_tells_the_page_the_upload_limit() {
    let server = server(&["--max-upload-bytes", "5000000"]).await;
    let info = call(&server.app, get("/info")).await.json();
    assert_eq!(info["limits"]["max_upload_bytes"], 5_000_000);
}
