//! The Gemma-2 decoder stack as a text encoder: transformers `Gemma2Model`
//! (`transformers/models/gemma2/modeling_gemma2.py`, eager attention), returning the last hidden
//! state after the final norm (candle-transformers' `gemma2` returns last-token logits instead).
//!
//! Numerics as the reference: the embedding scale √hidden cast to the weight dtype, `(1 + w)`
//! RMSNorms computed in f32 and cast back after the multiply, rotate-half RoPE with cos/sin made
//! in f32 and cast to the activation dtype, grouped-query attention with logits soft-capped
//! (`cap · tanh(logits / cap)`), an additive causal + padding (+ sliding-window) mask holding the
//! dtype minimum, and the softmax in f32. The logits are computed in f32 also for bf16 weights
//! (the reference rounds them to bf16 first), which only removes rounding.
//!
//! [`Gemma2Model::forward_cached`] runs a continuation of sequences whose first positions were
//! run before: their keys and values ([`KvCache`]) are reused, which is how
//! [`super::SanaTextEncoder`] encodes the instruction prefix once.

use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;

pub use super::gemma2_config::{Gemma2Config, RopeParameters};
use crate::weights::{read_config, Checkpoint};
use crate::{Error, Result};

/// `y = x Wᵀ` without bias, weight `[out, in]` as stored.
///
/// For few rows (a prompt after the cached prefix) or a wide input (`down_proj`) it computes
/// `(W xᵀ)ᵀ`, which streams the contiguous weight once: on CPU that is up to 4× faster than
/// `x Wᵀ` with the transposed weight as candle's right operand (the left operand stays contiguous,
/// see [`crate::nn::Linear`] for why that matters).
#[derive(Debug, Clone)]
struct Proj {
    weight: Tensor,
}

impl Proj {
    fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get((out_dim, in_dim), "weight")?,
        })
    }
}

impl Module for Proj {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (out_dim, in_dim) = self.weight.dims2()?;
        let rows = x.elem_count() / in_dim;
        let mut out_dims = x.dims().to_vec();
        *out_dims.last_mut().expect("input has at least one dim") = out_dim;
        let x = x.contiguous()?.reshape((rows, in_dim))?;
        if crate::ops::matmul_nt_on_onednn(&x, &self.weight) {
            return crate::ops::matmul_nt(&x, &self.weight)?.reshape(out_dims);
        }
        // CPU mixed precision without oneDNN: the bf16 weight widened for this call.
        let w = self.weight.to_dtype(x.dtype())?;
        let y = if rows <= 128 || in_dim > out_dim {
            w.matmul(&x.t()?)?.t()?.contiguous()? // [out, rows] → [rows, out]
        } else {
            x.matmul(&w.t()?)?
        };
        y.reshape(out_dims)
    }
}

/// Gemma's RMSNorm: `x · rsqrt(mean(x²) + eps) · (1 + w)`, all in f32, then cast back.
#[derive(Debug, Clone)]
struct Gemma2RmsNorm {
    /// `1 + w` in f32, as the reference computes it on every call.
    scale: Tensor,
    eps: f64,
}

impl Gemma2RmsNorm {
    fn new(dim: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        let scale = (vb.get(dim, "weight")?.to_dtype(DType::F32)? + 1.0)?;
        Ok(Self { scale, eps })
    }
}

impl Module for Gemma2RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        xf.broadcast_mul(&(var + self.eps)?.sqrt()?.recip()?)?
            .broadcast_mul(&self.scale)?
            .to_dtype(dtype)
    }
}

/// `Gemma2MLP`: `down(gelu_tanh(gate(x)) ⊙ up(x))`.
#[derive(Debug, Clone)]
struct Gemma2Mlp {
    gate_proj: Proj,
    up_proj: Proj,
    down_proj: Proj,
}

impl Gemma2Mlp {
    fn new(cfg: &Gemma2Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: Proj::new(d, i, vb.pp("gate_proj"))?,
            up_proj: Proj::new(d, i, vb.pp("up_proj"))?,
            down_proj: Proj::new(i, d, vb.pp("down_proj"))?,
        })
    }
}

impl Module for Gemma2Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let gate = crate::ops::gelu_tanh(&self.gate_proj.forward(x)?)?;
        self.down_proj.forward(&(gate * self.up_proj.forward(x)?)?)
    }
}

