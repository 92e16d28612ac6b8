//! The DC-AE's two halves: `DCDownBlock2d`, `DCUpBlock2d` and their parameter-free shortcuts, the
//! `Encoder` and the `Decoder`.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::blocks::*;
use super::config::*;

/// Repeats every channel `r` times consecutively (`repeat_interleave(r, dim=1)`).
pub(super) fn repeat_channels(x: &Tensor, r: usize) -> candle_core::Result<Tensor> {
    if r == 1 {
        return Ok(x.clone());
    }
    let (b, c, h, w) = x.dims4()?;
    // [B, C, 1, H, W] → [B, C, r, H, W] → [B, C·r, H, W].
    x.unsqueeze(2)?
        .broadcast_as((b, c, r, h, w))?
        .contiguous()?
        .reshape((b, c * r, h, w))
}

/// Averages groups of `g` consecutive channels (`unflatten(1, (-1, g)).mean(2)`).
pub(super) fn average_channel_groups(x: &Tensor, g: usize) -> candle_core::Result<Tensor> {
    if g == 1 {
        return Ok(x.clone());
    }
    let (b, c, h, w) = x.dims4()?;
    // [B, C/g, g, H, W] → mean over g.
    x.reshape((b, c / g, g, h, w))?.mean(2)
}

/// `DCDownBlock2d`: stride-2 conv (or conv + pixel-unshuffle) plus the optional
/// pixel-unshuffle/group-average shortcut.
#[derive(Debug, Clone)]
pub(super) struct DCDownBlock2d {
    pub(super) conv: Conv2d,
    pub(super) pixel_unshuffle: bool,
    pub(super) shortcut: Option<usize>, // group size
}

impl DCDownBlock2d {
    pub(super) fn new(
        cin: usize,
        cout: usize,
        pixel_unshuffle: bool,
        shortcut: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let (conv_out, stride) = if pixel_unshuffle {
            (cout / 4, 1)
        } else {
            (cout, 2)
        };
        Ok(Self {
            conv: Conv2d::new(cin, conv_out, 3, stride, true, vb.pp("conv"))?,
            pixel_unshuffle,
            shortcut: shortcut.then_some(cin * 4 / cout),
        })
    }
}

impl Module for DCDownBlock2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut y = self.conv.forward(x)?;
        if self.pixel_unshuffle {
            y = candle_nn::ops::pixel_unshuffle(&y, 2)?;
        }
        match self.shortcut {
            // [B, 4C, H/2, W/2], then the mean of each group of consecutive channels.
            Some(g) => y + average_channel_groups(&candle_nn::ops::pixel_unshuffle(x, 2)?, g)?,
            None => Ok(y),
        }
    }
}

/// `DCUpBlock2d`: nearest ×2 then conv (or conv + pixel-shuffle) plus the optional
/// repeat-interleave/pixel-shuffle shortcut.
#[derive(Debug, Clone)]
pub(super) struct DCUpBlock2d {
    pub(super) conv: Conv2d,
    pub(super) interpolate: bool,
    pub(super) shortcut: Option<usize>, // repeats
}

impl DCUpBlock2d {
    pub(super) fn new(
        cin: usize,
        cout: usize,
        interpolate: bool,
        shortcut: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let conv_out = if interpolate { cout } else { cout * 4 };
        Ok(Self {
            conv: Conv2d::new(cin, conv_out, 3, 1, true, vb.pp("conv"))?,
            interpolate,
            shortcut: shortcut.then_some(cout * 4 / cin),
        })
    }
}

impl Module for DCUpBlock2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let y = if self.interpolate {
            self.conv.forward(&x.upsample_nearest2d(2 * h, 2 * w)?)?
        } else {
            candle_nn::ops::pixel_shuffle(&self.conv.forward(x)?, 2)?
        };
        match self.shortcut {
            Some(r) => y + candle_nn::ops::pixel_shuffle(&repeat_channels(x, r)?, 2)?,
            None => Ok(y),
        }
    }
}

/// One block of a stage.
#[derive(Debug, Clone)]
pub(super) enum Block {
    Res(ResBlock),
    EfficientViT(Box<EfficientViTBlock>),
    Down(DCDownBlock2d),
    Up(DCUpBlock2d),
}

impl Block {
    pub(super) fn stage_block(s: &StageCfg, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(match s.block_type {
            "ResBlock" => Self::Res(ResBlock::new(s, vb)?),
            _ => Self::EfficientViT(Box::new(EfficientViTBlock::new(s, vb)?)),
        })
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Res(b) => b.forward(x),
            Self::EfficientViT(b) => b.forward(x),
            Self::Down(b) => b.forward(x),
            Self::Up(b) => b.forward(x),
        }
    }
}

/// The encoder's or decoder's first/last layer: a plain conv, or a DC block for a 0-layer stage.
#[derive(Debug, Clone)]
pub(super) enum Edge {
    Conv(Conv2d),
    Down(DCDownBlock2d),
    Up(DCUpBlock2d),
}

impl Module for Edge {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Conv(c) => c.forward(x),
            Self::Down(b) => b.forward(x),
            Self::Up(b) => b.forward(x),
        }
    }
}

