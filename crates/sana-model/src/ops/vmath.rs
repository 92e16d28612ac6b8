//! Vectorised f32 loops for the CPU ops: `exp`, SiLU, softmax rows, axpy.
//!
//! The workspace builds for baseline x86-64 (SSE2), and `f32::exp` is a call into libm per
//! value: the SiLUs of the Mix-FFN and the cross-attention softmax then spent more time in scalar
//! `expf` than in their arithmetic. Here `exp` is a branch-free polynomial the compiler vectorises,
//! and each loop is compiled three times — AVX-512, AVX2 + FMA, baseline — with the widest
//! chosen at run time by CPU feature (the binary still runs on any x86-64, and on other
//! architectures the plain loop is used).

/// Compiles `body` once per instruction set and calls the widest this CPU has.
macro_rules! dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                {
                    // SAFETY: the CPU has the features the function was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

/// `eˣ` in f32 within 2 ulp of the correctly rounded value (checked against f64 in the tests)
/// for `x ≤ 88.37`; `+∞` above (the last 0.35 of f32's range, where `eˣ` is within 5 % of
/// `f32::MAX`), `0` below −87.33 (where libm returns subnormals), NaN for NaN. No branches or
/// calls, so loops over it vectorise.
///
/// Cephes' `expf`: `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2` (`n` rounded by the 1.5·2²³ trick,
/// `ln 2` in two parts so `n·ln2_hi` is exact), a degree-7 polynomial for `eʳ`, and `2ⁿ` built
/// in the exponent bits.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2²³: adding it rounds to an integer
    const LN2_HI: f32 = 0.693_359_4; // 0.693359375, 9 significant bits
    const LN2_LO: f32 = -2.121_944_4e-4;
    const HI: f32 = 88.376_26; // ln(f32::MAX) − ln 2 / 2: n ≤ 127
    const LO: f32 = -87.336_55; // ln(f32::MIN_POSITIVE): n ≥ −126
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_2e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_65;
    let p = p * r + 0.5;
    let e = p * (r * r) + r + 1.0;
    // n sits in the low mantissa bits of t: 2ⁿ = bits (n + 127) << 23.
    let n = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let two_n = f32::from_bits((n.wrapping_add(127) as u32).wrapping_shl(23));
    let y = e * two_n;
    let y = if x > HI { f32::INFINITY } else { y };
    if x < LO {
        0.0
    } else {
        y
    }
}

/// `x · σ(x)`, with [`exp`].
#[inline(always)]
pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

dispatch! {
    /// `dst[i] = silu(src[i] + bias[i])` over the common length.
    pub(crate) fn silu_bias(dst: &mut [f32], src: &[f32], bias: &[f32]) {
        for ((d, &x), &b) in dst.iter_mut().zip(src).zip(bias) {
            *d = silu(x + b);
        }
    }
}

dispatch! {
    /// `dst[i] = silu(src[i] + bias)` over the common length.
    pub(crate) fn silu_add(dst: &mut [f32], src: &[f32], bias: f32) {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = silu(x + bias);
        }
    }
}

dispatch! {
    /// `dst[i] = value[i] · silu(gate[i])` over the common length.
    pub(crate) fn mul_silu(dst: &mut [f32], value: &[f32], gate: &[f32]) {
        for ((d, &v), &g) in dst.iter_mut().zip(value).zip(gate) {
            *d = v * silu(g);
        }
    }
}

dispatch! {
    /// `dst[i] *= silu(gate[i])` over the common length.
    pub(crate) fn mul_silu_in_place(dst: &mut [f32], gate: &[f32]) {
        for (d, &g) in dst.iter_mut().zip(gate) {
            *d *= silu(g);
        }
    }
}

dispatch! {
    /// `dst[i] += a · src[i]` over the common length.
    pub(crate) fn axpy(dst: &mut [f32], a: f32, src: &[f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d += a * s;
        }
    }
}

dispatch! {
    /// `dst[i] += a[i] · b[i]` over the common length.
    pub(crate) fn mul_add(dst: &mut [f32], a: &[f32], b: &[f32]) {
        for ((d, &a), &b) in dst.iter_mut().zip(a).zip(b) {
            *d += a * b;
        }
    }
}

