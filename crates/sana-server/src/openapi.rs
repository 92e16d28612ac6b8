//! The OpenAPI document, generated from the handlers' `#[utoipa::path]` attributes and the types'
//! `ToSchema` derives. A copy is committed as `openapi.yaml` at the repository root and a test
//! fails when the two drift (`cargo run -p sana-server --example openapi > openapi.yaml`
//! regenerates it).

use serde_json::{json, Value};
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, Schema, SchemaFormat, SchemaType, Type};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::RefOr;
use utoipa::{Modify, OpenApi};

use crate::edits::{CreateImageEditRequest, InputFidelity};
use crate::error::{ErrorDetail, ErrorResponse};
use crate::types::{
    Background, CompletedEvent, CreateImageRequest, ImageData, ImagesResponse, LoraAdapter,
    LoraRequest, Model, ModelList, Moderation, OutputFormat, PagLayer, PagLayers,
    PartialImageEvent, ProgressEvent, Quality, ResponseFormat, StreamErrorEvent, Style,
};
use crate::{edits, images, meta};

/// The API of `sana serve`.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Sana server",
        description = "OpenAI-compatible text-to-image API for Sana. Errors use OpenAI's envelope \
            `{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`. When the server has API keys, \
            every route but `/health` and `/v1/images/files/{file}` needs `Authorization: Bearer <key>`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    paths(
        images::generations,
        edits::edits,
        images::file,
        meta::models,
        meta::model_by_name,
        meta::health,
        meta::ready,
        meta::info,
        meta::metrics,
        meta::openapi,
    ),
    components(schemas(
        CreateImageRequest, CreateImageEditRequest, InputFidelity, Quality, ResponseFormat, OutputFormat, Background, Style, Moderation,
        ImagesResponse, ImageData, PartialImageEvent, ProgressEvent, CompletedEvent, StreamErrorEvent,
        ModelList, Model, LoraAdapter, LoraRequest, PagLayers, PagLayer, ErrorResponse, ErrorDetail,
    )),
    modifiers(&BearerAuth, &MultipartForm, &Seeds),
    tags(
        (name = "images", description = "Image generation and edits (OpenAI Images API)"),
        (name = "models", description = "The served model (OpenAI Models API)"),
        (name = "operations", description = "Health, readiness, limits, metrics"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// The edit form is `multipart/form-data`: its two files are string/binary properties (`image`
/// required), and a text field is present or absent, never `null`.
struct MultipartForm;

impl Modify for MultipartForm {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let Some(RefOr::T(Schema::Object(form))) = openapi
            .components
            .as_mut()
            .and_then(|c| c.schemas.get_mut("CreateImageEditRequest"))
        else {
            return;
        };
        let file = |description: &str| {
            RefOr::T(Schema::Object(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
                    .description(Some(description))
                    .build(),
            ))
        };
        let mut properties = std::mem::take(&mut form.properties);
        form.properties.insert(
            "image".into(),
            file(
                "The image to edit: PNG, JPEG or WebP, at most 4096×4096 pixels (also accepted as \
                 `image[]`; this model edits one image per request).",
            ),
        );
        form.properties.insert(
            "mask".into(),
            file(
                "Optional PNG with an alpha channel, the image's size: where alpha is below one half \
                 (fully transparent in OpenAI's convention) the image is repainted; elsewhere it is kept.",
            ),
        );
        for (name, property) in std::mem::take(&mut properties) {
            form.properties.insert(name, without_null(property));
        }
        form.required.insert(0, "image".into());
    }
}

/// Seeds are u64: `format: int64` would tell clients (and fuzzers) that 2^63 and above are out
/// of range.
struct Seeds;

impl Modify for Seeds {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let Some(components) = openapi.components.as_mut() else {
            return;
        };
        for schema in components.schemas.values_mut() {
            let RefOr::T(Schema::Object(object)) = schema else {
                continue;
            };
            if let Some(RefOr::T(Schema::Object(seed))) = object.properties.get_mut("seed") {
                seed.format = Some(SchemaFormat::Custom("uint64".into()));
                seed.minimum = Some(0.into());
                seed.maximum = Some(utoipa::Number::UInt(u64::MAX as usize));
            }
        }
    }
}

