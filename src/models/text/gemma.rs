//! Gemma-2 decoder used as a text encoder: the final hidden states after the last RMSNorm (no LM
//! head). Follows transformers' `Gemma2Model` with eager attention, which is what it runs (its SDPA
//! path is disabled because of the logit soft-capping):
//! - embeddings scaled by sqrt(hidden), cast to the model dtype;
//! - per layer: RMSNorm → attention → RMSNorm, residual; RMSNorm → GeGLU (tanh) MLP → RMSNorm, residual;
//! - RMSNorm computes in f32 and multiplies by `1 + w` before casting back;
//! - attention: grouped-query heads, half-rotation RoPE, scale `query_pre_attn_scalar^-1/2`,
//!   soft-capped logits `c·tanh(s/c)`, causal + padding mask, and a sliding window on the layers
//!   marked `sliding_attention`; softmax in f32.
//!
//! Unlike candle-transformers' `gemma2::Model` this returns every position's hidden state and takes
//! a padding mask, which SANA's right-padded prompts need.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Activation, Embedding, Linear, VarBuilder};
use serde::Deserialize;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Deserialize)]
pub struct RopeParameters {
    pub rope_theta: f64,
}

/// The fields of a transformers `config.json` for `Gemma2Model` that the encoder needs. Both the old
/// (`rope_theta`) and the new (`rope_parameters`) spelling of the RoPE base are accepted.
#[derive(Debug, Clone, Deserialize)]
pub struct Gemma2Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// transformers writes both `hidden_activation` and the older `hidden_act`; the first wins.
    #[serde(default)]
    pub hidden_activation: Option<Activation>,
    #[serde(default)]
    pub hidden_act: Option<Activation>,
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    pub query_pre_attn_scalar: f64,
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// "sliding_attention" / "full_attention" per layer; when absent, even layers slide.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default)]
    pub attention_bias: bool,
}

impl Gemma2Config {
    /// google/gemma-2-2b-it, SANA's text encoder (2304-d hidden states).
    pub fn gemma2_2b() -> Self {
        Self {
            vocab_size: 256_000,
            hidden_size: 2304,
            intermediate_size: 9216,
            num_hidden_layers: 26,
            num_attention_heads: 8,
            num_key_value_heads: 4,
            head_dim: 256,
            hidden_activation: Some(Activation::GeluPytorchTanh),
            hidden_act: None,
            rms_norm_eps: 1e-6,
            rope_theta: Some(10_000.0),
            rope_parameters: None,
            query_pre_attn_scalar: 256.0,
            attn_logit_softcapping: Some(50.0),
            sliding_window: Some(4096),
            layer_types: None,
            attention_bias: false,
        }
    }

    /// A tiny Gemma-2 of the given width, for random-weight smoke tests.
    pub fn tiny(hidden_size: usize) -> Self {
        Self {
            vocab_size: 128,
            hidden_size,
            intermediate_size: 2 * hidden_size,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 8,
            query_pre_attn_scalar: 8.0,
            sliding_window: Some(8),
            ..Self::gemma2_2b()
        }
    }

    /// Parses a transformers `config.json`; `origin` names it in errors.
    pub fn from_json_str(text: &str, origin: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| Error::Weights {
            file: origin.to_string(),
            tensor: String::new(),
            msg: format!("not a Gemma-2 config: {e}"),
        })
    }

    pub fn from_json_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// The MLP activation (GELU with the tanh approximation for every Gemma-2).
    pub fn activation(&self) -> Activation {
        self.hidden_activation
            .or(self.hidden_act)
            .unwrap_or(Activation::GeluPytorchTanh)
    }

    fn rope_base(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .map(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10_000.0)
    }

    fn layer_slides(&self, layer: usize) -> bool {
        match &self.layer_types {
            Some(types) => types.get(layer).map(|t| t == "sliding_attention").unwrap_or(false),
            None => layer.is_multiple_of(2),
        }
    }
}

#[derive(Debug, Clone)]
struct RmsNorm {
    weight_plus_one: Tensor, // f32
    /// `1 + weight` rounded to the model dtype, for candle's one-kernel norm on the GPU.
    weight_plus_one_model_dtype: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight_plus_one = (vb.get(dim, "weight")?.to_dtype(DType::F32)? + 1.0)?;
        let weight_plus_one_model_dtype = weight_plus_one.to_dtype(vb.dtype())?;
        Ok(Self { weight_plus_one, weight_plus_one_model_dtype, eps })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // On the GPU the eight tensor ops below are eight launches per norm, four norms per layer:
        // the encoder's time was the host enqueueing them. candle's fused norm accumulates in f32
        // too; it scales by `1 + weight` in the model dtype (one more rounding than transformers'
        // f32 product, at the model dtype's precision). The CPU keeps the exact f32 formula.
        if x.device().is_cuda() && x.dtype() != DType::F32 {
            return Ok(candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight_plus_one_model_dtype, self.eps as f32)?);
        }
        let xf = x.to_dtype(DType::F32)?;
        let mean_sq = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xf.broadcast_div(&(mean_sq + self.eps)?.sqrt()?)?;
        Ok(normed.broadcast_mul(&self.weight_plus_one)?.to_dtype(x.dtype())?)
    }
}

fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    Ok(candle_nn::linear_b(in_dim, out_dim, bias, vb)?)
}

#[derive(Debug, Clone)]
struct Attention {
    /// `q_proj`, `k_proj` and `v_proj` stacked into one projection (one GEMM instead of three).
    qkv_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    scale: f64,
    softcap: Option<f64>,
}

impl Attention {
    fn new(cfg: &Gemma2Config, vb: VarBuilder) -> Result<Self> {
        let (h, hd, kv) = (cfg.num_attention_heads, cfg.head_dim, cfg.num_key_value_heads);
        if kv == 0 || h % kv != 0 {
            return Err(Error::Other(format!(
                "Gemma-2: {h} heads do not group into {kv} key/value heads"
            )));
        }
        let q_proj = linear(cfg.hidden_size, h * hd, cfg.attention_bias, vb.pp("q_proj"))?;
        let k_proj = linear(cfg.hidden_size, kv * hd, cfg.attention_bias, vb.pp("k_proj"))?;
        let v_proj = linear(cfg.hidden_size, kv * hd, cfg.attention_bias, vb.pp("v_proj"))?;
        let stacked = |parts: [Option<&Tensor>; 3]| -> Result<Option<Tensor>> {
            match parts {
                [Some(q), Some(k), Some(v)] => Ok(Some(Tensor::cat(&[q, k, v], 0)?)),
                _ => Ok(None),
            }
        };
        let weight = stacked([Some(q_proj.weight()), Some(k_proj.weight()), Some(v_proj.weight())])?
            .ok_or_else(|| Error::Other("Gemma-2: missing q/k/v weights".into()))?;
        let bias = stacked([q_proj.bias(), k_proj.bias(), v_proj.bias()])?;
        Ok(Self {
            qkv_proj: Linear::new(weight, bias),
            o_proj: linear(h * hd, cfg.hidden_size, cfg.attention_bias, vb.pp("o_proj"))?,
            num_heads: h,
            num_kv_heads: kv,
            head_dim: hd,
            scale: cfg.query_pre_attn_scalar.powf(-0.5),
            softcap: cfg.attn_logit_softcapping,
        })
    }

    /// `mask` is additive, f32, (B, 1, L, L).
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let heads = |t: Tensor, n: usize| -> Result<Tensor> {
            Ok(t.reshape((b, l, n, self.head_dim))?.transpose(1, 2)?.contiguous()?)
        };
        let qkv = self.qkv_proj.forward(x)?;
        let (q_width, kv_width) = (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim);
        let q = heads(qkv.narrow(D::Minus1, 0, q_width)?, self.num_heads)?;
        let k = heads(qkv.narrow(D::Minus1, q_width, kv_width)?, self.num_kv_heads)?;
        let v = heads(qkv.narrow(D::Minus1, q_width + kv_width, kv_width)?, self.num_kv_heads)?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let groups = self.num_heads / self.num_kv_heads;
        let k = candle_transformers::utils::repeat_kv(k, groups)?.contiguous()?;
        let v = candle_transformers::utils::repeat_kv(v, groups)?.contiguous()?;

        let mut scores = (q.matmul(&k.t()?)? * self.scale)?;
        if let Some(cap) = self.softcap {
            scores = ((scores / cap)?.tanh()? * cap)?;
        }
        let scores = scores.to_dtype(DType::F32)?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, l, self.num_heads * self.head_dim))?;
        Ok(self.o_proj.forward(&out)?)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    act: Activation,
}

impl Mlp {
    fn new(cfg: &Gemma2Config, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            gate_proj: linear(cfg.hidden_size, cfg.intermediate_size, false, vb.pp("gate_proj"))?,
            up_proj: linear(cfg.hidden_size, cfg.intermediate_size, false, vb.pp("up_proj"))?,
            down_proj: linear(cfg.intermediate_size, cfg.hidden_size, false, vb.pp("down_proj"))?,
            act: cfg.activation(),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?.apply(&self.act)?;
        Ok(self.down_proj.forward(&(gate * self.up_proj.forward(x)?)?)?)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    pre_feedforward_layernorm: RmsNorm,
    mlp: Mlp,
    post_feedforward_layernorm: RmsNorm,
    sliding: bool,
}

impl DecoderLayer {
    fn new(cfg: &Gemma2Config, index: usize, vb: VarBuilder) -> Result<Self> {
        let norm = |name: &str| RmsNorm::new(cfg.hidden_size, cfg.rms_norm_eps, vb.pp(name));
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            pre_feedforward_layernorm: norm("pre_feedforward_layernorm")?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
            post_feedforward_layernorm: norm("post_feedforward_layernorm")?,
            sliding: cfg.layer_slides(index),
        })
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = self.input_layernorm.forward(x)?;
        let h = self.self_attn.forward(&h, cos, sin, mask)?;
        let x = (x + self.post_attention_layernorm.forward(&h)?)?;
        let h = self.pre_feedforward_layernorm.forward(&x)?;
        let h = self.mlp.forward(&h)?;
        Ok((x + self.post_feedforward_layernorm.forward(&h)?)?)
    }
}

