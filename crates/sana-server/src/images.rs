//! `POST /v1/images/generations` (JSON or server-sent events) and `GET /v1/images/files/{file}`.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::sse::{self, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use sana_engine::sana_backend::{Image, LoraChoice};
use sana_engine::{Event, GenerateRequest, GenerationStream, Timings};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::config::MAX_PARTIAL_IMAGES;
use crate::encode::{encode, resize};
use crate::error::{ApiError, ApiJson, ErrorResponse};
use crate::state::{unix_now, AppState};
use crate::types::{
    Background, CompletedEvent, CreateImageRequest, ImageData, ImagesResponse, OutputFormat,
    PagLayers, PartialImageEvent, ProgressEvent, Quality, ResponseFormat, StreamErrorEvent,
};

/// The path of stored `url` images.
pub const FILES_PATH: &str = "/v1/images/files";

/// A request checked by the server, ready for the engine, and how to answer it.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) engine: GenerateRequest,
    /// The stream events' prefix: `image_generation` or `image_edit`.
    pub(crate) events: &'static str,
    /// The `size` as sent, for error messages.
    pub(crate) size_text: Option<String>,
    pub(crate) width: u32,
    pub(crate) height: u32,
    quality: Quality,
    response_format: ResponseFormat,
    output_format: OutputFormat,
    compression: u8,
    stream: bool,
    /// Send `progress` events while streaming.
    progress: bool,
}

impl Plan {
    fn size(&self) -> String {
        format!("{}x{}", self.width, self.height)
    }
}

/// Checks what only the HTTP API knows (model name, size syntax, OpenAI-only values) and maps
/// the request to the engine's; the engine checks the rest against the model's limits.
pub(crate) fn plan(req: CreateImageRequest, state: &AppState) -> Result<Plan, ApiError> {
    let info = state.engine().info();
    if let Some(model) = &req.model {
        if model != state.served_model_name() && *model != info.model_id {
            return Err(ApiError::model_not_found(format!(
                "model `{model}` is not served here; this server serves `{}` (see GET /v1/models)",
                state.served_model_name()
            )));
        }
    }
    let (width, height) = match req.size.as_deref().map(str::trim) {
        None | Some("auto") => (None, None),
        Some(text) => {
            let (width, height) = parse_size(text).ok_or_else(|| {
                ApiError::invalid_value(
                    "size",
                    format!(
                        "`size` must be `auto` or `WIDTHxHEIGHT` in pixels, e.g. `{}x{}`, got `{text}`",
                        info.default_width, info.default_height
                    ),
                )
            })?;
            (Some(width), Some(height))
        }
    };
    if req.background == Some(Background::Transparent) {
        return Err(ApiError::invalid_value(
            "background",
            "`background` `transparent` is not supported: Sana generates opaque RGB images \
             without an alpha channel; use `auto` or `opaque`",
        ));
    }
    let compression = match req.output_compression {
        None => 100,
        Some(value) => u8::try_from(value)
            .ok()
            .filter(|value| *value <= 100)
            .ok_or_else(|| {
                ApiError::invalid_value(
                    "output_compression",
                    format!("`output_compression` must be between 0 and 100, got {value}"),
                )
            })?,
    };
    let response_format = req.response_format.unwrap_or_default();
    let stream = req.stream.unwrap_or(false);
    if stream && response_format == ResponseFormat::Url {
        return Err(ApiError::invalid_value(
            "response_format",
            "`response_format` `url` cannot be streamed: stream events carry `b64_json`; drop \
             `stream` or use `b64_json`",
        ));
    }
    let progress = req.progress.unwrap_or(false);
    if progress && !stream {
        return Err(ApiError::invalid_value(
            "progress",
            "`progress` events are only sent when streaming; add `\"stream\": true` or drop `progress`",
        ));
    }
    let partial_images = req.partial_images.unwrap_or(0);
    if partial_images > MAX_PARTIAL_IMAGES {
        return Err(ApiError::invalid_value(
            "partial_images",
            format!(
                "`partial_images` must be between 0 and {MAX_PARTIAL_IMAGES}, got {partial_images}"
            ),
        ));
    }
    if partial_images > 0 && !stream {
        return Err(ApiError::invalid_value(
            "partial_images",
            format!(
                "`partial_images` is {partial_images} but partial images are only sent when \
                 streaming; add `\"stream\": true` or drop `partial_images`"
            ),
        ));
    }
    let quality = req.quality.unwrap_or_default();
    let steps = req.num_inference_steps.or_else(|| {
        req.quality
            .map(|quality| quality.steps(info.default_steps, state.engine().config().max_steps))
    });
    if let Some(user) = &req.user {
        tracing::info!(user = %user, "end-user id");
    }
    let (out_w, out_h) = (
        width.unwrap_or(info.default_width),
        height.unwrap_or(info.default_height),
    );
    let control_image = req
        .control_image
        .as_deref()
        .map(|text| control_image(text, out_w, out_h))
        .transpose()?;
    Ok(Plan {
        events: "image_generation",
        size_text: req.size.clone(),
        width: width.unwrap_or(info.default_width),
        height: height.unwrap_or(info.default_height),
        engine: GenerateRequest {
            prompt: req.prompt,
            negative_prompt: req.negative_prompt,
            n: req.n.unwrap_or(1),
            width,
            height,
            steps,
            guidance_scale: req.guidance_scale,
            sampler: None,
            seed: req.seed,
            previews: partial_images,
            edit: None,
            lora: req
                .lora
                .unwrap_or_default()
                .into_iter()
                .map(|l| LoraChoice {
                    name: l.name,
                    scale: l.scale,
                })
                .collect(),
            pag_scale: req.pag_scale,
            pag_adaptive_scale: req.pag_adaptive_scale,
            pag_applied_layers: req.pag_applied_layers.as_ref().map(PagLayers::specs),
            control_image,
            controlnet: req.controlnet,
            controlnet_conditioning_scale: req.controlnet_conditioning_scale,
        },
        quality,
        response_format,
        output_format: req.output_format.unwrap_or_default(),
        compression,
        stream,
        progress,
    })
}