dispatch! {
    /// Each row of `x` (rows of `len` values) replaced by its softmax, `exp(x − max) / Σ`, in
    /// f32 as torch's CPU softmax. A row containing NaN or +∞ becomes NaN, as does a row of −∞
    /// only (0/0), as in torch.
    pub(crate) fn softmax_rows(x: &mut [f32], len: usize) {
        if len == 0 {
            return;
        }
        for row in x.chunks_exact_mut(len) {
            // A NaN anywhere must survive: a max would drop it, so it is tracked apart.
            if row.iter().any(|v| v.is_nan()) {
                row.fill(f32::NAN);
                continue;
            }
            let max = lanes(row, f32::NEG_INFINITY, |m, v| if v > m { v } else { m })
                .into_iter()
                .fold(f32::NEG_INFINITY, |m, v| if v > m { v } else { m });
            for v in row.iter_mut() {
                *v = exp(*v - max);
            }
            let sum: f32 = lanes(row, 0.0, |s, v| s + v).into_iter().sum();
            let inv = 1.0 / sum;
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }
}

/// `f` folded over `x` in 16 independent lanes (lane `i` takes `x[i], x[i + 16], …`), which
/// the compiler keeps in vector registers (a single running fold is a serial chain of
/// dependent operations).
#[inline(always)]
fn lanes(x: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> [f32; 16] {
    let mut acc = [init; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = f(*a, v);
        }
    }
    for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
        *a = f(*a, v);
    }
    acc
}

dispatch! {
    /// torch's tanh GELU in place, `0.5·x·(1 + tanh(u))` with `u = √(2/π)·(x + 0.044715·x³)`,
    /// computed as the equal `x·σ(2u) = x / (1 + e^(−2u))`.
    pub(crate) fn gelu_tanh_in_place(x: &mut [f32]) {
        const C: f32 = 0.797_884_6; // √(2/π)
        for v in x.iter_mut() {
            let u = C * (*v + 0.044_715 * *v * *v * *v);
            *v /= 1.0 + exp(-2.0 * u);
        }
    }
}

/// torch's tanh GELU (`approximate="tanh"`, candle's `gelu`): f32 on the CPU vectorised here
/// (chunks over rayon's threads), everything else by candle.
pub fn gelu_tanh(x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 {
        x.contiguous()?.apply_op1_no_bwd(&Rows {
            name: "gelu-tanh",
            len: 1,
            f: |x, _| gelu_tanh_in_place(x),
        })
    } else {
        x.gelu()
    }
}

