//! LoRA adapters for the DiT, as diffusers loads them (`SanaLoraLoaderMixin.load_lora_weights` →
//! peft): `pytorch_lora_weights.safetensors` from `save_lora_weights` (keys
//! `transformer.<module>.lora_A.weight` / `lora_B.weight`, optionally `lora_B.bias`), the older
//! names diffusers converts (`.lora.down.` / `.lora.up.`, `.to_q_lora.down.` …), any rank per
//! module and any subset of the LoRA-capable modules.
//!
//! Scaling as peft applies it: `alpha / r` per module (`alpha / √r` with `use_rslora`), `r` and
//! `alpha` from the `lora_adapter_metadata` header (`r`, `lora_alpha`, `rank_pattern`,
//! `alpha_pattern`, matched as peft's `get_pattern_key` does); a file without metadata scales by 1
//! (diffusers then sets alpha = r). A request's scale multiplies it (`set_adapters` weights).
//!
//! The adapters are never merged into the base weights: each forward adds
//! `scale_row · B(A(x))` per row (the scale applied to the rank-`r` intermediate), so rows with
//! different adapters share one forward exactly, a row without an adapter gets the base result
//! unchanged, and loading an adapter costs its own size only.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::config::SanaTransformerConfig;
use crate::{Error, Result};

/// Where an adapter may act: every linear layer and 1×1 (or patch) convolution of the DiT.
pub(super) mod site {
    pub const PATCH_EMBED: usize = 0;
    pub const TIMESTEP_1: usize = 1;
    pub const TIMESTEP_2: usize = 2;
    pub const GUIDANCE_1: usize = 3;
    pub const GUIDANCE_2: usize = 4;
    pub const TIME_LINEAR: usize = 5;
    pub const CAPTION_1: usize = 6;
    pub const CAPTION_2: usize = 7;
    pub const PROJ_OUT: usize = 8;
    const GLOBAL: usize = 9;
    pub const ATTN1_Q: usize = 0;
    pub const ATTN1_K: usize = 1;
    pub const ATTN1_V: usize = 2;
    pub const ATTN1_OUT: usize = 3;
    pub const ATTN2_Q: usize = 4;
    pub const ATTN2_K: usize = 5;
    pub const ATTN2_V: usize = 6;
    pub const ATTN2_OUT: usize = 7;
    pub const FF_INVERTED: usize = 8;
    pub const FF_POINT: usize = 9;
    pub const PER_BLOCK: usize = 10;

    /// The site of `part` (one of the block constants) in block `block`.
    pub fn block(block: usize, part: usize) -> usize {
        GLOBAL + block * PER_BLOCK + part
    }

    /// Sites of a model with `layers` blocks.
    pub fn count(layers: usize) -> usize {
        GLOBAL + layers * PER_BLOCK
    }
}

/// One LoRA-capable module: its diffusers name and the shapes its `lora_A` / `lora_B` take.
#[derive(Debug, Clone)]
struct Target {
    name: String,
    /// `lora_A.weight` without the rank: `[in]` for a linear layer, `[in, k, k]` for a conv.
    a_tail: Vec<usize>,
    /// `lora_B.weight` without the rank: `[out]` for a linear layer, `[out, (r), 1, 1]` for a
    /// conv (the rank sits in dim 1).
    out: usize,
    conv: bool,
}