/// Keys and values of every layer for the first positions of one sequence (`[1, kv_heads, P, hd]`
/// each, after RoPE, in the model dtype), plus that sequence's final hidden states `[P, hidden]`.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    hidden: Tensor,
}

impl KvCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.hidden.dim(0).unwrap_or(0)
    }

    /// Whether no position is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Final hidden states (after the final norm) of the cached positions, `[P, hidden]`.
    pub fn hidden(&self) -> &Tensor {
        &self.hidden
    }
}

/// Additive attention masks `[B, 1, 1, S, P + S]` in f32 for one forward (`None`: nothing masked).
struct Masks {
    full: Option<Tensor>,
    sliding: Option<Tensor>,
}

/// `Gemma2Attention` (eager path).
#[derive(Debug, Clone)]
struct Gemma2Attention {
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scaling: f64,
    softcap: Option<f64>,
    sliding: bool,
}

impl Gemma2Attention {
    fn new(cfg: &Gemma2Config, layer: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let (d, hd) = (cfg.hidden_size, cfg.head_dim());
        let (heads, kv_heads) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(Self {
            q_proj: Proj::new(d, heads * hd, vb.pp("q_proj"))?,
            k_proj: Proj::new(d, kv_heads * hd, vb.pp("k_proj"))?,
            v_proj: Proj::new(d, kv_heads * hd, vb.pp("v_proj"))?,
            o_proj: Proj::new(heads * hd, d, vb.pp("o_proj"))?,
            heads,
            kv_heads,
            head_dim: hd,
            scaling: cfg.query_pre_attn_scalar.powf(-0.5),
            softcap: cfg.attn_logit_softcapping,
            sliding: cfg.is_sliding(layer) && cfg.sliding_window.is_some(),
        })
    }

    /// `x`: `[B, S, D]` at positions `P..P+S` after `past` (`[1, kv, P, hd]` each) → output
    /// `[B, S, D]` and this call's keys and values `[B, kv, S, hd]`.
    fn forward(
        &self,
        x: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        past: Option<&(Tensor, Tensor)>,
        masks: &Masks,
    ) -> candle_core::Result<(Tensor, (Tensor, Tensor))> {
        let (b, s, _) = x.dims3()?;
        let hd = self.head_dim;
        let groups = self.heads / self.kv_heads;
        let split = |t: Tensor, heads: usize| -> candle_core::Result<Tensor> {
            // [B, S, heads·hd] → [B, heads, S, hd]
            t.reshape((b, s, heads, hd))?.transpose(1, 2)?.contiguous()
        };
        let q = split(self.q_proj.forward(x)?, self.heads)?;
        let k = split(self.k_proj.forward(x)?, self.kv_heads)?;
        let v = split(self.v_proj.forward(x)?, self.kv_heads)?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let (k_all, v_all) = match past {
            Some((pk, pv)) => {
                let p = pk.dim(2)?;
                let shape = (b, self.kv_heads, p, hd);
                (
                    Tensor::cat(&[&pk.broadcast_as(shape)?.contiguous()?, &k], 2)?,
                    Tensor::cat(&[&pv.broadcast_as(shape)?.contiguous()?, &v], 2)?,
                )
            }
            None => (k.clone(), v.clone()),
        };
        let kl = k_all.dim(2)?;
        // Grouped-query attention without copying keys: the `groups` query heads of one KV head
        // (heads h·G … h·G+G−1, as `repeat_kv`) are stacked along the rows.
        let qg = q
            .to_dtype(DType::F32)?
            .reshape((b, self.kv_heads, groups * s, hd))?; // [B, kv, G·S, hd]
        let kf = k_all.to_dtype(DType::F32)?;
        let mut logits = (qg.matmul(&kf.t()?)? * self.scaling)?; // [B, kv, G·S, P+S]
        if let Some(cap) = self.softcap {
            logits = ((logits / cap)?.tanh()? * cap)?;
        }
        let mask = if self.sliding {
            &masks.sliding
        } else {
            &masks.full
        };
        if let Some(mask) = mask {
            // [B, kv, G, S, P+S] + [B, 1, 1, S, P+S]
            logits = logits
                .reshape((b, self.kv_heads, groups, s, kl))?
                .broadcast_add(mask)?
                .reshape((b, self.kv_heads, groups * s, kl))?;
        }
        let probs = crate::ops::softmax_last_dim(&logits)?.to_dtype(v_all.dtype())?;
        let out = probs.matmul(&v_all)?; // [B, kv, G·S, hd]
        let out = out
            .reshape((b, self.heads, s, hd))?
            .transpose(1, 2)?
            .reshape((b, s, self.heads * hd))?;
        Ok((self.o_proj.forward(&out)?, (k, v)))
    }
}

