//! Finding, opening and validating checkpoint files in the Hugging Face layouts.
//!
//! A component folder (`transformer/`, `vae/`, `text_encoder/`) holds either one
//! `<stem>[.<variant>].safetensors` or shards `<stem>[.<variant>]-0000K-of-0000N.safetensors` listed by
//! `<stem>.safetensors.index[.<variant>].json` (diffusers and transformers name variants the same way;
//! the stem is `diffusion_pytorch_model` for diffusers models and `model` for transformers models).
//!
//! Tensors are memory-mapped and converted to the requested dtype when a module asks for them; the
//! file's own dtype (read from the header) is never inferred from the file name. Every lookup is
//! checked against the header first, so a missing tensor or a wrong shape fails while the model is
//! being built, naming the checkpoint key and both shapes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::Error;

/// Reads and parses a component's `config.json` (or any JSON config file) into `T`.
pub fn read_config<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// The safetensors files of one component, in shard order.
pub fn find_weight_files(
    dir: &Path,
    stem: &str,
    variant: Option<&str>,
) -> Result<Vec<PathBuf>, Error> {
    if let Some(variant) = variant {
        if let Some(files) = find_with(dir, stem, Some(variant))? {
            return Ok(files);
        }
        tracing::info!(dir = %dir.display(), variant, "no variant weights; using the default files");
    }
    find_with(dir, stem, None)?.ok_or_else(|| Error::NoWeights {
        dir: dir.to_path_buf(),
        expected: match variant {
            Some(v) => format!(
                "{stem}.{v}.safetensors, {stem}.safetensors.index.{v}.json, {stem}.safetensors or {stem}.safetensors.index.json"
            ),
            None => format!("{stem}.safetensors or {stem}.safetensors.index.json"),
        },
    })
}

fn find_with(dir: &Path, stem: &str, variant: Option<&str>) -> Result<Option<Vec<PathBuf>>, Error> {
    let (single, index) = match variant {
        Some(v) => (
            dir.join(format!("{stem}.{v}.safetensors")),
            dir.join(format!("{stem}.safetensors.index.{v}.json")),
        ),
        None => (
            dir.join(format!("{stem}.safetensors")),
            dir.join(format!("{stem}.safetensors.index.json")),
        ),
    };
    if single.is_file() {
        return Ok(Some(vec![single]));
    }
    if !index.is_file() {
        return Ok(None);
    }
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::HashMap<String, String>,
    }
    let idx: Index = read_config(&index)?;
    let shards: BTreeSet<&String> = idx.weight_map.values().collect();
    let files: Vec<PathBuf> = shards.into_iter().map(|s| dir.join(s)).collect();
    if let Some(missing) = files.iter().find(|f| !f.is_file()) {
        return Err(Error::Weights(format!(
            "{} lists shard {} which does not exist",
            index.display(),
            missing.display()
        )));
    }
    Ok(Some(files))
}

struct Inner {
    st: MmapedSafetensors,
    label: String,
    used: Mutex<BTreeSet<String>>,
}

/// Memory-mapped safetensors files seen as one checkpoint.
///
/// Cloning is cheap (shared). [`Checkpoint::var_builder`] hands modules a `VarBuilder` that checks
/// each tensor's shape against the header before reading it and records which keys were used.
#[derive(Clone)]
pub struct Checkpoint(Arc<Inner>);

impl Checkpoint {
    /// Opens (memory-maps) the given files.
    pub fn open(files: &[PathBuf]) -> Result<Self, Error> {
        // SAFETY: the files are memory-mapped read-only; like every mmap user we rely on nobody
        // truncating them while the process runs.
        let st = unsafe { MmapedSafetensors::multi(files) }.map_err(|e| {
            Error::Weights(format!(
                "cannot read safetensors {}: {e}",
                display_files(files)
            ))
        })?;
        Ok(Self(Arc::new(Inner {
            st,
            label: display_files(files),
            used: Mutex::new(BTreeSet::new()),
        })))
    }

