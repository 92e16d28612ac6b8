//! Gemma-2 text encoder and Sana prompt encoding: diffusers `SanaPipeline.encode_prompt` and
//! `_get_gemma_prompt_embeds` (`diffusers/pipelines/sana/pipeline_sana.py`) over transformers'
//! `Gemma2Model` ([`Gemma2Model`]) and `GemmaTokenizerFast` ([`GemmaTokenizer`]).
//!
//! The prompt recipe: lowercase and strip; for the positive prompt prepend the complex human
//! instruction (CHI, [`DEFAULT_COMPLEX_HUMAN_INSTRUCTION`] joined with `\n`) and tokenize to
//! `N_chi + max − 2` tokens (`N_chi` = the instruction's own token count with `<bos>`), run
//! Gemma, keep `<bos>` plus the last `max − 1` positions; the negative prompt has no instruction
//! and `max` tokens. CFG batches are `[negative; positive]`.
//!
//! Shortcuts (on by default, [`SanaTextEncoder::with_shortcuts`]), none of which changes what
//! reaches the image:
//! * only real tokens are run; padded rows come back as zeros (the DiT masks them out of its
//!   cross-attention, so their values never matter);
//! * Gemma is causal, so the keys and values of the instruction prefix (`<bos>` + CHI) are
//!   computed once per encoder and reused for every prompt that starts with the same tokens. The
//!   joint tokenization may merge the instruction's last token with the prompt: the shared part is
//!   found token by token, and whatever differs is run again (the empty negative prompt, `<bos>`
//!   alone, needs no forward at all);
//! * a bounded LRU cache of finished prompt embeddings.

mod gemma2;
mod gemma2_config;
mod tokenizer;

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, IndexOp, Tensor};

pub use gemma2::{Gemma2Config, Gemma2Model, KvCache, RopeParameters};
pub use tokenizer::GemmaTokenizer;

use crate::{Error, Result};

/// diffusers' default `complex_human_instruction` (`SanaPipeline.__call__`), verbatim.
pub const DEFAULT_COMPLEX_HUMAN_INSTRUCTION: [&str; 8] = [
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional commentary or evaluations:",
    "User Prompt: ",
];

/// Prompt embeddings and their mask.
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    /// `[B, L, hidden]` in the text encoder's dtype; padded rows are zero with shortcuts on.
    pub embeds: Tensor,
    /// `[B, L]` u8, 1 = token, 0 = padding.
    pub mask: Tensor,
    /// Real tokens of each row, on the host: row `b` is `lengths[b]` tokens then padding (the
    /// mask's ones), so the transformer needs no device read to trim the padding.
    pub lengths: Vec<usize>,
}

impl PromptEmbeds {
    /// The rows `rows`, in that order (e.g. one row per image).
    pub fn select(&self, rows: &[u32]) -> Result<Self> {
        let idx = Tensor::new(rows, self.embeds.device())?;
        Ok(Self {
            embeds: self.embeds.index_select(&idx, 0)?,
            mask: self.mask.index_select(&idx, 0)?,
            lengths: rows.iter().map(|&r| self.lengths[r as usize]).collect(),
        })
    }

    /// `first` then `second` along the batch (classifier-free guidance: negative, then positive).
    pub fn cat(first: &Self, second: &Self) -> Result<Self> {
        Ok(Self {
            embeds: Tensor::cat(&[&first.embeds, &second.embeds], 0)?,
            mask: Tensor::cat(&[&first.mask, &second.mask], 0)?,
            lengths: first
                .lengths
                .iter()
                .chain(&second.lengths)
                .copied()
                .collect(),
        })
    }
}

/// The knobs of `encode_prompt` (diffusers' defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct EncodeOptions {
    /// Tokens per prompt after selection (`max_sequence_length`, 300).
    pub max_sequence_length: usize,
    /// Each prompt's rows are repeated this many times, consecutively.
    pub num_images_per_prompt: usize,
    /// Classifier-free guidance: the negative prompts' rows come first (`[negative; positive]`).
    pub do_classifier_free_guidance: bool,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        Self {
            max_sequence_length: 300,
            num_images_per_prompt: 1,
            do_classifier_free_guidance: true,
        }
    }
}

/// `text.lower().strip()` as Python does it (`str.isspace` also counts U+001C‥U+001F).
pub fn preprocess(text: &str) -> String {
    text.to_lowercase()
        .trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
        .to_string()
}

/// The instruction prefix run once: `<bos>` + instruction tokens, every layer's keys and values.
struct Prefix {
    ids: Vec<u32>,
    kv: KvCache,
}

