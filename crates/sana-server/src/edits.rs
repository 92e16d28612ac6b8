//! `POST /v1/images/edits`: OpenAI's image edits over `multipart/form-data`: image-to-image, or
//! inpainting with a mask whose transparent pixels mark the area to repaint.
//!
//! The form's text fields are read into [`CreateImageEditRequest`] with the same checks and
//! error messages as a JSON generation request (unknown fields refused by name, types checked);
//! the image and the mask are decoded here, checked (format, size, pixel limit, the mask's alpha
//! channel and size), resized to the output size, and handed to the engine with the strength.
//! The answer is the generations' answer: JSON, `url`s, or a stream of `image_edit.*` events.

use std::io::Cursor;
use std::time::Instant;

use axum::extract::multipart::{Multipart, MultipartError, MultipartRejection};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use sana_engine::sana_backend::Image;
use sana_engine::EditRequest;
use serde::Deserialize;
use utoipa::ToSchema;

use crate::error::{parse_json, ApiError, ErrorResponse};
use crate::images::{answer, parse_size, plan};
use crate::state::AppState;
use crate::types::{
    Background, CompletedEvent, CreateImageRequest, ImagesResponse, LoraRequest, OutputFormat,
    PagLayers, Quality, ResponseFormat,
};

/// Most pixels an uploaded image or mask may have (decoding a larger one is refused before its
/// pixels are allocated).
pub const MAX_INPUT_PIXELS: u64 = 4096 * 4096;

/// Strength when the request gives none: inpainting repaints its area from pure noise
/// (`input_fidelity` `high` keeps some of the area's colours); image-to-image keeps the layout
/// (`low`, OpenAI's default) or more of the picture (`high`).
fn default_strength(masked: bool, fidelity: InputFidelity) -> f32 {
    match (masked, fidelity) {
        (true, InputFidelity::Low) => 1.0,
        (true, InputFidelity::High) => 0.85,
        (false, InputFidelity::Low) => 0.8,
        (false, InputFidelity::High) => 0.5,
    }
}

/// How closely the output follows the input image when `strength` is not given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum InputFidelity {
    /// Default: inpainting repaints the masked area from scratch (strength 1.0); without a mask
    /// the image is redrawn keeping its layout (strength 0.8).
    #[default]
    Low,
    /// Keep more of the input: strength 0.85 in a masked area, 0.5 for the whole image.
    High,
}

/// The fields of an edit request (`multipart/form-data`), OpenAI's `images.edit` and this
/// server's extensions. `image` and `mask` are files; the others are text fields.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateImageEditRequest {
    // `image` and `mask` are files, read from the form before these fields; the OpenAPI
    // document lists them (`openapi::MultipartForm`).
    /// What the edited image should show. Required, not blank.
    #[schema(min_length = 1, pattern = r"[^\s\u0085]")]
    pub prompt: String,
    /// The served model name or the loaded model's id; unset: the served model.
    #[serde(default)]
    pub model: Option<String>,
    /// Number of images, 1..=`--max-n` (default 1).
    #[serde(default, deserialize_with = "crate::types::whole::option_u32")]
    #[schema(minimum = 1)]
    pub n: Option<u32>,
    /// `WIDTHxHEIGHT`, or `auto` (default): the input's size, scaled down into the model's limits
    /// if needed and rounded to its `size_multiple`. The image (and mask) are resized to it.
    #[serde(default)]
    pub size: Option<String>,
    /// Mapped to a step count as for generations; `num_inference_steps` wins.
    #[serde(default)]
    pub quality: Option<Quality>,
    /// `b64_json` (default) or `url`.
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
    /// `png` (default), `jpeg` or `webp`.
    #[serde(default)]
    pub output_format: Option<OutputFormat>,
    /// 0..=100: JPEG quality.
    #[serde(default, deserialize_with = "crate::types::whole::option_u32")]
    #[schema(minimum = 0, maximum = 100)]
    pub output_compression: Option<u32>,
    /// `auto` or `opaque`; `transparent` is refused.
    #[serde(default)]
    pub background: Option<Background>,
    /// `low` (default) or `high`: the strength used when `strength` is not given.
    #[serde(default)]
    pub input_fidelity: Option<InputFidelity>,
    /// An end-user id, logged, not stored.
    #[serde(default)]
    pub user: Option<String>,
    /// `true`: server-sent events `image_edit.partial_image` and `image_edit.completed`.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Previews per image while streaming, 0..=3.
    #[serde(default, deserialize_with = "crate::types::whole::option_u32")]
    #[schema(minimum = 0, maximum = 3)]
    pub partial_images: Option<u32>,
    /// Extension: with `stream: true`, also send `image_edit.progress` events after every step.
    #[serde(default)]
    pub progress: Option<bool>,
    /// Extension: the share of the denoising schedule that repaints, in (0, 1] (kept to
    /// thousandths); 1 starts from pure noise. Default: from `input_fidelity`.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1)]
    pub strength: Option<f32>,
    /// Extension: with a mask, keep the original's unmasked pixels in the output, blended over an
    /// 8-pixel feather at the mask's edge (default `true`); `false` returns the decoded image.
    #[serde(default)]
    pub preserve_unmasked: Option<bool>,
    /// Extension: what the image should not show.
    #[serde(default)]
    pub negative_prompt: Option<String>,
    /// Extension: base seed; random when unset.
    #[serde(default, deserialize_with = "crate::types::whole::option_u64")]
    pub seed: Option<u64>,
    /// Extension: denoising steps of the full schedule (the edit runs `steps × strength`, rounded
    /// down, of them).
    #[serde(default, deserialize_with = "crate::types::whole::option_u32")]
    #[schema(minimum = 1)]
    pub num_inference_steps: Option<u32>,
    /// Extension: classifier-free guidance scale, 0 to 100 (≤ 1 turns guidance off).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 100)]
    pub guidance_scale: Option<f32>,
    /// Extension: LoRA adapters as in generations, the form field holding their JSON array
    /// (`[{"name": "style", "scale": 0.8}]`).
    #[serde(default)]
    pub lora: Option<Vec<LoraRequest>>,
    /// Extension: PAG scale as in generations.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 100)]
    pub pag_scale: Option<f32>,
    /// Extension: PAG's adaptive scale as in generations.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 100)]
    pub pag_adaptive_scale: Option<f32>,
    /// Extension: PAG's blocks as in generations: an index or name, or a JSON array of them.
    #[serde(default)]
    pub pag_applied_layers: Option<PagLayers>,
}

