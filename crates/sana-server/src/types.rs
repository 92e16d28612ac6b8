//! OpenAI-compatible request and response types (OpenAI `openapi.yaml`: `CreateImageRequest`,
//! `ImagesResponse`, `Image`, `ImageGenPartialImageEvent`, `ImageGenCompletedEvent`,
//! `ListModelsResponse`, `Model`) plus our documented extensions.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /v1/images/generations`. Fields follow OpenAI's `CreateImageRequest`; `negative_prompt`,
/// `seed`, `num_inference_steps` and `guidance_scale` are Sana extensions (send them with the
/// OpenAI SDK through `extra_body`). Unknown fields are refused (400 `unknown_parameter`) rather
/// than silently ignored; `null` is accepted wherever a field is optional and means "default".
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"prompt": "a red fox in the snow, watercolor", "size": "1024x1024", "n": 1}))]
pub struct CreateImageRequest {
    /// What to draw. Required, not blank, at most `--max-prompt-chars` characters.
    #[schema(min_length = 1, pattern = r"[^\s\u0085]")]
    pub prompt: String,
    /// The served model name (see `/v1/models`) or the loaded model's id; any other name is a 404.
    /// Unset: the served model.
    #[serde(default)]
    pub model: Option<String>,
    /// Number of images, 1..=`--max-n` (default 1). Image `i` uses seed `seed + i`.
    #[serde(default, deserialize_with = "crate::types::whole::option_u32")]
    #[schema(minimum = 1, example = 1)]
    pub n: Option<u32>,
    /// `WIDTHxHEIGHT` in pixels, each a multiple of the model's `size_multiple` within its limits
    /// (see `/info`), or `auto` (default) for the model's native size.
    #[serde(default)]
    #[schema(example = "1024x1024")]
    pub size: Option<String>,
    /// Mapped to a step count (default `auto`); see `Quality`. `num_inference_steps` wins
    /// when both are given.
    #[serde(default)]
    pub quality: Option<Quality>,
    /// `b64_json` (default): the image inline as plain base64 (no `data:` prefix); `url`: a link
    /// valid for `--url-ttl` (default one hour).
    #[serde(default)]
    pub response_format: Option<ResponseFormat>,
    /// Image encoding (default `png`).
    #[serde(default)]
    pub output_format: Option<OutputFormat>,
    /// 0..=100 (default 100): the JPEG quality. PNG and WebP are encoded losslessly, so it has no
    /// effect on them.
    #[serde(default, deserialize_with = "crate::types::whole::option_u32")]
    #[schema(minimum = 0, maximum = 100)]
    pub output_compression: Option<u32>,
    /// `auto` (default) or `opaque`: Sana's images have no alpha channel, so `transparent` is
    /// refused with 400.
    #[serde(default)]
    pub background: Option<Background>,
    /// Accepted for compatibility; has no effect (a dall-e-3 setting).
    #[serde(default)]
    pub style: Option<Style>,
    /// Accepted for compatibility; has no effect (this server runs no moderation model).
    #[serde(default)]
    pub moderation: Option<Moderation>,
    /// An end-user id; written to the server log with the request, not stored.
    #[serde(default)]
    pub user: Option<String>,
    /// `true`: answer with server-sent events (`image_generation.partial_image`, then
    /// `image_generation.completed` per image) instead of one JSON body. Needs `b64_json`.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Preview images per generated image while streaming, 0..=3 (default 0); needs
    /// `stream: true`.
    #[serde(default, deserialize_with = "crate::types::whole::option_u32")]
    #[schema(minimum = 0, maximum = 3)]
    pub partial_images: Option<u32>,
    /// Extension: with `stream: true`, also send an `image_generation.progress` event (see
    /// `ProgressEvent`) after every denoising step (default `false`: OpenAI's events only).
    #[serde(default)]
    pub progress: Option<bool>,
    /// Extension: what the image should not show (the unconditional branch of guidance).
    #[serde(default)]
    pub negative_prompt: Option<String>,
    /// Extension: base seed for reproducible images; random when unset (returned per image).
    #[serde(default, deserialize_with = "crate::types::whole::option_u64")]
    pub seed: Option<u64>,
    /// Extension: denoising steps, 1..=`--max-steps`; the model's default (see `/info`) when unset.
    #[serde(default, deserialize_with = "crate::types::whole::option_u32")]
    #[schema(minimum = 1)]
    pub num_inference_steps: Option<u32>,
    /// Extension: classifier-free guidance scale, 0 to 100 (≤ 1 turns guidance off); the model's
    /// default when unset.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 100)]
    pub guidance_scale: Option<f32>,
    /// Extension: LoRA adapters to apply, by the names the server loaded (`sana serve --lora
    /// NAME=PATH`; listed by `GET /v1/models`), each at most once. Requests with different
    /// adapters still share a batch: the adapters are applied per image, never merged.
    #[serde(default)]
    pub lora: Option<Vec<LoraRequest>>,
    /// Extension: perturbed-attention guidance scale, 0 to 100 (0 turns PAG off; diffusers'
    /// `SanaPAGPipeline` uses 3.0). Default: 3.0 for a `SanaPAGPipeline` model folder, else 0. PAG
    /// adds one transformer row per image (≈1.5× the time per step with guidance).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 100)]
    pub pag_scale: Option<f32>,
    /// Extension: PAG's adaptive scale, 0 to 100 (default 0): at timestep `t` (1000 → 0) the PAG
    /// scale is `max(0, pag_scale − pag_adaptive_scale·(1000 − t))`.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 100)]
    pub pag_adaptive_scale: Option<f32>,
    /// Extension: the transformer blocks PAG perturbs, as diffusers' `pag_applied_layers` takes
    /// them (default: block 0 as in diffusers, or an NVlabs YAML's `pag_applied_layers`): a block
    /// index, or a name searched as a regular
    /// expression in `transformer_blocks.<i>.attn1` (so `transformer_blocks.1` also selects blocks
    /// 10–19, as in diffusers; use the index `1` for block 1 alone), or a list of these.
    #[serde(default)]
    pub pag_applied_layers: Option<PagLayers>,
    /// Extension: a ControlNet's control image (the released HED ControlNets take white edges
    /// on black), base64 PNG, JPEG or WebP, plain or as a `data:` URL; resized to the output size.
    /// Needs a ControlNet loaded (`sana serve --controlnet NAME=PATH`).
    #[serde(default)]
    pub control_image: Option<String>,
    /// Extension: the ControlNet to use, by name (`GET /v1/models`: `data[].controlnets`); may be
    /// left out when the server loaded one.
    #[serde(default)]
    pub controlnet: Option<String>,
    /// Extension: how strongly the control image steers, −100 to 100 (default 1; diffusers'
    /// `controlnet_conditioning_scale`). Needs `control_image`.
    #[serde(default)]
    #[schema(minimum = -100, maximum = 100)]
    pub controlnet_conditioning_scale: Option<f32>,
}

