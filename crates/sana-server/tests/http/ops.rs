//! Models, readiness, info, metrics, OpenAPI (served and committed), CORS.

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn models_lists_the_served_model() {
    let server = server(&["--served-model-name", "sana-test"]).await;
    let answer = call(&server.app, get("/v1/models")).await;
    assert_eq!(answer.status, StatusCode::OK);
    let json = answer.json();
    assert_eq!(json["object"], "list");
    let models = json["data"].as_array().expect("data");
    assert_eq!(models.len(), 1);
    assert_eq!(models[0]["id"], "sana-test");
    assert_eq!(models[0]["object"], "model");
    assert_eq!(models[0]["owned_by"], "sana-server");
    assert!(models[0]["created"].as_u64().expect("created") > 1_700_000_000);

    for name in ["sana-test", "fake/sana"] {
        let answer = call(
            &server.app,
            get(&format!("/v1/models/{}", name.replace('/', "%2F"))),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{name}");
        assert_eq!(answer.json()["id"], "sana-test");
    }
    let answer = call(&server.app, get("/v1/models/gpt-image-1")).await;
    answer.expect_error(StatusCode::NOT_FOUND, "not_found", Some("model"));
    let answer = generate(
        &server.app,
        json!({"prompt": "a", "size": "32x32", "model": "sana-test"}),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
}

#[tokio::test]
async fn ready_reports_the_workers() {
    let server = server(&["--devices", "fake:0,fake:1"]).await;
    let answer = call(&server.app, get("/ready")).await;
    assert_eq!(answer.status, StatusCode::OK);
    let json = answer.json();
    assert_eq!(json["status"], "ready");
    let devices: Vec<&str> = json["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| w["device"].as_str().expect("device"))
        .collect();
    assert_eq!(devices, ["fake:0", "fake:1"]);
    assert_eq!(json["workers"][0]["state"], "ready");
    let health = call(&server.app, get("/health")).await;
    assert_eq!(
        health.json(),
        json!({"status": "ok", "api_key_required": false})
    );
}

#[tokio::test]
async fn info_reports_model_limits_defaults_and_quality_steps() {
    let server = server(&[
        "--max-n",
        "3",
        "--max-steps",
        "50",
        "--max-prompt-chars",
        "500",
    ])
    .await;
    let answer = call(&server.app, get("/info")).await;
    assert_eq!(answer.status, StatusCode::OK);
    let json = answer.json();
    let info = model_info();
    assert_eq!(json["model_id"], "fake/sana");
    assert_eq!(json["served_model_name"], "fake/sana");
    assert_eq!(json["dtype"], info.dtype);
    assert_eq!(json["device"], "fake:0");
    assert_eq!(json["version"], env!("CARGO_PKG_VERSION"));
    let limits = &json["limits"];
    assert_eq!(limits["min_width"], info.min_width);
    assert_eq!(limits["max_width"], info.max_width);
    assert_eq!(limits["max_height"], info.max_height);
    assert_eq!(limits["size_multiple"], 32);
    assert_eq!(limits["max_n"], 3);
    assert_eq!(limits["max_steps"], 50);
    assert_eq!(limits["max_prompt_chars"], 500);
    assert_eq!(limits["max_partial_images"], 3);
    assert_eq!(limits["request_timeout_secs"], 300.0);
    assert_eq!(
        json["defaults"]["size"],
        format!("{DEFAULT_WIDTH}x{DEFAULT_HEIGHT}")
    );
    assert_eq!(json["defaults"]["num_inference_steps"], 20);
    assert_eq!(json["defaults"]["sampler"], "dpm_solver_multistep");
    assert_eq!(
        json["quality_steps"],
        json!({"low": 10, "medium": 20, "high": 40})
    );
}

#[tokio::test]
async fn metrics_are_prometheus_text_with_the_engine_series() {
    let server = server(&[]).await;
    let answer = generate(&server.app, json!({"prompt": "a", "size": "32x32"})).await;
    assert_eq!(answer.status, StatusCode::OK);
    let refused = generate(&server.app, json!({"prompt": "a", "n": "two"})).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    let answer = call(&server.app, get("/metrics")).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(answer
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/plain")));
    let text = std::str::from_utf8(&answer.body).expect("UTF-8");
    for series in [
        "sana_request_count",
        "sana_request_success",
        "sana_request_duration_bucket",
        "sana_batch_size_bucket",
        "sana_http_failure{err=\"invalid_request\"}",
    ] {
        assert!(text.contains(series), "{series} missing from:\n{text}");
    }
}

#[tokio::test]
async fn openapi_json_is_the_document_narrowed_to_this_server() {
    let server = server(&["--max-n", "3", "--max-steps", "40"]).await;
    let answer = call(&server.app, get("/openapi.json")).await;
    assert_eq!(answer.status, StatusCode::OK);
    let served = answer.json();
    let info = model_info();
    for path in [
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/images/files/{file}",
        "/v1/models",
        "/health",
        "/ready",
        "/info",
        "/metrics",
    ] {
        assert!(
            served["paths"].get(path).is_some(),
            "{path} is not documented"
        );
    }
    // Everything but the narrowed fields is the committed document.
    let mut widened = served.clone();
    let committed = sana_server::openapi::document();
    for name in ["CreateImageRequest", "CreateImageEditRequest"] {
        let schema = &mut widened["components"]["schemas"][name];
        let request = &served["components"]["schemas"][name];
        assert_eq!(request["properties"]["n"]["maximum"], 3, "{name}");
        assert_eq!(request["properties"]["num_inference_steps"]["maximum"], 40);
        assert_eq!(
            request["properties"]["model"]["enum"],
            json!([info.model_id])
        );
        let pattern = request["properties"]["size"]["pattern"].as_str().unwrap();
        assert!(pattern.starts_with("^(auto|(32|64|96|"), "{pattern}");
        assert!(pattern.contains("|2048)x(32|"), "{pattern}");
        assert_eq!(request["allOf"].as_array().map(Vec::len), Some(3));
        let committed = &committed["components"]["schemas"][name];
        *schema = committed.clone();
    }
    // Without keys, no operation asks for one.
    assert!(served["components"].get("securitySchemes").is_none());
    assert!(!served.to_string().contains("\"security\""));
    assert_eq!(
        widened["components"]["schemas"],
        committed["components"]["schemas"]
    );
    assert_eq!(
        widened["paths"]
            .as_object()
            .map(|p| p.keys().collect::<Vec<_>>()),
        committed["paths"].as_object().map(|p| p.keys().collect())
    );

    // With keys, the document says so.
    let keyed = crate::common::server(&["--api-key", "sk-one"]).await;
    let request = get("/openapi.json");
    let (mut parts, body) = request.into_parts();
    parts.headers.insert(
        header::AUTHORIZATION,
        "Bearer sk-one".parse().expect("a header"),
    );
    let doc = call(&keyed.app, Request::from_parts(parts, body))
        .await
        .json();
    assert!(doc["components"]["securitySchemes"]["api_key"].is_object());
    assert_eq!(
        doc["paths"]["/v1/images/generations"]["post"]["security"],
        json!([{"api_key": []}])
    );
}

#[test]
fn committed_openapi_yaml_matches_the_code() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../openapi.yaml");
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    let generated = sana_server::openapi::yaml();
    assert!(
        committed == generated,
        "openapi.yaml is out of date with the code; regenerate it from the repository root with\n\
         \n    cargo run -p sana-server --example openapi > openapi.yaml\n\n\
         and commit it"
    );
}

#[tokio::test]
async fn cors_is_off_unless_configured() {
    let preflight = |origin: &str| {
        Request::builder()
            .method(Method::OPTIONS)
            .uri("/v1/images/generations")
            .header(header::ORIGIN, origin)
            .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
            .header(
                header::ACCESS_CONTROL_REQUEST_HEADERS,
                "authorization,content-type",
            )
            .body(Body::empty())
            .expect("a request")
    };
    let off = server(&[]).await;
    let answer = call(&off.app, preflight("https://app.example.com")).await;
    assert!(
        answer.header("access-control-allow-origin").is_none(),
        "CORS is off by default"
    );
    let mut req = get("/v1/models");
    req.headers_mut().insert(
        header::ORIGIN,
        "https://app.example.com".parse().expect("a value"),
    );
    assert!(call(&off.app, req)
        .await
        .header("access-control-allow-origin")
        .is_none());

    let on = server(&[
        "--cors-origin",
        "https://app.example.com",
        "--api-key",
        "sk-one",
    ])
    .await;
    let answer = call(&on.app, preflight("https://app.example.com")).await;
    assert_eq!(answer.status, StatusCode::OK, "preflight needs no key");
    assert_eq!(
        answer.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    let answer = call(&on.app, preflight("https://evil.example.com")).await;
    assert!(
        answer.header("access-control-allow-origin").is_none(),
        "other origins are not allowed"
    );
    let mut req = get("/v1/models");
    req.headers_mut().insert(
        header::ORIGIN,
        "https://app.example.com".parse().expect("a value"),
    );
    let answer = call(&on.app, req).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        answer.header("access-control-allow-origin"),
        Some("https://app.example.com"),
        "errors carry CORS headers too, so browsers can read them"
    );
}