/// Text fields whose values are numbers or booleans in [`CreateImageEditRequest`].
const NUMBERS: [&str; 9] = [
    "n",
    "output_compression",
    "partial_images",
    "strength",
    "seed",
    "num_inference_steps",
    "guidance_scale",
    "pag_scale",
    "pag_adaptive_scale",
];
/// Text fields that hold JSON: `lora` always, `pag_applied_layers` when it is a list.
const JSON_FIELDS: [&str; 2] = ["lora", "pag_applied_layers"];
const BOOLEANS: [&str; 3] = ["stream", "preserve_unmasked", "progress"];

/// The form as received: the files, and the text fields as a JSON object for [`parse_json`].
#[derive(Default)]
struct Form {
    images: Vec<Vec<u8>>,
    mask: Option<Vec<u8>>,
    fields: serde_json::Map<String, serde_json::Value>,
}

async fn read_form(mut multipart: Multipart, limit: usize) -> Result<Form, ApiError> {
    let form_error = |err: MultipartError| form_error(err, limit);
    let mut form = Form::default();
    while let Some(field) = multipart.next_field().await.map_err(form_error)? {
        let name = field.name().unwrap_or_default().to_string();
        match name.as_str() {
            "image" | "image[]" => form
                .images
                .push(field.bytes().await.map_err(form_error)?.to_vec()),
            "mask" => {
                if form.mask.is_some() {
                    return Err(ApiError::invalid_value(
                        "mask",
                        "give one `mask`, not several",
                    ));
                }
                form.mask = Some(field.bytes().await.map_err(form_error)?.to_vec());
            }
            _ => {
                let text = field.text().await.map_err(form_error)?;
                let value = field_value(&name, text)?;
                if form.fields.insert(name.clone(), value).is_some() {
                    return Err(ApiError::invalid_value(
                        &name,
                        format!("`{name}` is given more than once"),
                    ));
                }
            }
        }
    }
    Ok(form)
}

/// A text field as the JSON value the request type expects.
fn field_value(name: &str, text: String) -> Result<serde_json::Value, ApiError> {
    if BOOLEANS.contains(&name) {
        return match text.trim().to_ascii_lowercase().as_str() {
            "true" | "1" => Ok(true.into()),
            "false" | "0" => Ok(false.into()),
            other => Err(ApiError::invalid_request(
                Some(name.into()),
                "invalid_type",
                format!("`{name}` must be `true` or `false`, got `{other}`"),
            )),
        };
    }
    if NUMBERS.contains(&name) {
        return serde_json::from_str::<serde_json::Number>(text.trim())
            .map(serde_json::Value::Number)
            .map_err(|_| {
                ApiError::invalid_request(
                    Some(name.into()),
                    "invalid_type",
                    format!("`{name}` must be a number, got `{text}`"),
                )
            });
    }
    if JSON_FIELDS.contains(&name) && (name == "lora" || text.trim_start().starts_with('[')) {
        return serde_json::from_str(&text).map_err(|e| {
            ApiError::invalid_request(
                Some(name.into()),
                "invalid_type",
                format!("`{name}` must hold JSON (e.g. `[{{\"name\": \"style\", \"scale\": 0.8}}]` for `lora`): {e}"),
            )
        });
    }
    Ok(serde_json::Value::String(text))
}

