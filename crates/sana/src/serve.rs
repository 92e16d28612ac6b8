//! `sana serve`: the HTTP server over the engine, one worker per device, each with its own copy of
//! the pipeline.

use anyhow::{Context, Result};
use sana_backend::{Backend, BackendError};
use sana_model::backend::SanaBackend;
use sana_model::pipeline::{LoadOptions, SanaPipeline};
use sana_model::source::{resolve, HubOptions, ModelSource};
use sana_server::{ServeArgs, ServerConfig};

use crate::generate::parse_device;

pub fn run(args: ServeArgs) -> Result<()> {
    let model_spec = args.model.clone();
    let max_batch_images = args.max_batch_images;
    let config = ServerConfig::try_from(args).map_err(|e| anyhow::anyhow!("{e}"))?;
    // Download (or find in the cache) once, before any worker starts.
    let root = resolve(&ModelSource::parse(&model_spec)?, &HubOptions::from_env())
        .with_context(|| format!("--model {model_spec}"))?;
    // The API's model id: the repo id, or a local folder's name.
    let model_id = match ModelSource::parse(&model_spec)? {
        ModelSource::Hub { repo, .. } => repo,
        ModelSource::Dir(dir) => dir
            .canonicalize()
            .unwrap_or(dir)
            .file_name()
            .map_or_else(|| model_spec.clone(), |n| n.to_string_lossy().into_owned()),
    };
    let factory = move |device: &str| -> Result<Box<dyn Backend>, BackendError> {
        let device = parse_device(device).map_err(|e| BackendError::Internal(format!("{e:#}")))?;
        let pipe = SanaPipeline::load(&root, &LoadOptions::new(device))
            .map_err(|e| BackendError::Internal(format!("loading {}: {e}", root.display())))?;
        Ok(Box::new(SanaBackend::new(
            pipe,
            &model_id,
            max_batch_images,
        )))
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = runtime.block_on(sana_server::run(config, factory))?;
    tracing::info!(?report, "stopped");
    Ok(())
}