/// `Gemma2DecoderLayer`: sandwich norms around attention and MLP.
#[derive(Debug, Clone)]
struct Gemma2DecoderLayer {
    self_attn: Gemma2Attention,
    mlp: Gemma2Mlp,
    input_layernorm: Gemma2RmsNorm,
    post_attention_layernorm: Gemma2RmsNorm,
    pre_feedforward_layernorm: Gemma2RmsNorm,
    post_feedforward_layernorm: Gemma2RmsNorm,
}

impl Gemma2DecoderLayer {
    fn new(cfg: &Gemma2Config, layer: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let norm = |name: &str| Gemma2RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb.pp(name));
        Ok(Self {
            self_attn: Gemma2Attention::new(cfg, layer, vb.pp("self_attn"))?,
            mlp: Gemma2Mlp::new(cfg, vb.pp("mlp"))?,
            input_layernorm: norm("input_layernorm")?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            pre_feedforward_layernorm: norm("pre_feedforward_layernorm")?,
            post_feedforward_layernorm: norm("post_feedforward_layernorm")?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: (&Tensor, &Tensor),
        past: Option<&(Tensor, Tensor)>,
        masks: &Masks,
    ) -> candle_core::Result<(Tensor, (Tensor, Tensor))> {
        let h = self.input_layernorm.forward(x)?;
        let (h, kv) = self.self_attn.forward(&h, rope, past, masks)?;
        let x = (x + self.post_attention_layernorm.forward(&h)?)?;
        let h = self
            .mlp
            .forward(&self.pre_feedforward_layernorm.forward(&x)?)?;
        let x = (&x + self.post_feedforward_layernorm.forward(&h)?)?;
        Ok((x, kv))
    }
}

/// transformers `Gemma2Model`: token ids → last hidden state after the final norm.
#[derive(Debug, Clone)]
pub struct Gemma2Model {
    cfg: Gemma2Config,
    embed_tokens: Tensor, // [V, D]
    embed_scale: f64,
    layers: Vec<Gemma2DecoderLayer>,
    norm: Gemma2RmsNorm,
    dtype: DType,
    device: Device,
    /// RoPE cos/sin `[positions, hd/2]` in the model dtype on the device, grown on demand and
    /// then only narrowed: no host work per forward. Clones share it.
    rope: Arc<Mutex<Option<(Tensor, Tensor)>>>,
}

impl Gemma2Model {
    /// Builds the model from a `VarBuilder` with the `Gemma2Model` key names (no `model.` prefix).
    ///
    /// Gemma-2 runs in bf16 or f32: f16 overflows its activations and is refused.
    pub fn new(cfg: &Gemma2Config, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let dtype = vb.dtype();
        if !matches!(dtype, DType::F32 | DType::BF16) {
            return Err(Error::Unsupported {
                field: "dtype",
                value: format!("{dtype:?}"),
                reason: "the Gemma-2 text encoder runs in bf16 or f32 only (its activations \
                         overflow f16); load it in bf16"
                    .to_string(),
            });
        }
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Gemma2DecoderLayer::new(cfg, i, vb.pp(format!("layers.{i}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        // The reference keeps √hidden as an f32 tensor and casts it to the weight dtype.
        let scale = (cfg.hidden_size as f64).sqrt() as f32;
        let embed_scale = match dtype {
            DType::BF16 => half::bf16::from_f32(scale).to_f32(),
            _ => scale,
        } as f64;
        Ok(Self {
            embed_tokens: vb.get((cfg.vocab_size, cfg.hidden_size), "embed_tokens.weight")?,
            embed_scale,
            layers,
            norm: Gemma2RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("norm"))?,
            dtype,
            device: vb.device().clone(),
            cfg: cfg.clone(),
            rope: Arc::default(),
        })
    }

    /// Loads `config.json` and the weights of a transformers `text_encoder/` folder
    /// (`model.safetensors` or shards with `model.safetensors.index.json`). Keys may carry a
    /// leading `model.` (a `Gemma2ForCausalLM` checkpoint); an LM head is ignored.
    pub fn load(dir: &Path, variant: Option<&str>, dtype: DType, device: &Device) -> Result<Self> {
        let cfg: Gemma2Config = read_config(&dir.join("config.json"))?;
        cfg.validate()?;
        let ckpt = Checkpoint::open_dir(dir, "model", variant)?;
        let vb = ckpt.var_builder(dtype, device);
        let vb = if vb.contains_tensor("embed_tokens.weight") {
            vb
        } else {
            vb.pp("model")
        };
        let model = Self::new(&cfg, vb)?;
        ckpt.warn_unused("text_encoder");
        Ok(model)
    }

    /// The config the model was built from.
    pub fn config(&self) -> &Gemma2Config {
        &self.cfg
    }

    /// The activation dtype (the weights' dtype).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `Gemma2Model(input_ids, attention_mask).last_hidden_state`.
    ///
    /// `input_ids`: `[B, T]` (u32 or i64), `attention_mask`: `[B, T]` 1 = token, 0 = padding (any
    /// dtype; `None` = no padding) → `[B, T, hidden]` in the model dtype. Padded rows are computed
    /// as the reference computes them.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let valid: Vec<Vec<bool>> = match attention_mask {
            Some(m) => m
                .to_dtype(DType::F32)?
                .to_vec2::<f32>()?
                .into_iter()
                .map(|row| row.into_iter().map(|v| v != 0.0).collect())
                .collect(),
            None => vec![vec![true; t]; b],
        };
        let (hidden, _) = self.run(input_ids, &valid, None, false)?;
        Ok(hidden)
    }

