//! DC-AE encoder (diffusers `Encoder`): `conv_in`, stages of blocks each ending with a ×2 down-sampling
//! (all but the last), `conv_out` plus the channel-averaging shortcut.

use candle_core::Tensor;
use candle_nn::{Conv2d, VarBuilder};

use super::blocks::{DownBlock, EfficientViTBlock, ResBlock, StageBlock};
use super::config::{BlockType, DcAeConfig};
use crate::error::{Error, Result};
use crate::layers::conv::{conv2d, conv_forward, mean_channel_groups};

#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    stages: Vec<(Vec<StageBlock>, Option<DownBlock>)>,
    conv_out: Conv2d,
    out_shortcut_group: Option<usize>,
}

/// A stage's layer `j` of type `t` at `channels`, keys under `vb`.
pub(super) fn stage_block(t: BlockType, channels: usize, head_dim: usize, scales: &[usize], vb: VarBuilder) -> Result<StageBlock> {
    Ok(match t {
        BlockType::ResBlock => StageBlock::Res(ResBlock::new(channels, vb)?),
        BlockType::EfficientViTBlock => StageBlock::EfficientViT(EfficientViTBlock::new(channels, head_dim, scales, vb)?),
    })
}

impl Encoder {
    /// `vb` at `encoder`. Keys: `conv_in.*`, `down_blocks.{i}.{j}.*` (layers, then the down block at
    /// `j = layers`), `conv_out.*`.
    pub fn new(cfg: &DcAeConfig, vb: VarBuilder) -> Result<Self> {
        let chans = &cfg.encoder_block_out_channels;
        let n = chans.len();
        let mut stages = Vec::with_capacity(n);
        for i in 0..n {
            let vb_stage = vb.pp("down_blocks").pp(i);
            let layers = cfg.encoder_layers_per_block[i];
            let blocks = (0..layers)
                .map(|j| {
                    stage_block(
                        cfg.encoder_block_types[i],
                        chans[i],
                        cfg.attention_head_dim,
                        &cfg.encoder_qkv_multiscales[i],
                        vb_stage.pp(j),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let down = if i + 1 < n {
                let pixel_unshuffle = cfg.downsample_block_type == "pixel_unshuffle";
                Some(DownBlock::new(chans[i], chans[i + 1], pixel_unshuffle, vb_stage.pp(layers))?)
            } else {
                None
            };
            stages.push((blocks, down));
        }
        let last = chans[n - 1];
        Ok(Self {
            conv_in: conv2d(cfg.in_channels, chans[0], 3, 1, 1, true, vb.pp("conv_in"))?,
            stages,
            conv_out: conv2d(last, cfg.latent_channels, 3, 1, 1, true, vb.pp("conv_out"))?,
            out_shortcut_group: cfg.encoder_out_shortcut.then_some(last / cfg.latent_channels),
        })
    }

    /// `x`: `(B, 3, H, W)`, H and W divisible by the compression -> `(B, latent, H/f, W/f)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let f = 1usize << (self.stages.len() - 1);
        let (_, _, h, w) = x.dims4()?;
        if h % f != 0 || w % f != 0 {
            return Err(Error::Usage(format!("image {h}x{w} is not divisible by the autoencoder's compression {f}")));
        }
        let mut x = conv_forward(&self.conv_in, x)?;
        for (blocks, down) in &self.stages {
            for b in blocks {
                x = b.forward(&x)?;
            }
            if let Some(d) = down {
                x = d.forward(&x)?;
            }
        }
        let y = conv_forward(&self.conv_out, &x)?;
        Ok(match self.out_shortcut_group {
            Some(g) => (y + mean_channel_groups(&x, g)?)?,
            None => y,
        })
    }
}