/// The LoRA-capable modules of a DiT, by site.
fn targets(cfg: &SanaTransformerConfig) -> Vec<Option<Target>> {
    let d = cfg.inner_dim();
    let p = cfg.patch_size;
    let (heads, head_dim) = cfg.cross();
    let inner = heads * head_dim;
    let hidden = cfg.ffn_hidden();
    let mut out = vec![None; site::count(cfg.num_layers)];
    let linear = |name: String, i: usize, o: usize| {
        Some(Target {
            name,
            a_tail: vec![i],
            out: o,
            conv: false,
        })
    };
    let conv = |name: String, i: usize, k: usize, o: usize| {
        Some(Target {
            name,
            a_tail: vec![i, k, k],
            out: o,
            conv: true,
        })
    };
    out[site::PATCH_EMBED] = conv("patch_embed.proj".into(), cfg.in_channels, p, d);
    let te = if cfg.guidance_embeds {
        "time_embed.timestep_embedder"
    } else {
        "time_embed.emb.timestep_embedder"
    };
    out[site::TIMESTEP_1] = linear(format!("{te}.linear_1"), 256, d);
    out[site::TIMESTEP_2] = linear(format!("{te}.linear_2"), d, d);
    if cfg.guidance_embeds {
        out[site::GUIDANCE_1] = linear("time_embed.guidance_embedder.linear_1".into(), 256, d);
        out[site::GUIDANCE_2] = linear("time_embed.guidance_embedder.linear_2".into(), d, d);
    }
    out[site::TIME_LINEAR] = linear("time_embed.linear".into(), d, 6 * d);
    out[site::CAPTION_1] = linear(
        "caption_projection.linear_1".into(),
        cfg.caption_channels,
        d,
    );
    out[site::CAPTION_2] = linear("caption_projection.linear_2".into(), d, d);
    out[site::PROJ_OUT] = linear("proj_out".into(), d, p * p * cfg.out_channels());
    for b in 0..cfg.num_layers {
        let name = |part: &str| format!("transformer_blocks.{b}.{part}");
        let parts = [
            (site::ATTN1_Q, linear(name("attn1.to_q"), d, d)),
            (site::ATTN1_K, linear(name("attn1.to_k"), d, d)),
            (site::ATTN1_V, linear(name("attn1.to_v"), d, d)),
            (site::ATTN1_OUT, linear(name("attn1.to_out.0"), d, d)),
            (site::ATTN2_Q, linear(name("attn2.to_q"), d, inner)),
            (site::ATTN2_K, linear(name("attn2.to_k"), d, inner)),
            (site::ATTN2_V, linear(name("attn2.to_v"), d, inner)),
            (site::ATTN2_OUT, linear(name("attn2.to_out.0"), inner, d)),
            (
                site::FF_INVERTED,
                conv(name("ff.conv_inverted"), d, 1, 2 * hidden),
            ),
            (site::FF_POINT, conv(name("ff.conv_point"), hidden, 1, d)),
        ];
        for (part, t) in parts {
            out[site::block(b, part)] = t;
        }
    }
    out
}

/// One module's low-rank update: `scaling · (x Aᵀ) Bᵀ (+ scaling · bias)`.
#[derive(Debug, Clone)]
struct LoraModule {
    /// `A`, `[r, in]` (used transposed: a view as the right operand costs nothing).
    down: Tensor,
    /// `B`, `[out, r]`.
    up: Tensor,
    /// `lora_B.bias` (peft's `lora_bias`), `[out]`.
    up_bias: Option<Tensor>,
    scaling: f64,
}

impl LoraModule {
    /// `y + factor · scaling-free B(A x)` (`factor` already holds the scaling): `x` `[b, …, in]`,
    /// `y` `[b, …, out]`; a per-row factor is `[b]`.
    fn add_to(&self, x: &Tensor, y: Tensor, factor: &Factor) -> candle_core::Result<Tensor> {
        let dims = x.dims();
        let in_dim = dims[dims.len() - 1];
        let rows = x.elem_count() / in_dim;
        let b = dims[0];
        // [rows, in] · [in, r] → the rank-r intermediate, scaled per row, · [r, out].
        let h = crate::ops::matmul_nt(&x.contiguous()?.reshape((rows, in_dim))?, &self.down)?;
        let r = h.dim(1)?;
        let h = match factor {
            Factor::One(f) => (h * *f)?,
            Factor::PerRow(t) => h
                .reshape((b, rows / b, r))?
                .broadcast_mul(&t.reshape((b, 1, 1))?)?
                .reshape((rows, r))?,
        };
        let mut delta = crate::ops::matmul_nt(&h, &self.up)?; // [rows, out]
        if let Some(bias) = &self.up_bias {
            let out = delta.dim(1)?;
            delta = match factor {
                Factor::One(f) => delta.broadcast_add(&(bias * *f)?)?,
                Factor::PerRow(t) => delta
                    .reshape((b, rows / b, out))?
                    .broadcast_add(
                        &t.reshape((b, 1, 1))?
                            .broadcast_mul(&bias.reshape((1, 1, out))?)?,
                    )?
                    .reshape((rows, out))?,
            };
        }
        let shape = y.shape().clone();
        y + delta.reshape(shape)?
    }
}

/// A LoRA adapter loaded for one transformer: its modules on the model's device in its dtype.
#[derive(Debug)]
pub struct LoraAdapter {
    name: String,
    path: PathBuf,
    modules: Vec<Option<LoraModule>>,
    bytes: usize,
    ranks: Vec<usize>,
}

