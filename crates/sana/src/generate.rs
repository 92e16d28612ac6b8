//! `sana generate` and `sana edit`: text (and an image) to image files from the command line, with
//! flags mirroring diffusers' `SanaPipeline.__call__`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use sana_model::pipeline::edit::InitImage;
use sana_model::pipeline::sampling::Flow;
use sana_model::pipeline::{GenerateRequest, ItemRequest, LoraChoice};

use crate::model::ModelSpec;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// A diffusers folder, a Hub repo id (org/name[@revision]), an NVlabs `.pth` checkpoint (with
    /// --model-config), or `sana-tiny-scenes`: the small demo model built into the binary (64×64
    /// scenes of coloured shapes), the default.
    #[arg(long, env = "SANA_MODEL", default_value = sana_scenes::MODEL_ID)]
    model: String,
    /// The training YAML of an NVlabs `.pth` --model.
    #[arg(long)]
    model_config: Option<PathBuf>,
    /// With a `.pth`: the Gemma folder or repo (default: the YAML's text encoder).
    #[arg(long)]
    text_encoder: Option<String>,
    /// With a `.pth`: the DC-AE folder or repo (default: the YAML's, in diffusers format).
    #[arg(long)]
    vae: Option<String>,
    /// Weight-file variant to download and load where a model has one (`fp16`, `bf16`).
    #[arg(long)]
    variant: Option<String>,
    /// The prompt; repeat the flag for several prompts in one batch.
    #[arg(long, required = true)]
    prompt: Vec<String>,
    /// Negative prompt (one for all prompts, or one per --prompt).
    #[arg(long)]
    negative_prompt: Vec<String>,
    /// Denoising steps (default: 20, or 2 for SANA-Sprint).
    #[arg(long)]
    steps: Option<usize>,
    /// Guidance scale (classifier-free; embedded for SANA-Sprint). Default: the model's (4.5).
    #[arg(long)]
    guidance_scale: Option<f32>,
    /// Default: the model's native size (1024 for 1024px models, 64 for sana-tiny-scenes).
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    /// Seed of the first image; image i of a prompt uses seed + i, prompt k starts at seed + k·n.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Images per prompt.
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    /// A safetensors file with a tensor `latents` [images, C, h, w] replacing the initial noise.
    #[arg(long)]
    latents: Option<PathBuf>,
    /// Generate at exactly --width x --height instead of the nearest trained aspect ratio.
    #[arg(long)]
    no_resolution_binning: bool,
    /// Tokens kept per prompt (default: the model's, 300; an NVlabs YAML's `model_max_length`).
    #[arg(long)]
    max_sequence_length: Option<usize>,
    /// With a `.pth` --model: prepend diffusers' default instruction instead of the YAML's
    /// `text_encoder.chi_prompt`.
    #[arg(long)]
    diffusers_instruction: bool,
    /// Do not prepend the complex human instruction to the prompt (models trained without it,
    /// such as sana-tiny-scenes, never get it).
    #[arg(long)]
    no_complex_human_instruction: bool,
    /// Weights dtype: auto (on CPU bf16 when its AMX tiles are reached through oneDNN, else f32;
    /// bf16, or f16 for fp16-trained checkpoints, on CUDA), f32, bf16 or f16 (Gemma and the DC-AE
    /// then stay in bf16: they overflow f16).
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// cpu, cuda[:N], or auto (the first GPU when the binary has CUDA and one is present).
    #[arg(long, default_value = "auto")]
    device: String,
    /// Output file; the format follows the extension (png, jpg/jpeg, webp). Several images are
    /// written as name-0.png, name-1.png, ...
    #[arg(long, short, default_value = "sana.png")]
    output: PathBuf,
    /// A LoRA adapter, PATH[:SCALE] (scale 1 by default): a diffusers
    /// `pytorch_lora_weights.safetensors`, the folder holding it, or a Hub repo id. Repeat the flag
    /// for several adapters.
    #[arg(long, value_name = "PATH[:SCALE]")]
    lora: Vec<String>,
    /// Perturbed-attention guidance scale (diffusers' SanaPAGPipeline; 0 = off). Default: 3.0 for a
    /// SanaPAGPipeline folder, else 0.
    #[arg(long)]
    pag_scale: Option<f32>,
    /// PAG's blocks, comma-separated indices or names as diffusers' `pag_applied_layers` (names
    /// are regular expressions searched in `transformer_blocks.<i>.attn1`). Default:
    /// transformer_blocks.0 (an NVlabs YAML's `pag_applied_layers`).
    #[arg(long, value_delimiter = ',', value_name = "L,...")]
    pag_layers: Vec<String>,
    /// PAG's adaptive scale: the scale at timestep t is max(0, pag_scale − this·(1000 − t)).
    #[arg(long, default_value_t = 0.0)]
    pag_adaptive_scale: f32,
    /// A ControlNet: a diffusers SanaControlNetModel folder (or a SanaControlNetPipeline folder
    /// holding one in controlnet/), or a Hub repo id. A SanaControlNetPipeline --model brings its own.
    #[arg(long)]
    controlnet: Option<String>,
    /// The control image (PNG, JPEG or WebP; the released HED ControlNets take white edges on
    /// black), resized to the output size.
    #[arg(long)]
    control_image: Option<PathBuf>,
    /// ControlNet's conditioning scale (diffusers' controlnet_conditioning_scale).
    #[arg(long, default_value_t = 1.0)]
    controlnet_scale: f32,
}