/// diffusers `Encoder`: image `[B, in, H, W]` → latent `[B, latent, H/32, W/32]` (unscaled).
#[derive(Debug, Clone)]
pub(super) struct Encoder {
    pub(super) conv_in: Edge,
    pub(super) stages: Vec<Vec<Block>>,
    pub(super) conv_out: Conv2d,
    pub(super) out_shortcut: Option<usize>,
}

impl Encoder {
    pub(super) fn new(cfg: &AutoencoderDCConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let ch = &cfg.encoder_block_out_channels;
        let n = ch.len();
        let unshuffle = cfg.downsample_block_type == "pixel_unshuffle";
        let conv_in = if cfg.encoder_layers_per_block[0] > 0 {
            Edge::Conv(Conv2d::new(
                cfg.in_channels,
                ch[0],
                3,
                1,
                true,
                vb.pp("conv_in"),
            )?)
        } else {
            Edge::Down(DCDownBlock2d::new(
                cfg.in_channels,
                ch[1],
                unshuffle,
                false,
                vb.pp("conv_in"),
            )?)
        };
        let mut stages = Vec::with_capacity(n);
        for i in 0..n {
            let s = cfg.stage(Half::Encoder, i);
            let vb = vb.pp(format!("down_blocks.{i}"));
            let mut blocks = (0..s.layers)
                .map(|j| Block::stage_block(&s, vb.pp(j)))
                .collect::<candle_core::Result<Vec<_>>>()?;
            if i + 1 < n && s.layers > 0 {
                blocks.push(Block::Down(DCDownBlock2d::new(
                    ch[i],
                    ch[i + 1],
                    unshuffle,
                    true,
                    vb.pp(s.layers),
                )?));
            }
            stages.push(blocks);
        }
        Ok(Self {
            conv_in,
            stages,
            conv_out: Conv2d::new(
                ch[n - 1],
                cfg.latent_channels,
                3,
                1,
                true,
                vb.pp("conv_out"),
            )?,
            out_shortcut: cfg
                .encoder_out_shortcut
                .then_some(ch[n - 1] / cfg.latent_channels),
        })
    }
}

impl Module for Encoder {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for block in self.stages.iter().flatten() {
            h = block.forward(&h)?;
        }
        let out = self.conv_out.forward(&h)?;
        match self.out_shortcut {
            Some(g) => out + average_channel_groups(&h, g)?,
            None => Ok(out),
        }
    }
}

/// diffusers `Decoder`: latent `[B, latent, h, w]` (already divided by `scaling_factor`) →
/// image `[B, in, 32h, 32w]`.
#[derive(Debug, Clone)]
pub(super) struct Decoder {
    pub(super) conv_in: Conv2d,
    pub(super) in_shortcut: Option<usize>,
    /// `up_blocks.{i}`, in execution order (deepest stage first).
    pub(super) stages: Vec<Vec<Block>>,
    pub(super) norm_out: ChannelRmsNorm,
    pub(super) conv_act: Activation,
    pub(super) conv_out: Edge,
}

impl Decoder {
    pub(super) fn new(cfg: &AutoencoderDCConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let ch = &cfg.decoder_block_out_channels;
        let n = ch.len();
        let interpolate = cfg.upsample_block_type == "interpolate";
        let mut stages = Vec::with_capacity(n);
        for i in (0..n).rev() {
            let s = cfg.stage(Half::Decoder, i);
            let vb = vb.pp(format!("up_blocks.{i}"));
            let mut blocks = Vec::with_capacity(s.layers + 1);
            let has_up = i + 1 < n && s.layers > 0;
            if has_up {
                blocks.push(Block::Up(DCUpBlock2d::new(
                    ch[i + 1],
                    ch[i],
                    interpolate,
                    true,
                    vb.pp(0),
                )?));
            }
            for j in 0..s.layers {
                blocks.push(Block::stage_block(&s, vb.pp(j + usize::from(has_up)))?);
            }
            stages.push(blocks);
        }
        let head = if cfg.decoder_layers_per_block[0] > 0 {
            ch[0]
        } else {
            ch[1]
        };
        let conv_out = if cfg.decoder_layers_per_block[0] > 0 {
            Edge::Conv(Conv2d::new(
                head,
                cfg.in_channels,
                3,
                1,
                true,
                vb.pp("conv_out"),
            )?)
        } else {
            Edge::Up(DCUpBlock2d::new(
                head,
                cfg.in_channels,
                interpolate,
                false,
                vb.pp("conv_out"),
            )?)
        };
        Ok(Self {
            conv_in: Conv2d::new(cfg.latent_channels, ch[n - 1], 3, 1, true, vb.pp("conv_in"))?,
            in_shortcut: cfg
                .decoder_in_shortcut
                .then_some(ch[n - 1] / cfg.latent_channels),
            stages,
            norm_out: ChannelRmsNorm::new(head, vb.pp("norm_out"))?,
            conv_act: Activation::parse(&cfg.decoder_conv_act_fn)
                .expect("validated; this is a bug"),
            conv_out,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.conv_in.forward(z)?;
        if let Some(r) = self.in_shortcut {
            h = (h + repeat_channels(z, r)?)?;
        }
        for block in self.stages.iter().flatten() {
            h = block.forward(&h)?;
        }
        let h = self.conv_act.forward(&self.norm_out.forward(&h)?)?;
        self.conv_out.forward(&h)
    }
}
