//! `stream: true`: server-sent events framed as OpenAI's: `event: <type>` and `data: <json>` with
//! the same `type`, partial images first, then one `image_generation.completed` per image.

use axum::http::StatusCode;
use image::ImageFormat;
use sana_engine::sana_backend::BatchKey;
use sana_engine::testing::{Failure, FakeBackend};
use serde_json::{json, Value};

use crate::common::*;

/// The events of an SSE body: (event name, data as JSON). Checks the framing on the way.
fn events(answer: &Answer) -> Vec<(String, Value)> {
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.header("content-type"), Some("text/event-stream"));
    assert_eq!(answer.header("cache-control"), Some("no-cache"));
    let text = std::str::from_utf8(&answer.body).expect("SSE is UTF-8");
    assert!(text.ends_with("\n\n"), "every event ends with a blank line");
    text.split("\n\n")
        .filter(|frame| !frame.is_empty())
        .map(|frame| {
            let mut name = None;
            let mut data = None;
            for line in frame.lines() {
                if let Some(value) = line.strip_prefix("event: ") {
                    name = Some(value.to_owned());
                } else if let Some(value) = line.strip_prefix("data: ") {
                    assert!(data.is_none(), "one data line per event: {frame}");
                    data = Some(serde_json::from_str::<Value>(value).expect("data is JSON"));
                } else {
                    panic!("unexpected SSE line {line:?}");
                }
            }
            let name = name.expect("every event is named");
            let data = data.expect("every event has data");
            assert_eq!(
                data["type"],
                name.as_str(),
                "data.type repeats the event name"
            );
            (name, data)
        })
        .collect()
}

fn key(width: u32, height: u32, steps: u32) -> BatchKey {
    BatchKey {
        width,
        height,
        steps,
        sampler: model_info().default_sampler,
        cfg: true,
        strength_permille: None,
        pag_layers: None,
        controlnet: None,
    }
}

#[tokio::test]
async fn partial_images_then_the_completed_image() {
    let server = server(&[]).await;
    let answer = generate(
        &server.app,
        json!({"prompt": "a fox", "size": "64x32", "stream": true, "partial_images": 2,
               "num_inference_steps": 6, "seed": 8, "quality": "high"}),
    )
    .await;
    let events = events(&answer);
    let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "image_generation.partial_image",
            "image_generation.partial_image",
            "image_generation.completed"
        ]
    );
    // Previews after steps 2 and 4 of 6 (`preview_steps`), scaled to the requested size.
    for (index, (step, (_, data))) in [2, 4].iter().zip(&events[..2]).enumerate() {
        assert_eq!(data["partial_image_index"], index);
        assert_eq!(data["image_index"], 0);
        assert_eq!(data["size"], "64x32");
        assert_eq!(data["quality"], "high");
        assert_eq!(data["background"], "opaque");
        assert_eq!(data["output_format"], "png");
        assert!(data["created_at"].as_u64().is_some());
        let preview = decode(
            &b64(data["b64_json"].as_str().expect("b64")),
            ImageFormat::Png,
        );
        assert_eq!((preview.width(), preview.height()), (64, 32));
        // The fake's preview is 2x1 pixels; its first pixel survives scaling at the corner.
        let small = FakeBackend::preview_for("a fox", 8, *step, &key(64, 32, 6));
        assert_eq!(
            preview.get_pixel(0, 0).0,
            [small.rgb8[0], small.rgb8[1], small.rgb8[2]],
            "preview {index} is the step-{step} preview"
        );
    }
    let (_, done) = &events[2];
    assert_eq!(done["image_index"], 0);
    assert_eq!(done["seed"], 8);
    assert_eq!(done["size"], "64x32");
    let image = decode(
        &b64(done["b64_json"].as_str().expect("b64")),
        ImageFormat::Png,
    );
    assert_same_pixels(
        &image,
        &FakeBackend::image_for("a fox", 8, 64, 32),
        "the completed image",
    );
    assert!(
        !std::str::from_utf8(&answer.body)
            .expect("UTF-8")
            .contains("[DONE]"),
        "OpenAI's image stream has no [DONE]"
    );
    assert_eq!(served(&server.log)[0].items[0].previews, 2);
}

#[tokio::test]
async fn without_partial_images_only_the_completed_event_comes() {
    let server = server(&[]).await;
    let answer = generate(
        &server.app,
        json!({"prompt": "a fox", "size": "32x32", "stream": true, "output_format": "jpeg"}),
    )
    .await;
    let events = events(&answer);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0, "image_generation.completed");
    assert_eq!(events[0].1["output_format"], "jpeg");
    decode(
        &b64(events[0].1["b64_json"].as_str().expect("b64")),
        ImageFormat::Jpeg,
    );
}

