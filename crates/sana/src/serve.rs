//! `sana serve`: the HTTP server over the engine, one worker per device, each with its own copy of
//! the pipeline.

use anyhow::{bail, Context, Result};
use sana_backend::{Backend, BackendError};
use sana_model::backend::SanaBackend;
use sana_server::{ServeArgs, ServerConfig};

use crate::generate::parse_device;
use crate::memory::{self, ReleaseWhenIdle};
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
    // Adapters: names checked and Hub ids fetched once, before any worker starts.
    let hub = sana_model::source::HubOptions::from_env();
    let mut loras: Vec<(String, std::path::PathBuf)> = Vec::new();
    for arg in &args.lora {
        let (name, path) = parse_named("--lora", arg)?;
        if loras.iter().any(|(n, _)| *n == name) {
            bail!("--lora {arg}: the name `{name}` is given twice");
        }
        let path = sana_model::source::resolve_lora(&path, &hub)
            .with_context(|| format!("--lora {arg}"))?;
        loras.push((name, path));
    }
    let mut controlnets: Vec<(String, std::path::PathBuf)> = Vec::new();
    for arg in &args.controlnet {
        let (name, spec) = parse_named("--controlnet", arg)?;
        if controlnets.iter().any(|(n, _)| *n == name) {
            bail!("--controlnet {arg}: the name `{name}` is given twice");
        }
        let source = sana_model::source::ModelSource::parse(&spec)
            .with_context(|| format!("--controlnet {arg}"))?;
        let dir = sana_model::source::resolve_component(&source, &hub)
            .with_context(|| format!("--controlnet {arg}"))?;
        controlnets.push((name, dir));
    }
    let (dtype, variant) = (args.dtype.clone(), args.variant.clone());
    let (default_steps, default_guidance) = (args.default_steps, args.default_guidance_scale);
    let config = ServerConfig::try_from(args).map_err(|e| anyhow::anyhow!("{e}"))?;
    // Download (or find in the cache, or extract) once, before any worker starts.
    let (resolved, model_id) = spec.resolve()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .on_thread_park(memory::on_runtime_park)
        .on_thread_stop(memory::on_thread_stop)
        .thread_keep_alive(memory::BLOCKING_KEEP_ALIVE)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let handle = runtime.handle().clone();
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
        for (name, path) in &controlnets {
            pipe.add_controlnet(name, path)
                .with_context(|| format!("--controlnet {name}={}", path.display()))
                .map_err(internal)?;
        }
        for (name, path) in &loras {
            pipe.add_lora(name, path)
                .with_context(|| format!("--lora {name}={}", path.display()))
                .map_err(internal)?;
        }
        let backend = SanaBackend::new(pipe, &model_id, max_batch_images);
        Ok(Box::new(ReleaseWhenIdle::new(
            backend,
            device.is_cpu(),
            Some(handle.clone()),
        )))
    };
    let report = runtime.block_on(sana_server::run(config, factory))?;
    tracing::info!(?report, "stopped");
    Ok(())
}

/// `NAME=PATH` of `--lora` or `--controlnet` (`flag`): a name of letters, digits, `-`, `_` and
/// `.`, and a path or Hub id.
pub fn parse_named(flag: &str, arg: &str) -> Result<(String, String)> {
    let Some((name, path)) = arg.split_once('=') else {
        bail!("{flag} {arg}: expected NAME=PATH (e.g. {flag} style=./style)");
    };
    let name = name.trim();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        bail!("{flag} {arg}: the name must be letters, digits, `-`, `_` or `.`");
    }
    if path.trim().is_empty() {
        bail!("{flag} {arg}: the path is empty");
    }
    Ok((name.to_string(), path.trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::parse_named;

    #[test]
    fn lora_flags_need_a_name_and_a_path() {
        assert_eq!(
            parse_named("--lora", "style=org/repo@v1").unwrap(),
            ("style".to_string(), "org/repo@v1".to_string())
        );
        assert_eq!(parse_named("--lora", "a.b-c_1=/x=y").unwrap().1, "/x=y");
        for bad in ["style", "=x", "st yle=x", "style="] {
            let err = parse_named("--controlnet", bad).expect_err(bad).to_string();
            assert!(err.starts_with("--controlnet "), "{err}");
        }
    }
}
