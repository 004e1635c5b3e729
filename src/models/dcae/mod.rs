//! DC-AE, the deep-compression autoencoder of SANA (diffusers `AutoencoderDC`, spec sana.md §3):
//! 32× spatial compression to 32 latent channels, ResBlocks at high resolution and EfficientViT
//! blocks (multi-scale ReLU linear attention + GLUMBConv) at low resolution. Tiled decoding keeps
//! the memory of a 4096² decode bounded.

pub mod autoencoder;
pub mod blocks;
pub mod config;
pub mod decoder;
pub mod encoder;
pub mod tiling;

pub use autoencoder::AutoencoderDc;
pub use config::{BlockType, DcAeConfig};
pub use tiling::TilingConfig;