/// A `control_image` (base64, plain or a `data:` URL) decoded and resized to the output size
/// (Lanczos, as diffusers' image processor resizes it).
fn control_image(text: &str, width: u32, height: u32) -> Result<Image, ApiError> {
    const PARAM: &str = "control_image";
    let text = text.trim();
    let payload = match text.strip_prefix("data:") {
        Some(rest) => rest
            .split_once(";base64,")
            .map(|(_, data)| data)
            .ok_or_else(|| {
                ApiError::invalid_value(
                    PARAM,
                    "a `data:` URL in `control_image` must be base64 (`data:image/png;base64,…`)",
                )
            })?,
        None => text,
    };
    let compact: String = payload
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let bytes = BASE64.decode(compact.as_bytes()).map_err(|e| {
        ApiError::invalid_value(
            PARAM,
            format!("`control_image` is not base64 (of a PNG, JPEG or WebP): {e}"),
        )
    })?;
    if width == 0 || height == 0 {
        return Err(ApiError::invalid_value(PARAM, "the output size is empty"));
    }
    let rgb = crate::edits::decode(PARAM, &bytes)?.to_rgb8();
    let rgb = if rgb.dimensions() == (width, height) {
        rgb
    } else {
        image::imageops::resize(&rgb, width, height, image::imageops::FilterType::Lanczos3)
    };
    Image::new(width, height, rgb.into_raw())
        .map_err(|e| ApiError::internal(format!("control image: {e}")))
}

/// `1024x768` → `(1024, 768)`; `None` unless two decimal numbers joined by `x`.
pub(crate) fn parse_size(text: &str) -> Option<(u32, u32)> {
    let (width, height) = text.split_once(['x', 'X'])?;
    let number = |s: &str| {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u32>().ok())
            .flatten()
    };
    Some((number(width)?, number(height)?))
}