    /// [`Self::forward`] for right-padded rows: row `b` has `lengths[b]` real tokens. Reads
    /// nothing back from the device.
    pub fn forward_lengths(&self, input_ids: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        if lengths.len() != b || lengths.iter().any(|&l| l > t) {
            return Err(Error::Candle(candle_core::Error::Msg(format!(
                "forward_lengths: lengths {lengths:?} do not fit ids [{b}, {t}]"
            ))));
        }
        let valid: Vec<Vec<bool>> = lengths
            .iter()
            .map(|&l| (0..t).map(|i| i < l).collect())
            .collect();
        Ok(self.run(input_ids, &valid, None, false)?.0)
    }

    /// Runs one sequence and keeps every layer's keys and values for [`Self::forward_cached`].
    pub fn prefill(&self, ids: &[u32]) -> Result<KvCache> {
        let input = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let (hidden, cache) = self.run(&input, &[vec![true; ids.len()]], None, true)?;
        let mut cache = cache.expect("run keeps the cache when asked; this is a bug");
        cache.hidden = hidden.squeeze(0)?;
        Ok(cache)
    }

    /// Continues sequences after the first `past_len` positions of `past`: `input_ids` `[B, S]` at
    /// positions `past_len..past_len+S`, `lengths[b]` of them real (right padding) →
    /// `[B, S, hidden]`. Equals the matching rows of [`Self::forward`] on the whole sequences.
    pub fn forward_cached(
        &self,
        input_ids: &Tensor,
        lengths: &[usize],
        past: &KvCache,
        past_len: usize,
    ) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        if lengths.len() != b || lengths.iter().any(|&l| l > s) || past_len > past.len() {
            return Err(Error::Candle(candle_core::Error::Msg(format!(
                "forward_cached: lengths {lengths:?} / past {past_len} of {} do not fit ids [{b}, {s}]",
                past.len()
            ))));
        }
        let valid: Vec<Vec<bool>> = lengths
            .iter()
            .map(|&l| {
                let mut row = vec![true; past_len];
                row.extend((0..s).map(|i| i < l));
                row
            })
            .collect();
        let past = KvCache {
            layers: past
                .layers
                .iter()
                .map(|(k, v)| Ok((k.narrow(2, 0, past_len)?, v.narrow(2, 0, past_len)?)))
                .collect::<candle_core::Result<Vec<_>>>()?,
            hidden: past.hidden.narrow(0, 0, past_len)?,
        };
        Ok(self.run(input_ids, &valid, Some(&past), false)?.0)
    }