    /// Opens the weights of a component folder (see the module docs for the accepted names).
    pub fn open_dir(dir: &Path, stem: &str, variant: Option<&str>) -> Result<Self, Error> {
        Self::open(&find_weight_files(dir, stem, variant)?)
    }

    /// A `VarBuilder` that converts every tensor to `dtype` on `device` (bf16 on the CPU: see
    /// [`var_builder_for`]).
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        var_builder_for(Box::new(self.clone()), dtype, device)
    }

    /// Every tensor name in the checkpoint.
    pub fn keys(&self) -> Vec<String> {
        self.0.st.tensors().into_iter().map(|(k, _)| k).collect()
    }

    /// Names present in the checkpoint that no module asked for, sorted.
    pub fn unused_keys(&self) -> Vec<String> {
        let used = self
            .0
            .used
            .lock()
            .expect("weights mutex poisoned; this is a bug");
        let mut keys: Vec<String> = self
            .keys()
            .into_iter()
            .filter(|k| !used.contains(k))
            .collect();
        keys.sort();
        keys
    }

    /// Logs the keys nobody asked for (a config/checkpoint mismatch worth knowing about).
    pub fn warn_unused(&self, component: &str) {
        let unused = self.unused_keys();
        if !unused.is_empty() {
            tracing::warn!(
                component,
                count = unused.len(),
                first = %unused.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
                "checkpoint tensors not used by the model"
            );
        }
    }

    fn header_shape(&self, name: &str) -> Option<Shape> {
        self.0
            .st
            .get(name)
            .ok()
            .map(|v| Shape::from(v.shape().to_vec()))
    }
}

