//! SANA's prompt handling around the Gemma-2 encoder, as diffusers' `SanaPipeline.encode_prompt`:
//! 1. each prompt is lower-cased and stripped;
//! 2. positive prompts get the "complex human instruction" (CHI) lines, joined by "\n", prepended;
//!    the token budget becomes `len(tokens(CHI)) + max_sequence_length − 2` (the CHI count includes BOS);
//! 3. tokens (with BOS) are right-truncated and right-padded to the budget; the mask marks real tokens;
//! 4. Gemma-2 runs with that padding mask and the last hidden states are kept;
//! 5. positive prompts keep position 0 (BOS) plus the last `max_sequence_length − 1` positions, so the
//!    text length is always `max_sequence_length`; the mask takes the same positions.
//!    Negative prompts skip the CHI and the selection: budget `max_sequence_length`, all positions.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::gemma::Gemma2Encoder;
use crate::error::{Error, Result};

/// The instruction SANA's pipelines prepend to positive prompts by default (diffusers'
/// `complex_human_instruction` argument). It is model input: it must stay byte-identical.
pub const SANA_COMPLEX_HUMAN_INSTRUCTION: [&str; 8] = [
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional commentary or evaluations:",
    "User Prompt: ",
];

/// SANA-Video's instruction (diffusers' `SanaVideoPipeline` default): motion and temporal wording.
pub const SANA_VIDEO_COMPLEX_HUMAN_INSTRUCTION: [&str; 8] = [
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for video generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, motion, and temporal relationships to create vivid and dynamic scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat slowly settling into a curled position, peacefully falling asleep on a warm sunny windowsill, with gentle sunlight filtering through surrounding pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street lamps gradually lighting up, a diverse crowd of people in colorful clothing walking past, and a double-decker bus smoothly passing by towering glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional commentary or evaluations:",
    "User Prompt: ",
];

#[derive(Debug, Clone, PartialEq)]
pub struct SanaPromptConfig {
    /// Text length seen by the transformer (300 for every SANA model).
    pub max_sequence_length: usize,
    /// Lines prepended to positive prompts; empty disables the instruction.
    pub complex_human_instruction: Vec<String>,
}

impl SanaPromptConfig {
    /// SANA and SANA-Sprint (the same as `default()`).
    pub fn image() -> Self {
        Self::default()
    }