/// One LoRA adapter of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoraRequest {
    /// An adapter name from `GET /v1/models` (`data[].lora_adapters[].name`).
    pub name: String,
    /// Multiplies the adapter's trained strength (its `alpha / rank`); 1 (default) applies it as
    /// trained, 0 switches it off, negative values subtract it. Finite, −100 to 100.
    #[serde(default = "one")]
    #[schema(minimum = -100, maximum = 100, default = 1.0)]
    pub scale: f32,
}

fn one() -> f32 {
    1.0
}

/// PAG blocks: one entry or a list (see `pag_applied_layers`).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(untagged)]
pub enum PagLayers {
    /// One block index or name.
    One(PagLayer),
    /// Several; their blocks together.
    Many(Vec<PagLayer>),
}

/// A block index (`8`) or a name (`transformer_blocks.8`).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(untagged)]
pub enum PagLayer {
    /// A block index, `0..` the model's block count.
    Index(u32),
    /// A name or regular expression matched against `transformer_blocks.<i>.attn1`.
    Name(String),
}

impl PagLayer {
    /// An index (a whole number, `3` or `3.0`) or a name.
    fn from_json(value: &serde_json::Value) -> Result<Self, String> {
        match value {
            serde_json::Value::String(name) => Ok(Self::Name(name.clone())),
            serde_json::Value::Number(n) => n
                .as_u64()
                .or_else(|| {
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(f))
                        .map(|f| f as u64)
                })
                .and_then(|v| u32::try_from(v).ok())
                .map(Self::Index)
                .ok_or_else(|| format!("{n} is not a block index (a whole number ≥ 0)")),
            other => Err(format!(
                "expected a block index or name, or a list of them, got {other}"
            )),
        }
    }
}