/// What peft's `LoraConfig` says about scaling (the fields that matter at inference).
#[derive(Debug, Default, serde::Deserialize)]
struct Metadata {
    r: Option<usize>,
    lora_alpha: Option<f64>,
    #[serde(default)]
    rank_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
}

/// peft's `get_pattern_key`: the first pattern `p` with `re.match(rf"(.*\.)?({p})$", name)`.
fn pattern_value<'a>(
    patterns: &'a serde_json::Map<String, serde_json::Value>,
    name: &str,
    file: &Path,
) -> Result<Option<&'a serde_json::Value>> {
    for (pattern, value) in patterns {
        let re = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{pattern})$")).map_err(|e| {
            Error::Weights(format!(
                "{}: the LoRA metadata pattern `{pattern}` is not a regular expression this server reads: {e}",
                file.display()
            ))
        })?;
        if re.is_match(name) {
            return Ok(Some(value));
        }
    }
    Ok(None)
}

/// The `__metadata__` strings of a safetensors header (only the header is read).
fn read_header_metadata(file: &Path) -> Result<HashMap<String, String>> {
    use std::io::Read;
    let io = |source| Error::Io {
        path: file.to_path_buf(),
        source,
    };
    let bad =
        |msg: &str| Error::Weights(format!("{}: not a safetensors file: {msg}", file.display()));
    let mut f = std::fs::File::open(file).map_err(io)?;
    let size = f.metadata().map_err(io)?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| bad("shorter than its header"))?;
    let len = u64::from_le_bytes(len);
    if len > size.saturating_sub(8) || len > 100 << 20 {
        return Err(bad("its header length does not fit the file"));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(io)?;
    let header: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| bad(&format!("its header is not JSON: {e}")))?;
    Ok(header
        .get("__metadata__")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default())
}

/// diffusers' `UNET_TO_DIFFUSERS` renames (older LoRA formats), applied to keys without `lora_A`/`lora_B`.
const OLD_NAMES: [(&str, &str); 10] = [
    (".to_out_lora.up", ".to_out.0.lora_B"),
    (".to_out_lora.down", ".to_out.0.lora_A"),
    (".to_q_lora.down", ".to_q.lora_A"),
    (".to_q_lora.up", ".to_q.lora_B"),
    (".to_k_lora.down", ".to_k.lora_A"),
    (".to_k_lora.up", ".to_k.lora_B"),
    (".to_v_lora.down", ".to_v.lora_A"),
    (".to_v_lora.up", ".to_v.lora_B"),
    (".lora.up", ".lora_B"),
    (".lora.down", ".lora_A"),
];

/// The weight file of an adapter path: the file itself, or `pytorch_lora_weights.safetensors` in a folder.
pub fn adapter_file(path: &Path) -> Result<PathBuf> {
    if path.is_dir() {
        let file = path.join("pytorch_lora_weights.safetensors");
        if file.is_file() {
            return Ok(file);
        }
        return Err(Error::Weights(format!(
            "{}: no pytorch_lora_weights.safetensors in this folder (LoRA adapters are read from \
             safetensors files, as diffusers' save_lora_weights writes them)",
            path.display()
        )));
    }
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    Err(Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such LoRA file or folder"),
    })
}

impl LoraAdapter {
    /// Loads the adapter at `path` (a `.safetensors` file or a folder holding
    /// `pytorch_lora_weights.safetensors`) for a model of config `cfg`, its tensors in `dtype` on
    /// `device`. Every key must name a LoRA-capable module of the model with shapes that fit it;
    /// otherwise the error names the key (and both shapes).
    pub fn load(
        name: &str,
        path: &Path,
        cfg: &SanaTransformerConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let file = adapter_file(path)?;
        let bad = |msg: String| Error::Weights(format!("{}: {msg}", file.display()));
        let header = read_header_metadata(&file)?;
        let metadata: Option<Metadata> = match header.get("lora_adapter_metadata") {
            None => None,
            Some(raw) => {
                let all: serde_json::Map<String, serde_json::Value> = serde_json::from_str(raw)
                    .map_err(|e| bad(format!("its lora_adapter_metadata is not JSON: {e}")))?;
                // Keys as diffusers writes them, `transformer.r` …; the prefix is stripped as
                // diffusers does, and other components' entries ignored.
                let ours: serde_json::Map<String, serde_json::Value> = all
                    .into_iter()
                    .filter_map(|(k, v)| k.strip_prefix("transformer.").map(|k| (k.to_string(), v)))
                    .collect();
                Some(
                    serde_json::from_value(serde_json::Value::Object(ours)).map_err(|e| {
                        bad(format!(
                            "its lora_adapter_metadata does not read as a LoraConfig: {e}"
                        ))
                    })?,
                )
            }
        };
        if metadata.as_ref().is_some_and(|m| m.use_dora) {
            return Err(bad("DoRA adapters (use_dora) are not supported".into()));
        }
        // SAFETY: the file is mapped read-only and each tensor is copied out before the map is
        // dropped; a file truncated meanwhile could fault, as for any mmap-loaded checkpoint.
        let mapped = unsafe { candle_core::safetensors::MmapedSafetensors::new(&file) }
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let raw = mapped
            .tensors()
            .into_iter()
            .map(|(key, _)| Ok((key.clone(), mapped.load(&key, &Device::Cpu)?)))
            .collect::<Result<HashMap<String, Tensor>>>()?;
        drop(mapped);
        Self::from_tensors(name, &file, raw, metadata, cfg, dtype, device)
    }