    /// SANA-Video (text-to-video and image-to-video).
    pub fn video() -> Self {
        Self {
            max_sequence_length: 300,
            complex_human_instruction: SANA_VIDEO_COMPLEX_HUMAN_INSTRUCTION
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }
}

impl Default for SanaPromptConfig {
    fn default() -> Self {
        Self {
            max_sequence_length: 300,
            complex_human_instruction: SANA_COMPLEX_HUMAN_INSTRUCTION.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// The Gemma tokenizer from a checkpoint's `tokenizer.json`, with the BOS and padding ids.
#[derive(Clone)]
pub struct GemmaTokenizer {
    inner: tokenizers::Tokenizer,
    bos_id: u32,
    pad_id: u32,
}

impl GemmaTokenizer {
    /// Loads `tokenizer.json`; the pad and BOS tokens come from the sibling `tokenizer_config.json`
    /// when present, else Gemma's `<pad>` / `<bos>`.
    pub fn from_file(tokenizer_json: &Path) -> Result<Self> {
        let bad = |e: &dyn std::fmt::Display| Error::Weights {
            file: tokenizer_json.display().to_string(),
            tensor: String::new(),
            msg: format!("cannot read tokenizer: {e}"),
        };
        let mut inner = tokenizers::Tokenizer::from_file(tokenizer_json).map_err(|e| bad(&e))?;
        // padding and truncation are SANA's (below), never whatever the file may configure
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| bad(&e))?;
        let config = tokenizer_json.with_file_name("tokenizer_config.json");
        let special = |key: &str, fallback: &str| -> String {
            std::fs::read_to_string(&config)
                .ok()
                .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
                .and_then(|v| match v.get(key)? {
                    serde_json::Value::String(s) => Some(s.clone()),
                    other => other.get("content")?.as_str().map(str::to_string),
                })
                .unwrap_or_else(|| fallback.to_string())
        };
        let id_of = |token: String| -> Result<u32> {
            inner.token_to_id(&token).ok_or_else(|| Error::Weights {
                file: tokenizer_json.display().to_string(),
                tensor: String::new(),
                msg: format!("tokenizer has no `{token}` token"),
            })
        };
        let bos_id = id_of(special("bos_token", "<bos>"))?;
        let pad_id = id_of(special("pad_token", "<pad>"))?;
        Ok(Self { inner, bos_id, pad_id })
    }

    /// A character-level tokenizer for models with random weights, which ship no tokenizer:
    /// `<pad>` = 0, `<bos>` = 1, `<unk>` = 2, then one token per printable ASCII character.
    pub fn char_level() -> Result<Self> {
        use tokenizers::models::wordlevel::WordLevel;
        use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
        use tokenizers::SplitDelimiterBehavior;
        let bad = |e: &dyn std::fmt::Display| Error::Other(format!("character tokenizer: {e}"));
        let mut vocab: std::collections::HashMap<String, u32> =
            [("<pad>", 0), ("<bos>", 1), ("<unk>", 2)].into_iter().map(|(t, i)| (t.to_string(), i)).collect();
        for (i, c) in (b' '..=b'~').enumerate() {
            vocab.insert((c as char).to_string(), 3 + i as u32);
        }
        let model = WordLevel::builder().vocab(vocab.into_iter().collect()).unk_token("<unk>".into()).build().map_err(|e| bad(&e))?;
        let mut inner = tokenizers::Tokenizer::new(model);
        let split = Split::new(SplitPattern::Regex(".".into()), SplitDelimiterBehavior::Isolated, false).map_err(|e| bad(&e))?;
        inner.with_pre_tokenizer(Some(split));
        Ok(Self { inner, bos_id: 1, pad_id: 0 })
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Token ids with the special tokens, which for Gemma is a leading BOS (added here if the
    /// tokenizer's post-processor does not).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::Other(format!("tokenizer failed on {text:?}: {e}")))?;
        let mut ids = encoding.get_ids().to_vec();
        if ids.first() != Some(&self.bos_id) {
            ids.insert(0, self.bos_id);
        }
        Ok(ids)
    }

    /// Right-truncates (keeping BOS) and right-pads every text to `max_len`.
    pub fn encode_batch_padded(&self, texts: &[String], max_len: usize) -> Result<TokenBatch> {
        let mut input_ids = Vec::with_capacity(texts.len());
        let mut mask = Vec::with_capacity(texts.len());
        for text in texts {
            let mut ids = self.encode(text)?;
            ids.truncate(max_len);
            let real = ids.len();
            ids.resize(max_len, self.pad_id);
            input_ids.push(ids);
            mask.push((0..max_len).map(|i| u32::from(i < real)).collect());
        }
        Ok(TokenBatch {
            input_ids,
            mask,
            len: max_len,
        })
    }
}

/// Token ids and padding mask (1 = real token) of a batch, all rows of length `len`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBatch {
    pub input_ids: Vec<Vec<u32>>,
    pub mask: Vec<Vec<u32>>,
    pub len: usize,
}

impl TokenBatch {
    pub fn to_tensors(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let b = self.input_ids.len();
        let ids = Tensor::from_vec(self.input_ids.concat(), (b, self.len), device)?;
        let mask = Tensor::from_vec(self.mask.concat(), (b, self.len), device)?;
        Ok((ids, mask))
    }
}

/// Positions kept from a sequence of `total_len`: 0, then the last `max_sequence_length − 1`
/// (Python's `[0] + list(range(-max_sequence_length + 1, 0))`).
pub fn select_indices(total_len: usize, max_sequence_length: usize) -> Result<Vec<usize>> {
    if max_sequence_length == 0 || total_len + 1 < max_sequence_length {
        return Err(Error::Usage(format!(
            "cannot select {max_sequence_length} text positions from a sequence of {total_len}"
        )));
    }
    let tail_start = total_len + 1 - max_sequence_length;
    Ok(std::iter::once(0).chain(tail_start..total_len).collect())
}

/// Text conditioning for the transformer: `embeds` (B, max_sequence_length, hidden) in the text
/// encoder dtype and `mask` (B, max_sequence_length) f32 with 1 = real token, 0 = padding.
#[derive(Debug, Clone)]
pub struct PromptEmbeddings {
    pub embeds: Tensor,
    pub mask: Tensor,
}

impl PromptEmbeddings {
    /// The classifier-free-guidance batch in diffusers' order: negative first, then positive
    /// (`cat([negative, positive])` on the batch axis), for embeddings and masks.
    pub fn cfg_batch(negative: &PromptEmbeddings, positive: &PromptEmbeddings) -> Result<PromptEmbeddings> {
        Ok(PromptEmbeddings {
            embeds: Tensor::cat(&[&negative.embeds, &positive.embeds], 0)?,
            mask: Tensor::cat(&[&negative.mask, &positive.mask], 0)?,
        })
    }
}

/// Gemma-2 plus its tokenizer plus SANA's prompt rules.
pub struct SanaTextEncoder {
    pub tokenizer: GemmaTokenizer,
    pub model: Gemma2Encoder,
    pub config: SanaPromptConfig,
}

fn prepare(prompt: &str) -> String {
    prompt.to_lowercase().trim().to_string()
}

impl SanaTextEncoder {
    pub fn new(tokenizer: GemmaTokenizer, model: Gemma2Encoder, config: SanaPromptConfig) -> Self {
        Self {
            tokenizer,
            model,
            config,
        }
    }

    /// Tokens of positive prompts (CHI prepended, budget grown by its length), before selection.
    pub fn tokenize_prompts(&self, prompts: &[&str]) -> Result<TokenBatch> {
        check_batch(prompts)?;
        let max_len = self.config.max_sequence_length;
        if self.config.complex_human_instruction.is_empty() {
            let texts: Vec<String> = prompts.iter().map(|p| prepare(p)).collect();
            return self.tokenizer.encode_batch_padded(&texts, max_len);
        }
        let chi = self.config.complex_human_instruction.join("\n");
        let chi_tokens = self.tokenizer.encode(&chi)?.len();
        let budget = (chi_tokens + max_len)
            .checked_sub(2)
            .filter(|&b| b > 0)
            .ok_or_else(|| {
                Error::Usage(format!(
                    "max sequence length {max_len} is too small for the prompt instruction"
                ))
            })?;
        let texts: Vec<String> = prompts.iter().map(|p| format!("{chi}{}", prepare(p))).collect();
        self.tokenizer.encode_batch_padded(&texts, budget)
    }

    /// Tokens of negative prompts: no instruction, budget `max_sequence_length`.
    pub fn tokenize_negative(&self, prompts: &[&str]) -> Result<TokenBatch> {
        check_batch(prompts)?;
        let texts: Vec<String> = prompts.iter().map(|p| prepare(p)).collect();
        self.tokenizer
            .encode_batch_padded(&texts, self.config.max_sequence_length)
    }

    /// Runs the encoder on a token batch: (B, len, hidden) hidden states and the f32 mask.
    pub fn encode_tokens(&self, tokens: &TokenBatch) -> Result<PromptEmbeddings> {
        let (ids, mask) = tokens.to_tensors(self.model.device())?;
        let embeds = self.model.forward(&ids, &mask)?;
        Ok(PromptEmbeddings {
            embeds,
            mask: mask.to_dtype(DType::F32)?,
        })
    }

    /// Positive prompts → (B, max_sequence_length, hidden) with SANA's BOS + tail selection.
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<PromptEmbeddings> {
        let tokens = self.tokenize_prompts(prompts)?;
        let full = self.encode_tokens(&tokens)?;
        let keep = select_indices(tokens.len, self.config.max_sequence_length)?;
        let keep = Tensor::from_vec(
            keep.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            keep.len(),
            full.embeds.device(),
        )?;
        Ok(PromptEmbeddings {
            embeds: full.embeds.index_select(&keep, 1)?,
            mask: full.mask.index_select(&keep.to_device(full.mask.device())?, 1)?,
        })
    }

    /// Negative prompts → (B, max_sequence_length, hidden), no instruction, no selection.
    pub fn encode_negative(&self, prompts: &[&str]) -> Result<PromptEmbeddings> {
        let tokens = self.tokenize_negative(prompts)?;
        self.encode_tokens(&tokens)
    }

    /// Both halves of classifier-free guidance; `negative` must have one entry per prompt.
    pub fn encode_with_negative(
        &self,
        prompts: &[&str],
        negative: &[&str],
    ) -> Result<(PromptEmbeddings, PromptEmbeddings)> {
        if negative.len() != prompts.len() {
            return Err(Error::Usage(format!(
                "{} negative prompts for {} prompts: give one per prompt",
                negative.len(),
                prompts.len()
            )));
        }
        // One encoder pass for both (on the GPU the encoder's time is mostly launches, which a
        // second pass doubles): the negative rows are right-padded to the positive budget. Gemma is
        // causal, so padding after a row's last position changes none of its positions, with one
        // exception: a padding position whose sliding window holds no real token has every key
        // masked, and transformers then averages over ALL keys, the added padding included. Rows
        // always start with BOS, so that needs a window shorter than the sequence: then, two passes.
        let positive = self.tokenize_prompts(prompts)?;
        let negative_tokens = self.tokenize_negative(negative)?;
        let len = positive.len.max(negative_tokens.len);
        if self.model.config().sliding_window.is_some_and(|window| window < len) {
            return Ok((self.encode_prompts(prompts)?, self.encode_negative(negative)?));
        }
        let negative = negative_tokens;
        let pad = |batch: TokenBatch| -> TokenBatch {
            let widen = |rows: Vec<Vec<u32>>, fill: u32| {
                rows.into_iter().map(move |mut row| {
                    row.resize(len, fill);
                    row
                })
            };
            TokenBatch {
                input_ids: widen(batch.input_ids, self.tokenizer.pad_id()).collect(),
                mask: widen(batch.mask, 0).collect(),
                len,
            }
        };
        let (positive_len, rows) = (positive.len, prompts.len());
        let (positive, negative) = (pad(positive), pad(negative));
        let both = TokenBatch {
            input_ids: [positive.input_ids, negative.input_ids].concat(),
            mask: [positive.mask, negative.mask].concat(),
            len,
        };
        let full = self.encode_tokens(&both)?;
        let max_len = self.config.max_sequence_length;
        let keep = select_indices(positive_len, max_len)?;
        let keep = Tensor::from_vec(keep.iter().map(|&i| i as u32).collect::<Vec<_>>(), keep.len(), full.embeds.device())?;
        let positive_rows = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(0, 0, rows)?.index_select(&keep.to_device(t.device())?, 1)?) };
        let negative_rows = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(0, rows, rows)?.narrow(1, 0, max_len)?.contiguous()?) };
        Ok((
            PromptEmbeddings { embeds: positive_rows(&full.embeds)?, mask: positive_rows(&full.mask)? },
            PromptEmbeddings { embeds: negative_rows(&full.embeds)?, mask: negative_rows(&full.mask)? },
        ))
    }
}

fn check_batch(prompts: &[&str]) -> Result<()> {
    if prompts.is_empty() {
        return Err(Error::Usage("no prompt given".into()));
    }
    Ok(())
}