/// One prompt ready for Gemma.
struct Plan {
    /// Real token ids after truncation (`<bos>` first).
    ids: Vec<u32>,
    /// Rows of the `total`-long sequence that are kept, in order (`[0] + last max − 1`).
    select: Vec<usize>,
}

impl Plan {
    /// Selected rows that hold real tokens: always a prefix of `select` (row 0 is `<bos>`, the
    /// rest is contiguous and padding comes last).
    fn real_selected(&self) -> Vec<u32> {
        self.select
            .iter()
            .take_while(|&&r| r < self.ids.len())
            .map(|&r| r as u32)
            .collect()
    }
}

type CacheKey = (String, bool, usize);

/// Least-recently-used prompt embeddings: the real selected rows `[k, hidden]`.
struct EmbedCache {
    capacity: usize,
    order: VecDeque<CacheKey>,
    rows: HashMap<CacheKey, Tensor>,
}

impl EmbedCache {
    fn get(&mut self, key: &CacheKey) -> Option<Tensor> {
        let rows = self.rows.get(key)?.clone();
        if let Some(i) = self.order.iter().position(|k| k == key) {
            let k = self
                .order
                .remove(i)
                .expect("position is in range; this is a bug");
            self.order.push_back(k);
        }
        Some(rows)
    }

    fn put(&mut self, key: CacheKey, rows: Tensor) {
        if self.capacity == 0 || self.rows.contains_key(&key) {
            return;
        }
        while self.rows.len() >= self.capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.rows.remove(&old);
                }
                None => break,
            }
        }
        self.order.push_back(key.clone());
        self.rows.insert(key, rows);
    }
}

/// Gemma-2 + tokenizer + Sana's prompt recipe, with the shortcuts of the module docs.
///
/// Methods take `&self`; the caches sit behind mutexes, so one encoder can be shared.
pub struct SanaTextEncoder {
    model: Gemma2Model,
    tokenizer: GemmaTokenizer,
    /// The instruction joined with `\n`; `None` = switched off.
    instruction: Option<String>,
    shortcuts: bool,
    /// `N_chi`: the instruction's token count with `<bos>`, counted on first use.
    instruction_len: Mutex<Option<usize>>,
    prefix: Mutex<Option<Arc<Prefix>>>,
    cache: Mutex<EmbedCache>,
}

impl std::fmt::Debug for SanaTextEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SanaTextEncoder")
            .field("config", self.model.config())
            .field("dtype", &self.model.dtype())
            .field("instruction", &self.instruction.is_some())
            .field("shortcuts", &self.shortcuts)
            .finish()
    }
}

impl SanaTextEncoder {
    /// Default number of prompt embeddings kept.
    pub const DEFAULT_CACHE_CAPACITY: usize = 32;

    /// Wraps a model and tokenizer, with the default instruction and shortcuts on.
    pub fn new(model: Gemma2Model, tokenizer: GemmaTokenizer) -> Self {
        Self {
            model,
            tokenizer,
            instruction: Some(DEFAULT_COMPLEX_HUMAN_INSTRUCTION.join("\n")),
            shortcuts: true,
            instruction_len: Mutex::new(None),
            prefix: Mutex::new(None),
            cache: Mutex::new(EmbedCache {
                capacity: Self::DEFAULT_CACHE_CAPACITY,
                order: VecDeque::new(),
                rows: HashMap::new(),
            }),
        }
    }

    /// Loads a pipeline's `text_encoder/` and `tokenizer/` folders. `dtype` is bf16 or f32
    /// (f16 is refused: Gemma-2 overflows it).
    pub fn load(
        text_encoder_dir: &Path,
        tokenizer_dir: &Path,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let model = Gemma2Model::load(text_encoder_dir, None, dtype, device)?;
        let tokenizer = GemmaTokenizer::from_file(&tokenizer_dir.join("tokenizer.json"))?;
        Ok(Self::new(model, tokenizer))
    }

    /// Replaces the complex human instruction; `None` or an empty list switches it off (as
    /// diffusers' `if not complex_human_instruction`).
    pub fn with_instruction(mut self, lines: Option<&[&str]>) -> Self {
        self.instruction = lines.filter(|l| !l.is_empty()).map(|l| l.join("\n"));
        self.clear_caches();
        self
    }

    /// Turns the shortcuts off (every prompt is run in full, exactly as diffusers) or on.
    pub fn with_shortcuts(mut self, on: bool) -> Self {
        self.shortcuts = on;
        self.clear_caches();
        self
    }

    /// Sets how many prompt embeddings are kept (0 = none).
    pub fn with_cache_capacity(self, capacity: usize) -> Self {
        self.set_cache_capacity(capacity);
        self
    }