    fn from_tensors(
        name: &str,
        file: &Path,
        raw: HashMap<String, Tensor>,
        metadata: Option<Metadata>,
        cfg: &SanaTransformerConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let bad = |msg: String| Error::Weights(format!("{}: {msg}", file.display()));
        // 1. Keys: the `transformer.` entries when there are any (diffusers' prefix filter), else
        //    every key (peft's own unprefixed state dicts); DoRA scales dropped as diffusers does.
        let prefixed = raw.keys().any(|k| k.starts_with("transformer."));
        let mut ignored = 0usize;
        let mut parts: HashMap<String, [Option<Tensor>; 3]> = HashMap::new();
        let mut sorted: Vec<(String, Tensor)> = raw.into_iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, tensor) in sorted {
            let bare = match key.strip_prefix("transformer.") {
                Some(k) => k.to_string(),
                None if prefixed => {
                    ignored += 1;
                    continue;
                }
                None => key
                    .strip_prefix("base_model.model.")
                    .unwrap_or(&key)
                    .to_string(),
            };
            if bare.contains("dora_scale") {
                continue;
            }
            if bare.contains("lora_magnitude_vector") {
                return Err(bad(format!("`{key}`: DoRA adapters are not supported")));
            }
            if !bare.contains("lora") {
                return Err(bad(format!(
                    "`{key}` is not a LoRA weight (every key of a LoRA file names `lora`, as diffusers requires)"
                )));
            }
            let mut renamed = bare.clone();
            if !renamed.contains("lora_A") && !renamed.contains("lora_B") {
                for (from, to) in OLD_NAMES {
                    renamed = renamed.replace(from, to);
                }
            }
            let (module, slot) = if let Some(m) = renamed.strip_suffix(".lora_A.weight") {
                (m, 0)
            } else if let Some(m) = renamed.strip_suffix(".lora_B.weight") {
                (m, 1)
            } else if let Some(m) = renamed.strip_suffix(".lora_B.bias") {
                (m, 2)
            } else {
                return Err(bad(format!(
                    "`{key}` is neither lora_A.weight, lora_B.weight nor lora_B.bias of a module"
                )));
            };
            let entry = parts.entry(module.to_string()).or_default();
            entry[slot] = Some(tensor);
        }
        if ignored > 0 {
            tracing::warn!(
                adapter = name,
                ignored,
                "LoRA keys without the `transformer.` prefix ignored (other pipeline components)"
            );
        }
        if parts.is_empty() {
            return Err(bad("holds no LoRA weights for the transformer".into()));
        }
        // 2. Match each module, check shapes, scale.
        let targets = targets(cfg);
        let by_name: HashMap<&str, usize> = targets
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.as_ref().map(|t| (t.name.as_str(), i)))
            .collect();
        let mut modules: Vec<Option<LoraModule>> = vec![None; targets.len()];
        let mut total = 0usize;
        let mut ranks = Vec::new();
        let mut names: Vec<&String> = parts.keys().collect();
        names.sort();
        for module in names {
            let [a, b, bias] = &parts[module];
            let Some(&i) = by_name.get(module.as_str()) else {
                let hint = if module.ends_with("conv_depth") {
                    " (LoRA on the depthwise 3×3 convolution is not supported)"
                } else {
                    ""
                };
                return Err(bad(format!(
                    "`{module}.lora_*` matches no LoRA-capable module of this transformer{hint}"
                )));
            };
            let target = targets[i].as_ref().expect("by_name only holds targets");
            let (Some(a), Some(b)) = (a, b) else {
                return Err(bad(format!(
                    "`{module}` needs both lora_A.weight and lora_B.weight"
                )));
            };
            let r = a.dim(0)?;
            let mut want_a = vec![r];
            want_a.extend(&target.a_tail);
            let want_b = if target.conv {
                vec![target.out, r, 1, 1]
            } else {
                vec![target.out, r]
            };
            for (part, got, want) in [("lora_A", a, &want_a), ("lora_B", b, &want_b)] {
                if got.dims() != want.as_slice() {
                    return Err(bad(format!(
                        "`{module}.{part}.weight` has shape {:?}, the model needs {:?} (rank {r})",
                        got.dims(),
                        want
                    )));
                }
            }
            if let Some(bias) = bias {
                if bias.dims() != [target.out] {
                    return Err(bad(format!(
                        "`{module}.lora_B.bias` has shape {:?}, the model needs [{}]",
                        bias.dims(),
                        target.out
                    )));
                }
            }
            let scaling = match &metadata {
                None => 1.0,
                Some(m) => {
                    let cfg_r = match pattern_value(&m.rank_pattern, module, file)? {
                        Some(v) => v.as_u64().map(|v| v as usize),
                        None => m.r,
                    }
                    .unwrap_or(r);
                    if cfg_r != r {
                        return Err(bad(format!(
                            "`{module}`: the metadata gives rank {cfg_r}, its weights have rank {r}"
                        )));
                    }
                    let alpha = match pattern_value(&m.alpha_pattern, module, file)? {
                        Some(v) => v.as_f64(),
                        None => m.lora_alpha,
                    }
                    .unwrap_or(r as f64);
                    if m.use_rslora {
                        alpha / (r as f64).sqrt()
                    } else {
                        alpha / r as f64
                    }
                }
            };
            if !scaling.is_finite() {
                return Err(bad(format!(
                    "`{module}`: LoRA scaling {scaling} is not finite"
                )));
            }
            let a2 = a.reshape((r, a.elem_count() / r))?;
            let b2 = b.reshape((target.out, r))?;
            let m = LoraModule {
                down: a2.to_dtype(dtype)?.to_device(device)?,
                up: b2.to_dtype(dtype)?.to_device(device)?,
                up_bias: bias
                    .as_ref()
                    .map(|t| t.to_dtype(dtype)?.to_device(device))
                    .transpose()?,
                scaling,
            };
            for t in [&a, &b] {
                total += t.elem_count() * dtype.size_in_bytes();
            }
            ranks.push(r);
            modules[i] = Some(m);
        }
        ranks.sort_unstable();
        ranks.dedup();
        Ok(Self {
            name: name.to_string(),
            path: file.to_path_buf(),
            modules,
            bytes: total,
            ranks,
        })
    }

    /// The name requests choose it by.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The weight file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Modules it changes.
    pub fn module_count(&self) -> usize {
        self.modules.iter().flatten().count()
    }

    /// The distinct ranks of its modules, ascending.
    pub fn ranks(&self) -> &[usize] {
        &self.ranks
    }

    /// Bytes its weights take on the device.
    pub fn size_bytes(&self) -> usize {
        self.bytes
    }

    fn sites(&self) -> usize {
        self.modules.len()
    }
}