/// `PATH[:SCALE]` → (path, scale): the part after the last `:` is the scale when it is a number.
pub fn parse_lora_arg(arg: &str) -> Result<(String, f32)> {
    if let Some((path, scale)) = arg.rsplit_once(':') {
        if let Ok(scale) = scale.parse::<f32>() {
            if !scale.is_finite() {
                bail!("--lora {arg}: the scale must be a finite number");
            }
            return Ok((path.to_string(), scale));
        }
    }
    Ok((arg.to_string(), 1.0))
}

#[derive(Debug, Args)]
pub struct EditArgs {
    /// The image to edit (PNG, JPEG or WebP). The output has its size (rounded to the model's
    /// multiple of 32) unless --width/--height say otherwise; the image is resized to it.
    #[arg(long)]
    image: PathBuf,
    /// Inpainting: a mask of the image's size. With an alpha channel (OpenAI's convention) the
    /// transparent pixels are repainted; without one (diffusers' convention) the white ones.
    #[arg(long)]
    mask: Option<PathBuf>,
    /// Share of the denoising schedule that repaints, in (0, 1]: the edit runs steps × strength
    /// of the steps (rounded down), from the image noised to that level; 1 starts from noise.
    /// Default: 1.0 with a mask, 0.8 without.
    #[arg(long)]
    strength: Option<f32>,
    /// With a mask: return the decoded image as is, instead of keeping the original's unmasked
    /// pixels (blended over an 8-pixel feather).
    #[arg(long)]
    no_preserve_unmasked: bool,
    #[command(flatten)]
    generate: GenerateArgs,
}

/// `cpu`, `cuda`, `cuda:N`, or `auto` (`cuda:0` when CUDA is compiled in and a GPU answers).
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(if candle_core::utils::cuda_is_available() {
            Device::new_cuda(0).unwrap_or(Device::Cpu)
        } else {
            Device::Cpu
        }),
        _ => {
            let ordinal = match s.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => rest
                    .strip_prefix(':')
                    .and_then(|n| n.parse().ok())
                    .with_context(|| format!("--device {s:?}: expected cpu, cuda or cuda:N"))?,
                None => bail!("--device {s:?}: expected cpu, cuda or cuda:N"),
            };
            if !candle_core::utils::cuda_is_available() {
                bail!("--device {s}: this build has no CUDA support (build with the cuda feature)");
            }
            Device::new_cuda(ordinal).with_context(|| format!("--device {s}: cannot open the GPU"))
        }
    }
}

/// `out.png` for one image, `out-0.png`, `out-1.png`, … for several.
fn output_paths(output: &Path, count: usize) -> Vec<PathBuf> {
    if count == 1 {
        return vec![output.to_path_buf()];
    }
    let stem = output.file_stem().unwrap_or_default().to_string_lossy();
    let ext = output
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    (0..count)
        .map(|i| output.with_file_name(format!("{stem}-{i}{ext}")))
        .collect()
}

fn image_format(path: &Path) -> Result<image::ImageFormat> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase());
    Ok(match ext.as_deref() {
        Some("png") => image::ImageFormat::Png,
        Some("jpg" | "jpeg") => image::ImageFormat::Jpeg,
        Some("webp") => image::ImageFormat::WebP,
        _ => bail!(
            "--output {}: the extension must be png, jpg, jpeg or webp",
            path.display()
        ),
    })
}