impl<'de> Deserialize<'de> for PagLayers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        match &value {
            serde_json::Value::Array(items) => items
                .iter()
                .map(PagLayer::from_json)
                .collect::<Result<Vec<_>, _>>()
                .map(Self::Many),
            one => PagLayer::from_json(one).map(Self::One),
        }
        .map_err(serde::de::Error::custom)
    }
}

impl PagLayers {
    /// The entries as diffusers' strings.
    pub fn specs(&self) -> Vec<String> {
        let text = |l: &PagLayer| match l {
            PagLayer::Index(i) => i.to_string(),
            PagLayer::Name(n) => n.clone(),
        };
        match self {
            Self::One(l) => vec![text(l)],
            Self::Many(v) => v.iter().map(text).collect(),
        }
    }
}

/// Requested quality, mapped to denoising steps relative to the model's default step count `D`
/// (20 for Sana): `low` → `max(1, D/2)`; `medium` and `standard` → `D`; `high` and `hd` →
/// `min(2·D, --max-steps)`; `auto` → `D`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Quality {
    /// The model's default steps.
    #[default]
    Auto,
    /// Half the default steps: faster, rougher.
    Low,
    /// The default steps.
    Medium,
    /// Twice the default steps (capped by `--max-steps`).
    High,
    /// dall-e-3 spelling of `medium`.
    Standard,
    /// dall-e-3 spelling of `high`.
    Hd,
}

impl Quality {
    /// The name as sent.
    pub fn as_str(self) -> &'static str {
        match self {
            Quality::Auto => "auto",
            Quality::Low => "low",
            Quality::Medium => "medium",
            Quality::High => "high",
            Quality::Standard => "standard",
            Quality::Hd => "hd",
        }
    }

    /// Steps for this quality given the model's default steps and the server's step limit.
    pub fn steps(self, default_steps: u32, max_steps: u32) -> u32 {
        let steps = match self {
            Quality::Auto | Quality::Medium | Quality::Standard => default_steps,
            Quality::Low => (default_steps / 2).max(1),
            Quality::High | Quality::Hd => default_steps.saturating_mul(2),
        };
        steps.min(max_steps.max(1))
    }
}

/// How images come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResponseFormat {
    /// Inline, plain base64.
    #[default]
    B64Json,
    /// A link to `GET /v1/images/files/{file}`, valid for `--url-ttl`.
    Url,
}

/// Image encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OutputFormat {
    /// PNG (lossless).
    #[default]
    Png,
    /// JPEG; `output_compression` is its quality.
    Jpeg,
    /// WebP (lossless).
    Webp,
}

impl OutputFormat {
    /// The name as sent.
    pub fn as_str(self) -> &'static str {
        match self {
            OutputFormat::Png => "png",
            OutputFormat::Jpeg => "jpeg",
            OutputFormat::Webp => "webp",
        }
    }

    /// The MIME type.
    pub fn content_type(self) -> &'static str {
        match self {
            OutputFormat::Png => "image/png",
            OutputFormat::Jpeg => "image/jpeg",
            OutputFormat::Webp => "image/webp",
        }
    }
}

/// Background handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Background {
    /// Opaque (what Sana makes).
    #[default]
    Auto,
    /// Opaque.
    Opaque,
    /// Refused with 400: Sana's images have no alpha channel.
    Transparent,
}

