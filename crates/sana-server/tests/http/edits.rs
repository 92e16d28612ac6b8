//! `POST /v1/images/edits` (multipart/form-data): what reaches the backend (image, mask, strength,
//! size), the answers (JSON and `image_edit.*` events), and every bad input as a 400 naming the
//! field.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use image::{ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};
use serde_json::Value;

use crate::common::*;

/// One part of a multipart body.
enum Part<'a> {
    Text(&'a str, &'a str),
    File(&'a str, &'a str, Vec<u8>),
}

const BOUNDARY: &str = "sana-test-boundary-7MA4YWxkTrZu0gW";

fn multipart(parts: &[Part]) -> Vec<u8> {
    let mut body = Vec::new();
    for part in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        match part {
            Part::Text(name, value) => {
                body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                        .as_bytes(),
                );
            }
            Part::File(name, file, bytes) => {
                body.extend_from_slice(
                    format!(
                        "Content-Disposition: form-data; name=\"{name}\"; filename=\"{file}\"\r\n\
                         Content-Type: application/octet-stream\r\n\r\n"
                    )
                    .as_bytes(),
                );
                body.extend_from_slice(bytes);
                body.extend_from_slice(b"\r\n");
            }
        }
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

fn edit_request(parts: &[Part]) -> Request<Body> {
    post_raw(
        "/v1/images/edits",
        &format!("multipart/form-data; boundary={BOUNDARY}"),
        multipart(parts),
    )
}

fn png(image: &image::DynamicImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut out, ImageFormat::Png)
        .expect("PNG encodes");
    out.into_inner()
}

/// A 96×64 picture with a gradient, so a resize or a swap shows.
fn picture(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| Rgb([(x * 2) as u8, (y * 3) as u8, 7]))
}

/// OpenAI's mask convention: transparent (alpha 0) = edit; here the right half.
fn right_half_mask(w: u32, h: u32) -> RgbaImage {
    RgbaImage::from_fn(w, h, |x, _| {
        Rgba([0, 0, 0, if x >= w / 2 { 0 } else { 255 }])
    })
}

fn image_part(img: RgbImage) -> Part<'static> {
    Part::File("image", "in.png", png(&img.into()))
}

#[tokio::test]
async fn an_inpainting_edit_reaches_the_backend_with_its_image_mask_and_strength() {
    let srv = server(&[]).await;
    let answer = call(
        &srv.app,
        edit_request(&[
            image_part(picture(96, 64)),
            Part::File("mask", "mask.png", png(&right_half_mask(96, 64).into())),
            Part::Text("prompt", "a red ball on the right"),
            Part::Text("n", "2"),
            Part::Text("seed", "5"),
        ]),
    )
    .await;
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let json = answer.json();
    assert_eq!(json["data"].as_array().unwrap().len(), 2);
    assert_eq!(json["size"], "96x64");
    let batches = served(&srv.log);
    assert_eq!(batches.len(), 1);
    let batch = &batches[0];
    assert_eq!((batch.key.width, batch.key.height), (96, 64));
    assert_eq!(
        batch.key.strength_permille,
        Some(1000),
        "a mask defaults to strength 1"
    );
    let edit = batch.items[0]
        .edit
        .as_ref()
        .expect("the edit reaches the backend");
    assert_eq!(
        edit.image.rgb8,
        picture(96, 64).into_raw(),
        "the uploaded pixels, unresized"
    );
    assert!(edit.preserve_unmasked);
    let mask = edit.mask.as_ref().expect("the mask");
    for (i, &m) in mask.iter().enumerate() {
        let x = i % 96;
        assert_eq!(
            m,
            if x >= 48 { 255 } else { 0 },
            "mask at ({x}, {})",
            i / 96
        );
    }
}