fn form_error(err: MultipartError, limit: usize) -> ApiError {
    if err.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::payload_too_large(limit);
    }
    ApiError::invalid_request(
        None,
        "invalid_multipart",
        format!(
            "the multipart/form-data body could not be read: {}",
            err.body_text()
        ),
    )
}

/// Decodes an upload (PNG, JPEG or WebP), refusing more than [`MAX_INPUT_PIXELS`] before the
/// pixels are allocated.
pub(crate) fn decode(param: &str, bytes: &[u8]) -> Result<image::DynamicImage, ApiError> {
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|err| {
            ApiError::invalid_request(Some(param.into()), "invalid_image", err.to_string())
        })?;
    let Some(format) = reader.format() else {
        return Err(ApiError::invalid_request(
            Some(param.into()),
            "invalid_image",
            format!("`{param}` is not an image: send a PNG, JPEG or WebP file"),
        ));
    };
    let (width, height) = image::ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|err| undecodable(param, &err))?;
    if u64::from(width) * u64::from(height) > MAX_INPUT_PIXELS {
        return Err(ApiError::invalid_request(
            Some(param.into()),
            "image_too_large",
            format!(
                "`{param}` is {width}x{height}, above the limit of {MAX_INPUT_PIXELS} pixels \
                 (4096x4096); send a smaller image"
            ),
        ));
    }
    reader.decode().map_err(|err| undecodable(param, &err))
}

fn undecodable(param: &str, err: &image::ImageError) -> ApiError {
    ApiError::invalid_request(
        Some(param.into()),
        "invalid_image",
        format!("`{param}` could not be decoded (a damaged or truncated file?): {err}"),
    )
}

/// `auto`: the input's size, scaled down into the model's limits, rounded to its multiple.
fn auto_size(width: u32, height: u32, state: &AppState) -> (u32, u32) {
    let info = state.engine().info();
    let m = info.size_multiple.max(1);
    let scale = (f64::from(info.max_width) / f64::from(width))
        .min(f64::from(info.max_height) / f64::from(height))
        .min(1.0);
    let side = |v: u32, min: u32, max: u32| {
        let scaled = (f64::from(v) * scale / f64::from(m)).round() as u32 * m;
        scaled.clamp(min.div_ceil(m) * m, (max / m) * m)
    };
    (
        side(width, info.min_width, info.max_width),
        side(height, info.min_height, info.max_height),
    )
}

