//! API keys on every route but `/health` and image downloads; the per-key rate limit.

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use serde_json::json;

use crate::common::*;

fn with_key(mut req: Request<Body>, value: &str) -> Request<Body> {
    req.headers_mut().insert(
        header::AUTHORIZATION,
        value.parse().expect("a header value"),
    );
    req
}

fn protected() -> Vec<Request<Body>> {
    vec![
        post(
            "/v1/images/generations",
            &json!({"prompt": "a", "size": "32x32"}),
        ),
        get("/v1/models"),
        get("/v1/models/fake/sana"),
        get("/ready"),
        get("/info"),
        get("/metrics"),
        get("/openapi.json"),
    ]
}

#[tokio::test]
async fn every_route_but_health_needs_a_valid_key() {
    let server = server(&["--api-key", "sk-one,sk-two"]).await;
    for (value, why) in [
        (None, "no key"),
        (Some("Bearer sk-three"), "an unknown key"),
        (Some("Bearer sk-on"), "a prefix of a key"),
        (Some("Bearer "), "an empty key"),
        (Some("Basic c2stb25lOg=="), "another scheme"),
        (Some("sk-one"), "no scheme"),
    ] {
        for req in protected() {
            let path = req.uri().path().to_owned();
            let req = match value {
                Some(value) => with_key(req, value),
                None => req,
            };
            let answer = call(&server.app, req).await;
            let err = answer.expect_error(StatusCode::UNAUTHORIZED, "authentication", None);
            assert_eq!(
                err.code.as_deref(),
                Some("invalid_api_key"),
                "{path} with {why}"
            );
            assert_eq!(
                answer.header("www-authenticate"),
                Some("Bearer"),
                "{path} with {why}"
            );
        }
    }
    for key in ["Bearer sk-one", "Bearer sk-two", "bearer sk-two"] {
        for req in protected() {
            let path = req.uri().path().to_owned();
            let answer = call(&server.app, with_key(req, key)).await;
            assert_eq!(
                answer.status,
                StatusCode::OK,
                "{path} with `{key}`: {:?}",
                answer.body
            );
        }
    }
    assert_eq!(
        call(&server.app, get("/health")).await.status,
        StatusCode::OK,
        "health needs no key"
    );
    assert_eq!(
        served(&server.log).len(),
        3,
        "only authenticated generations ran"
    );
}

#[tokio::test]
async fn without_keys_no_route_asks_for_one() {
    let server = server(&[]).await;
    for req in protected() {
        let path = req.uri().path().to_owned();
        assert_eq!(
            call(&server.app, req).await.status,
            StatusCode::OK,
            "{path}"
        );
    }
}

#[tokio::test]
async fn image_links_work_without_the_key() {
    let server = server(&["--api-key", "sk-one"]).await;
    let req = with_key(
        post(
            "/v1/images/generations",
            &json!({"prompt": "a", "size": "32x32", "response_format": "url"}),
        ),
        "Bearer sk-one",
    );
    let answer = call(&server.app, req).await;
    let url = answer.json()["data"][0]["url"]
        .as_str()
        .expect("a url")
        .to_owned();
    let path = url
        .strip_prefix("http://sana.test")
        .expect("on the request's host");
    assert_eq!(
        call(&server.app, get(path)).await.status,
        StatusCode::OK,
        "the unguessable name is the capability, as OpenAI's signed URLs"
    );
}