/// Generates images (OpenAI `POST /v1/images/generations`).
#[utoipa::path(
    post,
    path = "/v1/images/generations",
    tag = "images",
    request_body = CreateImageRequest,
    responses(
        (status = 200, description = "The images as JSON, with timing headers; or, with `stream: true`, \
            a `text/event-stream` of `image_generation.partial_image`, `image_generation.completed` \
            (and on failure `error`) events whose data are the JSON objects described by \
            PartialImageEvent, CompletedEvent and StreamErrorEvent",
            headers(
                ("x-queue-time" = u64, description = "Milliseconds from admission to the start of the batch"),
                ("x-inference-time" = u64, description = "Milliseconds the batch spent in the model"),
                ("x-total-time" = u64, description = "Milliseconds from the parsed request to the answer, encoding included"),
            ),
            content(
                (ImagesResponse = "application/json"),
                (CompletedEvent = "text/event-stream"),
            )),
        (status = 400, description = "Malformed JSON, a wrong type, an unknown field, an unsupported value (type `invalid_request`), or a value beyond this model's or server's limits: size, n, steps, prompt length (type `validation`)", body = ErrorResponse),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
        (status = 404, description = "Unknown `model`", body = ErrorResponse),
        (status = 413, description = "Body larger than --max-body-bytes", body = ErrorResponse),
        (status = 415, description = "Body not sent as application/json", body = ErrorResponse),
        (status = 429, description = "Rate limit or admission limit reached; see Retry-After", body = ErrorResponse,
            headers(("Retry-After" = u64, description = "Seconds to wait"),
                ("x-should-retry" = String, description = "`true`"))),
        (status = 500, description = "Generation failed: type `backend` (a device error or a panic; the worker is rebuilt), or, with `x-should-retry: false` because the same request fails again, `out_of_memory` (a smaller size or `n` may fit), `model` (the model as loaded cannot run it), `url_store` (a `url` image larger than --url-store-bytes; `b64_json` works)", body = ErrorResponse,
            headers(("x-should-retry" = String, description = "`false` for `out_of_memory`, `model` and `url_store`; absent otherwise"))),
        (status = 503, description = "No healthy worker, a worker hung and is being replaced (`worker_hung`), or shutting down; see Retry-After", body = ErrorResponse,
            headers(("Retry-After" = u64, description = "Seconds to wait"),
                ("x-should-retry" = String, description = "`true`"))),
        (status = 504, description = "Took longer than --request-timeout", body = ErrorResponse),
    ),
    security(("api_key" = []))
)]
pub async fn generations(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<CreateImageRequest>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let plan = plan(req, &state)?;
    answer(&state, &headers, plan, started).await
}

/// Submits a planned request and answers it: JSON (images inline or as `url`s) or a stream.
pub(crate) async fn answer(
    state: &AppState,
    headers: &HeaderMap,
    plan: Plan,
    started: Instant,
) -> Result<Response, ApiError> {
    let submitted = state
        .engine()
        .submit(plan.engine.clone())
        .map_err(|err| ApiError::from_engine(err, plan.size_text.as_deref()))?;
    if plan.stream {
        return Ok(stream_events(plan, submitted));
    }
    let generation = submitted
        .result()
        .await
        .map_err(|err| ApiError::from_engine(err, plan.size_text.as_deref()))?;
    let images = encode_all(generation.images, &plan).await?;
    let base = match plan.response_format {
        ResponseFormat::Url => Some(public_base(state, headers)),
        ResponseFormat::B64Json => None,
    };
    let mut data = Vec::with_capacity(images.len());
    for (bytes, seed) in images.into_iter().zip(generation.seeds) {
        let (b64_json, url) = match &base {
            None => (Some(BASE64.encode(&bytes)), None),
            Some(base) => {
                let name = state
                    .store()
                    .insert(
                        Bytes::from(bytes),
                        plan.output_format.content_type(),
                        plan.output_format.as_str(),
                    )
                    .map_err(|err| ApiError::url_store_full(&err))?;
                (None, Some(format!("{base}{FILES_PATH}/{name}")))
            }
        };
        data.push(ImageData {
            b64_json,
            url,
            seed,
        });
    }
    let body = ImagesResponse {
        created: unix_now(),
        data,
        background: "opaque".into(),
        output_format: plan.output_format,
        size: plan.size(),
        quality: plan.quality,
    };
    let mut response = axum::Json(body).into_response();
    timing_headers(
        response.headers_mut(),
        &generation.timings,
        started.elapsed(),
    );
    Ok(response)
}

