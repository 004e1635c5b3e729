//! The word-level tokenizer of tiny-shapes: a `tokenizers` WordLevel model over the shapes
//! vocabulary (`data::shapes::VOCABULARY`), after three special tokens. Every caption starts with
//! `[bos]`, so the empty (unconditional) caption of classifier-free guidance is `[bos]` alone and no
//! cross-attention row is ever fully masked. Padding is `[pad]`, masked out of attention.
//!
//! Text is split into words by `data::prompt::words` (the same split the caption parser uses) and
//! every word must be in the vocabulary: an unknown word is a usage error that lists it.

use std::path::Path;
use std::str::FromStr;

use tokenizers::Tokenizer;

use crate::data::shapes::{words, VOCABULARY};
use crate::error::{Error, Result};

pub const PAD: &str = "[pad]";
pub const UNK: &str = "[unk]";
pub const BOS: &str = "[bos]";
/// Ids 0, 1, 2; the vocabulary words follow from id 3 in `VOCABULARY` order.
pub const SPECIAL_TOKENS: [&str; 3] = [PAD, UNK, BOS];
pub const PAD_ID: u32 = 0;
pub const UNK_ID: u32 = 1;
pub const BOS_ID: u32 = 2;

/// A batch of captions as ids `(B, L)` with a mask `(B, L)` (1 = real token), row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBatch {
    pub ids: Vec<u32>,
    pub mask: Vec<f32>,
    pub batch: usize,
    pub len: usize,
}

#[derive(Clone)]
pub struct ShapesTokenizer {
    inner: Tokenizer,
    max_len: usize,
}

impl std::fmt::Debug for ShapesTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ShapesTokenizer(max_len {})", self.max_len)
    }
}

/// The tokenizer JSON (the format `tokenizers` reads) for the shapes vocabulary.
pub fn tokenizer_json() -> String {
    let mut vocab = serde_json::Map::new();
    for (i, word) in SPECIAL_TOKENS.iter().chain(VOCABULARY.iter()).enumerate() {
        vocab.insert((*word).to_string(), serde_json::Value::from(i as u64));
    }
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": { "type": "Lowercase" },
        "pre_tokenizer": { "type": "WhitespaceSplit" },
        "post_processor": null,
        "decoder": null,
        "model": { "type": "WordLevel", "vocab": vocab, "unk_token": UNK }
    });
    serde_json::to_string_pretty(&json).unwrap_or_default()
}

fn unknown_word(word: &str) -> Error {
    Error::usage(format!(
        "unknown word `{word}`: tiny-shapes only knows the words {}",
        VOCABULARY.join(", ")
    ))
}

impl ShapesTokenizer {
    /// The tokenizer built in memory from the vocabulary.
    pub fn from_vocabulary(max_len: usize) -> Result<Self> {
        let inner = Tokenizer::from_str(&tokenizer_json()).map_err(|e| Error::Other(format!("building the tokenizer: {e}")))?;
        Ok(Self { inner, max_len })
    }

    /// Reads `tokenizer.json` and checks that it numbers the words as the vocabulary does.
    pub fn from_file(path: &Path, max_len: usize) -> Result<Self> {
        let inner = Tokenizer::from_file(path).map_err(|e| Error::Weights {
            file: path.display().to_string(),
            tensor: String::new(),
            msg: format!("cannot read the tokenizer: {e}"),
        })?;
        for (i, word) in SPECIAL_TOKENS.iter().chain(VOCABULARY.iter()).enumerate() {
            if inner.token_to_id(word) != Some(i as u32) {
                return Err(Error::Weights {
                    file: path.display().to_string(),
                    tensor: String::new(),
                    msg: format!("word `{word}` should have id {i}, found {:?}", inner.token_to_id(word)),
                });
            }
        }
        Ok(Self { inner, max_len })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner.save(path, true).map_err(|e| Error::Other(format!("saving {}: {e}", path.display())))
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// `[bos]` then the ids of the words of `text`; an unknown word is a usage error listing the
    /// vocabulary. An empty text gives `[bos]` alone (the unconditional caption).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let words = words(text);
        if words.len() + 1 > self.max_len {
            return Err(Error::usage(format!(
                "the prompt has {} words; tiny-shapes reads at most {}",
                words.len(),
                self.max_len - 1
            )));
        }
        let joined = words.join(" ");
        let encoding = self.inner.encode(joined.as_str(), false).map_err(|e| Error::Other(format!("tokenizer: {e}")))?;
        let ids = encoding.get_ids();
        if ids.len() != words.len() {
            return Err(Error::Other(format!("tokenizer split `{joined}` into {} tokens, expected {}", ids.len(), words.len())));
        }
        let mut out = Vec::with_capacity(ids.len() + 1);
        out.push(BOS_ID);
        for (id, word) in ids.iter().zip(&words) {
            if *id == UNK_ID || (*id as usize) < SPECIAL_TOKENS.len() {
                return Err(unknown_word(word));
            }
            out.push(*id);
        }
        Ok(out)
    }

    /// Pads already encoded captions to `max_len`.
    pub fn pad_batch(&self, captions: &[Vec<u32>]) -> TokenBatch {
        let len = self.max_len;
        let mut ids = vec![PAD_ID; captions.len() * len];
        let mut mask = vec![0f32; captions.len() * len];
        for (row, caption) in captions.iter().enumerate() {
            for (j, id) in caption.iter().take(len).enumerate() {
                ids[row * len + j] = *id;
                mask[row * len + j] = 1.0;
            }
        }
        TokenBatch { ids, mask, batch: captions.len(), len }
    }

    /// Encodes and pads a batch of texts.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<TokenBatch> {
        let captions = texts.iter().map(|t| self.encode(t)).collect::<Result<Vec<_>>>()?;
        Ok(self.pad_batch(&captions))
    }
}