#[tokio::test]
async fn each_key_has_its_own_rate_limit_with_retry_after() {
    let server = server(&["--api-key", "sk-one,sk-two", "--rate-limit", "2"]).await;
    let generate_as = |key: &str| {
        with_key(
            post(
                "/v1/images/generations",
                &json!({"prompt": "a", "size": "32x32"}),
            ),
            &format!("Bearer {key}"),
        )
    };
    for _ in 0..2 {
        assert_eq!(
            call(&server.app, generate_as("sk-one")).await.status,
            StatusCode::OK
        );
    }
    let answer = call(&server.app, generate_as("sk-one")).await;
    let err = answer.expect_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited", None);
    assert_eq!(err.code.as_deref(), Some("rate_limit_exceeded"));
    assert!(
        err.message.contains("2 image generations per minute"),
        "{}",
        err.message
    );
    assert_eq!(
        answer.header("retry-after"),
        Some("30"),
        "one token per 30 s"
    );

    assert_eq!(
        call(&server.app, generate_as("sk-two")).await.status,
        StatusCode::OK,
        "another key is not limited"
    );
    assert_eq!(
        call(&server.app, with_key(get("/v1/models"), "Bearer sk-one"))
            .await
            .status,
        StatusCode::OK,
        "only generations count"
    );

    server.clock.advance(Duration::from_secs(20));
    let answer = call(&server.app, generate_as("sk-one")).await;
    answer.expect_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited", None);
    assert_eq!(answer.header("retry-after"), Some("10"));
    server.clock.advance(Duration::from_secs(10));
    assert_eq!(
        call(&server.app, generate_as("sk-one")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        served(&server.log).len(),
        4,
        "refused requests never reached the model"
    );
}

#[tokio::test]
async fn without_keys_the_rate_limit_is_shared() {
    let server = server(&["--rate-limit", "1"]).await;
    let req = || {
        post(
            "/v1/images/generations",
            &json!({"prompt": "a", "size": "32x32"}),
        )
    };
    assert_eq!(call(&server.app, req()).await.status, StatusCode::OK);
    let answer = call(&server.app, req()).await;
    answer.expect_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited", None);
    assert_eq!(answer.header("retry-after"), Some("60"));
}

/// The id metrics and logs use for `key`: the first 8 hex digits of its SHA-256.
fn key_id(key: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.as_bytes());
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn the_key_file_is_read_again_on_reload_and_a_bad_edit_keeps_the_old_keys() {
    let dir = std::env::temp_dir().join(format!("sana-key-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let file = dir.join("keys");
    std::fs::write(&file, "# team a\nsk-file-a\n").expect("written");
    let path = file.to_str().expect("utf-8");
    let server = server(&["--api-key", "sk-flag", "--api-key-file", path]).await;
    let status = |key: &'static str| {
        let app = server.app.clone();
        async move {
            call(&app, with_key(get("/v1/models"), &format!("Bearer {key}")))
                .await
                .status
        }
    };
    assert_eq!(status("sk-file-a").await, StatusCode::OK);
    assert_eq!(status("sk-file-b").await, StatusCode::UNAUTHORIZED);

    std::fs::write(&file, "sk-file-b\n").expect("written");
    assert_eq!(server.state.reload_api_keys().expect("reloaded"), 2);
    assert_eq!(status("sk-file-a").await, StatusCode::UNAUTHORIZED);
    assert_eq!(status("sk-file-b").await, StatusCode::OK);
    assert_eq!(status("sk-flag").await, StatusCode::OK, "flag keys stay");

    // An emptied or vanished file would turn authentication off or lock everyone out: refused,
    // and the keys in force stay.
    std::fs::write(&file, "# nobody\n\n").expect("written");
    let err = server.state.reload_api_keys().expect_err("no key");
    assert!(err.to_string().contains("holds no key"), "{err}");
    std::fs::remove_file(&file).expect("removed");
    let err = server.state.reload_api_keys().expect_err("no file");
    assert!(err.to_string().contains("cannot read"), "{err}");
    assert_eq!(status("sk-file-b").await, StatusCode::OK);
    assert_eq!(status("nothing").await, StatusCode::UNAUTHORIZED);

    // Per-key metrics, by key id.
    let metrics = call(&server.app, with_key(get("/metrics"), "Bearer sk-flag")).await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    let line = format!(
        "sana_key_requests{{key=\"{}\",status=\"200\"}}",
        key_id("sk-file-b")
    );
    assert!(text.contains(&line), "{line} missing from:\n{text}");
    assert!(!text.contains("sk-"), "a key in the metrics");
    std::fs::remove_dir_all(&dir).expect("clean up");
}