/// `property` without its `null` alternative.
fn without_null(property: RefOr<Schema>) -> RefOr<Schema> {
    let is_null = |item: &RefOr<Schema>| matches!(item, RefOr::T(Schema::Object(o)) if o.schema_type == SchemaType::Type(Type::Null));
    match property {
        RefOr::T(Schema::Object(mut object)) => {
            if let SchemaType::Array(types) = &object.schema_type {
                let kept: Vec<Type> = types
                    .iter()
                    .filter(|t| **t != Type::Null)
                    .cloned()
                    .collect();
                if let [only] = kept.as_slice() {
                    object.schema_type = SchemaType::Type(only.clone());
                }
            }
            RefOr::T(Schema::Object(object))
        }
        RefOr::T(Schema::OneOf(one_of)) => {
            let mut kept: Vec<RefOr<Schema>> = one_of
                .items
                .iter()
                .filter(|i| !is_null(i))
                .cloned()
                .collect();
            if kept.len() == 1 {
                kept.remove(0)
            } else {
                RefOr::T(Schema::OneOf(one_of))
            }
        }
        other => other,
    }
}

/// What this server takes, for [`served`].
#[derive(Debug, Clone, PartialEq)]
pub struct ServedLimits {
    /// Whether the routes want an API key.
    pub api_key_required: bool,
    /// The name clients use for the model.
    pub served_model_name: String,
    /// The loaded model's id (also accepted as `model`).
    pub model_id: String,
    /// The sizes: smallest and largest width and height, and their multiple.
    pub min_width: u32,
    /// See `min_width`.
    pub min_height: u32,
    /// See `min_width`.
    pub max_width: u32,
    /// See `min_width`.
    pub max_height: u32,
    /// See `min_width`.
    pub size_multiple: u32,
    /// The default size, `WIDTHxHEIGHT`.
    pub default_size: String,
    /// Images per request.
    pub max_n: u32,
    /// Denoising steps per request.
    pub max_steps: u32,
    /// Characters of a prompt.
    pub max_prompt_chars: usize,
    /// The LoRA adapters' names.
    pub loras: Vec<String>,
    /// Transformer blocks (PAG's layers).
    pub transformer_layers: u32,
    /// Whether PAG is available.
    pub pag_supported: bool,
    /// The ControlNets' names.
    pub controlnets: Vec<String>,
}

/// The document `GET /openapi.json` serves: the committed one narrowed to this server, so that a
/// client (or a fuzzer) generating from it makes requests this server takes: `size` as a pattern
/// of this model's sizes with its default as the example, the largest `n`, steps and prompt, and
/// no `security` when the server has no keys.
pub fn served(limits: &ServedLimits) -> Value {
    let mut doc = document();
    let dimension = |min: u32, max: u32| {
        let m = limits.size_multiple.max(1);
        let values: Vec<String> = (min.div_ceil(m)..=max / m)
            .map(|k| (k * m).to_string())
            .collect();
        format!("({})", values.join("|"))
    };
    let size_pattern = format!(
        "^(auto|{}x{})$",
        dimension(limits.min_width, limits.max_width),
        dimension(limits.min_height, limits.max_height)
    );
    for name in ["CreateImageRequest", "CreateImageEditRequest"] {
        let schema = &mut doc["components"]["schemas"][name];
        let properties = &mut schema["properties"];
        properties["size"]["pattern"] = json!(size_pattern);
        properties["n"]["maximum"] = json!(limits.max_n);
        properties["num_inference_steps"]["maximum"] = json!(limits.max_steps);
        properties["prompt"]["maxLength"] = json!(limits.max_prompt_chars);
        // The adapters this server loaded, each once; PAG's blocks of this model as indices or
        // exact names (the server also takes diffusers' regular expressions).
        let description = properties["lora"]["description"].clone();
        properties["lora"] = if limits.loras.is_empty() {
            json!({"type": ["array", "null"], "maxItems": 0, "description": description})
        } else {
            json!({
                "type": ["array", "null"],
                "maxItems": limits.loras.len(),
                "items": {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "enum": limits.loras},
                        "scale": {"type": "number", "minimum": -100, "maximum": 100}
                    }
                },
                "description": description
            })
        };
        let layer = json!({"oneOf": [
            {"type": "integer", "minimum": 0, "maximum": limits.transformer_layers.saturating_sub(1)},
            {"type": "string", "enum": (0..limits.transformer_layers)
                .map(|i| format!("transformer_blocks.{i}")).collect::<Vec<_>>()}
        ]});
        let description = properties["pag_applied_layers"]["description"].clone();
        properties["pag_applied_layers"] = json!({
            "oneOf": [
                {"type": "null"},
                layer,
                {"type": "array", "minItems": 1, "items": layer}
            ],
            "description": description
        });
        if !limits.pag_supported {
            properties["pag_scale"]["maximum"] = json!(0);
        }
        // ControlNet fields exist for generations only. Without a ControlNet they must be left
        // out (or null); with some, `controlnet` names one of them.
        if name == "CreateImageRequest" {
            if limits.controlnets.is_empty() {
                for field in [
                    "control_image",
                    "controlnet",
                    "controlnet_conditioning_scale",
                ] {
                    let description = properties[field]["description"].clone();
                    properties[field] = json!({"type": "null", "description": description});
                }
            } else {
                let description = properties["controlnet"]["description"].clone();
                properties["controlnet"] = json!({
                    "type": ["string", "null"],
                    "enum": limits.controlnets.iter().map(|n| json!(n)).chain([json!(null)]).collect::<Vec<_>>(),
                    "description": description
                });
            }
        }
        if schema.get("example").is_some() {
            schema["example"]["size"] = json!(limits.default_size);
        }
    }
    // Rules across fields, as JSON Schema: streaming is needed for `progress` and
    // `partial_images`, and a stream cannot carry `url` images.
    let needs_stream = |field: &str, when: Value| {
        json!({
            "if": {"properties": {field: when}, "required": [field]},
            "then": {"properties": {"stream": {"const": true}}, "required": ["stream"]}
        })
    };
    let rules = json!([
        needs_stream("progress", json!({"const": true})),
        needs_stream("partial_images", json!({"type": "integer", "minimum": 1})),
        {
            "if": {"properties": {"stream": {"const": true}}, "required": ["stream"]},
            "then": {"properties": {"response_format": {"enum": ["b64_json", null]}}}
        }
    ]);
    let mut models = vec![limits.served_model_name.clone()];
    if limits.model_id != limits.served_model_name {
        models.push(limits.model_id.clone());
    }
    for name in ["CreateImageRequest", "CreateImageEditRequest"] {
        let schema = &mut doc["components"]["schemas"][name];
        schema["allOf"] = rules.clone();
        schema["properties"]["model"]["enum"] = json!(models);
    }
    if !limits.api_key_required {
        if let Some(paths) = doc["paths"].as_object_mut() {
            for operation in paths.values_mut().filter_map(Value::as_object_mut) {
                for op in operation.values_mut().filter_map(Value::as_object_mut) {
                    op.remove("security");
                    if let Some(responses) = op.get_mut("responses").and_then(Value::as_object_mut)
                    {
                        responses.remove("401");
                    }
                }
            }
        }
        if let Some(components) = doc["components"].as_object_mut() {
            components.remove("securitySchemes");
        }
    }
    doc
}

