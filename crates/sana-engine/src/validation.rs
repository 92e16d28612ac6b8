//! A request as the server hands it over, and its check against the model and the engine limits.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use sana_backend::{
    cfg_enabled, edit_first_step, resolve_pag_layers, BatchItem, BatchKey, ControlInput, Edit,
    Image, LoraChoice, ModelInfo, Sampler,
};

use crate::config::{BatchLimits, EngineConfig};
use crate::error::ValidationError;

/// What a client asks for. Unset fields take the model's defaults ([`ModelInfo`]).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// The prompt; required, not blank.
    pub prompt: String,
    /// Prompt of the unconditional CFG branch; the empty prompt when `None`.
    pub negative_prompt: Option<String>,
    /// Number of images, `1..=max_n`; they share the prompt, image `i` uses seed `seed + i`.
    pub n: u32,
    /// Width in pixels; [`ModelInfo::default_width`] when `None`.
    pub width: Option<u32>,
    /// Height in pixels; [`ModelInfo::default_height`] when `None`.
    pub height: Option<u32>,
    /// Denoising steps; [`ModelInfo::default_steps`] when `None`.
    pub steps: Option<u32>,
    /// Classifier-free guidance scale (`> 1` turns CFG on); [`ModelInfo::default_guidance_scale`]
    /// when `None`.
    pub guidance_scale: Option<f32>,
    /// Sampler; [`ModelInfo::default_sampler`] when `None`.
    pub sampler: Option<Sampler>,
    /// Base seed; a random one when `None` (reported back in the result).
    pub seed: Option<u64>,
    /// Preview images per generated image while denoising, `0..=max_previews`.
    pub previews: u32,
    /// An edit of an image (image-to-image, or inpainting with a mask); `None` for
    /// text-to-image.
    pub edit: Option<EditRequest>,
    /// LoRA adapters by name with their scales (each name once, from [`ModelInfo::loras`]).
    pub lora: Vec<LoraChoice>,
    /// Perturbed-attention guidance scale, `0..=`[`MAX_PAG_SCALE`] (0 = off);
    /// [`ModelInfo::default_pag_scale`] when `None`.
    pub pag_scale: Option<f32>,
    /// PAG's adaptive scale, `0..=`[`MAX_PAG_SCALE`]; 0 when `None`.
    pub pag_adaptive_scale: Option<f32>,
    /// PAG's blocks as diffusers' `pag_applied_layers` takes them (indices or names, see
    /// [`resolve_pag_layers`]); [`ModelInfo::default_pag_layers`] when `None`.
    pub pag_applied_layers: Option<Vec<String>>,
    /// ControlNet: the control image, at the output size; needs a ControlNet loaded.
    pub control_image: Option<Image>,
    /// The ControlNet by name ([`ModelInfo::controlnets`]); may be left out when one is loaded.
    pub controlnet: Option<String>,
    /// Its conditioning scale, finite, at most [`MAX_CONDITIONING_SCALE`] in magnitude; 1 when
    /// `None`.
    pub controlnet_conditioning_scale: Option<f32>,
}

/// The largest ControlNet conditioning scale a request may give (in magnitude).
pub const MAX_CONDITIONING_SCALE: f32 = 100.0;

/// The largest LoRA scale a request may give (in magnitude).
pub const MAX_LORA_SCALE: f32 = 100.0;
/// The largest PAG scale and adaptive scale a request may give.
pub const MAX_PAG_SCALE: f32 = 100.0;

/// The image side of an edit request.
#[derive(Debug, Clone, PartialEq)]
pub struct EditRequest {
    /// The image to edit, already at the output size (`width × height` of the request).
    pub image: Image,
    /// One byte per pixel of `image`: 255 = repaint, 0 = keep; `None` repaints everything.
    pub mask: Option<Vec<u8>>,
    /// The share of the denoising schedule that repaints, in (0, 1]; kept to thousandths.
    pub strength: f32,
    /// Inpainting: keep the original's unmasked pixels in the output.
    pub preserve_unmasked: bool,
}

