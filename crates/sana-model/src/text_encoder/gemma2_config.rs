//! `Gemma2Config`: the keys of a transformers Gemma-2 `config.json`, their defaults, validation and
//! the parameter count.

use serde::Deserialize;

use crate::{Error, Result};

fn default_vocab_size() -> usize {
    256000
}
fn default_hidden_size() -> usize {
    2304
}
fn default_intermediate_size() -> usize {
    9216
}
fn default_num_hidden_layers() -> usize {
    26
}
fn default_num_attention_heads() -> usize {
    8
}
fn default_num_key_value_heads() -> usize {
    4
}
fn default_head_dim() -> Option<usize> {
    Some(256)
}
fn default_hidden_activation() -> Option<String> {
    Some("gelu_pytorch_tanh".to_string())
}
fn default_max_position_embeddings() -> usize {
    8192
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_query_pre_attn_scalar() -> f64 {
    256.0
}
fn default_sliding_window() -> Option<usize> {
    Some(4096)
}
fn default_attn_logit_softcapping() -> Option<f64> {
    Some(50.0)
}
fn default_pad_token_id() -> Option<u32> {
    Some(0)
}
fn default_bos_token_id() -> Option<u32> {
    Some(2)
}

/// `rope_parameters` as transformers ≥ 5 writes it (older configs have a top-level `rope_theta`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RopeParameters {
    #[serde(default)]
    pub rope_type: Option<String>,
    #[serde(default)]
    pub rope_theta: Option<f64>,
}

/// `text_encoder/config.json` (transformers `Gemma2Config`). Field names are the config keys;
/// defaults are transformers' (= gemma-2-2b); unknown keys are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Gemma2Config {
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "default_num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_num_key_value_heads")]
    pub num_key_value_heads: usize,
    /// `null` ⇒ `hidden_size / num_attention_heads`.
    #[serde(default = "default_head_dim")]
    pub head_dim: Option<usize>,
    /// The MLP activation (`hidden_act` is ignored by `Gemma2MLP`, as in transformers).
    #[serde(default = "default_hidden_activation")]
    pub hidden_activation: Option<String>,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// Legacy key (transformers < 5); `rope_parameters.rope_theta` wins when both are present.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    /// Legacy key; only `null` is served.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "default_query_pre_attn_scalar")]
    pub query_pre_attn_scalar: f64,
    #[serde(default = "default_sliding_window")]
    pub sliding_window: Option<usize>,
    /// `null` ⇒ alternating, starting with `sliding_attention` at layer 0.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default = "default_attn_logit_softcapping")]
    pub attn_logit_softcapping: Option<f64>,
    #[serde(default)]
    pub use_bidirectional_attention: Option<bool>,
    #[serde(default = "default_pad_token_id")]
    pub pad_token_id: Option<u32>,
    #[serde(default = "default_bos_token_id")]
    pub bos_token_id: Option<u32>,
}

impl Default for Gemma2Config {
    fn default() -> Self {
        serde_json::from_str("{}").expect("an empty config parses; this is a bug")
    }
}

impl Gemma2Config {
    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// RoPE base frequency (default 10000).
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10000.0)
    }

    /// Whether layer `i` attends through the sliding window.
    pub fn is_sliding(&self, i: usize) -> bool {
        match &self.layer_types {
            Some(types) => types.get(i).is_some_and(|t| t == "sliding_attention"),
            None => i.is_multiple_of(2),
        }
    }

    /// Refuses configs this implementation cannot serve, naming the field.
    pub fn validate(&self) -> Result<()> {
        let unsupported = |field: &'static str, value: String, reason: &str| {
            Err(Error::Unsupported {
                field,
                value,
                reason: reason.to_string(),
            })
        };
        if self.hidden_size == 0 || self.num_hidden_layers == 0 || self.intermediate_size == 0 {
            return unsupported(
                "hidden_size",
                format!(
                    "{} (num_hidden_layers {}, intermediate_size {})",
                    self.hidden_size, self.num_hidden_layers, self.intermediate_size
                ),
                "all model sizes must be positive",
            );
        }
        let (h, kv) = (self.num_attention_heads, self.num_key_value_heads);
        if h == 0 || kv == 0 || !h.is_multiple_of(kv) {
            return unsupported(
                "num_key_value_heads",
                kv.to_string(),
                &format!("must be positive and divide num_attention_heads ({h})"),
            );
        }
        let hd = self.head_dim();
        if hd == 0 || !hd.is_multiple_of(2) {
            return unsupported(
                "head_dim",
                hd.to_string(),
                "rotary embeddings need a positive even head dim",
            );
        }
        match self.hidden_activation.as_deref() {
            Some("gelu_pytorch_tanh" | "gelu_new") => {}
            other => {
                return unsupported(
                    "hidden_activation",
                    format!("{other:?}"),
                    "only the tanh GELU (\"gelu_pytorch_tanh\") is supported",
                )
            }
        }
        let rope_type = self
            .rope_parameters
            .as_ref()
            .and_then(|r| r.rope_type.as_deref());
        if !matches!(rope_type, None | Some("default")) || self.rope_scaling.is_some() {
            return unsupported(
                "rope_parameters",
                format!("{:?} (rope_scaling {:?})", rope_type, self.rope_scaling),
                "only the default RoPE without scaling is supported",
            );
        }
        if self.attention_bias {
            return unsupported(
                "attention_bias",
                "true".into(),
                "Gemma-2 has no attention biases",
            );
        }
        if self.use_bidirectional_attention == Some(true) {
            return unsupported(
                "use_bidirectional_attention",
                "true".into(),
                "the text encoder is causal",
            );
        }
        if !(self.query_pre_attn_scalar.is_finite() && self.query_pre_attn_scalar > 0.0) {
            return unsupported(
                "query_pre_attn_scalar",
                self.query_pre_attn_scalar.to_string(),
                "must be positive",
            );
        }
        if let Some(cap) = self.attn_logit_softcapping {
            if !(cap.is_finite() && cap > 0.0) {
                return unsupported(
                    "attn_logit_softcapping",
                    cap.to_string(),
                    "must be positive or null",
                );
            }
        }
        if let Some(types) = &self.layer_types {
            if types.len() < self.num_hidden_layers {
                return unsupported(
                    "layer_types",
                    format!("{} entries", types.len()),
                    &format!("needs one per layer ({})", self.num_hidden_layers),
                );
            }
            if let Some(t) = types
                .iter()
                .find(|t| *t != "sliding_attention" && *t != "full_attention")
            {
                return unsupported(
                    "layer_types",
                    format!("{t:?}"),
                    "only \"sliding_attention\" and \"full_attention\" are supported",
                );
            }
        }
        if self.sliding_window == Some(0) {
            return unsupported("sliding_window", "0".into(), "must be positive or null");
        }
        Ok(())
    }

    /// Number of parameters of `Gemma2Model` for this config.
    pub fn parameter_count(&self) -> usize {
        let (d, hd) = (self.hidden_size, self.head_dim());
        let q = self.num_attention_heads * hd;
        let kv = self.num_key_value_heads * hd;
        let layer = d * q + 2 * d * kv + q * d + 3 * d * self.intermediate_size + 4 * d;
        self.vocab_size * d + self.num_hidden_layers * layer + d
    }
}
