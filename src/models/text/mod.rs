//! Text encoders and their prompt handling: Gemma-2 (SANA, SANA-Sprint, SANA-Video).

pub mod gemma;
pub mod sana_prompt;

pub use gemma::{Gemma2Config, Gemma2Encoder};
pub use sana_prompt::{
    select_indices, GemmaTokenizer, PromptEmbeddings, SanaPromptConfig, SanaTextEncoder, TokenBatch,
    SANA_COMPLEX_HUMAN_INSTRUCTION, SANA_VIDEO_COMPLEX_HUMAN_INSTRUCTION,
};