/// An image file as RGB8, and its mask (255 = repaint) when one is given.
fn read_edit(args: &EditArgs) -> Result<(image::RgbImage, Option<image::GrayImage>)> {
    let open = |path: &Path| {
        image::ImageReader::open(path)
            .and_then(|r| r.with_guessed_format())
            .with_context(|| format!("{}", path.display()))?
            .decode()
            .with_context(|| format!("{}: not a readable PNG, JPEG or WebP image", path.display()))
    };
    let image = open(&args.image)?.to_rgb8();
    let mask = match &args.mask {
        None => None,
        Some(path) => {
            let m = open(path)?;
            if (m.width(), m.height()) != image.dimensions() {
                bail!(
                    "--mask {} is {}x{} but --image is {}x{}: they must be the same size",
                    path.display(),
                    m.width(),
                    m.height(),
                    image.width(),
                    image.height()
                );
            }
            Some(if m.color().has_alpha() {
                let rgba = m.to_rgba8();
                image::GrayImage::from_fn(m.width(), m.height(), |x, y| {
                    image::Luma([255 - rgba.get_pixel(x, y).0[3]])
                })
            } else {
                m.to_luma8()
            })
        }
    };
    Ok((image, mask))
}

pub fn run_edit(args: EditArgs) -> Result<()> {
    let (image, mask) = read_edit(&args)?;
    let strength = args
        .strength
        .unwrap_or(if mask.is_some() { 1.0 } else { 0.8 });
    let edit = Edit {
        image,
        mask,
        strength,
        preserve_unmasked: !args.no_preserve_unmasked,
    };
    generate(args.generate, Some(edit))
}

/// What `sana edit` adds to a generation.
struct Edit {
    image: image::RgbImage,
    mask: Option<image::GrayImage>,
    strength: f32,
    preserve_unmasked: bool,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    generate(args, None)
}

