//! The ReLU linear attention core of the DiT (`SanaLinearAttnProcessor2_0`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::store_like;

/// The ReLU linear attention core of `SanaLinearAttnProcessor2_0`, after the projections and
/// before `to_out`: for each head, `out_i = Σ_n v_n (k_n·q_i) / (Σ_n k_n·q_i + 1e-15)` with
/// `q = ReLU(q)`, `k = ReLU(k)`, all sums in f32.
///
/// `q`, `k`, `v`: `[B, N, D]` (any row strides, e.g. views into a fused qkv projection), `heads`
/// dividing D. Returns `[B, N, D]` in the input dtype, channel = head·(D/heads) + j.
/// On CPU this is one pass (the per-head `[d+1, d]` sums, then every output row); on other devices
/// it is the tensor-op formulation of diffusers (ones row appended to v, two matmuls).
pub fn linear_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, d) = q.dims3()?;
    if k.dims() != [b, n, d] || v.dims() != [b, n, d] || heads == 0 || d % heads != 0 {
        candle_core::bail!(
            "linear_attention: q {:?}, k {:?}, v {:?} with {heads} heads",
            q.shape(),
            k.shape(),
            v.shape()
        )
    }
    if q.device().is_cpu() {
        let unit_last = |t: &Tensor| -> Result<Tensor> {
            if t.stride()[2] == 1 {
                Ok(t.clone())
            } else {
                t.contiguous()
            }
        };
        let (k, v) = (
            unit_last(&k.to_dtype(q.dtype())?)?,
            unit_last(&v.to_dtype(q.dtype())?)?,
        );
        unit_last(q)?.apply_op3_no_bwd(&k, &v, &LinearAttentionOp { heads })
    } else {
        linear_attention_tensor_ops(q, k, v, heads)
    }
}

/// The device-generic formulation (see [`linear_attention`]).
pub fn linear_attention_tensor_ops(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let (b, n, d) = q.dims3()?;
    let hd = d / heads;
    // q as [B, h, d, N]; k as [B, h, N, d]; v as [B, h, d, N], ReLU on q and k, all in f32.
    let q = q.relu()?.to_dtype(DType::F32)?;
    let k = k.relu()?.to_dtype(DType::F32)?;
    let v = v.to_dtype(DType::F32)?;
    let q = q
        .reshape((b, n, heads, hd))?
        .permute((0, 2, 3, 1))?
        .contiguous()?;
    let k = k
        .reshape((b, n, heads, hd))?
        .transpose(1, 2)?
        .contiguous()?;
    let v = v.reshape((b, n, heads, hd))?.permute((0, 2, 3, 1))?;
    // A row of ones appended to v makes one matmul also yield Σ_n k_n (the normaliser).
    let ones = Tensor::ones((b, heads, 1, n), DType::F32, q.device())?;
    let v = Tensor::cat(&[&v, &ones], 2)?.contiguous()?; // [B, h, d+1, N]
    let o = v.matmul(&k)?.matmul(&q)?; // [B, h, d+1, d] · [B, h, d, N] → [B, h, d+1, N]
    let out = o
        .narrow(2, 0, hd)?
        .broadcast_div(&(o.narrow(2, hd, 1)? + 1e-15)?)?;
    // Merge heads: [B, h, d, N] → [B, D, N] → [B, N, D].
    out.reshape((b, d, n))?
        .transpose(1, 2)?
        .to_dtype(dtype)?
        .contiguous()
}

struct LinearAttentionOp {
    heads: usize,
}

