//! Successful generations: defaults, every field, `n`, sizes, formats, `url`.

use std::time::Duration;

use axum::http::StatusCode;
use image::ImageFormat;
use sana_engine::testing::{FakeBackend, Latency};
use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn defaults_give_one_png_of_the_model_size_as_plain_base64() {
    let server = server(&[]).await;
    let answer = generate(&server.app, json!({"prompt": "a fox", "seed": 7})).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    let json = answer.json();
    assert!(json["created"].as_u64().expect("created") > 1_700_000_000);
    assert_eq!(json["size"], format!("{DEFAULT_WIDTH}x{DEFAULT_HEIGHT}"));
    assert_eq!(json["output_format"], "png");
    assert_eq!(json["quality"], "auto");
    assert_eq!(json["background"], "opaque");
    let data = json["data"].as_array().expect("data");
    assert_eq!(data.len(), 1, "n defaults to 1");
    let item = data[0].as_object().expect("an image object");
    assert!(
        !item.contains_key("url"),
        "b64_json is the default: {item:?}"
    );
    assert_eq!(item["seed"], 7);
    let png = decode(
        &b64(item["b64_json"].as_str().expect("b64_json")),
        ImageFormat::Png,
    );
    assert_same_pixels(
        &png,
        &FakeBackend::image_for("a fox", 7, DEFAULT_WIDTH, DEFAULT_HEIGHT),
        "the image",
    );
    for name in ["x-queue-time", "x-inference-time", "x-total-time"] {
        let value = answer
            .header(name)
            .unwrap_or_else(|| panic!("{name} is missing"));
        value
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("{name}: {value} is not milliseconds"));
    }
    assert!(answer.header("x-request-id").is_some());

    let batches = served(&server.log);
    assert_eq!(batches.len(), 1);
    let (key, item) = (batches[0].key, &batches[0].items[0]);
    let info = model_info();
    assert_eq!((key.width, key.height), (DEFAULT_WIDTH, DEFAULT_HEIGHT));
    assert_eq!(
        key.steps, info.default_steps,
        "steps default to the model's"
    );
    assert_eq!(item.guidance_scale, info.default_guidance_scale);
    assert_eq!(item.negative_prompt, None);
    assert_eq!(item.previews, 0);
}

#[tokio::test]
async fn timing_headers_add_up() {
    let fake = FakeBackend::new()
        .with_info(model_info())
        .with_latency(Latency {
            per_batch: Duration::from_millis(30),
            ..Latency::default()
        });
    let server = server_with(&[], fake).await;
    let answer = generate(&server.app, json!({"prompt": "a fox", "size": "32x32"})).await;
    let millis = |name: &str| -> u64 {
        answer
            .header(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name}"))
    };
    let (queue, inference, total) = (
        millis("x-queue-time"),
        millis("x-inference-time"),
        millis("x-total-time"),
    );
    assert!(
        inference >= 30,
        "the batch took at least 30 ms: {inference}"
    );
    assert!(
        total >= queue + inference,
        "total {total} < queue {queue} + inference {inference}"
    );
}