#[tokio::test]
async fn sizes_and_strengths_follow_the_request() {
    let srv = server(&[]).await;
    // auto: 100×70 rounds to 96×64; no mask, default fidelity: strength 0.8.
    let ok = call(
        &srv.app,
        edit_request(&[image_part(picture(100, 70)), Part::Text("prompt", "a fox")]),
    )
    .await;
    assert_eq!(
        ok.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&ok.body)
    );
    // An explicit size resizes; input_fidelity high keeps more; an explicit strength wins.
    for extra in [
        vec![Part::Text("size", "64x64")],
        vec![Part::Text("input_fidelity", "high")],
        vec![Part::Text("strength", "0.333")],
        vec![
            Part::Text("strength", "0.5"),
            Part::Text("preserve_unmasked", "false"),
        ],
    ] {
        let mut parts = vec![image_part(picture(96, 64)), Part::Text("prompt", "a fox")];
        parts.extend(extra);
        let answer = call(&srv.app, edit_request(&parts)).await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
    }
    let batches = served(&srv.log);
    let got: Vec<((u32, u32), Option<u16>)> = batches
        .iter()
        .map(|b| ((b.key.width, b.key.height), b.key.strength_permille))
        .collect();
    assert_eq!(
        got,
        [
            ((96, 64), Some(800)),
            ((64, 64), Some(800)),
            ((96, 64), Some(500)),
            ((96, 64), Some(333)),
            ((96, 64), Some(500)),
        ]
    );
    let resized = batches[1].items[0].edit.as_ref().unwrap();
    assert_eq!((resized.image.width, resized.image.height), (64, 64));
    assert!(!batches[4].items[0].edit.as_ref().unwrap().preserve_unmasked);
    // Edits are never batched with text-to-image work.
    assert!(batches
        .iter()
        .all(|b| b.items.iter().all(|i| i.edit.is_some())));
}

/// The events of a streamed edit of a 96×64 picture with `fields`: (type, data).
async fn streamed_edit(srv: &TestServer, fields: &[(&'static str, &'static str)]) -> Vec<Value> {
    let mut parts = vec![
        image_part(picture(96, 64)),
        Part::Text("prompt", "a fox"),
        Part::Text("stream", "true"),
    ];
    parts.extend(fields.iter().map(|&(name, value)| Part::Text(name, value)));
    let answer = call(&srv.app, edit_request(&parts)).await;
    assert_eq!(answer.status, StatusCode::OK);
    let text = String::from_utf8(answer.body.to_vec()).unwrap();
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    let events: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let types: Vec<&str> = events.iter().map(|d| d["type"].as_str().unwrap()).collect();
    assert_eq!(names, types, "each event's name is its data's type");
    events
}