/// The whole document: the derived one plus what the derive cannot say (the event streams).
pub fn document() -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi())
        .expect("the OpenAPI document serializes to JSON; this is a bug");
    event_streams(&mut doc);
    // `transparent`, which OpenAI's API also takes, is parsed (to answer it with a 400 that says
    // why) but is not a value this API accepts.
    doc["components"]["schemas"]["Background"] = json!({
        "type": "string",
        "description": "Background handling: Sana's images are opaque. `transparent` (OpenAI's \
                        API has it) is answered 400.",
        "enum": ["auto", "opaque"]
    });
    doc
}

/// A `text/event-stream` response is a sequence of events, each with an `event` name and a
/// `data` line holding one of the event objects as JSON (OpenAPI 3.1: the media type's `schema`
/// describes one event).
fn event_streams(doc: &mut Value) {
    let events = |prefix: &str| {
        json!({
            "type": "object",
            "description": format!(
                "One server-sent event: `event` is its type, `data` the event object as JSON \
                 (`{prefix}.partial_image`: PartialImageEvent, `{prefix}.progress`: ProgressEvent, \
                 `{prefix}.completed`: CompletedEvent, `error`: StreamErrorEvent)."
            ),
            "required": ["event", "data"],
            "properties": {
                "event": {
                    "type": "string",
                    "enum": [
                        format!("{prefix}.partial_image"),
                        format!("{prefix}.progress"),
                        format!("{prefix}.completed"),
                        "error"
                    ]
                },
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {"oneOf": [
                        {"$ref": "#/components/schemas/PartialImageEvent"},
                        {"$ref": "#/components/schemas/ProgressEvent"},
                        {"$ref": "#/components/schemas/CompletedEvent"},
                        {"$ref": "#/components/schemas/StreamErrorEvent"}
                    ]}
                }
            }
        })
    };
    for (path, prefix) in [
        ("/v1/images/generations", "image_generation"),
        ("/v1/images/edits", "image_edit"),
    ] {
        let content = &mut doc["paths"][path]["post"]["responses"]["200"]["content"];
        if content.get("text/event-stream").is_some() {
            content["text/event-stream"]["schema"] = events(prefix);
        }
    }
}

/// The document as YAML, as committed in `openapi.yaml`.
pub fn yaml() -> String {
    serde_norway::to_string(&document())
        .expect("the OpenAPI document serializes to YAML; this is a bug")
}
