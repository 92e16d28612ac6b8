//! `sana serve`: the HTTP server over the engine, one worker per device, each with its own copy of
//! the pipeline.

use anyhow::{Context, Result};
use sana_backend::{Backend, BackendError};
use sana_model::backend::SanaBackend;
use sana_server::{ServeArgs, ServerConfig};

use crate::generate::parse_device;
use crate::model::ModelSpec;

pub fn run(args: ServeArgs) -> Result<()> {
    let spec = ModelSpec {
        model: args.model.clone(),
        model_config: args.model_config.clone(),
        text_encoder: args.text_encoder.clone(),
        vae: args.vae.clone(),
        variant: args.variant.clone(),
        diffusers_instruction: args.diffusers_instruction,
    };
    let max_batch_images = args.max_batch_images;
    let (dtype, variant) = (args.dtype.clone(), args.variant.clone());
    let (default_steps, default_guidance) = (args.default_steps, args.default_guidance_scale);
    let config = ServerConfig::try_from(args).map_err(|e| anyhow::anyhow!("{e}"))?;
    // Download (or find in the cache, or extract) once, before any worker starts.
    let (resolved, model_id) = spec.resolve()?;
    let factory = move |device: &str| -> Result<Box<dyn Backend>, BackendError> {
        let internal = |e: anyhow::Error| BackendError::Internal(format!("{e:#}"));
        let device = parse_device(device).map_err(internal)?;
        let mut pipe = resolved
            .load(&device, &dtype, variant.as_deref())
            .map_err(internal)?;
        let mut defaults = pipe.defaults();
        if let Some(steps) = default_steps {
            defaults.steps = steps as usize;
        }
        if let Some(g) = default_guidance {
            defaults.guidance_scale = g;
        }
        pipe.set_defaults(defaults);
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