impl GenerateRequest {
    /// One image of `prompt` with every other field at its default.
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            negative_prompt: None,
            n: 1,
            width: None,
            height: None,
            steps: None,
            guidance_scale: None,
            sampler: None,
            seed: None,
            previews: 0,
            edit: None,
            lora: Vec::new(),
            pag_scale: None,
            pag_adaptive_scale: None,
            pag_applied_layers: None,
            control_image: None,
            controlnet: None,
            controlnet_conditioning_scale: None,
        }
    }
}

/// A checked request: its batch key and its batch item.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    /// What a batch mate must share.
    pub key: BatchKey,
    /// This request's part of a batch (seed resolved).
    pub item: BatchItem,
}

/// Checks `req` against the model and the engine limits and fills in defaults.
pub fn validate(
    mut req: GenerateRequest,
    info: &ModelInfo,
    config: &EngineConfig,
    limits: &BatchLimits,
) -> Result<ValidRequest, ValidationError> {
    // Blank: only Unicode white space or U+FEFF, which together are exactly the characters that
    // ECMA-262's `\s` or U+0085 match, so the OpenAPI pattern `[^\s\u0085]` says the same.
    if req
        .prompt
        .chars()
        .all(|c| c.is_whitespace() || c == '\u{feff}')
    {
        return Err(ValidationError::new(
            "prompt",
            "`prompt` is empty; describe the image to generate",
        ));
    }
    check_chars("prompt", &req.prompt, config.max_prompt_chars)?;
    if let Some(negative) = &req.negative_prompt {
        check_chars("negative_prompt", negative, config.max_prompt_chars)?;
    }
    if req.n == 0 || req.n > config.max_n {
        return Err(ValidationError::new(
            "n",
            format!(
                "`n` must be between 1 and {}, got {}; ask for fewer images per request",
                config.max_n, req.n
            ),
        ));
    }
    let width = req.width.unwrap_or(info.default_width);
    let height = req.height.unwrap_or(info.default_height);
    check_side("width", width, info.min_width, info.max_width, info)?;
    check_side("height", height, info.min_height, info.max_height, info)?;
    let steps = req.steps.unwrap_or(info.default_steps);
    if steps == 0 || steps > config.max_steps {
        return Err(ValidationError::new(
            "steps",
            format!(
                "`steps` must be between 1 and {}, got {steps}",
                config.max_steps
            ),
        ));
    }
    let guidance_scale = req.guidance_scale.unwrap_or(info.default_guidance_scale);
    if !(0.0..=MAX_GUIDANCE_SCALE).contains(&guidance_scale) {
        return Err(ValidationError::new(
            "guidance_scale",
            format!(
                "`guidance_scale` must be a finite number ≥ 0 and ≤ {MAX_GUIDANCE_SCALE} (values ≤ 1 turn guidance off), got {guidance_scale}"
            ),
        ));
    }
    let sampler = req.sampler.unwrap_or(info.default_sampler);
    if !info.samplers.contains(&sampler) {
        let known: Vec<&str> = info.samplers.iter().map(|s| s.as_str()).collect();
        return Err(ValidationError::new(
            "sampler",
            format!(
                "sampler `{sampler}` is not available for {}; use one of: {}",
                info.model_id,
                known.join(", ")
            ),
        ));
    }
    if req.previews > config.max_previews {
        return Err(ValidationError::new(
            "previews",
            format!(
                "at most {} preview images may be asked for, got {}",
                config.max_previews, req.previews
            ),
        ));
    }
    check_lora(&req.lora, info)?;
    let (pag_scale, pag_adaptive_scale, pag_layers) = check_pag(&req, info)?;
    let (controlnet, control) = check_control(&mut req, info, width, height)?;
    let (strength_permille, edit) = match req.edit {
        None => (None, None),
        Some(edit) => {
            let permille = check_edit(&edit, width, height, steps)?;
            (
                Some(permille),
                Some(Edit {
                    image: edit.image,
                    mask: edit.mask,
                    preserve_unmasked: edit.preserve_unmasked,
                }),
            )
        }
    };
    let key = BatchKey {
        width,
        height,
        steps,
        sampler,
        cfg: cfg_enabled(guidance_scale),
        strength_permille,
        pag_layers,
        controlnet,
    };
    let tokens = key.latent_tokens_per_image() * req.n as usize;
    if tokens > limits.max_latent_tokens {
        return Err(ValidationError::new(
            "n",
            format!(
                "{} image(s) of {width}x{height}{}{} need {tokens} latent tokens, above this \
                 server's batch limit of {}; ask for fewer images or a smaller size",
                req.n,
                if key.cfg { " with guidance" } else { "" },
                if key.pag_layers.is_some() {
                    " with PAG"
                } else {
                    ""
                },
                limits.max_latent_tokens
            ),
        ));
    }
    Ok(ValidRequest {
        key,
        item: BatchItem {
            prompt: req.prompt,
            negative_prompt: req.negative_prompt,
            n: req.n,
            seed: req.seed.unwrap_or_else(random_seed),
            guidance_scale,
            previews: req.previews,
            edit,
            lora: req.lora,
            pag_scale,
            pag_adaptive_scale,
            control,
        },
    })
}