#[tokio::test]
async fn n_images_come_back_in_order_each_from_its_seed() {
    let server = server(&[]).await;
    let answer = generate(
        &server.app,
        json!({"prompt": "three owls", "n": 3, "seed": 10, "size": "64x32"}),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let data = answer.json()["data"].as_array().expect("data").clone();
    assert_eq!(data.len(), 3);
    for (i, item) in data.iter().enumerate() {
        let seed = 10 + i as u64;
        assert_eq!(item["seed"], seed);
        let png = decode(
            &b64(item["b64_json"].as_str().expect("b64")),
            ImageFormat::Png,
        );
        assert_same_pixels(
            &png,
            &FakeBackend::image_for("three owls", seed, 64, 32),
            &format!("image {i}"),
        );
    }
    let batches = served(&server.log);
    assert_eq!(batches.len(), 1, "a request's images share one batch");
    assert_eq!(batches[0].items[0].n, 3);
}

#[tokio::test]
async fn a_random_seed_is_reported_per_image() {
    let server = server(&[]).await;
    let answer = generate(
        &server.app,
        json!({"prompt": "a fox", "n": 2, "size": "32x32"}),
    )
    .await;
    let data = answer.json()["data"].as_array().expect("data").clone();
    let first = data[0]["seed"].as_u64().expect("a seed");
    assert_eq!(data[1]["seed"].as_u64(), Some(first.wrapping_add(1)));
    let png = decode(
        &b64(data[1]["b64_json"].as_str().expect("b64")),
        ImageFormat::Png,
    );
    assert_same_pixels(
        &png,
        &FakeBackend::image_for("a fox", first.wrapping_add(1), 32, 32),
        "image 1",
    );
}

#[tokio::test]
async fn size_sets_width_and_height_and_auto_is_the_default() {
    let server = server(&[]).await;
    for (size, width, height) in [
        ("64x32", 64, 32),
        ("32x96", 32, 96),
        ("auto", DEFAULT_WIDTH, DEFAULT_HEIGHT),
    ] {
        let answer = generate(&server.app, json!({"prompt": "a fox", "size": size})).await;
        assert_eq!(answer.status, StatusCode::OK, "{size}");
        let json = answer.json();
        assert_eq!(json["size"], format!("{width}x{height}"));
        let png = decode(
            &b64(json["data"][0]["b64_json"].as_str().expect("b64")),
            ImageFormat::Png,
        );
        assert_eq!((png.width(), png.height()), (width, height), "{size}");
    }
    let keys: Vec<(u32, u32)> = served(&server.log)
        .iter()
        .map(|batch| (batch.key.width, batch.key.height))
        .collect();
    assert_eq!(keys, [(64, 32), (32, 96), (DEFAULT_WIDTH, DEFAULT_HEIGHT)]);
}

#[tokio::test]
async fn every_output_format_decodes_to_the_requested_size() {
    let server = server(&[]).await;
    for (format, expected) in [
        ("png", ImageFormat::Png),
        ("jpeg", ImageFormat::Jpeg),
        ("webp", ImageFormat::WebP),
    ] {
        let answer = generate(
            &server.app,
            json!({"prompt": "a fox", "size": "64x32", "output_format": format, "seed": 1}),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{format}");
        let json = answer.json();
        assert_eq!(json["output_format"], format);
        let decoded = decode(
            &b64(json["data"][0]["b64_json"].as_str().expect("b64")),
            expected,
        );
        assert_eq!((decoded.width(), decoded.height()), (64, 32), "{format}");
        if expected != ImageFormat::Jpeg {
            assert_same_pixels(
                &decoded,
                &FakeBackend::image_for("a fox", 1, 64, 32),
                &format!("the {format} image (lossless)"),
            );
        }
    }
}

#[tokio::test]
async fn output_compression_is_the_jpeg_quality() {
    let server = server(&[]).await;
    let mut sizes = Vec::new();
    for compression in [5, 100] {
        let answer = generate(
            &server.app,
            json!({"prompt": "a fox", "size": "256x256", "output_format": "jpeg",
                   "output_compression": compression, "seed": 3}),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
        let bytes = b64(answer.json()["data"][0]["b64_json"].as_str().expect("b64"));
        decode(&bytes, ImageFormat::Jpeg);
        sizes.push(bytes.len());
    }
    assert!(
        sizes[0] < sizes[1],
        "quality 5 should encode smaller than 100: {sizes:?}"
    );
}

#[tokio::test]
async fn quality_maps_to_steps_and_num_inference_steps_wins() {
    let server = server(&["--max-steps", "100"]).await;
    let cases = [
        (json!({"quality": "low"}), 10),
        (json!({"quality": "medium"}), 20),
        (json!({"quality": "high"}), 40),
        (json!({"quality": "standard"}), 20),
        (json!({"quality": "hd"}), 40),
        (json!({"quality": "auto"}), 20),
        (json!({"quality": null}), 20),
        (json!({"num_inference_steps": 7}), 7),
        (json!({"quality": "high", "num_inference_steps": 3}), 3),
    ];
    for (fields, _) in &cases {
        let mut body = json!({"prompt": "a fox", "size": "32x32"});
        body.as_object_mut()
            .expect("an object")
            .extend(fields.as_object().expect("an object").clone());
        let answer = generate(&server.app, body).await;
        assert_eq!(answer.status, StatusCode::OK, "{fields}");
        let expected_quality = fields
            .get("quality")
            .and_then(|q| q.as_str())
            .unwrap_or("auto");
        assert_eq!(answer.json()["quality"], expected_quality, "{fields}");
    }
    let steps: Vec<u32> = served(&server.log).iter().map(|b| b.key.steps).collect();
    let expected: Vec<u32> = cases.iter().map(|(_, steps)| *steps).collect();
    assert_eq!(steps, expected);
}

#[tokio::test]
async fn high_quality_is_capped_by_max_steps() {
    let server = server(&["--max-steps", "30"]).await;
    let answer = generate(
        &server.app,
        json!({"prompt": "a fox", "size": "32x32", "quality": "high"}),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(served(&server.log)[0].key.steps, 30);
}

#[tokio::test]
async fn extensions_reach_the_batch() {
    let server = server(&[]).await;
    let answer = generate(
        &server.app,
        json!({"prompt": "a fox", "size": "32x32", "negative_prompt": "blurry",
               "guidance_scale": 1.0, "seed": 99, "num_inference_steps": 4}),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let batch = &served(&server.log)[0];
    assert_eq!(batch.key.steps, 4);
    assert!(!batch.key.cfg, "guidance 1.0 turns guidance off");
    let item = &batch.items[0];
    assert_eq!(item.negative_prompt.as_deref(), Some("blurry"));
    assert_eq!(item.guidance_scale, 1.0);
    assert_eq!(item.seed, 99);
    assert_eq!(item.prompt, "a fox");
}

#[tokio::test]
async fn compatibility_fields_are_accepted() {
    let server = server(&["--served-model-name", "sana-test"]).await;
    let bodies = [
        json!({"prompt": "a", "model": "sana-test"}),
        json!({"prompt": "a", "model": "fake/sana"}),
        json!({"prompt": "a", "model": null, "n": null, "size": null, "quality": null,
               "response_format": null, "output_format": null, "output_compression": null,
               "background": null, "style": null, "moderation": null, "user": null,
               "stream": null, "partial_images": null, "negative_prompt": null, "seed": null,
               "num_inference_steps": null, "guidance_scale": null}),
        json!({"prompt": "a", "style": "vivid", "moderation": "low", "background": "opaque",
               "user": "user-1234", "stream": false, "partial_images": 0}),
        json!({"prompt": "a", "style": "natural", "moderation": "auto", "background": "auto",
               "response_format": "b64_json", "output_compression": 0}),
    ];
    for body in bodies {
        let mut body = body;
        body["size"] = json!("32x32");
        let answer = generate(&server.app, body.clone()).await;
        assert_eq!(answer.status, StatusCode::OK, "{body}: {:?}", answer.body);
        assert_eq!(answer.json()["data"].as_array().map(Vec::len), Some(1));
    }
}

#[tokio::test]
async fn url_images_are_served_until_they_expire() {
    let server = server(&[]).await;
    let answer = generate(
        &server.app,
        json!({"prompt": "a fox", "size": "64x32", "response_format": "url", "seed": 5, "n": 2}),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let data = answer.json()["data"].as_array().expect("data").clone();
    assert_eq!(data.len(), 2);
    let mut paths = Vec::new();
    for (i, item) in data.iter().enumerate() {
        assert!(
            item.get("b64_json").is_none(),
            "url answers carry no b64_json: {item}"
        );
        let url = item["url"].as_str().expect("a url");
        let path = url
            .strip_prefix("http://sana.test")
            .unwrap_or_else(|| panic!("{url} is not on the request's host"));
        assert!(
            path.starts_with("/v1/images/files/") && path.ends_with(".png"),
            "{url}"
        );
        let file = get(path);
        let download = call(&server.app, file).await;
        assert_eq!(download.status, StatusCode::OK);
        assert_eq!(download.header("content-type"), Some("image/png"));
        assert_same_pixels(
            &decode(&download.body, ImageFormat::Png),
            &FakeBackend::image_for("a fox", 5 + i as u64, 64, 32),
            &format!("downloaded image {i}"),
        );
        paths.push(path.to_owned());
    }
    assert_ne!(paths[0], paths[1]);

    server.clock.advance(Duration::from_secs(3599));
    assert_eq!(
        call(&server.app, get(&paths[0])).await.status,
        StatusCode::OK,
        "valid for an hour"
    );
    server.clock.advance(Duration::from_secs(1));
    for path in &paths {
        let gone = call(&server.app, get(path)).await;
        let err = gone.expect_error(StatusCode::NOT_FOUND, "not_found", None);
        assert_eq!(err.code.as_deref(), Some("image_not_found"));
        assert!(err.message.contains("3600 s"), "{}", err.message);
    }
    let unknown = call(
        &server.app,
        get("/v1/images/files/0123456789abcdef0123456789abcdef.png"),
    )
    .await;
    unknown.expect_error(StatusCode::NOT_FOUND, "not_found", None);
}

#[tokio::test]
async fn url_ttl_public_url_and_format_are_configurable() {
    let server = server(&[
        "--url-ttl",
        "10s",
        "--public-url",
        "https://cdn.example.com/",
    ])
    .await;
    let answer = generate(
        &server.app,
        json!({"prompt": "a fox", "size": "32x32", "response_format": "url", "output_format": "webp"}),
    )
    .await;
    let url = answer.json()["data"][0]["url"]
        .as_str()
        .expect("a url")
        .to_owned();
    let path = url
        .strip_prefix("https://cdn.example.com")
        .unwrap_or_else(|| panic!("{url} does not use --public-url"));
    assert!(path.ends_with(".webp"), "{url}");
    let download = call(&server.app, get(path)).await;
    assert_eq!(download.header("content-type"), Some("image/webp"));
    decode(&download.body, ImageFormat::WebP);
    server.clock.advance(Duration::from_secs(10));
    assert_eq!(
        call(&server.app, get(path)).await.status,
        StatusCode::NOT_FOUND
    );
}
