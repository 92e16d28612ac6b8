//! ControlNet through the API: a control image reaches the batch at the output size with its
//! ControlNet and scale, bad input is a 400 naming the field, and `/v1/models` and the served
//! document describe what is loaded.

use axum::http::StatusCode;
use base64::Engine as _;
use sana_engine::sana_backend::ModelInfo;
use sana_engine::testing::FakeBackend;
use serde_json::json;

use crate::common::{call, generate, get, model_info, served, server_with};

fn info_with(controlnets: &[&str]) -> ModelInfo {
    ModelInfo {
        controlnets: controlnets.iter().map(|s| s.to_string()).collect(),
        ..model_info()
    }
}

/// A PNG of `w × h`: white edges (a frame) on black, base64.
fn edges_png(w: u32, h: u32) -> String {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let edge = x == 2 || y == 2 || x + 3 == w || y + 3 == h;
        image::Rgb(if edge { [255, 255, 255] } else { [0, 0, 0] })
    });
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    base64::engine::general_purpose::STANDARD.encode(png)
}

#[tokio::test]
async fn a_control_image_reaches_the_batch_at_the_output_size() {
    let server = server_with(
        &[],
        FakeBackend::new().with_info(info_with(&["hed", "depth"])),
    )
    .await;
    // Given at another size (32x32 for a 64x96 output) and as a data URL: resized.
    let answer = generate(
        &server.app,
        json!({"prompt": "a", "size": "96x64", "control_image": format!("data:image/png;base64,{}", edges_png(32, 32)),
               "controlnet": "depth", "controlnet_conditioning_scale": 0.4}),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.json());
    let batch = served(&server.log).pop().expect("a batch");
    assert_eq!(
        batch.key.controlnet,
        Some(1),
        "`depth` is the second ControlNet"
    );
    let control = batch.items[0].control.as_ref().expect("a control input");
    assert_eq!((control.image.width, control.image.height), (96, 64));
    assert_eq!(control.scale, 0.4);
    // Resized with its content: the frame's corner region is white, the middle black.
    let px = |x: usize, y: usize| control.image.rgb8[3 * (y * 96 + x)];
    assert!(px(48, 32) < 30 && px(6, 32) > 200, "edges kept");
    // The same size as the output is taken as it is; the scale defaults to 1.
    let answer = generate(
        &server.app,
        json!({"prompt": "a", "size": "96x64", "control_image": edges_png(96, 64), "controlnet": "hed"}),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let batch = served(&server.log).pop().expect("a batch");
    assert_eq!(batch.key.controlnet, Some(0));
    assert_eq!(batch.items[0].control.as_ref().unwrap().scale, 1.0);
    // Without a control image there is no ControlNet in the key.
    let answer = generate(&server.app, json!({"prompt": "a", "size": "96x64"})).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(served(&server.log).pop().unwrap().key.controlnet, None);
}

#[tokio::test]
async fn one_controlnet_is_used_when_none_is_named() {
    let server = server_with(&[], FakeBackend::new().with_info(info_with(&["hed"]))).await;
    let answer = generate(
        &server.app,
        json!({"prompt": "a", "size": "64x64", "control_image": edges_png(64, 64)}),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(served(&server.log).pop().unwrap().key.controlnet, Some(0));
}

#[tokio::test]
async fn bad_control_input_is_a_400_naming_the_field() {
    let two = server_with(
        &[],
        FakeBackend::new().with_info(info_with(&["hed", "depth"])),
    )
    .await;
    let png = edges_png(64, 64);
    let cases = [
        (
            json!({"control_image": "not base64!"}),
            "control_image",
            "base64",
        ),
        (
            json!({"control_image": "aGVsbG8gd29ybGQ="}),
            "control_image",
            "control_image",
        ),
        (
            json!({"control_image": "data:image/png,abc"}),
            "control_image",
            "base64",
        ),
        (
            json!({"control_image": png.clone()}),
            "controlnet",
            "hed, depth",
        ),
        (
            json!({"control_image": png.clone(), "controlnet": "canny"}),
            "controlnet",
            "`canny`",
        ),
        (
            json!({"controlnet": "hed"}),
            "control_image",
            "needs a `control_image`",
        ),
        (
            json!({"controlnet_conditioning_scale": 0.5}),
            "controlnet_conditioning_scale",
            "needs",
        ),
        (
            json!({"control_image": png.clone(), "controlnet": "hed", "controlnet_conditioning_scale": 1e39}),
            "controlnet_conditioning_scale",
            "finite",
        ),
        (
            json!({"control_image": png.clone(), "controlnet": "hed", "controlnet_conditioning_scale": -101}),
            "controlnet_conditioning_scale",
            "100",
        ),
    ];
    for (extra, param, word) in cases {
        let mut body = json!({"prompt": "a", "size": "64x64"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let answer = generate(&two.app, body.clone()).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body}");
        let err = &answer.json()["error"];
        assert_eq!(err["param"], param, "{body}: {err}");
        assert!(
            err["message"].as_str().unwrap().contains(word),
            "{body}: {err}"
        );
    }
    assert!(
        served(&two.log).is_empty(),
        "no bad request reached the model"
    );
    // No ControlNet loaded at all.
    let none = server_with(&[], FakeBackend::new().with_info(model_info())).await;
    let answer = generate(
        &none.app,
        json!({"prompt": "a", "size": "64x64", "control_image": png}),
    )
    .await;
    let err = &answer.json()["error"];
    assert_eq!(
        (answer.status, err["param"].as_str()),
        (StatusCode::BAD_REQUEST, Some("control_image"))
    );
    assert!(
        err["message"].as_str().unwrap().contains("--controlnet"),
        "{err}"
    );
}

#[tokio::test]
async fn models_list_the_controlnets_and_the_served_document_follows() {
    let server = server_with(&[], FakeBackend::new().with_info(info_with(&["hed"]))).await;
    let models = call(&server.app, get("/v1/models")).await.json();
    assert_eq!(models["data"][0]["controlnets"], json!(["hed"]));
    let doc = call(&server.app, get("/openapi.json")).await.json();
    let props = &doc["components"]["schemas"]["CreateImageRequest"]["properties"];
    assert_eq!(props["controlnet"]["enum"], json!(["hed", null]));
    let plain = server_with(&[], FakeBackend::new().with_info(model_info())).await;
    let doc = call(&plain.app, get("/openapi.json")).await.json();
    let props = &doc["components"]["schemas"]["CreateImageRequest"]["properties"];
    assert_eq!(
        props["control_image"]["type"],
        json!("null"),
        "no ControlNet: no control image"
    );
    assert_eq!(
        call(&plain.app, get("/v1/models")).await.json()["data"][0]["controlnets"],
        json!([])
    );
}

/// With a ControlNet loaded, generations take bodies up to the upload limit (a control image);
/// without, the JSON limit.
#[tokio::test]
async fn generations_take_larger_bodies_with_a_controlnet() {
    let big = json!({"prompt": "a", "size": "64x64", "user": "x".repeat(2 << 20)});
    let plain = server_with(&[], FakeBackend::new().with_info(model_info())).await;
    assert_eq!(
        generate(&plain.app, big.clone()).await.status,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    let with = server_with(&[], FakeBackend::new().with_info(info_with(&["hed"]))).await;
    assert_eq!(generate(&with.app, big).await.status, StatusCode::OK);
}