/// The ControlNet (its index) and the item's control input, `None` without a control image.
fn check_control(
    req: &mut GenerateRequest,
    info: &ModelInfo,
    width: u32,
    height: u32,
) -> Result<(Option<u16>, Option<ControlInput>), ValidationError> {
    let Some(image) = req.control_image.take() else {
        if let Some(name) = &req.controlnet {
            return Err(ValidationError::new(
                "control_image",
                format!("`controlnet` `{name}` needs a `control_image`"),
            ));
        }
        if req.controlnet_conditioning_scale.is_some() {
            return Err(ValidationError::new(
                "controlnet_conditioning_scale",
                "`controlnet_conditioning_scale` needs a `control_image`",
            ));
        }
        return Ok((None, None));
    };
    if info.controlnets.is_empty() {
        return Err(ValidationError::new(
            "control_image",
            "this server loaded no ControlNet (start it with `--controlnet NAME=PATH`), so a \
             `control_image` cannot be used",
        ));
    }
    let known = info.controlnets.join(", ");
    let index = match &req.controlnet {
        Some(name) => info
            .controlnets
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| {
                ValidationError::new(
                    "controlnet",
                    format!("unknown ControlNet `{name}`; loaded: {known}"),
                )
            })?,
        None if info.controlnets.len() == 1 => 0,
        None => {
            return Err(ValidationError::new(
                "controlnet",
                format!("several ControlNets are loaded; name one in `controlnet`: {known}"),
            ))
        }
    };
    let scale = req.controlnet_conditioning_scale.unwrap_or(1.0);
    if !(scale.is_finite() && scale.abs() <= MAX_CONDITIONING_SCALE) {
        return Err(ValidationError::new(
            "controlnet_conditioning_scale",
            format!(
                "`controlnet_conditioning_scale` must be a finite number in \
                 [-{MAX_CONDITIONING_SCALE}, {MAX_CONDITIONING_SCALE}], got {scale}"
            ),
        ));
    }
    if (image.width, image.height) != (width, height) {
        return Err(ValidationError::new(
            "control_image",
            format!(
                "the control image is {}x{} but the output is {width}x{height}; resize it first",
                image.width, image.height
            ),
        ));
    }
    let index = u16::try_from(index).map_err(|_| {
        ValidationError::new("controlnet", "more ControlNets than this server can index")
    })?;
    Ok((Some(index), Some(ControlInput { image, scale })))
}