/// dall-e-3's style; accepted, no effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Style {
    /// No effect.
    Vivid,
    /// No effect.
    Natural,
}

/// GPT-image moderation level; accepted, no effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Moderation {
    /// No effect.
    Low,
    /// No effect.
    Auto,
}

/// The answer of a non-streaming generation (OpenAI `ImagesResponse`). Timing headers come with
/// it: `x-queue-time`, `x-inference-time`, `x-total-time` (milliseconds). `usage` is not
/// reported: the server does not tokenize prompts (the model does).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ImagesResponse {
    /// Unix time of the answer, in seconds.
    pub created: u64,
    /// One entry per image, in order.
    pub data: Vec<ImageData>,
    /// Always `opaque`.
    pub background: String,
    /// The encoding of the images.
    pub output_format: OutputFormat,
    /// `WIDTHxHEIGHT` of the images.
    pub size: String,
    /// The quality asked for (`auto` when unset).
    pub quality: Quality,
}

/// One image (OpenAI `Image`): exactly one of `b64_json` and `url`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ImageData {
    /// The encoded image, plain base64 (no `data:` prefix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub b64_json: Option<String>,
    /// A link to the image, valid for `--url-ttl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Extension: the seed this image was drawn from; send it back as `seed` (with `n: 1`) to
    /// get the same image again.
    pub seed: u64,
}

/// SSE event `image_generation.partial_image`: a preview of image `image_index` while it is
/// denoised (OpenAI `ImageGenPartialImageEvent`), at the requested size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PartialImageEvent {
    /// Always `image_generation.partial_image`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The preview, plain base64 in `output_format`.
    pub b64_json: String,
    /// Unix time of the event, in seconds.
    pub created_at: u64,
    /// `WIDTHxHEIGHT` of the request.
    pub size: String,
    /// The quality asked for.
    pub quality: Quality,
    /// Always `opaque`.
    pub background: String,
    /// The encoding.
    pub output_format: OutputFormat,
    /// 0-based index of this preview among the previews of its image.
    pub partial_image_index: u32,
    /// Extension: which image of the request (0..n) this is a preview of.
    pub image_index: u32,
}

/// Extension SSE event `image_generation.progress` (`image_edit.progress` for edits), sent after
/// every denoising step when the request sets `progress: true`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProgressEvent {
    /// `image_generation.progress` or `image_edit.progress`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Steps done, 1..=`steps`.
    pub step: u32,
    /// Steps this request runs (an edit runs `steps × strength` of its schedule).
    pub steps: u32,
    /// Unix time of the event, in seconds.
    pub created_at: u64,
}

/// SSE event `image_generation.completed`: one final image (OpenAI `ImageGenCompletedEvent`);
/// one per image of the request, in order, after its partial images. `usage` is not reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CompletedEvent {
    /// Always `image_generation.completed`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The image, plain base64 in `output_format`.
    pub b64_json: String,
    /// Unix time of the event, in seconds.
    pub created_at: u64,
    /// `WIDTHxHEIGHT` of the image.
    pub size: String,
    /// The quality asked for.
    pub quality: Quality,
    /// Always `opaque`.
    pub background: String,
    /// The encoding.
    pub output_format: OutputFormat,
    /// Extension: which image of the request (0..n) this is.
    pub image_index: u32,
    /// Extension: the seed this image was drawn from.
    pub seed: u64,
}

/// SSE event `error`: the generation failed after the stream began. The data is
/// `{"type":"error","error":{…}}` with the usual envelope fields; the stream ends after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StreamErrorEvent {
    /// Always `error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// What went wrong.
    pub error: crate::error::ErrorDetail,
}

/// `GET /v1/models` (OpenAI `ListModelsResponse`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    /// The one served model.
    pub data: Vec<Model>,
}

/// A served model (OpenAI `Model`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Model {
    /// The name to send as `model`.
    pub id: String,
    /// Always `model`.
    pub object: String,
    /// Unix time the server started, in seconds.
    pub created: u64,
    /// Always `sana-server`.
    pub owned_by: String,
    /// Extension: the LoRA adapters a request may choose (`lora`), empty when none is loaded.
    pub lora_adapters: Vec<LoraAdapter>,
    /// Extension: the ControlNets a request may choose (`controlnet`), empty when none is loaded.
    pub controlnets: Vec<String>,
}

