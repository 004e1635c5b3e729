//! DC-AE decoder (diffusers `Decoder`): `conv_in` plus the channel-repeating shortcut, stages from
//! the deepest up (each but the deepest starting with a ×2 up-sampling), RMSNorm, ReLU, `conv_out`.

use candle_core::Tensor;
use candle_nn::{Conv2d, VarBuilder};

use super::blocks::{StageBlock, UpBlock};
use super::config::DcAeConfig;
use super::encoder::stage_block;
use crate::error::Result;
use crate::layers::conv::{conv2d, conv_forward, repeat_interleave_channels};
use crate::layers::RmsNorm;

#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    in_shortcut_repeats: Option<usize>,
    /// Stage `i` (0 = highest resolution): its up block (absent for the deepest) and its layers.
    stages: Vec<(Option<UpBlock>, Vec<StageBlock>)>,
    norm_out: RmsNorm,
    conv_out: Conv2d,
}

impl Decoder {
    /// `vb` at `decoder`. Keys: `conv_in.*`, `up_blocks.{i}.0` (up block, stages `i < n-1`) then
    /// `up_blocks.{i}.{j}` layers, `norm_out.{weight, bias}`, `conv_out.*`.
    pub fn new(cfg: &DcAeConfig, vb: VarBuilder) -> Result<Self> {
        let chans = &cfg.decoder_block_out_channels;
        let n = chans.len();
        let mut stages = Vec::with_capacity(n);
        for i in 0..n {
            let vb_stage = vb.pp("up_blocks").pp(i);
            let up = if i + 1 < n {
                Some(UpBlock::new(chans[i + 1], chans[i], cfg.upsample_block_type == "interpolate", vb_stage.pp(0))?)
            } else {
                None
            };
            let first = usize::from(up.is_some());
            let blocks = (0..cfg.decoder_layers_per_block[i])
                .map(|j| {
                    stage_block(
                        cfg.decoder_block_types[i],
                        chans[i],
                        cfg.attention_head_dim,
                        &cfg.decoder_qkv_multiscales[i],
                        vb_stage.pp(first + j),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            stages.push((up, blocks));
        }
        let last = chans[n - 1];
        Ok(Self {
            conv_in: conv2d(cfg.latent_channels, last, 3, 1, 1, true, vb.pp("conv_in"))?,
            in_shortcut_repeats: cfg.decoder_in_shortcut.then_some(last / cfg.latent_channels),
            stages,
            norm_out: RmsNorm::new(chans[0], 1e-5, true, true, vb.pp("norm_out"))?,
            conv_out: conv2d(chans[0], cfg.in_channels, 3, 1, 1, true, vb.pp("conv_out"))?,
        })
    }

    /// `z`: `(B, latent, h, w)` (unscaled: divide the diffusion latent by the scaling factor first)
    /// -> `(B, 3, h·f, w·f)`.
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut x = conv_forward(&self.conv_in, z)?;
        if let Some(r) = self.in_shortcut_repeats {
            x = (x + repeat_interleave_channels(z, r)?)?;
        }
        for (up, blocks) in self.stages.iter().rev() {
            if let Some(up) = up {
                x = up.forward(&x)?;
            }
            for b in blocks {
                x = b.forward(&x)?;
            }
        }
        let x = self.norm_out.forward_channels_first(&x)?.relu()?;
        conv_forward(&self.conv_out, &x)
    }
}