/// How an active adapter is scaled over the rows of a forward.
#[derive(Debug, Clone)]
enum RowScales {
    /// Every row the same (the common case: one request, or batchmates that agree).
    All(f64),
    /// Per row (`0` = not applied).
    Rows(RowSubset),
}

/// The rows an adapter applies to when they differ.
#[derive(Debug, Clone)]
struct RowSubset {
    /// Every row's scale.
    values: Vec<f32>,
    /// The rows with a scale ≠ 0, ascending.
    used: Vec<usize>,
    /// `used` as `[k]` u32 on the device.
    index: Tensor,
    /// Their scales, `[k]` in the model dtype.
    scales: Tensor,
}

/// The multiplier of an adapter's update in one call (its scaling included): one number, or
/// `[B]` per row.
enum Factor {
    One(f64),
    PerRow(Tensor),
}

/// The adapters of one generation and each row's scale for each of them (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct LoraRows {
    active: Vec<(Arc<LoraAdapter>, RowScales)>,
}

impl LoraRows {
    /// `adapters`: each adapter with one scale per row of the forwards to come (rows without the
    /// adapter 0). Adapters no row uses are dropped.
    pub fn new(
        adapters: Vec<(Arc<LoraAdapter>, Vec<f32>)>,
        cfg: &SanaTransformerConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut active = Vec::new();
        for (adapter, scales) in adapters {
            if adapter.sites() != site::count(cfg.num_layers) {
                return Err(Error::Weights(format!(
                    "LoRA adapter `{}` was loaded for another transformer",
                    adapter.name
                )));
            }
            if let Some(s) = scales.iter().find(|s| !s.is_finite()) {
                return Err(Error::Unsupported {
                    field: "lora.scale",
                    value: s.to_string(),
                    reason: "a LoRA scale must be finite".into(),
                });
            }
            if scales.iter().all(|&s| s == 0.0) {
                continue;
            }
            let first = scales[0];
            let row_scales = if scales.iter().all(|&s| s == first) {
                RowScales::All(f64::from(first))
            } else {
                let used: Vec<usize> = (0..scales.len()).filter(|&r| scales[r] != 0.0).collect();
                let index: Vec<u32> = used.iter().map(|&r| r as u32).collect();
                let kept: Vec<f32> = used.iter().map(|&r| scales[r]).collect();
                RowScales::Rows(RowSubset {
                    index: Tensor::from_vec(index, used.len(), device)?,
                    scales: Tensor::from_vec(kept, used.len(), device)?.to_dtype(dtype)?,
                    values: scales,
                    used,
                })
            };
            active.push((adapter, row_scales));
        }
        Ok(Self { active })
    }

