//! Small layers shared by the model files.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// `y = x Wᵀ + b` with the PyTorch weight layout `[out, in]`.
///
/// Unlike `candle_nn::Linear` it makes the input contiguous first: candle 0.11.1's CPU f32 batched
/// matmul returns wrong values for a transposed (non-contiguous) left operand (found by the
/// transformer parity tests), and a contiguous input is what the fast path wants anyway.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Wraps existing weights.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// Several layers reading the same input as one (outputs concatenated in order), so one
    /// larger matmul replaces several smaller ones.
    pub fn fuse(layers: &[Linear]) -> Result<Self> {
        let weights: Vec<&Tensor> = layers.iter().map(|l| &l.weight).collect();
        let bias = if layers.iter().all(|l| l.bias.is_some()) {
            let biases: Vec<&Tensor> = layers.iter().filter_map(|l| l.bias.as_ref()).collect();
            Some(Tensor::cat(&biases, 0)?)
        } else if layers.iter().all(|l| l.bias.is_none()) {
            None
        } else {
            candle_core::bail!("cannot fuse linear layers with and without bias")
        };
        Ok(Self::new(Tensor::cat(&weights, 0)?, bias))
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // One 2-D gemm over all leading dims: [.., in] → [rows, in] · [in, out] → [.., out].
        let dims = x.dims();
        let (rows, in_dim) = (x.elem_count() / dims[dims.len() - 1], dims[dims.len() - 1]);
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("input has at least one dim") = self.weight.dim(0)?;
        let y = crate::ops::matmul_nt(&x.contiguous()?.reshape((rows, in_dim))?, &self.weight)?
            .reshape(out_dims)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// The weights of a `GLUMBConv` (the DiT's Mix-FFN and the DC-AE's), as the fused ops take them.
#[derive(Debug, Clone)]
pub struct GluConvWeights {
    /// `conv_inverted.weight` as `[2Hf, C]`.
    pub inverted_w: Tensor,
    /// `[2, 2Hf]`: `conv_inverted.bias` and `conv_depth.bias` (see `ops::glu_depthwise_conv2d`).
    pub biases: Tensor,
    /// `conv_depth.weight`, `[2Hf, 1, 3, 3]`.
    pub depth_w: Tensor,
    /// `conv_point.weight` as `[C, Hf]`.
    pub point_w: Tensor,
}

impl GluConvWeights {
    /// Loads `conv_inverted` (C → 2·hidden, bias), `conv_depth` (depthwise 3×3, bias) and
    /// `conv_point` (hidden → C, no bias).
    pub fn load(c: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        let inv = vb.pp("conv_inverted");
        let depth = vb.pp("conv_depth");
        Ok(Self {
            inverted_w: inv
                .get((2 * hidden, c, 1, 1), "weight")?
                .reshape((2 * hidden, c))?,
            biases: Tensor::stack(
                &[inv.get(2 * hidden, "bias")?, depth.get(2 * hidden, "bias")?],
                0,
            )?,
            depth_w: depth.get((2 * hidden, 1, 3, 3), "weight")?,
            point_w: vb
                .pp("conv_point")
                .get((c, hidden, 1, 1), "weight")?
                .reshape((c, hidden))?,
        })
    }
}

/// Loads `weight` `[out, in]` and `bias` `[out]`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear::new(
        vb.get((out_dim, in_dim), "weight")?,
        Some(vb.get(out_dim, "bias")?),
    ))
}

/// Loads `weight` `[out, in]` only.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear::new(vb.get((out_dim, in_dim), "weight")?, None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn transposed_input_gives_the_same_result() -> Result<()> {
        let dev = Device::Cpu;
        let lin = Linear::new(Tensor::randn(0f32, 1., (6, 4), &dev)?, None);
        let x = Tensor::randn(0f32, 1., (2, 4, 5), &dev)?.transpose(1, 2)?;
        let a = lin.forward(&x)?;
        let b = lin.forward(&x.contiguous()?)?;
        let want = x
            .contiguous()?
            .matmul(&lin.weight.t()?.broadcast_left(2)?.contiguous()?)?;
        for got in [a, b] {
            let (d, _) = sana_testing::max_abs_diff(&got, &want);
            assert!(d < 1e-5, "diff {d}");
        }
        Ok(())
    }
}
