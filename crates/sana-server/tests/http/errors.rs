//! Every failure answers the OpenAI envelope with the right status, and messages name the field,
//! the limit and the value.

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use sana_engine::testing::{Failure, FakeBackend, Gate};
use serde_json::{json, Value};

use crate::common::*;

/// (body, status, type, param, code, words the message must contain)
type Case = (
    Value,
    StatusCode,
    &'static str,
    Option<&'static str>,
    &'static str,
    &'static [&'static str],
);

#[tokio::test]
async fn invalid_requests_name_the_field_the_limit_and_the_value() {
    let server = server(&["--max-prompt-chars", "100"]).await;
    let bad = StatusCode::BAD_REQUEST;
    // Beyond a limit: 400 as well (OpenAI's status for any invalid parameter), type `validation`.
    let limit = StatusCode::BAD_REQUEST;
    let cases: Vec<Case> = vec![
        // Shape: 400 invalid_request.
        (
            json!({"n": 1}),
            bad,
            "invalid_request",
            Some("prompt"),
            "missing_parameter",
            &["`prompt` is required"],
        ),
        (
            json!({"prompt": null}),
            bad,
            "invalid_request",
            Some("prompt"),
            "invalid_type",
            &["`prompt`", "null"],
        ),
        (
            json!({"prompt": 5}),
            bad,
            "invalid_request",
            Some("prompt"),
            "invalid_type",
            &["`prompt`", "integer `5`"],
        ),
        (
            json!({"prompt": "a", "n": "two"}),
            bad,
            "invalid_request",
            Some("n"),
            "invalid_type",
            &["`n`", "\"two\"", "u32"],
        ),
        (
            json!({"prompt": "a", "n": 1.5}),
            bad,
            "invalid_request",
            Some("n"),
            "invalid_type",
            &["`n`", "1.5"],
        ),
        (
            json!({"prompt": "a", "n": -1}),
            bad,
            "invalid_request",
            Some("n"),
            "invalid_value",
            &["`n`", "-1"],
        ),
        (
            json!({"prompt": "a", "steps": 4}),
            bad,
            "invalid_request",
            Some("steps"),
            "unknown_parameter",
            &["`steps`", "`num_inference_steps`"],
        ),
        (
            json!({"prompt": "a", "size": "big"}),
            bad,
            "invalid_request",
            Some("size"),
            "invalid_value",
            &["`size`", "`big`", "WIDTHxHEIGHT", "96x64"],
        ),
        (
            json!({"prompt": "a", "size": 512}),
            bad,
            "invalid_request",
            Some("size"),
            "invalid_type",
            &["`size`"],
        ),
        (
            json!({"prompt": "a", "quality": "ultra"}),
            bad,
            "invalid_request",
            Some("quality"),
            "invalid_value",
            &["`ultra`", "`low`", "`hd`"],
        ),
        (
            json!({"prompt": "a", "response_format": "png"}),
            bad,
            "invalid_request",
            Some("response_format"),
            "invalid_value",
            &["`png`", "`b64_json`", "`url`"],
        ),
        (
            json!({"prompt": "a", "output_format": "gif"}),
            bad,
            "invalid_request",
            Some("output_format"),
            "invalid_value",
            &["`gif`", "`webp`"],
        ),
        (
            json!({"prompt": "a", "output_compression": 101}),
            bad,
            "invalid_request",
            Some("output_compression"),
            "invalid_value",
            &["between 0 and 100", "101"],
        ),
        (
            json!({"prompt": "a", "output_compression": -5}),
            bad,
            "invalid_request",
            Some("output_compression"),
            "invalid_value",
            &["-5"],
        ),
        (
            json!({"prompt": "a", "background": "transparent"}),
            bad,
            "invalid_request",
            Some("background"),
            "invalid_value",
            &["`transparent`", "alpha", "`opaque`"],
        ),
        (
            json!({"prompt": "a", "background": "green"}),
            bad,
            "invalid_request",
            Some("background"),
            "invalid_value",
            &["`green`"],
        ),
        (
            json!({"prompt": "a", "style": "bold"}),
            bad,
            "invalid_request",
            Some("style"),
            "invalid_value",
            &["`bold`", "`vivid`"],
        ),
        (
            json!({"prompt": "a", "moderation": "high"}),
            bad,
            "invalid_request",
            Some("moderation"),
            "invalid_value",
            &["`high`"],
        ),
        (
            json!({"prompt": "a", "user": 42}),
            bad,
            "invalid_request",
            Some("user"),
            "invalid_type",
            &["`user`"],
        ),
        (
            json!({"prompt": "a", "stream": "yes"}),
            bad,
            "invalid_request",
            Some("stream"),
            "invalid_type",
            &["`stream`"],
        ),
        (
            json!({"prompt": "a", "stream": true, "response_format": "url"}),
            bad,
            "invalid_request",
            Some("response_format"),
            "invalid_value",
            &["`url`", "stream"],
        ),
        (
            json!({"prompt": "a", "partial_images": 2}),
            bad,
            "invalid_request",
            Some("partial_images"),
            "invalid_value",
            &["\"stream\": true", "2"],
        ),
        (
            json!({"prompt": "a", "stream": true, "partial_images": 4}),
            bad,
            "invalid_request",
            Some("partial_images"),
            "invalid_value",
            &["between 0 and 3", "4"],
        ),
        (
            json!({"prompt": "a", "seed": -1}),
            bad,
            "invalid_request",
            Some("seed"),
            "invalid_value",
            &["`seed`", "-1"],
        ),
        (
            json!({"prompt": "a", "seed": "x"}),
            bad,
            "invalid_request",
            Some("seed"),
            "invalid_type",
            &["`seed`"],
        ),
        (
            json!({"prompt": "a", "guidance_scale": "high"}),
            bad,
            "invalid_request",
            Some("guidance_scale"),
            "invalid_type",
            &["`guidance_scale`"],
        ),
        (
            json!({"prompt": "a", "num_inference_steps": 2.5}),
            bad,
            "invalid_request",
            Some("num_inference_steps"),
            "invalid_type",
            &["`num_inference_steps`"],
        ),
        (
            json!({"prompt": "a", "negative_prompt": ["x"]}),
            bad,
            "invalid_request",
            Some("negative_prompt"),
            "invalid_type",
            &["`negative_prompt`"],
        ),
        // Limits of the model and server: 400 validation.
        (
            json!({"prompt": "   "}),
            limit,
            "validation",
            Some("prompt"),
            "invalid_value",
            &["`prompt` is empty"],
        ),
        (
            json!({"prompt": "x".repeat(101)}),
            limit,
            "validation",
            Some("prompt"),
            "invalid_value",
            &["101 characters", "limit of 100"],
        ),
        (
            json!({"prompt": "a", "negative_prompt": "x".repeat(101)}),
            limit,
            "validation",
            Some("negative_prompt"),
            "invalid_value",
            &["101", "100"],
        ),
        (
            json!({"prompt": "a", "n": 0}),
            limit,
            "validation",
            Some("n"),
            "invalid_value",
            &["between 1 and 4", "got 0"],
        ),
        (
            json!({"prompt": "a", "n": 5}),
            limit,
            "validation",
            Some("n"),
            "invalid_value",
            &["between 1 and 4", "got 5"],
        ),
        (
            json!({"prompt": "a", "size": "500x512"}),
            limit,
            "validation",
            Some("size"),
            "invalid_value",
            &[
                "`500x512`",
                "`width`",
                "multiple of 32",
                "got 500",
                "nearest valid value is 512",
            ],
        ),
        (
            json!({"prompt": "a", "size": "512x4096"}),
            limit,
            "validation",
            Some("size"),
            "invalid_value",
            &["`height`", "between 32 and 2048", "got 4096"],
        ),
        (
            json!({"prompt": "a", "size": "0x0"}),
            limit,
            "validation",
            Some("size"),
            "invalid_value",
            &["got 0"],
        ),
        (
            json!({"prompt": "a", "num_inference_steps": 0}),
            limit,
            "validation",
            Some("num_inference_steps"),
            "invalid_value",
            &["`num_inference_steps` must be between 1 and 100", "got 0"],
        ),
        (
            json!({"prompt": "a", "num_inference_steps": 101}),
            limit,
            "validation",
            Some("num_inference_steps"),
            "invalid_value",
            &["got 101"],
        ),
        (
            json!({"prompt": "a", "guidance_scale": -1.0}),
            limit,
            "validation",
            Some("guidance_scale"),
            "invalid_value",
            &["≥ 0", "-1"],
        ),
    ];
    for (body, status, kind, param, code, words) in cases {
        let answer = generate(&server.app, body.clone()).await;
        let err = answer.expect_error(status, kind, param);
        assert_eq!(err.code.as_deref(), Some(code), "code for {body}: {err:?}");
        for word in words {
            assert!(
                err.message.contains(word),
                "message for {body} lacks {word:?}: {}",
                err.message
            );
        }
        assert!(
            !err.message.contains(" at line "),
            "serde positions are noise: {}",
            err.message
        );
    }
    assert!(
        served(&server.log).is_empty(),
        "no invalid request reached the model"
    );
}