fn generate(args: GenerateArgs, edit: Option<Edit>) -> Result<()> {
    let format = image_format(&args.output)?;
    if !args.negative_prompt.is_empty()
        && ![1, args.prompt.len()].contains(&args.negative_prompt.len())
    {
        bail!(
            "--negative-prompt given {} times for {} prompts: give it once or once per prompt",
            args.negative_prompt.len(),
            args.prompt.len()
        );
    }
    let device = parse_device(&args.device)?;
    let spec = ModelSpec {
        model: args.model.clone(),
        model_config: args.model_config.clone(),
        text_encoder: args.text_encoder.clone(),
        vae: args.vae.clone(),
        variant: args.variant.clone(),
        diffusers_instruction: args.diffusers_instruction,
    };
    let (resolved, _) = spec.resolve()?;
    let mut pipe = resolved.load(&device, &args.dtype, args.variant.as_deref())?;
    let hub = sana_model::source::HubOptions::from_env();
    let mut lora = Vec::new();
    for (k, arg) in args.lora.iter().enumerate() {
        let (spec, scale) = parse_lora_arg(arg)?;
        let path = sana_model::source::resolve_lora(&spec, &hub)
            .with_context(|| format!("--lora {arg}"))?;
        let name = format!("lora{k}");
        pipe.add_lora(&name, &path)
            .with_context(|| format!("--lora {arg}"))?;
        lora.push(LoraChoice { name, scale });
    }
    if let Some(spec) = &args.controlnet {
        let source = sana_model::source::ModelSource::parse(spec)
            .with_context(|| format!("--controlnet {spec}"))?;
        let dir = sana_model::source::resolve_component(&source, &hub)
            .with_context(|| format!("--controlnet {spec}"))?;
        pipe.add_controlnet("controlnet-arg", &dir)
            .with_context(|| format!("--controlnet {spec}"))?;
    }
    if args.controlnet.is_some() && args.control_image.is_none() {
        bail!("--controlnet needs --control-image");
    }
    let controlnet = match (&args.control_image, &args.controlnet) {
        (None, _) => None,
        (Some(_), Some(_)) => Some("controlnet-arg".to_string()),
        (Some(path), None) => match pipe.controlnets() {
            [(name, _)] => Some(name.clone()),
            _ => bail!(
                "--control-image {}: give the ControlNet with --controlnet (this --model has none)",
                path.display()
            ),
        },
    };
    let pag_scale = args
        .pag_scale
        .unwrap_or_else(|| pipe.pag_defaults().map_or(0.0, |d| d.scale));
    let pag_layers = if pag_scale > 0.0 {
        if args.pag_layers.is_empty() {
            pipe.default_pag_layers()
        } else {
            pipe.resolve_pag_layers(&args.pag_layers)
                .context("--pag-layers")?
        }
    } else {
        Vec::new()
    };
    let defaults = pipe.defaults();
    let steps = args.steps.unwrap_or(defaults.steps);
    let guidance_scale = args.guidance_scale.unwrap_or(defaults.guidance_scale);
    let native = pipe.transformer().config().sample_size * pipe.vae_scale_factor();
    // An edit's output defaults to the image's size, rounded to the model's multiple.
    let multiple = pipe.vae_scale_factor() * pipe.transformer().config().patch_size;
    let round = |v: u32| ((v as usize + multiple / 2) / multiple).max(1) * multiple;
    let (width, height) = match &edit {
        Some(e) => (
            args.width.unwrap_or(round(e.image.width())),
            args.height.unwrap_or(round(e.image.height())),
        ),
        None => (args.width.unwrap_or(native), args.height.unwrap_or(native)),
    };
    let init_image = match &edit {
        None => None,
        Some(e) => {
            let filter = image::imageops::FilterType::Lanczos3;
            let (w, h) = (width as u32, height as u32);
            let rgb = if e.image.dimensions() == (w, h) {
                e.image.clone()
            } else {
                image::imageops::resize(&e.image, w, h, filter)
            };
            let mask = e.mask.as_ref().map(|m| {
                if m.dimensions() == (w, h) {
                    m.clone().into_raw()
                } else {
                    image::imageops::resize(m, w, h, filter).into_raw()
                }
            });
            Some(InitImage {
                width,
                height,
                rgb8: rgb.into_raw(),
                mask,
                preserve_unmasked: e.preserve_unmasked,
            })
        }
    };
    let control_image = match &args.control_image {
        None => None,
        Some(path) => {
            let img = image::open(path)
                .with_context(|| format!("--control-image {}", path.display()))?
                .to_rgb8();
            let (w, h) = (width as u32, height as u32);
            let img = if img.dimensions() == (w, h) {
                img
            } else {
                image::imageops::resize(&img, w, h, image::imageops::FilterType::Lanczos3)
            };
            Some(InitImage {
                width,
                height,
                rgb8: img.into_raw(),
                mask: None,
                preserve_unmasked: false,
            })
        }
    };
    let items = args
        .prompt
        .iter()
        .enumerate()
        .map(|(k, prompt)| ItemRequest {
            prompt: prompt.clone(),
            negative_prompt: args
                .negative_prompt
                .get(if args.negative_prompt.len() == 1 {
                    0
                } else {
                    k
                })
                .cloned()
                .unwrap_or_default(),
            num_images: args.num_images,
            seed: args.seed.wrapping_add((k * args.num_images) as u64),
            guidance_scale,
            init_image: init_image.clone(),
            lora: lora.clone(),
            pag_scale,
            pag_adaptive_scale: args.pag_adaptive_scale,
            control_image: control_image.clone(),
            controlnet_scale: Some(args.controlnet_scale),
        })
        .collect();
    let latents = match &args.latents {
        Some(path) => Some(
            candle_core::safetensors::load(path, &device)
                .with_context(|| format!("--latents {}", path.display()))?
                .remove("latents")
                .with_context(|| {
                    format!("--latents {}: no tensor named `latents`", path.display())
                })?,
        ),
        None => None,
    };
    let req = GenerateRequest {
        items,
        width,
        height,
        steps,
        use_resolution_binning: !args.no_resolution_binning,
        max_sequence_length: args
            .max_sequence_length
            .unwrap_or(defaults.max_sequence_length),
        complex_human_instruction: defaults.complex_human_instruction
            && !args.no_complex_human_instruction,
        latents,
        strength: edit.as_ref().map(|e| f64::from(e.strength)),
        schedule: Default::default(),
        scheduler: None,
        pag_layers,
        controlnet,
    };
    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(steps as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:40}] step {pos}/{len} ({eta} left)",
            )
            .expect("static template; this is a bug"),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let images = pipe
        .generate(&req, &mut |p| {
            bar.set_position(p.step as u64);
            Flow::Continue
        })?
        .context("generation stopped")?;
    bar.finish_and_clear();
    for (img, path) in images.iter().zip(output_paths(&args.output, images.len())) {
        let buf = image::RgbImage::from_raw(img.width as u32, img.height as u32, img.rgb8.clone())
            .context("image buffer size; this is a bug")?;
        buf.save_with_format(&path, format)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("{} (seed {})", path.display(), img.seed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_names_and_formats() {
        assert_eq!(
            output_paths(Path::new("a/out.png"), 1),
            [PathBuf::from("a/out.png")]
        );
        assert_eq!(
            output_paths(Path::new("a/out.webp"), 2),
            [PathBuf::from("a/out-0.webp"), PathBuf::from("a/out-1.webp")]
        );
        assert_eq!(
            image_format(Path::new("x.JPG")).unwrap(),
            image::ImageFormat::Jpeg
        );
        assert!(image_format(Path::new("x.gif"))
            .unwrap_err()
            .to_string()
            .contains("png"));
    }

    #[test]
    fn devices() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device("tpu")
            .unwrap_err()
            .to_string()
            .contains("cuda:N"));
        assert!(parse_device("cuda:x").is_err());
    }
}
