//! Loading `*.safetensors` checkpoints (single file or sharded), incl. compressed-tensors FP8.

use super::source::ModelFiles;
use super::weights::{assemble, Linear, LlamaWeights, TensorSource};
use anyhow::{bail, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Where the weights come from (`--load-format`, vLLM's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LoadFormat {
    /// Read `*.safetensors` from the model directory.
    Safetensors,
    /// Seeded random weights of the right shapes and dtypes (no files needed but config.json).
    Dummy,
}

/// Loads the weights of `files` (`seed` only matters for [`LoadFormat::Dummy`]).
pub fn load_weights(files: &ModelFiles, format: LoadFormat, seed: u64) -> Result<LlamaWeights> {
    match format {
        LoadFormat::Dummy => super::dummy::dummy_weights(&files.config, seed),
        LoadFormat::Safetensors => {
            files.fetch_weights()?;
            let ckpt = Checkpoint::open(&files.dir)?;
            assemble(&files.config, &mut CheckpointSource { ckpt: &ckpt })
        }
    }
}

/// The memory-mapped safetensors files of one model directory.
pub struct Checkpoint {
    files: MmapedSafetensors,
    dir: PathBuf,
}

impl Checkpoint {
    /// Opens `model.safetensors.index.json` and its shards, else `model.safetensors`, else
    /// every `*.safetensors` in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let paths = if index.exists() {
            shards_from_index(&index)?
        } else if dir.join("model.safetensors").exists() {
            vec![dir.join("model.safetensors")]
        } else {
            let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                .with_context(|| format!("cannot read model directory {}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            found.sort();
            if found.is_empty() {
                bail!(
                    "no *.safetensors files in {} (pass --load-format dummy for random weights)",
                    dir.display()
                );
            }
            found
        };
        for p in &paths {
            check_header(p)?;
        }
        // SAFETY: the files are opened read-only; as with every mmap, they must not be
        // truncated while the model is loading (we copy the tensors out right away).
        let files = unsafe { MmapedSafetensors::multi(&paths) }
            .map_err(|e| anyhow::anyhow!("malformed safetensors file: {e}"))?;
        Ok(Self {
            files,
            dir: dir.to_path_buf(),
        })
    }

    /// The dtype and shape of tensor `name`, or None if no file has it.
    pub fn info(&self, name: &str) -> Result<Option<(DType, Vec<usize>)>> {
        let Ok(view) = self.files.get(name) else {
            return Ok(None);
        };
        let stored = view.dtype();
        let dtype = DType::try_from(stored)
            .map_err(|_| anyhow::anyhow!("tensor `{name}` has unsupported dtype {stored:?}"))?;
        Ok(Some((dtype, view.shape().to_vec())))
    }

    /// Tensor `name`, checked to have `shape` and one of `dtypes`.
    pub fn tensor(&self, name: &str, shape: &[usize], dtypes: &[DType]) -> Result<Tensor> {
        let Some((dtype, got)) = self.info(name)? else {
            bail!(
                "missing tensor `{name}` (expected shape {shape:?}) in {}",
                self.dir.display()
            );
        };
        if got != shape {
            bail!("tensor `{name}` has shape {got:?}, expected {shape:?}");
        }
        if !dtypes.contains(&dtype) {
            bail!("tensor `{name}` has dtype {dtype:?}, expected one of {dtypes:?}");
        }
        self.files
            .load(name, &Device::Cpu)
            .with_context(|| format!("cannot read tensor `{name}`"))
    }
}

/// The distinct shard files named by an index, each checked to exist.
fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index)
        .with_context(|| format!("cannot read {}", index.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", index.display()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{}: missing object `weight_map`", index.display()))?;
    let mut shards = BTreeSet::new();
    for (tensor, file) in map {
        let file = file.as_str().with_context(|| {
            format!(
                "{}: `weight_map.{tensor}` must be a file name",
                index.display()
            )
        })?;
        let path = index.with_file_name(file);
        if !path.exists() {
            bail!(
                "missing shard {} (listed in {} for tensor `{tensor}`)",
                path.display(),
                index.display()
            );
        }
        shards.insert(path);
    }
    Ok(shards.into_iter().collect())
}

/// A short, readable check before mmap: header length and total size must add up.
fn check_header(path: &Path) -> Result<()> {
    use std::io::Read;
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let size = f.metadata()?.len();
    let mut len = [0u8; 8];
    if size < 8 || f.read_exact(&mut len).is_err() {
        bail!(
            "malformed safetensors file {}: shorter than its 8-byte header length",
            path.display()
        );
    }
    let header_len = u64::from_le_bytes(len);
    if header_len > size - 8 {
        bail!(
            "malformed safetensors file {}: header of {header_len} bytes but the file has {size} (truncated?)",
            path.display()
        );
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header)?;
    let meta: serde_json::Value = serde_json::from_slice(&header).with_context(|| {
        format!(
            "malformed safetensors file {}: header is not JSON",
            path.display()
        )
    })?;
    let data_end = meta
        .as_object()
        .into_iter()
        .flat_map(|m| m.values())
        .filter_map(|t| t.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    let have = size - 8 - header_len;
    if data_end > have {
        bail!(
            "malformed safetensors file {}: tensors need {data_end} data bytes but the file has {have} (truncated?)",
            path.display()
        );
    }
    Ok(())
}

const FLOATS: [DType; 3] = [DType::BF16, DType::F16, DType::F32];

struct CheckpointSource<'a> {
    ckpt: &'a Checkpoint,
}

impl TensorSource for CheckpointSource<'_> {
    fn dense(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.ckpt.tensor(name, shape, &FLOATS)
    }

    fn fp8(&mut self, module: &str, out: usize, inp: usize) -> Result<Linear> {
        let input_scale = format!("{module}.input_scale");
        if self.ckpt.info(&input_scale)?.is_some() {
            bail!("tensor `{input_scale}` is present: static activation scales are not supported (only dynamic per-token FP8)");
        }
        let weight =
            self.ckpt
                .tensor(&format!("{module}.weight"), &[out, inp], &[DType::F8E4M3])?;
        let scale_name = format!("{module}.weight_scale");
        let scale = match self.ckpt.info(&scale_name)? {
            Some((_, s)) if s == [out] => self.ckpt.tensor(&scale_name, &[out], &FLOATS)?,
            _ => self.ckpt.tensor(&scale_name, &[out, 1], &FLOATS)?,
        };
        let scale = scale.to_dtype(DType::F32)?.reshape((out, 1))?;
        Ok(Linear::Fp8 { weight, scale })
    }
}