impl CustomOp3 for LinearAttentionOp {
    fn name(&self) -> &'static str {
        "linear-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, n, d) = ql.shape().dims3()?;
        let heads = self.heads;
        let hd = d / heads;
        // Row (batch i, token t) of a [B, N, D] view with unit last stride.
        fn rows<'a>(
            s: &'a CpuStorage,
            l: &Layout,
        ) -> Result<(std::borrow::Cow<'a, [f32]>, usize, usize, usize)> {
            let st = l.stride();
            let whole = match s {
                CpuStorage::F32(v) => std::borrow::Cow::Borrowed(&v[..]),
                CpuStorage::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
                CpuStorage::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
                other => {
                    candle_core::bail!("linear_attention: unsupported dtype {:?}", other.dtype())
                }
            };
            Ok((whole, l.start_offset(), st[0], st[1]))
        }
        let (q, q0, qb, qn) = rows(qs, ql)?;
        let (k, k0, kb, kn) = rows(ks, kl)?;
        let (v, v0, vb, vn) = rows(vs, vl)?;
        // 1. Per (batch, head): S = Σ_n [v_n; 1] ⊗ ReLU(k_n), a [(d+1) × d] matrix.
        let sums: Vec<Vec<f32>> = (0..b * heads)
            .into_par_iter()
            .map(|task| {
                let (i, h) = (task / heads, task % heads);
                let mut s = vec![0f32; (hd + 1) * hd];
                let mut kr = vec![0f32; hd];
                for t in 0..n {
                    let krow = &k[k0 + i * kb + t * kn + h * hd..][..hd];
                    for (dst, x) in kr.iter_mut().zip(krow) {
                        *dst = x.max(0.0);
                    }
                    let vrow = &v[v0 + i * vb + t * vn + h * hd..][..hd];
                    for (r, vv) in vrow.iter().chain(std::iter::once(&1.0)).enumerate() {
                        for (acc, kk) in s[r * hd..][..hd].iter_mut().zip(&kr) {
                            *acc += vv * kk;
                        }
                    }
                }
                s
            })
            .collect();
        // 2. Each output row: out = S·ReLU(q) / (last row of S · ReLU(q) + 1e-15), per head.
        let mut out = vec![0f32; b * n * d];
        out.par_chunks_mut(d).enumerate().for_each_init(
            || (vec![0f32; hd], vec![0f32; hd + 1]),
            |(qr, num), (row, o)| {
                let (i, t) = (row / n, row % n);
                for h in 0..heads {
                    let qrow = &q[q0 + i * qb + t * qn + h * hd..][..hd];
                    for (dst, x) in qr.iter_mut().zip(qrow) {
                        *dst = x.max(0.0);
                    }
                    let s = &sums[i * heads + h];
                    for (r, acc) in num.iter_mut().enumerate() {
                        *acc = s[r * hd..][..hd]
                            .iter()
                            .zip(qr.iter())
                            .map(|(a, b)| a * b)
                            .sum();
                    }
                    let den = num[hd] + 1e-15;
                    for (dst, x) in o[h * hd..][..hd].iter_mut().zip(num.iter()) {
                        *dst = x / den;
                    }
                }
            },
        );
        Ok((store_like(qs, out)?, Shape::from((b, n, d))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// max |a − b| / max(1, max |b|) (the workspace's comparison: any non-finite value fails).
    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        let (diff, scale) = sana_testing::max_abs_diff(a, b);
        Ok(diff / scale.max(1.0))
    }

    #[test]
    fn linear_attention_cpu_kernel_equals_tensor_ops() -> Result<()> {
        let dev = Device::Cpu;
        // q, k, v as views into one fused projection, like the DiT passes them.
        let qkv = Tensor::randn(0f32, 1., (2, 37, 3 * 24), &dev)?;
        let (q, k, v) = (
            qkv.narrow(2, 0, 24)?,
            qkv.narrow(2, 24, 24)?,
            qkv.narrow(2, 48, 24)?,
        );
        let want = linear_attention_tensor_ops(&q, &k, &v, 3)?;
        let ours = linear_attention(&q, &k, &v, 3)?;
        let diff = max_diff(&ours, &want)?;
        assert!(
            diff < 1e-5,
            "linear attention: max diff {diff} (f32 relative tolerance 1e-5)"
        );
        let ours = linear_attention(&q.to_dtype(DType::BF16)?, &k, &v, 3)?;
        assert_eq!(ours.dtype(), DType::BF16);
        let diff = max_diff(&ours, &want)?;
        assert!(
            diff < 2e-2,
            "bf16 relative diff {diff} (bf16 tolerance 2e-2)"
        );
        Ok(())
    }
}
