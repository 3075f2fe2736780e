//! A deployment file (`tandem serve -f benchmarks/agg.yaml`): the model and groups of workers,
//! like the guide's configs. Values in the file override the command line's.

use super::router::RouterMode;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    pub model: Option<String>,
    pub served_model_name: Option<String>,
    /// `safetensors` or `dummy`.
    pub load_format: Option<String>,
    pub router_mode: Option<RouterMode>,
    pub max_model_len: Option<usize>,
    pub workers: Vec<WorkerGroup>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Prefill and decode in one engine.
    #[default]
    Agg,
    Prefill,
    Decode,
}

/// `replicas` identical workers. Unset fields fall back to the command line.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WorkerGroup {
    #[serde(default)]
    pub role: Role,
    #[serde(default = "one")]
    pub replicas: usize,
    /// `auto`, `cpu` or `cuda`.
    pub device: Option<String>,
    /// First GPU of the group; replica r of TP size t uses GPUs `first + r*t ..`.
    pub first_gpu: Option<usize>,
    #[serde(alias = "tp")]
    pub tensor_parallel_size: Option<usize>,
    pub block_size: Option<usize>,
    pub max_model_len: Option<usize>,
    pub max_num_seqs: Option<usize>,
    pub max_num_batched_tokens: Option<usize>,
    pub gpu_memory_utilization: Option<f32>,
    /// `auto` or `fp8` (vLLM's `--kv-cache-dtype`). Prefill and decode workers that hand KV over
    /// must agree.
    pub kv_cache_dtype: Option<String>,
    /// Reuse the KV of shared prompt prefixes (vLLM's `--enable-prefix-caching`). The guide's
    /// runs turn it off: a sweep's levels repeat prompts, and hits would skip their prefills.
    pub enable_prefix_caching: Option<bool>,
    /// Decode workers: prompts with at most this many uncached tokens are prefilled locally.
    pub max_local_prefill_length: Option<usize>,
    /// Decode workers: with this many prompts queued for prefill or more, prefill locally.
    pub max_prefill_queue_size: Option<usize>,
    /// Decode workers: `false` sends every prompt to a prefill worker.
    pub conditional_disagg: Option<bool>,
}

fn one() -> usize {
    1
}

impl Deployment {
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in deployment file {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let d: Deployment = serde_yaml_ng::from_str(text)?;
        if d.workers.is_empty() {
            bail!("`workers` must list at least one worker group");
        }
        for (i, g) in d.workers.iter().enumerate() {
            if g.replicas == 0 {
                bail!("workers[{i}]: `replicas` must be at least 1");
            }
            if g.tensor_parallel_size == Some(0) {
                bail!("workers[{i}]: `tensor_parallel_size` must be at least 1");
            }
        }
        Ok(d)
    }

    pub fn has_role(&self, role: Role) -> bool {
        self.workers.iter().any(|g| g.role == role)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_shipped_files() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("benchmarks");
        let agg = Deployment::load(&root.join("agg.yaml")).unwrap();
        assert!(!agg.workers.is_empty());
        assert!(!agg.has_role(Role::Prefill));
        let disagg = Deployment::load(&root.join("disagg.yaml")).unwrap();
        assert!(disagg.has_role(Role::Prefill) && disagg.has_role(Role::Decode));
    }

    #[test]
    fn rejects_mistakes() {
        assert!(Deployment::parse("workers: []").is_err());
        assert!(Deployment::parse("workers: [{replicas: 0}]").is_err());
        assert!(
            Deployment::parse("workers: [{replicaz: 2}]").is_err(),
            "typos are caught"
        );
        assert!(Deployment::parse("router_mode: fastest\nworkers: [{}]").is_err());
        let d = Deployment::parse("router_mode: kv-aware\nworkers: [{replicas: 3, device: cpu}]")
            .unwrap();
        assert_eq!(d.router_mode, Some(RouterMode::KvAware));
        assert_eq!(d.workers[0].replicas, 3);
        assert_eq!(d.workers[0].role, Role::Agg);
    }
}