#[tokio::test]
async fn each_of_n_images_streams_its_partials_and_its_completion() {
    let server = server(&[]).await;
    let answer = generate(
        &server.app,
        json!({"prompt": "owls", "size": "32x32", "n": 2, "seed": 20, "stream": true,
               "partial_images": 1, "num_inference_steps": 4, "output_format": "webp"}),
    )
    .await;
    let events = events(&answer);
    let summary: Vec<(&str, u64, Option<u64>)> = events
        .iter()
        .map(|(name, data)| {
            (
                name.as_str(),
                data["image_index"].as_u64().expect("image_index"),
                data["partial_image_index"].as_u64(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("image_generation.partial_image", 0, Some(0)),
            ("image_generation.partial_image", 1, Some(0)),
            ("image_generation.completed", 0, None),
            ("image_generation.completed", 1, None),
        ]
    );
    for (i, (_, data)) in events[2..].iter().enumerate() {
        let seed = 20 + i as u64;
        assert_eq!(data["seed"], seed);
        let image = decode(
            &b64(data["b64_json"].as_str().expect("b64")),
            ImageFormat::WebP,
        );
        assert_same_pixels(
            &image,
            &FakeBackend::image_for("owls", seed, 32, 32),
            &format!("image {i}"),
        );
    }
}

#[tokio::test]
async fn a_failure_after_the_stream_began_is_an_error_event() {
    let fake = FakeBackend::new()
        .with_info(model_info())
        .fail_on("boom", Failure::Error);
    let server = server_with(&[], fake).await;
    let answer = generate(
        &server.app,
        json!({"prompt": "boom", "size": "32x32", "stream": true}),
    )
    .await;
    let events = events(&answer);
    assert_eq!(events.len(), 1, "the stream ends at its error");
    let (name, data) = &events[0];
    assert_eq!(name, "error");
    let error = data["error"].as_object().expect("an envelope body");
    assert_eq!(error["type"], "backend");
    assert!(
        !error["message"]
            .as_str()
            .expect("a message")
            .contains("injected"),
        "5xx detail leaked"
    );
    for key in ["message", "type", "param", "code"] {
        assert!(error.contains_key(key), "{key} missing: {data}");
    }
}

#[tokio::test]
async fn a_stream_refused_up_front_is_a_plain_json_error() {
    let server = server(&[]).await;
    let answer = generate(
        &server.app,
        json!({"prompt": "a", "size": "33x32", "stream": true}),
    )
    .await;
    answer.expect_error(StatusCode::BAD_REQUEST, "validation", Some("size"));
}

#[tokio::test]
async fn progress_events_count_every_step_when_asked() {
    let server = server(&[]).await;
    let answer = generate(
        &server.app,
        json!({"prompt": "a fox", "size": "32x32", "stream": true, "partial_images": 1,
               "progress": true, "num_inference_steps": 4, "n": 2}),
    )
    .await;
    let events = events(&answer);
    let names: Vec<&str> = events.iter().map(|(name, _)| name.as_str()).collect();
    // One batch of two images: a progress event per step (not per image), the previews of
    // both images after their step, then the two completions.
    let progress: Vec<(u64, u64)> = events
        .iter()
        .filter(|(name, _)| name == "image_generation.progress")
        .map(|(_, data)| {
            assert!(data["created_at"].as_u64().is_some());
            (
                data["step"].as_u64().expect("step"),
                data["steps"].as_u64().expect("steps"),
            )
        })
        .collect();
    assert_eq!(progress, [(1, 4), (2, 4), (3, 4), (4, 4)], "{names:?}");
    let first_preview = names
        .iter()
        .position(|n| *n == "image_generation.partial_image")
        .expect("a preview");
    let first_completed = names
        .iter()
        .position(|n| *n == "image_generation.completed")
        .expect("a completion");
    let last_progress = names
        .iter()
        .rposition(|n| *n == "image_generation.progress")
        .expect("progress");
    assert!(first_preview > 0 && names[first_preview - 1] == "image_generation.progress");
    assert!(last_progress < first_completed, "{names:?}");
    assert_eq!(
        names.iter().filter(|n| n.ends_with(".completed")).count(),
        2
    );
}

#[tokio::test]
async fn progress_without_stream_is_refused() {
    let server = server(&[]).await;
    let answer = generate(&server.app, json!({"prompt": "a", "progress": true})).await;
    let error = answer.expect_error(StatusCode::BAD_REQUEST, "invalid_request", Some("progress"));
    assert!(error.message.contains("stream"), "{}", error.message);
    // Without progress, a stream carries OpenAI's events only.
    let answer = generate(
        &server.app,
        json!({"prompt": "a", "size": "32x32", "stream": true, "progress": false}),
    )
    .await;
    let names: Vec<String> = events(&answer).into_iter().map(|(name, _)| name).collect();
    assert_eq!(names, ["image_generation.completed"]);
}