    /// Sets how many prompt embeddings are kept (0 = none), emptying the cache.
    pub fn set_cache_capacity(&self, capacity: usize) {
        let mut cache = self
            .cache
            .lock()
            .expect("cache mutex poisoned; this is a bug");
        cache.capacity = capacity;
        cache.order.clear();
        cache.rows.clear();
    }

    /// Forgets the instruction prefix and the cached prompt embeddings.
    pub fn clear_caches(&self) {
        *self
            .instruction_len
            .lock()
            .expect("instruction mutex poisoned; this is a bug") = None;
        *self
            .prefix
            .lock()
            .expect("prefix mutex poisoned; this is a bug") = None;
        let mut cache = self
            .cache
            .lock()
            .expect("cache mutex poisoned; this is a bug");
        cache.order.clear();
        cache.rows.clear();
    }

    /// The Gemma model.
    pub fn model(&self) -> &Gemma2Model {
        &self.model
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &GemmaTokenizer {
        &self.tokenizer
    }

    /// Width of the embeddings (Gemma's hidden size; the DiT's `caption_channels`).
    pub fn hidden_size(&self) -> usize {
        self.model.config().hidden_size
    }

    /// Number of cached prompt embeddings.
    pub fn cached_prompts(&self) -> usize {
        self.cache
            .lock()
            .expect("cache mutex poisoned; this is a bug")
            .rows
            .len()
    }

    /// diffusers `encode_prompt`: the positive prompts (with the instruction when it is on) and,
    /// under CFG, the negative prompts (one for all, or one per prompt; never with the
    /// instruction), each repeated `num_images_per_prompt` times → `[negative; positive]`.
    ///
    /// Unlike diffusers, the mask rows are repeated like the embedding rows (diffusers tiles the
    /// masks, which pairs them with other prompts' rows when there are several prompts and
    /// several images per prompt).
    pub fn encode_prompt(
        &self,
        prompts: &[&str],
        negative_prompts: &[&str],
        opts: &EncodeOptions,
    ) -> Result<PromptEmbeds> {
        let n = opts.num_images_per_prompt;
        if n == 0 {
            return Err(Error::Unsupported {
                field: "num_images_per_prompt",
                value: "0".into(),
                reason: "must be at least 1".into(),
            });
        }
        let b = prompts.len();
        let positive = self.encode(prompts, true, opts.max_sequence_length)?;
        let repeat = |p: PromptEmbeds| -> Result<PromptEmbeds> {
            if n == 1 {
                return Ok(p);
            }
            let rows: Vec<u32> = (0..b as u32)
                .flat_map(|i| std::iter::repeat_n(i, n))
                .collect();
            p.select(&rows)
        };
        let positive = repeat(positive)?;
        if !opts.do_classifier_free_guidance {
            return Ok(positive);
        }
        let negatives: Vec<&str> = match negative_prompts.len() {
            1 => vec![negative_prompts[0]; b],
            len if len == b => negative_prompts.to_vec(),
            len => {
                return Err(Error::Unsupported {
                    field: "negative_prompt",
                    value: format!("{len} prompts"),
                    reason: format!("give one negative prompt, or one per prompt ({b})"),
                })
            }
        };
        let negative = repeat(self.encode(&negatives, false, opts.max_sequence_length)?)?;
        PromptEmbeds::cat(&negative, &positive)
    }

    /// diffusers `_get_gemma_prompt_embeds` followed by `encode_prompt`'s selection:
    /// `[B, max_sequence_length, hidden]` and the mask. `instruction` asks for the instruction
    /// (ignored when it is switched off).
    pub fn encode(
        &self,
        prompts: &[&str],
        instruction: bool,
        max_sequence_length: usize,
    ) -> Result<PromptEmbeds> {
        let _span = tracing::debug_span!("encode_prompt", prompts = prompts.len()).entered();
        if prompts.is_empty() {
            return Err(Error::Unsupported {
                field: "prompt",
                value: "[]".into(),
                reason: "give at least one prompt".into(),
            });
        }
        let instruction = instruction && self.instruction.is_some();
        let max = max_sequence_length;
        let texts: Vec<String> = prompts.iter().map(|p| preprocess(p)).collect();
        let plans = texts
            .iter()
            .map(|t| self.plan(t, instruction, max))
            .collect::<Result<Vec<_>>>()?;
        let rows = if self.shortcuts {
            self.rows_shortcut(&texts, &plans, instruction, max)?
        } else {
            self.rows_full(&plans)?
        };
        let (h, dev) = (self.hidden_size(), self.model.device());
        let mut embeds = Vec::with_capacity(plans.len());
        let mut mask = Vec::with_capacity(plans.len() * max);
        let mut lengths = Vec::with_capacity(plans.len());
        for (plan, rows) in plans.iter().zip(rows) {
            let k = rows.dim(0)?;
            let real = plan.real_selected().len();
            lengths.push(real);
            mask.extend(
                plan.select
                    .iter()
                    .enumerate()
                    .map(|(j, _)| u8::from(j < real)),
            );
            embeds.push(if k < max {
                let pad = Tensor::zeros((max - k, h), self.model.dtype(), dev)?;
                Tensor::cat(&[&rows, &pad], 0)?
            } else {
                rows
            });
        }
        Ok(PromptEmbeds {
            embeds: Tensor::stack(&embeds, 0)?,
            mask: Tensor::from_vec(mask, (plans.len(), max), dev)?,
            lengths,
        })
    }

    /// The token ids and mask the tokenizer gives a prompt before Gemma (`total` long: with the
    /// instruction `N_chi + max − 2`, else `max`), as `_get_gemma_prompt_embeds` makes them.
    pub fn token_ids(
        &self,
        prompt: &str,
        instruction: bool,
        max_sequence_length: usize,
    ) -> Result<(Vec<u32>, Vec<u8>)> {
        let instruction = instruction && self.instruction.is_some();
        let (full, total) =
            self.full_text(&preprocess(prompt), instruction, max_sequence_length)?;
        self.tokenizer.encode_padded(&full, total)
    }

    /// The text handed to the tokenizer and the padded length.
    fn full_text(&self, text: &str, instruction: bool, max: usize) -> Result<(String, usize)> {
        if max == 0 {
            return Err(Error::Unsupported {
                field: "max_sequence_length",
                value: "0".into(),
                reason: "must be at least 1 (Sana uses 300)".into(),
            });
        }
        match (&self.instruction, instruction) {
            (Some(chi), true) => {
                let mut len = self
                    .instruction_len
                    .lock()
                    .expect("instruction mutex poisoned; this is a bug");
                let n_chi = match *len {
                    Some(n) => n,
                    None => *len.insert(self.tokenizer.encode(chi)?.len()),
                };
                Ok((format!("{chi}{text}"), (n_chi + max).saturating_sub(2)))
            }
            _ => Ok((text.to_string(), max)),
        }
    }

    fn plan(&self, text: &str, instruction: bool, max: usize) -> Result<Plan> {
        let (full, total) = self.full_text(text, instruction, max)?;
        let (ids, mask) = self.tokenizer.encode_padded(&full, total)?;
        let real = mask.iter().filter(|&&m| m == 1).count();
        if total + 1 < max || real == 0 {
            return Err(Error::Unsupported {
                field: "tokenizer",
                value: format!("{total} tokens for max_sequence_length {max}"),
                reason: "the tokenizer must add <bos> to every sequence".into(),
            });
        }
        // [0] + [total − (max − 1), …, total − 1], as Python indexes `[0] + range(−max + 1, 0)`.
        let select = std::iter::once(0).chain(total + 1 - max..total).collect();
        Ok(Plan {
            ids: ids[..real].to_vec(),
            select,
        })
    }

    /// Every prompt run in full with padding, as diffusers does: all selected rows.
    fn rows_full(&self, plans: &[Plan]) -> Result<Vec<Tensor>> {
        let dev = self.model.device();
        let total = plans[0].select.last().map_or(1, |&r| r + 1);
        let mut ids = Vec::with_capacity(plans.len() * total);
        for plan in plans {
            ids.extend(plan.ids.iter().copied());
            ids.extend(std::iter::repeat_n(
                self.tokenizer.pad_id(),
                total - plan.ids.len(),
            ));
        }
        let ids = Tensor::from_vec(ids, (plans.len(), total), dev)?;
        let lengths: Vec<usize> = plans.iter().map(|p| p.ids.len()).collect();
        let hidden = self.model.forward_lengths(&ids, &lengths)?; // [B, total, H]
        plans
            .iter()
            .enumerate()
            .map(|(i, plan)| {
                let sel: Vec<u32> = plan.select.iter().map(|&r| r as u32).collect();
                let sel = Tensor::new(sel.as_slice(), dev)?;
                Ok(hidden.i(i)?.index_select(&sel, 0)?)
            })
            .collect()
    }

    /// The prefix (`<bos>` + instruction, or `<bos>` alone), run on first use.
    fn prefix(&self) -> Result<Arc<Prefix>> {
        let mut slot = self
            .prefix
            .lock()
            .expect("prefix mutex poisoned; this is a bug");
        if let Some(p) = slot.as_ref() {
            return Ok(p.clone());
        }
        let _span = tracing::debug_span!("instruction_prefix").entered();
        let ids = self
            .tokenizer
            .encode(self.instruction.as_deref().unwrap_or(""))?;
        let kv = self.model.prefill(&ids)?;
        let p = Arc::new(Prefix { ids, kv });
        *slot = Some(p.clone());
        Ok(p)
    }

    /// Real tokens only, after the shared prefix, with the embedding cache.
    fn rows_shortcut(
        &self,
        texts: &[String],
        plans: &[Plan],
        instruction: bool,
        max: usize,
    ) -> Result<Vec<Tensor>> {
        let keys: Vec<CacheKey> = texts
            .iter()
            .map(|t| (t.clone(), instruction, max))
            .collect();
        let mut out: Vec<Option<Tensor>> = {
            let mut cache = self
                .cache
                .lock()
                .expect("cache mutex poisoned; this is a bug");
            keys.iter().map(|k| cache.get(k)).collect()
        };
        // Unique prompts still to run, grouped by how many leading tokens the prefix covers.
        let mut todo: Vec<usize> = Vec::new();
        for i in 0..plans.len() {
            if out[i].is_none() && !todo.iter().any(|&j| keys[j] == keys[i]) {
                todo.push(i);
            }
        }
        if !todo.is_empty() {
            let prefix = self.prefix()?;
            let mut groups: HashMap<usize, Vec<usize>> = HashMap::new();
            for &i in &todo {
                let ids = &plans[i].ids;
                let shared = ids
                    .iter()
                    .zip(&prefix.ids)
                    .take_while(|(a, b)| a == b)
                    .count();
                groups.entry(shared).or_default().push(i);
            }
            let mut groups: Vec<(usize, Vec<usize>)> = groups.into_iter().collect();
            groups.sort();
            for (shared, items) in groups {
                for (i, rows) in items
                    .iter()
                    .zip(self.run_group(&prefix, shared, plans, &items)?)
                {
                    out[*i] = Some(rows);
                }
            }
            let mut cache = self
                .cache
                .lock()
                .expect("cache mutex poisoned; this is a bug");
            for &i in &todo {
                if let Some(rows) = &out[i] {
                    cache.put(keys[i].clone(), rows.clone());
                }
            }
        }
        // Duplicates in the batch take their first occurrence's rows.
        (0..plans.len())
            .map(|i| {
                if let Some(rows) = &out[i] {
                    return Ok(rows.clone());
                }
                let first = keys
                    .iter()
                    .position(|k| *k == keys[i])
                    .expect("a key equals itself; this is a bug");
                Ok(out[first]
                    .clone()
                    .expect("every unique prompt was run; this is a bug"))
            })
            .collect()
    }

    /// Prompts sharing their first `shared` tokens with the prefix: one batched forward over the
    /// rest of their real tokens → each prompt's real selected rows.
    fn run_group(
        &self,
        prefix: &Prefix,
        shared: usize,
        plans: &[Plan],
        items: &[usize],
    ) -> Result<Vec<Tensor>> {
        let dev = self.model.device();
        let lengths: Vec<usize> = items.iter().map(|&i| plans[i].ids.len() - shared).collect();
        let s = lengths.iter().copied().max().unwrap_or(0);
        let suffix = if s > 0 {
            let mut ids = Vec::with_capacity(items.len() * s);
            for &i in items {
                let tail = &plans[i].ids[shared..];
                ids.extend_from_slice(tail);
                ids.extend(std::iter::repeat_n(self.tokenizer.pad_id(), s - tail.len()));
            }
            let ids = Tensor::from_vec(ids, (items.len(), s), dev)?;
            Some(
                self.model
                    .forward_cached(&ids, &lengths, &prefix.kv, shared)?,
            )
        } else {
            None
        };
        items
            .iter()
            .enumerate()
            .map(|(g, &i)| {
                let plan = &plans[i];
                // All real rows of this prompt: [prefix rows; suffix rows] → [n_real, H].
                let mut parts = Vec::with_capacity(2);
                if shared > 0 {
                    parts.push(prefix.kv.hidden().narrow(0, 0, shared)?);
                }
                if let Some(suffix) = &suffix {
                    parts.push(suffix.i(g)?.narrow(0, 0, lengths[g])?);
                }
                let all = Tensor::cat(&parts, 0)?;
                let sel = Tensor::new(plan.real_selected().as_slice(), dev)?;
                Ok(all.index_select(&sel, 0)?)
            })
            .collect()
    }
}