/// `total` is the handler's time, encoding included; the engine's own total ends at the last
/// image.
fn timing_headers(headers: &mut HeaderMap, timings: &Timings, total: Duration) {
    let millis = |duration: Duration| HeaderValue::from(duration.as_millis() as u64);
    headers.insert("x-queue-time", millis(timings.queue));
    headers.insert("x-inference-time", millis(timings.inference));
    headers.insert("x-total-time", millis(total));
}

/// Where `url` images are served from: `--public-url`, else `http://` + the `Host` header.
fn public_base(state: &AppState, headers: &HeaderMap) -> String {
    if let Some(url) = &state.config().public_url {
        return url.clone();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .filter(|host| !host.is_empty() && !host.contains(['/', ' ', '@']))
        .map_or_else(|| state.config().addr.to_string(), str::to_owned);
    format!("http://{host}")
}

/// Encodes images on the blocking pool (PNG of a 1024² image is tens of milliseconds).
async fn encode_all(images: Vec<Image>, plan: &Plan) -> Result<Vec<Vec<u8>>, ApiError> {
    let (format, compression) = (plan.output_format, plan.compression);
    tokio::task::spawn_blocking(move || {
        images
            .iter()
            .map(|image| encode(image, format, compression))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)
}

/// Encodes a preview at the requested size, as base64.
async fn encode_preview(image: Image, plan: &Plan) -> Result<String, ApiError> {
    let (format, compression, width, height) = (
        plan.output_format,
        plan.compression,
        plan.width,
        plan.height,
    );
    tokio::task::spawn_blocking(move || {
        let image = resize(image, width, height)?;
        encode(&image, format, compression).map(|bytes| BASE64.encode(bytes))
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)
}

/// The SSE answer: a task drives the generation and sends events; when the client goes away the
/// channel closes, the task ends and dropping the generation cancels it in the engine.
fn stream_events(plan: Plan, generation: GenerationStream) -> Response {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(drive(plan, generation, tx).instrument(tracing::Span::current()));
    Sse::new(Events(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

type SseItem = Result<sse::Event, Infallible>;

async fn drive(plan: Plan, mut generation: GenerationStream, tx: mpsc::Sender<SseItem>) {
    let mut partials = vec![0u32; plan.engine.n as usize];
    loop {
        let event = tokio::select! {
            event = generation.next_event() => event,
            () = tx.closed() => return,
        };
        let finished = matches!(event, Some(Event::Done(_)));
        let events = match event {
            None => return,
            Some(Event::Progress { step, steps }) if plan.progress => vec![sse_event(
                &format!("{}.progress", plan.events),
                &ProgressEvent {
                    kind: format!("{}.progress", plan.events),
                    step,
                    steps,
                    created_at: unix_now(),
                },
            )],
            Some(Event::Progress { .. }) => continue,
            Some(Event::Preview {
                image_index, image, ..
            }) => match encode_preview(image, &plan).await {
                Ok(b64_json) => {
                    let slot = partials.get_mut(image_index as usize);
                    let partial_image_index = slot.map_or(0, |count| {
                        *count += 1;
                        *count - 1
                    });
                    vec![sse_event(
                        &format!("{}.partial_image", plan.events),
                        &PartialImageEvent {
                            kind: format!("{}.partial_image", plan.events),
                            b64_json,
                            created_at: unix_now(),
                            size: plan.size(),
                            quality: plan.quality,
                            background: "opaque".into(),
                            output_format: plan.output_format,
                            partial_image_index,
                            image_index,
                        },
                    )]
                }
                Err(err) => {
                    // The stream ends at its first error.
                    let _ = tx.send(error_event(&err)).await;
                    return;
                }
            },
            Some(Event::Done(Ok(done))) => {
                let size = format!("{}x{}", plan.width, plan.height);
                match encode_all(done.images, &plan).await {
                    Ok(images) => images
                        .into_iter()
                        .zip(done.seeds)
                        .zip(0u32..)
                        .map(|((bytes, seed), image_index)| {
                            sse_event(
                                &format!("{}.completed", plan.events),
                                &CompletedEvent {
                                    kind: format!("{}.completed", plan.events),
                                    b64_json: BASE64.encode(bytes),
                                    created_at: unix_now(),
                                    size: size.clone(),
                                    quality: plan.quality,
                                    background: "opaque".into(),
                                    output_format: plan.output_format,
                                    image_index,
                                    seed,
                                },
                            )
                        })
                        .collect(),
                    Err(err) => vec![error_event(&err)],
                }
            }
            Some(Event::Done(Err(err))) => vec![error_event(&ApiError::from_engine(
                err,
                plan.size_text.as_deref(),
            ))],
        };
        for event in events {
            if tx.send(event).await.is_err() {
                return;
            }
        }
        if finished {
            return;
        }
    }
}

fn sse_event(name: &str, data: &impl serde::Serialize) -> SseItem {
    Ok(sse::Event::default()
        .event(name)
        .json_data(data)
        .unwrap_or_else(|err| sse::Event::default().event("error").data(err.to_string())))
}

fn error_event(err: &ApiError) -> SseItem {
    sse_event(
        "error",
        &StreamErrorEvent {
            kind: "error".into(),
            error: err.body().error,
        },
    )
}

/// The receiving end of the event channel as a `Stream`.
struct Events(mpsc::Receiver<SseItem>);

impl futures_core::Stream for Events {
    type Item = SseItem;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<SseItem>> {
        self.0.poll_recv(cx)
    }
}

/// Downloads an image of a `response_format: "url"` generation. The unguessable name is the
/// capability (as OpenAI's signed URLs), so this route needs no API key.
#[utoipa::path(
    get,
    path = "/v1/images/files/{file}",
    tag = "images",
    params(("file" = String, Path, description = "The name in the `url` of a generation")),
    responses(
        (status = 200, description = "The encoded image", content(
            (Vec<u8> = "image/png"), (Vec<u8> = "image/jpeg"), (Vec<u8> = "image/webp"))),
        (status = 404, description = "Unknown, expired (after --url-ttl) or evicted", body = ErrorResponse),
    )
)]
pub async fn file(State(state): State<AppState>, Path(file): Path<String>) -> Response {
    match state.store().get(&file) {
        Some(image) => {
            let cache = format!("private, max-age={}", state.store().ttl().as_secs());
            (
                [
                    (
                        header::CONTENT_TYPE,
                        HeaderValue::from_static(image.content_type),
                    ),
                    (
                        header::CACHE_CONTROL,
                        HeaderValue::from_str(&cache)
                            .unwrap_or(HeaderValue::from_static("private")),
                    ),
                ],
                image.bytes,
            )
                .into_response()
        }
        None => ApiError::not_found(
            "image_not_found",
            format!(
                "no image `{file}`: images of `response_format: \"url\"` are kept for {} s after \
                 they are made; generate it again",
                state.store().ttl().as_secs()
            ),
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_strictly() {
        assert_eq!(parse_size("1024x768"), Some((1024, 768)));
        assert_eq!(parse_size("512X512"), Some((512, 512)));
        for bad in [
            "1024",
            "x",
            "1024x",
            "ax1",
            "1024*1024",
            "-1x5",
            "1x2x3",
            " 1x2",
            "99999999999x1",
        ] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }
}