/// Gemma-2 body (`Gemma2Model`), returning the normed last hidden states.
#[derive(Debug, Clone)]
pub struct Gemma2Encoder {
    config: Gemma2Config,
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    dtype: DType,
    device: Device,
}

impl Gemma2Encoder {
    /// `vb` points at the weights of a `Gemma2Model` (keys `embed_tokens.*`, `layers.*`, `norm.*`);
    /// a `Gemma2ForCausalLM` checkpoint (keys under `model.`) works too.
    pub fn new(config: &Gemma2Config, vb: VarBuilder) -> Result<Self> {
        let vb = if !vb.contains_tensor("embed_tokens.weight") && vb.contains_tensor("model.embed_tokens.weight") {
            vb.pp("model")
        } else {
            vb
        };
        let embed_tokens = candle_nn::embedding(config.vocab_size, config.hidden_size, vb.pp("embed_tokens"))?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::new(config, i, vb.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(config.hidden_size, config.rms_norm_eps, vb.pp("norm"))?;
        Ok(Self {
            config: config.clone(),
            embed_tokens,
            layers,
            norm,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    pub fn config(&self) -> &Gemma2Config {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `input_ids` (B, L) u32, `attention_mask` (B, L) with 1 for real tokens and 0 for padding.
    /// Returns (B, L, hidden) in the model dtype.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        if attention_mask.dims() != [b, l] {
            return Err(Error::Other(format!(
                "Gemma-2: attention mask {:?} does not match input ids {:?}",
                attention_mask.dims(),
                input_ids.dims()
            )));
        }
        let ids = input_ids.to_dtype(DType::U32)?.to_device(&self.device)?;
        let keep: Vec<Vec<f32>> = attention_mask
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .to_vec2()?;

        let embed_scale = (self.config.hidden_size as f64).sqrt();
        // transformers casts the scale to the weight dtype before multiplying
        let embed_scale = Tensor::new(embed_scale as f32, &Device::Cpu)?
            .to_dtype(self.dtype)?
            .to_dtype(DType::F64)?;
        let mut x = (self.embed_tokens.forward(&ids)? * embed_scale.to_scalar::<f64>()?)?;

        let (cos, sin) = self.rope_tables(l)?;
        let full_mask = self.attention_bias(&keep, l, None)?;
        let sliding_mask = match self.config.sliding_window {
            Some(w) if self.layers.iter().any(|layer| layer.sliding) => Some(self.attention_bias(&keep, l, Some(w))?),
            _ => None,
        };
        for layer in &self.layers {
            let mask = match (&sliding_mask, layer.sliding) {
                (Some(m), true) => m,
                _ => &full_mask,
            };
            x = layer.forward(&x, &cos, &sin, mask)?;
        }
        self.norm.forward(&x)
    }

    /// cos/sin of shape (L, head_dim/2), computed in f32 and cast to the model dtype.
    fn rope_tables(&self, len: usize) -> Result<(Tensor, Tensor)> {
        let dim = self.config.head_dim;
        let base = self.config.rope_base();
        let inv_freq: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| (1.0 / base.powf(i as f64 / dim as f64)) as f32)
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, dim / 2), &self.device)?;
        let positions = Tensor::arange(0u32, len as u32, &self.device)?
            .to_dtype(DType::F32)?
            .reshape((len, 1))?;
        let freqs = positions.matmul(&inv_freq)?;
        Ok((freqs.cos()?.to_dtype(self.dtype)?, freqs.sin()?.to_dtype(self.dtype)?))
    }

    /// Additive f32 bias (B, 1, L, L): 0 where query i may see key j (j ≤ i, key not padding,
    /// and within the window when there is one), the lowest f32 otherwise (as transformers does).
    fn attention_bias(&self, keep: &[Vec<f32>], len: usize, window: Option<usize>) -> Result<Tensor> {
        let mut bias = vec![f32::MIN; keep.len() * len * len];
        for (bi, row) in keep.iter().enumerate() {
            for i in 0..len {
                for j in 0..=i {
                    let in_window = window.map(|w| i - j < w).unwrap_or(true);
                    if row[j] > 0.5 && in_window {
                        bias[(bi * len + i) * len + j] = 0.0;
                    }
                }
            }
        }
        Ok(Tensor::from_vec(bias, (keep.len(), 1, len, len), &self.device)?)
    }
}
