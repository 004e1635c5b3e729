//! Gemma-2 text encoder and SANA prompt handling against diffusers' SanaPipeline.encode_prompt run
//! with a tiny random Gemma2Model and a tiny tokenizer (tests/goldens/make_gemma_goldens.py).

mod common;
use common::max_rel_err;
use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use visgen::models::text::{
    Gemma2Config, Gemma2Encoder, GemmaTokenizer, SanaPromptConfig, SanaTextEncoder, SANA_COMPLEX_HUMAN_INSTRUCTION,
    SANA_VIDEO_COMPLEX_HUMAN_INSTRUCTION,
};
use visgen::weights::{HubConfig, ModelRepo, ModelSource};

fn golden_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/goldens"))
}

fn goldens() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(golden_dir().join("gemma_prompts.safetensors"), &Device::Cpu).unwrap()
}

fn prompts() -> (Vec<String>, Vec<String>) {
    let text = std::fs::read_to_string(golden_dir().join("gemma_tiny/prompts.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let list = |k: &str| {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    (list("prompts"), list("negative"))
}

/// Loaded the way a pipeline loads it: through the weights module, from a diffusers-style folder.
fn encoder(config: SanaPromptConfig) -> SanaTextEncoder {
    let source = ModelSource::parse(golden_dir().join("gemma_tiny").to_str().unwrap()).unwrap();
    let repo = ModelRepo::open(&source, &HubConfig::from_env()).unwrap();
    let tokenizer = GemmaTokenizer::from_file(&repo.tokenizer_json("tokenizer").unwrap()).unwrap();
    let cfg = Gemma2Config::from_json_file(&repo.component_config("text_encoder").unwrap()).unwrap();
    let weights = repo.open_weights("text_encoder", None).unwrap();
    let model = weights
        .build(DType::F32, &Device::Cpu, |vb| Gemma2Encoder::new(&cfg, vb))
        .unwrap();
    SanaTextEncoder::new(tokenizer, model, config)
}


fn as_i64_rows(t: &Tensor) -> Vec<Vec<i64>> {
    t.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap()
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn tokenization_matches_transformers() {
    let g = goldens();
    let (pos, _) = prompts();
    let enc = encoder(SanaPromptConfig::default());
    let tokens = enc.tokenize_prompts(&refs(&pos)).unwrap();
    let ids: Vec<Vec<i64>> = tokens
        .input_ids
        .iter()
        .map(|r| r.iter().map(|&x| x as i64).collect())
        .collect();
    let mask: Vec<Vec<i64>> = tokens
        .mask
        .iter()
        .map(|r| r.iter().map(|&x| x as i64).collect())
        .collect();
    assert_eq!(ids, as_i64_rows(&g["raw/input_ids"]), "input ids");
    assert_eq!(mask, as_i64_rows(&g["raw/attention_mask"]), "attention mask");
}

#[test]
fn gemma2_hidden_states_match_transformers() {
    let g = goldens();
    let enc = encoder(SanaPromptConfig::default());
    let ids = g["raw/input_ids"].to_dtype(DType::U32).unwrap();
    let mask = &g["raw/attention_mask"];
    let hidden = enc.model.forward(&ids, mask).unwrap();
    let err = max_rel_err(&hidden, &g["raw/hidden"]);
    assert!(err <= 1e-4, "hidden states: max rel err {err:e}");
}

#[test]
fn sana_encode_prompt_matches_diffusers() {
    let g = goldens();
    let (pos, neg) = prompts();
    let chi: Vec<String> = SANA_COMPLEX_HUMAN_INSTRUCTION.iter().map(|s| s.to_string()).collect();
    let cases = [
        ("chi300", SanaPromptConfig::default()),
        (
            "plain300",
            SanaPromptConfig {
                max_sequence_length: 300,
                complex_human_instruction: vec![],
            },
        ),
        (
            "chi_short",
            SanaPromptConfig {
                max_sequence_length: 12,
                complex_human_instruction: chi[6..].to_vec(),
            },
        ),
    ];
    for (tag, config) in cases {
        let enc = encoder(config);
        let (p, n) = enc.encode_with_negative(&refs(&pos), &refs(&neg)).unwrap();
        for (what, got, key) in [("prompt", &p, "prompt"), ("negative", &n, "negative")] {
            let embeds = &g[&format!("{tag}/{key}_embeds")];
            let err = max_rel_err(&got.embeds, embeds);
            assert!(err <= 1e-4, "{tag} {what} embeds: max rel err {err:e}");
            assert_eq!(
                as_i64_rows(&got.mask),
                as_i64_rows(&g[&format!("{tag}/{key}_mask")]),
                "{tag} {what} mask"
            );
        }
    }
}

#[test]
fn bad_prompt_batches_are_usage_errors() {
    let enc = encoder(SanaPromptConfig::default());
    assert!(matches!(enc.encode_prompts(&[]), Err(visgen::Error::Usage(_))));
    assert!(matches!(
        enc.encode_with_negative(&["a"], &["b", "c"]),
        Err(visgen::Error::Usage(_))
    ));
}

#[test]
fn bf16_encoder_stays_close_to_f32_reference() {
    // SANA runs Gemma in bf16: the same path must work there, within bf16 rounding of the f32 golden
    let g = goldens();
    let source = ModelSource::parse(golden_dir().join("gemma_tiny").to_str().unwrap()).unwrap();
    let repo = ModelRepo::open(&source, &HubConfig::from_env()).unwrap();
    let cfg = Gemma2Config::from_json_file(&repo.component_config("text_encoder").unwrap()).unwrap();
    let weights = repo.open_weights("text_encoder", None).unwrap();
    let model = weights
        .build(DType::BF16, &Device::Cpu, |vb| Gemma2Encoder::new(&cfg, vb))
        .unwrap();
    let ids = g["raw/input_ids"].to_dtype(DType::U32).unwrap();
    let hidden = model.forward(&ids, &g["raw/attention_mask"]).unwrap();
    assert_eq!(hidden.dtype(), DType::BF16);
    let err = max_rel_err(&hidden, &g["raw/hidden"]);
    assert!(err <= 5e-2, "bf16 hidden states: max rel err {err:e}");
}

#[test]
fn instructions_are_diffusers_defaults() {
    let text = std::fs::read_to_string(golden_dir().join("gemma_tiny/prompts.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let lines = |k: &str| -> Vec<String> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(SanaPromptConfig::image().complex_human_instruction, lines("chi_sana"));
    assert_eq!(SanaPromptConfig::image().complex_human_instruction, lines("chi_sprint"));
    assert_eq!(SanaPromptConfig::video().complex_human_instruction, lines("chi_video"));
    assert_eq!(SANA_VIDEO_COMPLEX_HUMAN_INSTRUCTION.len(), lines("chi_video").len());
}

#[test]
fn cfg_batch_puts_negative_first() {
    let enc = encoder(SanaPromptConfig::default());
    let (p, n) = enc.encode_with_negative(&["a red fox"], &[""]).unwrap();
    let both = visgen::models::text::PromptEmbeddings::cfg_batch(&n, &p).unwrap();
    assert_eq!(both.embeds.dims(), &[2, 300, 32]);
    let first = both.embeds.get(0).unwrap();
    assert_eq!(max_rel_err(&first, &n.embeds.get(0).unwrap()), 0.0);
    assert_eq!(max_rel_err(&both.mask.get(1).unwrap(), &p.mask.get(0).unwrap()), 0.0);
}

#[test]
fn hub_style_gemma2_2b_config_parses_to_the_preset() {
    // the shape of text_encoder/config.json in the SANA repos (written by transformers 4.x)
    let text = r#"{
      "architectures": ["Gemma2Model"], "attention_bias": false, "attention_dropout": 0.0,
      "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
      "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
      "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "initializer_range": 0.02,
      "intermediate_size": 9216, "max_position_embeddings": 8192, "model_type": "gemma2",
      "num_attention_heads": 8, "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0,
      "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096,
      "torch_dtype": "bfloat16", "transformers_version": "4.44.2", "use_cache": true, "vocab_size": 256000
    }"#;
    let cfg = Gemma2Config::from_json_str(text, "config.json").unwrap();
    let preset = Gemma2Config::gemma2_2b();
    assert_eq!(
        (
            cfg.vocab_size,
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_hidden_layers
        ),
        (
            preset.vocab_size,
            preset.hidden_size,
            preset.intermediate_size,
            preset.num_hidden_layers
        )
    );
    assert_eq!(
        (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim),
        (8, 4, 256)
    );
    assert_eq!(
        (
            cfg.query_pre_attn_scalar,
            cfg.attn_logit_softcapping,
            cfg.sliding_window
        ),
        (256.0, Some(50.0), Some(4096))
    );
    assert_eq!(cfg.activation(), preset.activation());
    assert_eq!(cfg.rope_theta, Some(10000.0));
}

/// `encode_with_negative` runs prompt and negative in one padded pass when no sliding window can
/// leave a row without keys (the real Gemma-2-2B's window is 4096): it must equal the two
/// separate passes above, which are checked against diffusers.
#[test]
fn prompt_and_negative_in_one_pass_equal_two_passes() {
    let (pos, neg) = prompts();
    let source = ModelSource::parse(golden_dir().join("gemma_tiny").to_str().unwrap()).unwrap();
    let repo = ModelRepo::open(&source, &HubConfig::from_env()).unwrap();
    let mut cfg = Gemma2Config::from_json_file(&repo.component_config("text_encoder").unwrap()).unwrap();
    cfg.sliding_window = Some(4096);
    let weights = repo.open_weights("text_encoder", None).unwrap();
    let model = weights.build(DType::F32, &Device::Cpu, |vb| Gemma2Encoder::new(&cfg, vb)).unwrap();
    let tokenizer = GemmaTokenizer::from_file(&repo.tokenizer_json("tokenizer").unwrap()).unwrap();
    let enc = SanaTextEncoder::new(tokenizer, model, SanaPromptConfig::default());
    let (p, n) = enc.encode_with_negative(&refs(&pos), &refs(&neg)).unwrap();
    let (p2, n2) = (enc.encode_prompts(&refs(&pos)).unwrap(), enc.encode_negative(&refs(&neg)).unwrap());
    for (what, one, two) in [("prompt", &p, &p2), ("negative", &n, &n2)] {
        let err = max_rel_err(&one.embeds, &two.embeds);
        assert!(err <= 1e-5, "{what}: one pass vs two, max rel err {err:e}");
        assert_eq!(as_i64_rows(&one.mask), as_i64_rows(&two.mask), "{what} mask");
    }
}
