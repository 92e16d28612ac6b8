//! The OpenAPI document, generated from the handlers' `#[utoipa::path]` attributes and the types'
//! `ToSchema` derives. A copy is committed as `openapi.yaml` at the repository root and a test
//! fails when the two drift (`cargo run -p sana-server --example openapi > openapi.yaml`
//! regenerates it).

use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::edits::{CreateImageEditRequest, InputFidelity};
use crate::error::{ErrorDetail, ErrorResponse};
use crate::types::{
    Background, CompletedEvent, CreateImageRequest, ImageData, ImagesResponse, Model, ModelList,
    Moderation, OutputFormat, PartialImageEvent, ProgressEvent, Quality, ResponseFormat,
    StreamErrorEvent, Style,
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
        ModelList, Model, ErrorResponse, ErrorDetail,
    )),
    modifiers(&BearerAuth),
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

/// The document as YAML, as committed in `openapi.yaml`.
pub fn yaml() -> String {
    ApiDoc::openapi()
        .to_yaml()
        .expect("the OpenAPI document serializes to YAML; this is a bug")
}