#[tokio::test]
async fn a_streamed_edit_sends_image_edit_events() {
    let srv = server(&[]).await;
    let events = streamed_edit(
        &srv,
        &[("partial_images", "1"), ("num_inference_steps", "4")],
    )
    .await;
    let types: Vec<&str> = events.iter().map(|d| d["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["image_edit.partial_image", "image_edit.completed"]);
    for data in &events {
        decode(&b64(data["b64_json"].as_str().unwrap()), ImageFormat::Png);
    }

    // `progress` (a form field like the others): one `image_edit.progress` per step the edit
    // runs; strength 0.5 of 4 steps runs 2.
    let events = streamed_edit(
        &srv,
        &[
            ("progress", "true"),
            ("strength", "0.5"),
            ("num_inference_steps", "4"),
        ],
    )
    .await;
    let progress: Vec<(u64, u64)> = events
        .iter()
        .filter(|d| d["type"] == "image_edit.progress")
        .map(|d| (d["step"].as_u64().unwrap(), d["steps"].as_u64().unwrap()))
        .collect();
    assert_eq!(progress, [(1, 2), (2, 2)], "{events:?}");
}

/// A PNG whose header says `w × h` (its pixel data is a 1×1 image's: the size check comes
/// first).
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut bytes = png(&RgbImage::new(1, 1).into());
    // IHDR: 8-byte signature, 4-byte length, "IHDR", width, height, …, CRC over type + data.
    bytes[16..20].copy_from_slice(&w.to_be_bytes());
    bytes[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    bytes
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[tokio::test]
async fn bad_inputs_are_400_naming_the_field() {
    let srv = server(&[]).await;
    let good = || image_part(picture(96, 64));
    let mut truncated = png(&picture(96, 64).into());
    truncated.truncate(truncated.len() / 2);
    let rgb_mask = png(&RgbImage::new(96, 64).into());
    let small_mask = png(&right_half_mask(48, 32).into());
    let cases: Vec<(&str, Vec<Part>, &str, &str)> = vec![
        (
            "not an image",
            vec![
                Part::File("image", "x.txt", b"hello, not an image".to_vec()),
                Part::Text("prompt", "a"),
            ],
            "image",
            "invalid_image",
        ),
        (
            "a truncated PNG",
            vec![
                Part::File("image", "x.png", truncated),
                Part::Text("prompt", "a"),
            ],
            "image",
            "invalid_image",
        ),
        (
            "an image over the pixel limit",
            vec![
                Part::File("image", "big.png", png_claiming(5000, 5000)),
                Part::Text("prompt", "a"),
            ],
            "image",
            "image_too_large",
        ),
        (
            "two images",
            vec![
                good(),
                Part::File("image[]", "b.png", png(&picture(96, 64).into())),
                Part::Text("prompt", "a"),
            ],
            "image",
            "invalid_value",
        ),
        (
            "no image",
            vec![Part::Text("prompt", "a")],
            "image",
            "missing_parameter",
        ),
        ("no prompt", vec![good()], "prompt", "missing_parameter"),
        (
            "a mask without alpha",
            vec![
                good(),
                Part::File("mask", "m.png", rgb_mask),
                Part::Text("prompt", "a"),
            ],
            "mask",
            "invalid_value",
        ),
        (
            "a mask of another size",
            vec![
                good(),
                Part::File("mask", "m.png", small_mask),
                Part::Text("prompt", "a"),
            ],
            "mask",
            "invalid_value",
        ),
        (
            "a mask that is not an image",
            vec![
                good(),
                Part::File("mask", "m.png", b"GIF8".to_vec()),
                Part::Text("prompt", "a"),
            ],
            "mask",
            "invalid_image",
        ),
        (
            "a strength that is not a number",
            vec![
                good(),
                Part::Text("prompt", "a"),
                Part::Text("strength", "strong"),
            ],
            "strength",
            "invalid_type",
        ),
        (
            "a stream flag that is not a boolean",
            vec![
                good(),
                Part::Text("prompt", "a"),
                Part::Text("stream", "maybe"),
            ],
            "stream",
            "invalid_type",
        ),
        (
            "an unknown field",
            vec![
                good(),
                Part::Text("prompt", "a"),
                Part::Text("colour", "red"),
            ],
            "colour",
            "unknown_parameter",
        ),
        (
            "an unknown input_fidelity",
            vec![
                good(),
                Part::Text("prompt", "a"),
                Part::Text("input_fidelity", "medium"),
            ],
            "input_fidelity",
            "invalid_value",
        ),
    ];
    for (what, parts, param, code) in cases {
        let answer = call(&srv.app, edit_request(&parts)).await;
        let error = answer.expect_error(StatusCode::BAD_REQUEST, "invalid_request", Some(param));
        assert_eq!(
            error.code.as_deref(),
            Some(code),
            "{what}: {}",
            error.message
        );
    }
    // Values beyond the model's limits come back from the engine's checks.
    for (strength, steps) in [("0", "20"), ("1.5", "20"), ("-0.2", "5")] {
        let answer = call(
            &srv.app,
            edit_request(&[
                good(),
                Part::Text("prompt", "a"),
                Part::Text("strength", strength),
                Part::Text("num_inference_steps", steps),
            ]),
        )
        .await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "strength {strength}"
        );
        assert_eq!(
            answer.json()["error"]["param"],
            "strength",
            "strength {strength}"
        );
    }
    assert!(
        served(&srv.log).is_empty(),
        "nothing bad reached the backend"
    );
}

#[tokio::test]
async fn content_type_and_size_limits() {
    let srv = server(&["--max-body-bytes", "100000", "--max-upload-bytes", "200000"]).await;
    let json = call(
        &srv.app,
        post("/v1/images/edits", &serde_json::json!({"prompt": "a"})),
    )
    .await;
    json.expect_error(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
        None,
    );
    let noise = RgbImage::from_fn(400, 400, |x, y| {
        Rgb([(x * 7 + y * 13) as u8, (x * x + y) as u8, (x ^ y) as u8])
    });
    let big = call(
        &srv.app,
        edit_request(&[
            Part::File("image", "big.png", png(&noise.into())),
            Part::Text("prompt", "a"),
        ]),
    )
    .await;
    assert_eq!(
        big.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        String::from_utf8_lossy(&big.body)
    );
}