/// Edits an image (OpenAI `POST /v1/images/edits`).
#[utoipa::path(
    post,
    path = "/v1/images/edits",
    tag = "images",
    request_body(content = CreateImageEditRequest, content_type = "multipart/form-data"),
    responses(
        (status = 200, description = "The edited images as JSON, with timing headers; or, with \
            `stream: true`, a `text/event-stream` of `image_edit.partial_image` and \
            `image_edit.completed` (on failure `error`) events, with the shapes of the generations' events",
            content(
                (ImagesResponse = "application/json"),
                (CompletedEvent = "text/event-stream"),
            )),
        (status = 400, description = "A missing or invalid field, named in `param`: not an image, an undecodable file, an image over 4096×4096 pixels, more than one image, a mask without alpha or of another size than the image, a missing prompt, a strength outside (0, 1] or too small for the steps", body = ErrorResponse),
        (status = 401, description = "Missing or invalid API key", body = ErrorResponse),
        (status = 404, description = "Unknown `model`", body = ErrorResponse),
        (status = 413, description = "Body larger than --max-upload-bytes", body = ErrorResponse),
        (status = 415, description = "Body not sent as multipart/form-data", body = ErrorResponse),
        (status = 429, description = "Rate limit or admission limit reached; see Retry-After", body = ErrorResponse,
            headers(("Retry-After" = u64, description = "Seconds to wait"),
                ("x-should-retry" = String, description = "`true`"))),
        (status = 500, description = "The edit failed: type `backend` (a device error or a panic; the worker is rebuilt), or, with `x-should-retry: false` because the same request fails again, `out_of_memory` (a smaller size or `n` may fit), `model` (the model as loaded cannot run it), `url_store` (a `url` image larger than --url-store-bytes; `b64_json` works)", body = ErrorResponse,
            headers(("x-should-retry" = String, description = "`false` for `out_of_memory`, `model` and `url_store`; absent otherwise"))),
        (status = 503, description = "No healthy worker, a worker hung and is being replaced (`worker_hung`), or shutting down; see Retry-After", body = ErrorResponse,
            headers(("Retry-After" = u64, description = "Seconds to wait"),
                ("x-should-retry" = String, description = "`true`"))),
        (status = 504, description = "Took longer than --request-timeout", body = ErrorResponse),
    ),
    security(("api_key" = []))
)]
pub async fn edits(
    State(state): State<AppState>,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let multipart = multipart.map_err(|err| {
        ApiError::unsupported_media_type(format!(
            "an edit is sent as multipart/form-data with an `image` file and a `prompt` field: {}",
            err.body_text()
        ))
    })?;
    let form = read_form(multipart, state.config().max_upload_bytes).await?;
    let fields = serde_json::to_vec(&form.fields).map_err(ApiError::internal)?;
    let req: CreateImageEditRequest = parse_json(&fields)?;
    let image_bytes = match form.images.as_slice() {
        [one] => one,
        [] => {
            return Err(ApiError::invalid_request(
                Some("image".into()),
                "missing_parameter",
                "`image` is required: the file to edit",
            ))
        }
        several => {
            return Err(ApiError::invalid_value(
                "image",
                format!(
                    "{} images were sent; this model edits one image per request",
                    several.len()
                ),
            ))
        }
    };
    let image = decode("image", image_bytes)?.to_rgb8();
    let (in_w, in_h) = image.dimensions();
    let mask = match &form.mask {
        None => None,
        Some(bytes) => {
            let mask = decode("mask", bytes)?;
            if (mask.width(), mask.height()) != (in_w, in_h) {
                return Err(ApiError::invalid_value(
                    "mask",
                    format!(
                        "the mask is {}x{} but the image is {in_w}x{in_h}; they must be the same size",
                        mask.width(),
                        mask.height()
                    ),
                ));
            }
            if !mask.color().has_alpha() {
                return Err(ApiError::invalid_value(
                    "mask",
                    "the mask has no alpha channel: send a PNG whose transparent pixels mark \
                     the area to edit",
                ));
            }
            // 255 − alpha: transparent (alpha 0) = repaint; split at one half later.
            let rgba = mask.to_rgba8();
            Some(image::GrayImage::from_fn(in_w, in_h, |x, y| {
                image::Luma([255 - rgba.get_pixel(x, y).0[3]])
            }))
        }
    };
    let size = match req.size.as_deref().map(str::trim) {
        None | Some("auto") => {
            let (w, h) = auto_size(in_w, in_h, &state);
            Some(format!("{w}x{h}"))
        }
        Some(other) => Some(other.to_string()),
    };
    let masked = mask.is_some();
    let strength = req
        .strength
        .unwrap_or_else(|| default_strength(masked, req.input_fidelity.unwrap_or_default()));
    let preserve_unmasked = req.preserve_unmasked.unwrap_or(true);
    let generation = CreateImageRequest {
        prompt: req.prompt,
        model: req.model,
        n: req.n,
        size: size.clone(),
        quality: req.quality,
        response_format: req.response_format,
        output_format: req.output_format,
        output_compression: req.output_compression,
        background: req.background,
        style: None,
        moderation: None,
        user: req.user,
        stream: req.stream,
        partial_images: req.partial_images,
        progress: req.progress,
        negative_prompt: req.negative_prompt,
        seed: req.seed,
        num_inference_steps: req.num_inference_steps,
        guidance_scale: req.guidance_scale,
        lora: req.lora,
        pag_scale: req.pag_scale,
        pag_adaptive_scale: req.pag_adaptive_scale,
        pag_applied_layers: req.pag_applied_layers,
        control_image: None,
        controlnet: None,
        controlnet_conditioning_scale: None,
    };
    let mut plan = plan(generation, &state)?;
    plan.events = "image_edit";
    let (w, h) = size
        .as_deref()
        .and_then(parse_size)
        .unwrap_or((plan.width, plan.height));
    let filter = image::imageops::FilterType::Lanczos3;
    let resized = if (w, h) == (in_w, in_h) {
        image
    } else {
        image::imageops::resize(&image, w, h, filter)
    };
    let mask = mask.map(|m| {
        if (w, h) == (in_w, in_h) {
            m.into_raw()
        } else {
            image::imageops::resize(&m, w, h, filter).into_raw()
        }
    });
    plan.engine.edit = Some(EditRequest {
        image: Image {
            width: w,
            height: h,
            rgb8: resized.into_raw(),
        },
        mask,
        strength,
        preserve_unmasked,
    });
    answer(&state, &headers, plan, started).await
}