/// A loaded LoRA adapter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LoraAdapter {
    /// The name a request gives in `lora`.
    pub name: String,
    /// Where it was loaded from.
    pub source: String,
    /// Transformer modules it changes.
    pub modules: u32,
    /// Its ranks.
    pub ranks: Vec<u32>,
}

/// `GET /health`: the process is up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HealthResponse {
    /// Always `ok`.
    pub status: String,
    /// Extension: whether the other routes want `Authorization: Bearer <key>` (so a client, such
    /// as the playground, can ask for a key before its first call instead of after a 401).
    pub api_key_required: bool,
}

/// `GET /ready`: the model is loaded and a worker can serve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReadyResponse {
    /// Always `ready` (a server that is not ready answers 503 with the error envelope).
    pub status: String,
    /// One entry per device worker.
    pub workers: Vec<WorkerInfo>,
}

/// One device worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WorkerInfo {
    /// Its device (`cuda:0`, `cpu`).
    pub device: String,
    /// `starting`, `ready`, `busy`, `restarting`, `unhealthy` or `stopped`.
    pub state: String,
    /// How often its backend was rebuilt after a crash.
    pub restarts: u32,
}

/// `GET /info`: what is served and what it accepts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct InfoResponse {
    /// The name to send as `model`.
    pub served_model_name: String,
    /// The loaded model's id.
    pub model_id: String,
    /// Compute dtype (`bf16`, `f32`, …).
    pub dtype: String,
    /// Device of the first worker.
    pub device: String,
    /// Every worker.
    pub workers: Vec<WorkerInfo>,
    /// The server version.
    pub version: String,
    /// What a request may ask for.
    pub limits: Limits,
    /// Defaults of unset fields.
    pub defaults: Defaults,
    /// Steps each `quality` maps to.
    pub quality_steps: QualitySteps,
}

/// Request limits of this server and model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Limits {
    /// Smallest width.
    pub min_width: u32,
    /// Smallest height.
    pub min_height: u32,
    /// Largest width.
    pub max_width: u32,
    /// Largest height.
    pub max_height: u32,
    /// Width and height are multiples of this.
    pub size_multiple: u32,
    /// Largest `n`.
    pub max_n: u32,
    /// Largest `num_inference_steps`.
    pub max_steps: u32,
    /// Longest prompt, in characters.
    pub max_prompt_chars: usize,
    /// Largest `partial_images`.
    pub max_partial_images: u32,
    /// Images per batch.
    pub max_batch_images: usize,
    /// Requests in flight before 429.
    pub max_concurrent_requests: usize,
    /// Largest body, in bytes.
    pub max_body_bytes: usize,
    /// Largest body of an image upload (`POST /v1/images/edits`), in bytes.
    pub max_upload_bytes: usize,
    /// Longest request, in seconds.
    pub request_timeout_secs: f64,
}

/// Values used for unset fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Defaults {
    /// `WIDTHxHEIGHT` of `size: auto`.
    pub size: String,
    /// Steps of `quality: auto`.
    pub num_inference_steps: u32,
    /// Guidance scale.
    pub guidance_scale: f32,
    /// Sampler.
    pub sampler: String,
}

/// Steps per `quality`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct QualitySteps {
    /// Steps of `low`.
    pub low: u32,
    /// Steps of `medium`, `standard` and `auto`.
    pub medium: u32,
    /// Steps of `high` and `hd`.
    pub high: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quality_maps_to_steps_around_the_default() {
        assert_eq!(Quality::Auto.steps(20, 100), 20);
        assert_eq!(Quality::Medium.steps(20, 100), 20);
        assert_eq!(Quality::Standard.steps(20, 100), 20);
        assert_eq!(Quality::Low.steps(20, 100), 10);
        assert_eq!(Quality::High.steps(20, 100), 40);
        assert_eq!(Quality::Hd.steps(20, 100), 40);
        assert_eq!(Quality::High.steps(20, 30), 30, "capped by --max-steps");
        assert_eq!(Quality::Low.steps(1, 100), 1, "never zero steps");
        assert_eq!(Quality::High.steps(2, 100), 4, "few-step models scale too");
    }
}

