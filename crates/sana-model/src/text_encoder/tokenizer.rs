//! Gemma's tokenizer (`GemmaTokenizerFast`) from `tokenizer/tokenizer.json` through the
//! `tokenizers` crate, called the way `SanaPipeline` calls it: special tokens added (`<bos>`),
//! right truncation and right padding to a fixed length, an attention mask.

use std::path::{Path, PathBuf};

use tokenizers::{PostProcessor, Tokenizer, TruncationDirection};

use crate::{Error, Result};

/// A `tokenizer.json` tokenizer with HF's `padding="max_length", truncation=True` behaviour.
#[derive(Clone)]
pub struct GemmaTokenizer {
    inner: Tokenizer,
    /// Where it was loaded from, for error messages.
    path: PathBuf,
    pad_id: u32,
    /// Special tokens the post-processor adds to one sequence (`<bos>`: 1).
    added: usize,
}

impl std::fmt::Debug for GemmaTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GemmaTokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl GemmaTokenizer {
    /// Loads `tokenizer.json` (any truncation or padding stored in it is dropped: each call
    /// states its own). The padding token is `<pad>`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let mut inner = Tokenizer::from_file(path).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: format!("cannot load tokenizer: {e}"),
        })?;
        inner
            .with_truncation(None)
            .map_err(|e| Error::Config {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?
            .with_padding(None);
        let pad_id = inner.token_to_id("<pad>").ok_or_else(|| Error::Config {
            path: path.to_path_buf(),
            message: "the tokenizer has no <pad> token".to_string(),
        })?;
        let added = inner
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false));
        Ok(Self {
            inner,
            path: path.to_path_buf(),
            pad_id,
            added,
        })
    }

    /// The padding id.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Ids with special tokens, no truncation (`tokenizer.encode(text)`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_truncated(text, None)
    }

    /// `tokenizer(text, padding="max_length", max_length, truncation=True)`: exactly
    /// `max_length` ids and the mask (1 = token, 0 = padding), right-truncated, right-padded.
    pub fn encode_padded(&self, text: &str, max_length: usize) -> Result<(Vec<u32>, Vec<u8>)> {
        if max_length < self.added {
            return Err(Error::Unsupported {
                field: "max_sequence_length",
                value: max_length.to_string(),
                reason: format!("must leave room for the {} special token(s)", self.added),
            });
        }
        let mut ids = self.encode_truncated(text, Some(max_length))?;
        let mut mask = vec![1u8; ids.len()];
        ids.resize(max_length, self.pad_id);
        mask.resize(max_length, 0);
        Ok((ids, mask))
    }

    /// Tokenizes, truncates the text's tokens so that with the special tokens at most
    /// `max_length` remain (as the `tokenizers` library does), then adds the special tokens.
    fn encode_truncated(&self, text: &str, max_length: Option<usize>) -> Result<Vec<u32>> {
        let err = |e: tokenizers::Error| Error::Config {
            path: self.path.clone(),
            message: format!("cannot tokenize {text:?}: {e}"),
        };
        let mut enc = self.inner.encode(text, false).map_err(err)?;
        if let Some(max) = max_length {
            enc.truncate(max - self.added, 0, TruncationDirection::Right);
        }
        let enc = self.inner.post_process(enc, None, true).map_err(err)?;
        Ok(enc.get_ids().to_vec())
    }
}