/// Each adapter known, named once, with a finite scale of at most [`MAX_LORA_SCALE`].
fn check_lora(lora: &[LoraChoice], info: &ModelInfo) -> Result<(), ValidationError> {
    for (k, choice) in lora.iter().enumerate() {
        if !info.loras.iter().any(|l| l.name == choice.name) {
            let known: Vec<&str> = info.loras.iter().map(|l| l.name.as_str()).collect();
            return Err(ValidationError::new(
                "lora",
                if known.is_empty() {
                    format!(
                        "unknown LoRA adapter `{}`: this server loaded none (start it with \
                         `--lora NAME=PATH`)",
                        choice.name
                    )
                } else {
                    format!(
                        "unknown LoRA adapter `{}`; loaded: {} (see GET /v1/models)",
                        choice.name,
                        known.join(", ")
                    )
                },
            ));
        }
        if lora[..k].iter().any(|c| c.name == choice.name) {
            return Err(ValidationError::new(
                "lora",
                format!("LoRA adapter `{}` is named twice", choice.name),
            ));
        }
        if !(choice.scale.is_finite() && choice.scale.abs() <= MAX_LORA_SCALE) {
            return Err(ValidationError::new(
                "lora",
                format!(
                    "the scale of LoRA adapter `{}` must be a finite number in \
                     [-{MAX_LORA_SCALE}, {MAX_LORA_SCALE}], got {}",
                    choice.name, choice.scale
                ),
            ));
        }
    }
    Ok(())
}

/// PAG's scale, adaptive scale and blocks (`None` when PAG is off).
fn check_pag(
    req: &GenerateRequest,
    info: &ModelInfo,
) -> Result<(f32, f32, Option<sana_backend::LayerSet>), ValidationError> {
    let scale = req.pag_scale.unwrap_or(info.default_pag_scale);
    let adaptive = req.pag_adaptive_scale.unwrap_or(0.0);
    for (field, v) in [("pag_scale", scale), ("pag_adaptive_scale", adaptive)] {
        if !(0.0..=MAX_PAG_SCALE).contains(&v) {
            return Err(ValidationError::new(
                field,
                format!("`{field}` must be a finite number in [0, {MAX_PAG_SCALE}], got {v}"),
            ));
        }
    }
    if scale == 0.0 && req.pag_applied_layers.is_none() {
        return Ok((0.0, adaptive, None));
    }
    let specs = req.pag_applied_layers.clone().unwrap_or_else(|| {
        if info.default_pag_layers.is_empty() {
            vec!["0".to_owned()]
        } else {
            info.default_pag_layers.iter().map(u32::to_string).collect()
        }
    });
    if specs.is_empty() {
        return Err(ValidationError::new(
            "pag_applied_layers",
            "`pag_applied_layers` is empty; name at least one block (or leave it out for \
             transformer_blocks.0)",
        ));
    }
    let layers = resolve_pag_layers(info.transformer_layers, &specs)
        .map_err(|e| ValidationError::new("pag_applied_layers", e))?;
    if scale == 0.0 {
        return Ok((0.0, adaptive, None));
    }
    if !info.pag_supported {
        return Err(ValidationError::new(
            "pag_scale",
            format!(
                "perturbed-attention guidance is not available for {} (SANA-Sprint); leave \
                 `pag_scale` out or set it to 0",
                info.model_id
            ),
        ));
    }
    Ok((scale, adaptive, Some(layers)))
}

/// Checks an edit against the output size and the steps; its strength in thousandths.
fn check_edit(
    edit: &EditRequest,
    width: u32,
    height: u32,
    steps: u32,
) -> Result<u16, ValidationError> {
    if (edit.image.width, edit.image.height) != (width, height) {
        return Err(ValidationError::new(
            "image",
            format!(
                "the image is {}x{} but the output is {width}x{height}; resize it to the output size \
                 first",
                edit.image.width, edit.image.height
            ),
        ));
    }
    if let Some(mask) = &edit.mask {
        if mask.len() != width as usize * height as usize {
            return Err(ValidationError::new(
                "mask",
                format!(
                    "the mask has {} values for a {width}x{height} image; give one per pixel",
                    mask.len()
                ),
            ));
        }
    }
    let strength = edit.strength;
    if !(strength.is_finite() && strength > 0.0 && strength <= 1.0) {
        return Err(ValidationError::new(
            "strength",
            format!("`strength` must be in (0, 1], got {strength}"),
        ));
    }
    let permille = ((strength * 1000.0).round() as u16).clamp(1, 1000);
    // Any positive strength runs at least the last step (diffusers truncates toward zero).
    debug_assert!(edit_first_step(steps, f64::from(permille) / 1000.0).is_some());
    Ok(permille)
}