    /// The forward proper. `valid[b]` covers the past and the new positions.
    fn run(
        &self,
        input_ids: &Tensor,
        valid: &[Vec<bool>],
        past: Option<&KvCache>,
        keep: bool,
    ) -> Result<(Tensor, Option<KvCache>)> {
        let _span = tracing::trace_span!("gemma2").entered();
        let (b, s) = input_ids.dims2()?;
        let p = past.map_or(0, |c| c.len());
        if p + s > self.cfg.max_position_embeddings {
            return Err(Error::Candle(candle_core::Error::Msg(format!(
                "{} tokens exceed max_position_embeddings {}",
                p + s,
                self.cfg.max_position_embeddings
            ))));
        }
        // 1. Scaled embeddings: [B·S] → [B, S, D].
        let ids = input_ids.to_dtype(DType::U32)?.flatten_all()?;
        let mut x = self
            .embed_tokens
            .index_select(&ids, 0)?
            .to_dtype(self.dtype)? // bf16 rows of a CPU mixed-precision table
            .affine(self.embed_scale, 0.0)?
            .reshape((b, s, self.cfg.hidden_size))?;
        // 2. RoPE tables for positions p..p+s: [S, hd/2], f32, then the activation dtype.
        let (cos, sin) = self.rope_tables(p, s)?;
        // 3. Masks.
        let masks = self.masks(valid, p, s)?;
        // 4. Layers.
        let mut kept = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let past_kv = past.map(|c| &c.layers[i]);
            let (y, kv) = layer.forward(&x, (&cos, &sin), past_kv, &masks)?;
            x = y;
            if keep {
                kept.push(kv);
            }
        }
        // 5. Final norm.
        let hidden = self.norm.forward(&x)?;
        let cache = keep.then(|| KvCache {
            layers: kept,
            hidden: hidden.clone(),
        });
        Ok((hidden, cache))
    }

    /// RoPE cos/sin for positions `start..start + len`, `[len, hd/2]`, views of the cached
    /// tables (made for the first 512 positions, or up to the end asked for, rounded up to a
    /// power of two).
    fn rope_tables(&self, start: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let end = start + len;
        let mut slot = self
            .rope
            .lock()
            .expect("rope table mutex poisoned; this is a bug");
        let covered = slot.as_ref().map_or(0, |(cos, _)| cos.dim(0).unwrap_or(0));
        if covered < end {
            let n = end
                .max(512)
                .next_power_of_two()
                .min(self.cfg.max_position_embeddings.max(end));
            let hd = self.cfg.head_dim();
            let theta = self.cfg.rope_theta() as f32;
            // As the reference: inv_freq = 1 / base^(arange(0, hd, 2) / hd) in f32.
            let inv_freq: Vec<f32> = (0..hd / 2)
                .map(|i| 1.0 / theta.powf((2 * i) as f32 / hd as f32))
                .collect();
            let mut freqs = Vec::with_capacity(n * hd / 2);
            for pos in 0..n {
                freqs.extend(inv_freq.iter().map(|f| pos as f32 * f));
            }
            let freqs = Tensor::from_vec(freqs, (n, hd / 2), &self.device)?;
            *slot = Some((
                freqs.cos()?.to_dtype(self.dtype)?,
                freqs.sin()?.to_dtype(self.dtype)?,
            ));
        }
        let (cos, sin) = slot.as_ref().expect("filled above; this is a bug");
        Ok((cos.narrow(0, start, len)?, sin.narrow(0, start, len)?))
    }

    /// Causal + padding masks, and the sliding-window one when some layer slides and the window
    /// is shorter than the keys. Masked entries hold f32's minimum, as transformers' eager mask.
    fn masks(&self, valid: &[Vec<bool>], p: usize, s: usize) -> Result<Masks> {
        let b = valid.len();
        let kl = p + s;
        let window = self
            .cfg
            .sliding_window
            .filter(|&w| w < kl && (0..self.cfg.num_hidden_layers).any(|i| self.cfg.is_sliding(i)));
        let build = |window: Option<usize>| -> Result<Option<Tensor>> {
            let mut data = Vec::with_capacity(b * s * kl);
            let mut any = false;
            for row in valid {
                for i in 0..s {
                    let q = p + i;
                    for (k, &ok) in row.iter().enumerate().take(kl) {
                        let keep = ok && k <= q && window.is_none_or(|w| k + w > q);
                        any |= !keep;
                        data.push(if keep { 0f32 } else { f32::MIN });
                    }
                }
            }
            if !any {
                return Ok(None);
            }
            Ok(Some(Tensor::from_vec(
                data,
                (b, 1, 1, s, kl),
                &self.device,
            )?))
        };
        let full = build(None)?;
        let sliding = match window {
            Some(w) => build(Some(w))?,
            None => full.clone(),
        };
        Ok(Masks { full, sliding })
    }
}