    /// Fails unless every per-row scale list has `rows` entries.
    pub(super) fn check_rows(&self, rows: usize) -> Result<()> {
        for (adapter, scales) in &self.active {
            if let RowScales::Rows(RowSubset { values, .. }) = scales {
                if values.len() != rows {
                    return Err(Error::Candle(candle_core::Error::Msg(format!(
                        "LoRA adapter `{}` has {} row scales for {rows} rows",
                        adapter.name,
                        values.len()
                    ))));
                }
            }
        }
        Ok(())
    }

    /// `y + Σ_adapters scale_row · scaling · B(A(x))` for the module at `site`; `x` `[rows, …, in]`
    /// and `y` `[rows, …, out]` with every row of the forward.
    pub(super) fn apply(&self, site: usize, x: &Tensor, y: Tensor) -> candle_core::Result<Tensor> {
        self.apply_inner(site, x, y, None)
    }

    /// [`Self::apply`] for `x` holding row `row` alone (the caption work, done item by item).
    pub(super) fn apply_row(
        &self,
        site: usize,
        row: usize,
        x: &Tensor,
        y: Tensor,
    ) -> candle_core::Result<Tensor> {
        self.apply_inner(site, x, y, Some(row))
    }

    fn apply_inner(
        &self,
        site: usize,
        x: &Tensor,
        mut y: Tensor,
        row: Option<usize>,
    ) -> candle_core::Result<Tensor> {
        for (adapter, scales) in &self.active {
            let Some(m) = &adapter.modules[site] else {
                continue;
            };
            let live = x.dim(0)?;
            y = match (scales, row) {
                (RowScales::All(s), _) => m.add_to(x, y, &Factor::One(s * m.scaling))?,
                (RowScales::Rows(rows), Some(i)) => {
                    let s = f64::from(rows.values[i]);
                    if s == 0.0 {
                        continue;
                    }
                    m.add_to(x, y, &Factor::One(s * m.scaling))?
                }
                (RowScales::Rows(rows), None) => {
                    // The rows in the forward are a prefix of the generation's (PAG's copies join
                    // later; see `forward_with_caption`).
                    let k = rows.used.iter().take_while(|&&r| r < live).count();
                    if k == 0 {
                        continue;
                    }
                    let scales = (rows.scales.narrow(0, 0, k)? * m.scaling)?;
                    if k == live {
                        m.add_to(x, y, &Factor::PerRow(scales))?
                    } else {
                        // Only the rows that use it: the others' results are not touched at all
                        // (an overflow in a row without the adapter cannot reach it as 0·∞).
                        let index = rows.index.narrow(0, 0, k)?;
                        let xs = x.index_select(&index, 0)?;
                        let mut dims = y.dims().to_vec();
                        dims[0] = k;
                        let zero = Tensor::zeros(dims, y.dtype(), y.device())?;
                        let delta = m.add_to(&xs, zero, &Factor::PerRow(scales))?;
                        y.contiguous()?.index_add(&index, &delta, 0)?
                    }
                }
            };
        }
        Ok(y)
    }
}