/// Whole-number fields that accept what JSON Schema calls an integer: `3` and `3.0` alike (a
/// client's JSON encoder may write any whole number as a float), but not `3.5`, a negative
/// number, or one beyond the field's type.
pub(crate) mod whole {
    use std::fmt;
    use std::marker::PhantomData;

    use serde::de::{self, Deserializer, Unexpected, Visitor};

    struct Whole<T>(PhantomData<T>);

    impl<'de, T: TryFrom<u64> + Bounded> Visitor<'de> for Whole<T> {
        type Value = Option<T>;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "a whole number from 0 to {} ({})", T::MAX, T::NAME)
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            T::try_from(v)
                .map(Some)
                .map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            match u64::try_from(v) {
                Ok(v) => self.visit_u64(v),
                Err(_) => Err(E::invalid_value(Unexpected::Signed(v), &self)),
            }
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            // Every whole f64 below 2^64 converts to u64 exactly.
            // A fraction is the wrong type (JSON Schema's `integer`); a whole number out of range
            // is the wrong value, as for integers.
            if v.fract() != 0.0 || !v.is_finite() {
                Err(E::invalid_type(Unexpected::Float(v), &self))
            } else if (0.0..18_446_744_073_709_551_616.0).contains(&v) {
                self.visit_u64(v as u64)
            } else {
                Err(E::invalid_value(Unexpected::Float(v), &self))
            }
        }
    }

    /// The largest value and the type's name, for the message.
    pub(crate) trait Bounded {
        const MAX: u64;
        const NAME: &'static str;
    }

    impl Bounded for u32 {
        const MAX: u64 = u32::MAX as u64;
        const NAME: &'static str = "u32";
    }

    impl Bounded for u64 {
        const MAX: u64 = u64::MAX;
        const NAME: &'static str = "u64";
    }

    pub(crate) fn option_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        d.deserialize_option(Whole::<u32>(PhantomData))
    }

    pub(crate) fn option_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        d.deserialize_option(Whole::<u64>(PhantomData))
    }

    #[cfg(test)]
    mod tests {
        use serde::Deserialize;

        #[derive(Deserialize, Debug, PartialEq)]
        struct Form {
            #[serde(default, deserialize_with = "super::option_u32")]
            n: Option<u32>,
            #[serde(default, deserialize_with = "super::option_u64")]
            seed: Option<u64>,
        }

        fn parse(json: &str) -> Result<Form, String> {
            serde_json::from_str(json).map_err(|e| e.to_string())
        }

        #[test]
        fn whole_numbers_in_any_spelling() {
            let form = |n, seed| Form { n, seed };
            assert_eq!(parse("{}"), Ok(form(None, None)));
            assert_eq!(parse(r#"{"n": null, "seed": null}"#), Ok(form(None, None)));
            assert_eq!(parse(r#"{"n": 3, "seed": 7}"#), Ok(form(Some(3), Some(7))));
            assert_eq!(
                parse(r#"{"n": 3.0, "seed": 1e17}"#),
                Ok(form(Some(3), Some(100_000_000_000_000_000)))
            );
            assert_eq!(
                parse(r#"{"seed": 18446744073709551615}"#),
                Ok(form(None, Some(u64::MAX)))
            );
            for bad in [
                r#"{"n": 3.5}"#,
                r#"{"n": -1}"#,
                r#"{"n": 4294967296}"#,
                r#"{"n": "3"}"#,
                r#"{"seed": 1.8446744073709552e19}"#,
                r#"{"seed": -0.5}"#,
            ] {
                let err = parse(bad).expect_err(bad);
                assert!(err.contains("a whole number from 0 to"), "{bad}: {err}");
            }
        }
    }
}