fn check_chars(param: &'static str, text: &str, max: usize) -> Result<(), ValidationError> {
    let chars = text.chars().count();
    if chars > max {
        return Err(ValidationError::new(
            param,
            format!("`{param}` has {chars} characters, above the limit of {max}; shorten it"),
        ));
    }
    Ok(())
}

fn check_side(
    param: &'static str,
    value: u32,
    min: u32,
    max: u32,
    info: &ModelInfo,
) -> Result<(), ValidationError> {
    let multiple = info.size_multiple.max(1);
    if value < min || value > max || !value.is_multiple_of(multiple) {
        return Err(ValidationError::new(
            param,
            format!(
                "`{param}` must be a multiple of {multiple} between {min} and {max}, got {value}; \
                 the nearest valid value is {}",
                nearest_valid(value, min, max, multiple)
            ),
        ));
    }
    Ok(())
}

fn nearest_valid(value: u32, min: u32, max: u32, multiple: u32) -> u32 {
    let rounded = (value.saturating_add(multiple / 2) / multiple) * multiple;
    let lowest = min.div_ceil(multiple) * multiple;
    let highest = (max / multiple) * multiple;
    rounded.clamp(lowest, highest.max(lowest))
}

/// Largest `guidance_scale`. diffusers sets none; far past Sana's useful range (4.5; images
/// burn out past ~20) it only risks overflowing half-precision activations.
pub const MAX_GUIDANCE_SCALE: f32 = 100.0;

/// Drawn seeds stay below this, so that every image's seed (`seed + i`) is a number JavaScript
/// reads exactly from JSON (its integers are exact up to 2^53).
const RANDOM_SEED_BOUND: u64 = 1 << 52;