/// An f32 tensor of the file as bf16 on the CPU, converted straight from the mapped bytes: no
/// f32 copy first (Gemma's embedding table alone would be a 2.4 GB transient). `None` for other
/// cases (the file's own dtype, other targets, other devices).
fn f32_as_bf16(
    st: &MmapedSafetensors,
    name: &str,
    dtype: DType,
    dev: &Device,
) -> candle_core::Result<Option<Tensor>> {
    if dtype != DType::BF16 || !dev.is_cpu() {
        return Ok(None);
    }
    let view = st.get(name)?;
    if DType::try_from(view.dtype()).ok() != Some(DType::F32) {
        return Ok(None);
    }
    let values: Vec<half::bf16> = view
        .data()
        .chunks_exact(4)
        .map(|b| half::bf16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
        .collect();
    Tensor::from_vec(values, view.shape(), dev).map(Some)
}

fn display_files(files: &[PathBuf]) -> String {
    match files {
        [one] => one.display().to_string(),
        [first, ..] => format!("{} (+{} shards)", first.display(), files.len() - 1),
        [] => "<no files>".to_string(),
    }
}

impl SimpleBackend for Checkpoint {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        match self.header_shape(name) {
            None => candle_core::bail!(
                "checkpoint {}: missing tensor `{name}` (the model expects shape {:?})",
                self.0.label,
                s.dims()
            ),
            Some(got) if got != s => candle_core::bail!(
                "checkpoint {}: tensor `{name}` has shape {:?} but the model expects {:?}",
                self.0.label,
                got.dims(),
                s.dims()
            ),
            Some(_) => self.get_unchecked(name, dtype, dev),
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = match f32_as_bf16(&self.0.st, name, dtype, dev)? {
            Some(t) => t,
            None => self.0.st.load(name, dev)?.to_dtype(dtype)?,
        };
        self.0
            .used
            .lock()
            .expect("weights mutex poisoned; this is a bug")
            .insert(name.to_string());
        Ok(t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.st.get(name).is_ok()
    }
}

/// A `VarBuilder` that makes up every tensor it is asked for: N(0, `std`²) values in `dtype`.
///
/// For benchmarks and load tests of real configs without downloading weights: the cost of a
/// forward does not depend on the values.
pub fn random_var_builder(std: f64, dtype: DType, device: &Device) -> VarBuilder<'static> {
    var_builder_for(Box::new(RandomWeights { std }), dtype, device)
}

/// A `VarBuilder` over `backend` for a model in `dtype` on `device`.
///
/// bf16 on the CPU is mixed precision: the weight matrices (every `…weight` of rank ≥ 2 with more
/// than one input channel: linear layers, 1×1 and k×k convolutions, embeddings) are held in bf16,
/// half the memory, and everything else (biases, norms, modulation tables, depthwise kernels) in
/// f32; the modules compute in f32 (the `VarBuilder`'s dtype), and [`crate::ops::matmul_nt`]
/// multiplies bf16 weights by f32 activations (oneDNN's bf16 kernels, or the weight widened).
/// Everywhere else `dtype` is the weights' and the activations' dtype.
pub fn var_builder_for(
    backend: Box<dyn SimpleBackend>,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    if device.is_cpu() && dtype == DType::BF16 {
        let mixed = MatricesIn {
            inner: backend,
            dtype,
        };
        VarBuilder::from_backend(Box::new(mixed), DType::F32, device.clone())
    } else {
        VarBuilder::from_backend(backend, dtype, device.clone())
    }
}

/// Whether `name` of shape `s` is a weight matrix (see [`var_builder_for`]).
pub fn is_weight_matrix(name: &str, s: &Shape) -> bool {
    let dims = s.dims();
    name.ends_with("weight") && dims.len() >= 2 && dims[1] > 1 && s.elem_count() >= 256
}

/// Weight matrices in `dtype`, all else as asked (see [`var_builder_for`]).
struct MatricesIn {
    inner: Box<dyn SimpleBackend>,
    dtype: DType,
}

impl SimpleBackend for MatricesIn {
    fn get(
        &self,
        s: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let dtype = if is_weight_matrix(name, &s) {
            self.dtype
        } else {
            dtype
        };
        self.inner.get(s, name, init, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.inner.get_unchecked(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

struct RandomWeights {
    std: f64,
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        _: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        match dtype {
            // drawn in bf16: no f32 transient of each (large) tensor
            DType::BF16 => Tensor::randn(half::bf16::ZERO, half::bf16::from_f64(self.std), s, dev),
            _ => Tensor::randn(0f32, self.std as f32, s, dev)?.to_dtype(dtype),
        }
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights have no shape for `{name}`")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CPU bf16: matrices held in bf16, vectors, tables and depthwise kernels in f32, the
    /// builder's (activation) dtype f32; other devices and dtypes untouched.
    #[test]
    fn cpu_bf16_holds_weight_matrices_in_bf16_and_the_rest_in_f32() -> candle_core::Result<()> {
        let vb = random_var_builder(0.02, DType::BF16, &Device::Cpu);
        assert_eq!(vb.dtype(), DType::F32);
        for (shape, name, want) in [
            (vec![64, 32], "to_q.weight", DType::BF16),
            (vec![64, 32, 1, 1], "conv_inverted.weight", DType::BF16),
            (vec![16, 8, 3, 3], "conv_in.weight", DType::BF16),
            (vec![64], "to_q.bias", DType::F32),
            (vec![64], "norm.weight", DType::F32),
            (vec![6, 64], "scale_shift_table", DType::F32),
            (vec![64, 1, 3, 3], "conv_depth.weight", DType::F32),
        ] {
            let t = vb.get(shape.as_slice(), name)?;
            assert_eq!(t.dtype(), want, "{name} {shape:?}");
        }
        let f32 = random_var_builder(0.02, DType::F32, &Device::Cpu);
        assert_eq!(f32.get((64, 32), "to_q.weight")?.dtype(), DType::F32);
        Ok(())
    }
}