/// Softmax over the last dimension: f32 on the CPU through [`softmax_rows`] (rows split over
/// rayon's threads), everything else through candle's `softmax_last_dim`.
pub fn softmax_last_dim(x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    if x.device().is_cpu() && x.dtype() == candle_core::DType::F32 && x.rank() > 0 {
        let len = x.dim(candle_core::D::Minus1)?;
        x.contiguous()?.apply_op1_no_bwd(&Rows {
            name: "softmax-last-dim",
            len,
            f: softmax_rows,
        })
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// A CPU op on a contiguous f32 tensor: a copy of it, `f(rows, len)` on runs of whole rows of
/// `len` values (about 16k values each) over rayon's threads.
struct Rows {
    name: &'static str,
    len: usize,
    f: fn(&mut [f32], usize),
}

impl candle_core::CustomOp1 for Rows {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (candle_core::CpuStorage::F32(v), Some((start, end))) = (s, l.contiguous_offsets())
        else {
            candle_core::bail!("{}: contiguous f32 only", self.name)
        };
        let mut out = v[start..end].to_vec();
        let rows = 16_384usize.checked_div(self.len).unwrap_or(1).max(1);
        out.par_chunks_mut((rows * self.len).max(1))
            .for_each(|c| (self.f)(c, self.len));
        Ok((candle_core::CpuStorage::F32(out), l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between two finite f32 of the same sign.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_2_ulp_over_its_range() {
        let mut worst = (0u32, 0f32);
        let mut x = -87.3f32;
        while x < 88.37 {
            let want = (x as f64).exp() as f32;
            let got = exp(x);
            let u = ulps(got, want);
            if u > worst.0 {
                worst = (u, x);
            }
            x += 1.37e-3;
        }
        // Around 0, densely.
        for i in -100_000..100_000 {
            let x = i as f32 * 1e-6;
            let u = ulps(exp(x), (x as f64).exp() as f32);
            if u > worst.0 {
                worst = (u, x);
            }
        }
        assert!(worst.0 <= 2, "{} ulp off at x = {}", worst.0, worst.1);
    }

    #[test]
    fn exp_edges() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(88.37).is_finite());
        assert!(exp(-87.33) > 0.0);
    }

    #[test]
    fn silu_matches_libm_and_keeps_nan() {
        for i in -4000..4000 {
            let x = i as f32 * 0.01;
            let want = (x as f64 / (1.0 + (-x as f64).exp())) as f32;
            let got = silu(x);
            assert!(
                (got - want).abs() <= 4.0 * f32::EPSILON * want.abs().max(1e-30),
                "silu({x}) = {got}, want {want}"
            );
        }
        assert_eq!(silu(-1000.0), -0.0);
        assert_eq!(silu(1000.0), 1000.0);
        assert!(silu(f32::NAN).is_nan());
        let mut out = [0f32; 3];
        silu_bias(&mut out, &[1.0, f32::NAN, -2.0], &[0.5, 0.0, f32::INFINITY]);
        assert!(out[1].is_nan());
        assert_eq!(out[0], silu(1.5));
        assert_eq!(out[2], f32::INFINITY);
    }

    #[test]
    fn dispatched_loops_equal_the_scalar_formula() {
        // Odd lengths exercise the vector loops' tails.
        for n in [1usize, 7, 16, 33, 1000] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin() * 9.0).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos() * 5.0).collect();
            let mut out = vec![0f32; n];
            mul_silu(&mut out, &a, &b);
            for i in 0..n {
                assert_eq!(out[i], a[i] * silu(b[i]));
            }
            let mut inplace = a.clone();
            mul_silu_in_place(&mut inplace, &b);
            assert_eq!(inplace, out);
            silu_bias(&mut out, &a, &b);
            for i in 0..n {
                assert_eq!(out[i], silu(a[i] + b[i]));
            }
            let mut acc = b.clone();
            axpy(&mut acc, 0.5, &a);
            for i in 0..n {
                assert_eq!(acc[i], b[i] + 0.5 * a[i]);
            }
        }
    }

    #[test]
    fn softmax_op_equals_candle() -> candle_core::Result<()> {
        let dev = candle_core::Device::Cpu;
        let x = (candle_core::Tensor::randn(0f32, 3., (2, 3, 50, 77), &dev)?.transpose(1, 2))?;
        let got = softmax_last_dim(&x)?;
        let want = candle_nn::ops::softmax_last_dim(&x.contiguous()?)?;
        let d = (got - want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(d < 1e-6, "max difference {d}");
        let empty = candle_core::Tensor::zeros((3, 0), candle_core::DType::F32, &dev)?;
        assert_eq!(softmax_last_dim(&empty)?.dims(), [3, 0]);
        Ok(())
    }

    #[test]
    fn gelu_tanh_equals_torch_formula() -> candle_core::Result<()> {
        let dev = candle_core::Device::Cpu;
        let xs: Vec<f32> = (-2000..2000).map(|i| i as f32 * 0.01).collect();
        let got: Vec<f32> =
            gelu_tanh(&candle_core::Tensor::new(xs.as_slice(), &dev)?)?.to_vec1()?;
        for (&x, &g) in xs.iter().zip(&got) {
            let x64 = x as f64;
            let u = (2.0 / std::f64::consts::PI).sqrt() * (x64 + 0.044715 * x64.powi(3));
            let want = 0.5 * x64 * (1.0 + u.tanh());
            // u in f32 carries ~|u|·2⁻²⁴ of error into e^(−2u): relative 1e-5 at |u| ≈ 40, where
            // torch's 1 + tanh(u) has already cancelled to 0.
            let tol = 1e-5 * want.abs() + 1e-12;
            assert!(
                (g as f64 - want).abs() <= tol,
                "gelu({x}) = {g}, want {want}"
            );
        }
        let special: Vec<f32> = gelu_tanh(&candle_core::Tensor::new(
            &[f32::NAN, f32::INFINITY, -100.0, 0.0],
            &dev,
        )?)?
        .to_vec1()?;
        assert!(special[0].is_nan());
        assert_eq!(special[1..], [f32::INFINITY, -0.0, 0.0]);
        Ok(())
    }

    #[test]
    fn softmax_rows_match_f64_and_propagate_nan() {
        let len = 37;
        let mut x: Vec<f32> = (0..3 * len)
            .map(|i| (i as f32 * 0.71).sin() * 30.0)
            .collect();
        let orig = x.clone();
        softmax_rows(&mut x, len);
        for (row, src) in x.chunks(len).zip(orig.chunks(len)) {
            let max = src.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let sum: f64 = src.iter().map(|&v| (v as f64 - max).exp()).sum();
            for (&got, &v) in row.iter().zip(src) {
                let want = (v as f64 - max).exp() / sum;
                // x − max rounds to f32 (as in torch): up to 0.5 ulp of |x − max| ≤ 60.
                assert!((got as f64 - want).abs() <= 1e-5 * want, "{got} vs {want}");
            }
        }
        let mut with_nan = vec![0.0, 1.0, f32::NAN, 2.0];
        softmax_rows(&mut with_nan, 2);
        assert!(with_nan[..2].iter().all(|v| v.is_finite()));
        assert!(with_nan[2..].iter().all(|v| v.is_nan()));
        let mut with_inf = vec![1.0, f32::INFINITY];
        softmax_rows(&mut with_inf, 2);
        assert!(
            with_inf.iter().all(|v| v.is_nan()),
            "inf - inf is NaN, as in torch"
        );
    }
}