/// A seed nobody chose: process-random keys hashed with a counter, below [`RANDOM_SEED_BOUND`].
fn random_seed() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.finish() % RANDOM_SEED_BOUND
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeBackend;
    use sana_backend::Backend;

    fn check(req: GenerateRequest) -> Result<ValidRequest, ValidationError> {
        let info = FakeBackend::new().info();
        let config = EngineConfig {
            max_batch_latent_tokens: Some(4 * 2 * 32 * 32),
            ..EngineConfig::default()
        };
        let limits = BatchLimits::new(&config, &info).expect("valid config");
        validate(req, &info, &config, &limits)
    }

    fn param_of(req: GenerateRequest) -> Option<&'static str> {
        check(req).expect_err("must be rejected").param
    }

    #[test]
    fn defaults_come_from_the_model() {
        let info = FakeBackend::new().info();
        let valid = check(GenerateRequest::new("a fox")).expect("valid");
        assert_eq!(valid.key.width, info.default_width);
        assert_eq!(valid.key.height, info.default_height);
        assert_eq!(valid.key.steps, info.default_steps);
        assert_eq!(valid.key.sampler, info.default_sampler);
        assert_eq!(valid.item.guidance_scale, info.default_guidance_scale);
        assert_eq!(valid.key.cfg, info.default_guidance_scale > 1.0);
    }

    #[test]
    fn guidance_at_most_one_turns_cfg_off() {
        let valid = check(GenerateRequest {
            guidance_scale: Some(1.0),
            ..GenerateRequest::new("a fox")
        })
        .expect("valid");
        assert!(!valid.key.cfg);
    }

    #[test]
    fn each_bad_field_is_named() {
        let base = || GenerateRequest::new("a fox");
        assert_eq!(param_of(GenerateRequest::new("  ")), Some("prompt"));
        assert_eq!(
            param_of(GenerateRequest::new("x".repeat(8193))),
            Some("prompt")
        );
        assert_eq!(
            param_of(GenerateRequest {
                negative_prompt: Some("x".repeat(8193)),
                ..base()
            }),
            Some("negative_prompt")
        );
        assert_eq!(param_of(GenerateRequest { n: 0, ..base() }), Some("n"));
        assert_eq!(param_of(GenerateRequest { n: 5, ..base() }), Some("n"));
        assert_eq!(
            param_of(GenerateRequest {
                width: Some(500),
                ..base()
            }),
            Some("width")
        );
        assert_eq!(
            param_of(GenerateRequest {
                height: Some(8192),
                ..base()
            }),
            Some("height")
        );
        assert_eq!(
            param_of(GenerateRequest {
                steps: Some(0),
                ..base()
            }),
            Some("steps")
        );
        assert_eq!(
            param_of(GenerateRequest {
                steps: Some(101),
                ..base()
            }),
            Some("steps")
        );
        for g in [f32::NAN, f32::INFINITY, -0.5, MAX_GUIDANCE_SCALE + 1.0] {
            assert_eq!(
                param_of(GenerateRequest {
                    guidance_scale: Some(g),
                    ..base()
                }),
                Some("guidance_scale"),
                "{g}"
            );
        }
        assert!(check(GenerateRequest {
            guidance_scale: Some(MAX_GUIDANCE_SCALE),
            ..base()
        })
        .is_ok());
        assert_eq!(
            param_of(GenerateRequest {
                previews: 4,
                ..base()
            }),
            Some("previews")
        );
    }

    #[test]
    fn messages_name_the_limit_and_the_value() {
        let err = check(GenerateRequest {
            width: Some(500),
            ..GenerateRequest::new("a fox")
        })
        .expect_err("500 is not a multiple of 32");
        assert!(err.message.contains("500"), "{}", err.message);
        assert!(err.message.contains("multiple of 32"), "{}", err.message);
        assert!(
            err.message.contains("nearest valid value is 512"),
            "{}",
            err.message
        );
    }

    #[test]
    fn a_request_above_the_token_budget_is_refused() {
        // Budget: 4 CFG images of 1024²; 4 at 1024² with CFG fit, at 1024x2048 they don't.
        assert!(check(GenerateRequest {
            n: 4,
            width: Some(1024),
            height: Some(1024),
            ..GenerateRequest::new("a fox")
        })
        .is_ok());
        assert_eq!(
            param_of(GenerateRequest {
                n: 4,
                width: Some(1024),
                height: Some(2048),
                ..GenerateRequest::new("a fox")
            }),
            Some("n")
        );
    }

    #[test]
    fn blank_prompts_are_white_space_or_bom_only() {
        for blank in ["", " ", "\t\n", "\u{85}", "\u{feff}", "\u{3000}\u{2028}"] {
            let err = check(GenerateRequest::new(blank)).expect_err(blank);
            assert_eq!(err.param, Some("prompt"), "{blank:?}");
        }
        for text in ["a", " a ", "\u{200b}", "\u{85}x"] {
            check(GenerateRequest::new(text)).expect(text);
        }
    }

    #[test]
    fn a_given_seed_is_kept_and_a_missing_one_is_drawn() {
        let valid = check(GenerateRequest {
            seed: Some(42),
            ..GenerateRequest::new("a fox")
        })
        .expect("valid");
        assert_eq!(valid.item.seed, 42);
        let a = check(GenerateRequest::new("a fox"))
            .expect("valid")
            .item
            .seed;
        let b = check(GenerateRequest::new("a fox"))
            .expect("valid")
            .item
            .seed;
        assert_ne!(a, b, "two random seeds in a row should differ");
        let drawn: Vec<u64> = (0..256)
            .map(|_| {
                check(GenerateRequest::new("a fox"))
                    .expect("valid")
                    .item
                    .seed
            })
            .collect();
        assert!(drawn.iter().all(|&s| s < RANDOM_SEED_BOUND), "{drawn:?}");
        assert!(
            drawn.iter().any(|&s| s > RANDOM_SEED_BOUND / 2),
            "drawn from the whole range"
        );
    }
}