#[tokio::test]
async fn unknown_models_are_404() {
    let server = server(&[]).await;
    let answer = generate(&server.app, json!({"prompt": "a", "model": "dall-e-3"})).await;
    let err = answer.expect_error(StatusCode::NOT_FOUND, "not_found", Some("model"));
    assert_eq!(err.code.as_deref(), Some("model_not_found"));
    assert!(
        err.message.contains("`dall-e-3`") && err.message.contains("`fake/sana`"),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn malformed_bodies_are_400() {
    let server = server(&[]).await;
    for body in [
        r#"{"prompt": "a""#,
        "{prompt: a}",
        "",
        r#"["a"]"#,
        r#"{"prompt": "a"} {}"#,
        "null",
    ] {
        let answer = call(
            &server.app,
            post_raw("/v1/images/generations", "application/json", body),
        )
        .await;
        let err = answer.expect_error(StatusCode::BAD_REQUEST, "invalid_request", None);
        assert_eq!(
            err.code.as_deref(),
            Some("invalid_json"),
            "{body:?}: {err:?}"
        );
    }
}

#[tokio::test]
async fn a_body_that_is_not_json_is_415() {
    let server = server(&[]).await;
    for content_type in ["text/plain", "application/x-www-form-urlencoded"] {
        let answer = call(
            &server.app,
            post_raw("/v1/images/generations", content_type, r#"{"prompt": "a"}"#),
        )
        .await;
        let err = answer.expect_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            None,
        );
        assert!(err.message.contains(content_type), "{}", err.message);
    }
    let no_type = Request::post("/v1/images/generations")
        .body(Body::from(r#"{"prompt": "a"}"#))
        .expect("a request");
    call(&server.app, no_type).await.expect_error(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        None,
    );
    let charset = call(
        &server.app,
        post_raw(
            "/v1/images/generations",
            "application/json; charset=utf-8",
            r#"{"prompt": "a", "size": "32x32"}"#,
        ),
    )
    .await;
    assert_eq!(
        charset.status,
        StatusCode::OK,
        "a charset parameter is fine"
    );
}

#[tokio::test]
async fn a_body_over_the_limit_is_413() {
    let server = server(&["--max-body-bytes", "1024"]).await;
    let answer = generate(&server.app, json!({"prompt": "x".repeat(2000)})).await;
    let err = answer.expect_error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", None);
    assert!(err.message.contains("1024 bytes"), "{}", err.message);
    let fits = generate(
        &server.app,
        json!({"prompt": "x".repeat(900), "size": "32x32"}),
    )
    .await;
    assert_eq!(fits.status, StatusCode::OK);
}

#[tokio::test]
async fn unknown_routes_are_404_and_wrong_methods_405() {
    let server = server(&[]).await;
    let answer = call(&server.app, get("/v1/images/variations")).await;
    let err = answer.expect_error(StatusCode::NOT_FOUND, "not_found", None);
    assert_eq!(err.code.as_deref(), Some("unknown_route"));
    assert!(
        err.message.contains("GET /v1/images/variations"),
        "{}",
        err.message
    );
    // `/` is the playground (tests/http/playground.rs; 404 with `--no-playground`).
    call(&server.app, get("/index.html")).await.expect_error(
        StatusCode::NOT_FOUND,
        "not_found",
        None,
    );

    let answer = call(&server.app, get("/v1/images/generations")).await;
    let err = answer.expect_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", None);
    assert!(
        err.message.contains("GET") && err.message.contains("/v1/images/generations"),
        "{}",
        err.message
    );
    assert_eq!(answer.header("allow"), Some("POST"));

    let delete = Request::delete("/health")
        .body(Body::empty())
        .expect("a request");
    let answer = call(&server.app, delete).await;
    answer.expect_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", None);
    assert!(answer
        .header("allow")
        .is_some_and(|allow| allow.contains("GET")));
    let post = post_raw("/v1/models", "application/json", "{}");
    call(&server.app, post).await.expect_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        None,
    );
}

#[tokio::test]
async fn backend_failures_are_500_with_a_generic_message() {
    let fake = FakeBackend::new()
        .with_info(model_info())
        .fail_on("boom", Failure::Error);
    let server = server_with(&[], fake).await;
    let answer = generate(&server.app, json!({"prompt": "boom", "size": "32x32"})).await;
    let err = answer.expect_error(StatusCode::INTERNAL_SERVER_ERROR, "backend", None);
    assert!(
        !err.message.contains("injected"),
        "5xx detail leaked: {}",
        err.message
    );
    assert!(err.message.contains("server log"), "{}", err.message);
    let after = generate(&server.app, json!({"prompt": "fine", "size": "32x32"})).await;
    assert_eq!(
        after.status,
        StatusCode::OK,
        "one failed batch does not break the server"
    );
}

#[tokio::test]
async fn overload_is_429_with_retry_after() {
    let gate = Gate::closed();
    let fake = FakeBackend::new()
        .with_info(model_info())
        .with_gate(gate.clone());
    let server = server_with(&["--max-concurrent-requests", "1"], fake).await;
    let app = server.app.clone();
    let first =
        tokio::spawn(
            async move { generate(&app, json!({"prompt": "first", "size": "32x32"})).await },
        );
    let engine = server.engine.clone();
    wait_until("the first request is admitted", || engine.in_flight() == 1).await;

    let answer = generate(&server.app, json!({"prompt": "second", "size": "32x32"})).await;
    let err = answer.expect_error(StatusCode::TOO_MANY_REQUESTS, "overloaded", None);
    assert_eq!(err.code.as_deref(), Some("overloaded"));
    assert!(
        err.message.contains("1 requests are already in flight"),
        "{}",
        err.message
    );
    assert_eq!(answer.header("retry-after"), Some("1"));

    gate.open();
    let first = first.await.expect("the first request task");
    assert_eq!(
        first.status,
        StatusCode::OK,
        "the admitted request still completes"
    );
}

#[tokio::test]
async fn a_request_past_its_deadline_is_504() {
    let gate = Gate::closed();
    let fake = FakeBackend::new()
        .with_info(model_info())
        .with_gate(gate.clone());
    let server = server_with(&["--request-timeout", "50ms"], fake).await;
    let answer = generate(&server.app, json!({"prompt": "slow", "size": "32x32"})).await;
    let err = answer.expect_error(StatusCode::GATEWAY_TIMEOUT, "timeout", None);
    assert!(err.message.contains("50ms"), "{}", err.message);
    gate.open();
    let engine = server.engine.clone();
    wait_until("the cancelled request leaves", || engine.in_flight() == 0).await;
}

#[tokio::test]
async fn shutting_down_is_503_with_retry_after_and_health_stays_up() {
    let server = server(&[]).await;
    let report = server.engine.shutdown(Duration::from_secs(5)).await;
    assert!(report.drained);
    let answer = generate(&server.app, json!({"prompt": "late", "size": "32x32"})).await;
    answer.expect_error(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", None);
    assert_eq!(answer.header("retry-after"), Some("1"));
    let ready = call(&server.app, get("/ready")).await;
    ready.expect_error(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", None);
    assert_eq!(
        call(&server.app, get("/health")).await.status,
        StatusCode::OK,
        "liveness is not readiness"
    );
}

#[tokio::test]
async fn errors_carry_the_request_id() {
    let server = server(&[]).await;
    let req = Request::get("/nope")
        .header("x-request-id", "trace-42")
        .header(header::HOST, "sana.test")
        .body(Body::empty())
        .expect("a request");
    let answer = call(&server.app, req).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(answer.header("x-request-id"), Some("trace-42"));
}
