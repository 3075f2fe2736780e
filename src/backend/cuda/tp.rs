//! [`TpBackend`]: one model over `world` GPUs with tensor parallelism (Megatron-style sharding,
//! see `shard.rs`), as one [`Backend`].
//!
//! Design: one process, one thread per GPU. Each rank thread owns a [`CudaBackend`] built for its
//! shard and its NCCL communicator; the backend's forward is the one-GPU forward over the shard's
//! local config, with NCCL all-reduces (sum) after the vocab-parallel embedding and after o_proj
//! and down_proj, and an all-gather of the vocab-parallel logits before sampling. Every rank
//! receives the same batch (over a channel), runs the same steps, and samples the same tokens
//! from the same gathered logits; rank 0's outputs are the step's result. Steps are launched and
//! finished on the ranks like on one GPU (async scheduling: each rank takes a previous token from
//! its own samples, which equal every other rank's), and decode steps replay CUDA graphs that hold
//! the collectives. Threads rather than
//! processes: no IPC, one address space for KV export/import, and NCCL supports one communicator
//! per thread.
//!
//! KV: rank `r` holds KV heads `r·h .. (r+1)·h` (`h = kv_heads / world`), which is the per-rank
//! layout of `kv::transfer::reshard`. [`Backend::kv_layout`] and the export/import wire format
//! present all heads (blocks are gathered from and scattered to the ranks), so a TP engine
//! exchanges KV with any other backend of the same model.
//!
//! Every wait on a rank has a timeout; a rank that errors or times out leaves the ranks out of
//! step (a collective may wait forever), so the backend then refuses further work.

use super::backend::{CudaBackend, CudaOptions, WeightSource};
use super::nccl::{NcclId, TpSetup};
use super::shard::Shard;
use crate::backend::{Backend, Batch, CudaKvPool, KvLayout, PreviousToken, SeqOutput};
use crate::model::config::LlamaConfig;
use crate::model::weights::LlamaWeights;
use anyhow::{anyhow, bail, ensure, Context, Result};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

type Job = Box<dyn FnOnce(&mut CudaBackend) + Send>;

struct Rank {
    jobs: mpsc::Sender<Job>,
    thread: Option<JoinHandle<()>>,
}

pub struct TpBackend {
    config: LlamaConfig,
    /// All KV heads (what export/import speak).
    layout: KvLayout,
    /// One rank's share of the KV heads.
    rank_layout: KvLayout,
    num_blocks: usize,
    ranks: Vec<Rank>,
    broken: Option<String>,
    weight_bytes: usize,
    /// Each rank's KV pool (its share of the heads), for GPU-to-GPU KV imports.
    pools: Vec<CudaKvPool>,
}

/// Building a rank: loading weights or generating a 70B's share takes a while.
const BUILD_TIMEOUT: Duration = Duration::from_secs(1200);
/// One step or KV copy.
const STEP_TIMEOUT: Duration = Duration::from_secs(300);

pub enum TpWeights<'a> {
    Host(&'a LlamaWeights),
    Dummy { seed: u64 },
}

impl TpBackend {
    /// Ranks on GPUs `opts.device .. opts.device + world`, each with a KV pool sized from
    /// `opts.gpu_memory_utilization` of its own GPU (or `opts.num_blocks`).
    pub fn new(
        config: &LlamaConfig,
        weights: TpWeights,
        opts: CudaOptions,
        world: usize,
    ) -> Result<Self> {
        Shard::check(config, world)?;
        let gpus = if super::device::gpu_available() {
            cudarc::driver::result::device::get_count()? as usize
        } else {
            0
        };
        ensure!(
            opts.device + world <= gpus,
            "--tensor-parallel-size {world} from GPU {} needs GPUs {}..{}, but {gpus} are visible",
            opts.device,
            opts.device,
            opts.device + world
        );
        let id = NcclId::new()?;
        let (ready_tx, ready_rx) = mpsc::channel();
        let mut ranks = Vec::with_capacity(world);
        for rank in 0..world {
            let shard = Shard { rank, world };
            let host = match &weights {
                TpWeights::Host(w) => Some(shard.weights(config, w)?),
                TpWeights::Dummy { .. } => None,
            };
            let seed = match weights {
                TpWeights::Dummy { seed } => seed.wrapping_add(rank as u64 * 0x9E37_79B9),
                TpWeights::Host(_) => 0,
            };
            let (jobs, inbox) = mpsc::channel::<Job>();
            let (config, opts, ready) = (config.clone(), opts.clone(), ready_tx.clone());
            let thread = std::thread::Builder::new()
                .name(format!("tp-rank-{rank}"))
                .spawn(move || {
                    let source = match &host {
                        Some(w) => WeightSource::Host(w),
                        None => WeightSource::Dummy { seed },
                    };
                    let opts = CudaOptions {
                        device: opts.device + rank,
                        ..opts
                    };
                    let built =
                        CudaBackend::new_rank(&config, source, opts, Some(TpSetup { shard, id }));
                    drop(host); // the GPU has its copy
                    let mut backend = match built {
                        Ok(b) => {
                            let _ = ready.send((
                                rank,
                                Ok((
                                    b.kv_layout(),
                                    b.num_kv_blocks(),
                                    b.weight_bytes(),
                                    b.kv_pool(),
                                )),
                            ));
                            b
                        }
                        Err(e) => {
                            let _ = ready.send((rank, Err(e)));
                            return;
                        }
                    };
                    for job in inbox {
                        job(&mut backend);
                    }
                })
                .context("starting a tensor-parallel rank thread")?;
            ranks.push(Rank {
                jobs,
                thread: Some(thread),
            });
        }
        drop(ready_tx);
        let mut built = vec![None; world];
        for _ in 0..world {
            let (rank, r) = ready_rx
                .recv_timeout(BUILD_TIMEOUT)
                .map_err(|_| anyhow!("tensor-parallel ranks not ready after {BUILD_TIMEOUT:?}"))?;
            built[rank] =
                Some(r.with_context(|| format!("tensor-parallel rank {rank} of {world}"))?);
        }
        let built: Vec<_> = built.into_iter().map(|b| b.unwrap()).collect();
        let rank_layout = built[0].0;
        let layout = KvLayout {
            num_kv_heads: rank_layout.num_kv_heads * world,
            ..rank_layout
        };
        let num_blocks = built.iter().map(|b| b.1).min().unwrap();
        tracing::info!(
            world,
            kv_blocks = num_blocks,
            "tensor-parallel backend ready"
        );
        Ok(Self {
            config: config.clone(),
            layout,
            rank_layout,
            num_blocks,
            weight_bytes: built.iter().map(|b| b.2).sum(),
            pools: built.iter().map(|b| b.3).collect(),
            ranks,
            broken: None,
        })
    }

    pub fn world(&self) -> usize {
        self.ranks.len()
    }

    /// Weight bytes over all GPUs.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Runs `f` on every rank at once and waits for all of them (rank order).
    pub fn on_ranks<T, F>(&mut self, f: F) -> Result<Vec<T>>
    where
        T: Send + 'static,
        F: Fn(usize, &mut CudaBackend) -> Result<T> + Send + Sync + 'static,
    {
        if let Some(why) = &self.broken {
            bail!("the tensor-parallel backend stopped after an earlier failure: {why}");
        }
        let f = Arc::new(f);
        let (tx, rx) = mpsc::channel();
        for (rank, r) in self.ranks.iter().enumerate() {
            let (f, tx) = (f.clone(), tx.clone());
            let job: Job = Box::new(move |b| {
                let _ = tx.send((rank, f(rank, b)));
            });
            if r.jobs.send(job).is_err() {
                self.broken = Some(format!("rank {rank} has exited"));
                bail!("tensor-parallel rank {rank} has exited");
            }
        }
        drop(tx);
        let mut out: Vec<Option<T>> = (0..self.ranks.len()).map(|_| None).collect();
        let mut first_err = None;
        for _ in 0..self.ranks.len() {
            match rx.recv_timeout(STEP_TIMEOUT) {
                Ok((rank, Ok(v))) => out[rank] = Some(v),
                Ok((rank, Err(e))) => {
                    first_err.get_or_insert(e.context(format!("tensor-parallel rank {rank}")));
                }
                Err(_) => {
                    let why = format!("a rank did not answer within {STEP_TIMEOUT:?}");
                    self.broken = Some(why.clone());
                    bail!(why);
                }
            }
        }
        if let Some(e) = first_err {
            self.broken = Some(format!("{e:#}"));
            return Err(e);
        }
        Ok(out.into_iter().map(|v| v.unwrap()).collect())
    }

    pub fn fill_kv_random(&mut self, seed: u64) -> Result<()> {
        self.on_ranks(move |r, b| b.fill_kv_random(seed.wrapping_add(r as u64)))?;
        Ok(())
    }

    pub fn set_split_min_keys(&mut self, keys: usize) -> Result<()> {
        self.on_ranks(move |_, b| {
            b.set_split_min_keys(keys);
            Ok(())
        })?;
        Ok(())
    }

    pub fn set_attention_blocks_per_sm(&mut self, blocks: usize) -> Result<()> {
        self.on_ranks(move |_, b| {
            b.set_attention_blocks_per_sm(blocks);
            Ok(())
        })?;
        Ok(())
    }

    pub fn split_min_keys(&mut self) -> Result<usize> {
        Ok(self.on_ranks(|_, b| Ok(b.options().split_min_keys))?[0])
    }

    pub fn set_enforce_eager(&mut self, on: bool) -> Result<()> {
        self.on_ranks(move |_, b| {
            b.set_enforce_eager(on);
            Ok(())
        })?;
        Ok(())
    }

    pub fn set_profiling(&mut self, on: bool) -> Result<()> {
        self.on_ranks(move |_, b| {
            b.set_profiling(on);
            Ok(())
        })?;
        Ok(())
    }

    /// Rank 0's (graphs captured, steps replayed from a graph); every rank chooses alike.
    pub fn graph_counts(&mut self) -> Result<(usize, usize)> {
        Ok(self.on_ranks(|_, b| Ok(b.graph_counts()))?[0])
    }

    /// Rank 0's kernel profile (the others wait in the same collectives).
    pub fn take_profile(&mut self) -> Result<Vec<(&'static str, f64, usize)>> {
        Ok(self.on_ranks(|_, b| Ok(b.take_profile()))?.swap_remove(0))
    }

    /// Bytes of one (block, layer, K|V) slab group of one rank.
    fn rank_part_bytes(&self) -> usize {
        let l = &self.rank_layout;
        l.num_kv_heads * l.block_size * l.head_dim * l.dtype.size_bytes()
    }
}

/// Interleaves the ranks' wire-format buffers into one with all heads: every (block, layer,
/// K|V) group is the ranks' groups one after the other (rank `r` holds heads `r·h ..`).
pub fn merge_heads(shards: &[Vec<u8>], part: usize) -> Vec<u8> {
    let groups = shards.first().map_or(0, |s| s.len() / part.max(1));
    let mut out = Vec::with_capacity(groups * part * shards.len());
    for g in 0..groups {
        for s in shards {
            out.extend_from_slice(&s[g * part..(g + 1) * part]);
        }
    }
    out
}

/// The inverse of [`merge_heads`].
pub fn split_heads(data: &[u8], world: usize, part: usize) -> Vec<Vec<u8>> {
    let groups = data.len() / (part * world).max(1);
    let mut out: Vec<Vec<u8>> = (0..world)
        .map(|_| Vec::with_capacity(groups * part))
        .collect();
    for (i, chunk) in data.chunks_exact(part).enumerate() {
        out[i % world].extend_from_slice(chunk);
    }
    out
}

impl Backend for TpBackend {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn kv_layout(&self) -> KvLayout {
        self.layout
    }

    fn num_kv_blocks(&self) -> usize {
        self.num_blocks
    }

    /// The ranks' pools: a KV import copies each rank's heads straight into its GPU (between
    /// steps, when the rank threads are idle). No `cuda_kv_pool`: a rank's pool alone is not the
    /// whole layout, so TP prefill engines export through the host.
    fn cuda_kv_pools(&self) -> Vec<CudaKvPool> {
        self.pools.clone()
    }

    fn step(&mut self, batch: &Batch) -> Result<Vec<SeqOutput>> {
        if batch.seqs.is_empty() {
            return Ok(vec![]);
        }
        let batch = Arc::new(batch.clone());
        Ok(self.on_ranks(move |_, b| b.step(&batch))?.swap_remove(0))
    }

    /// Every rank queues the step on its stream; returns once all have (not when computed).
    fn launch_step(&mut self, batch: &Batch, previous: &[PreviousToken]) -> Result<()> {
        let (batch, previous) = (Arc::new(batch.clone()), Arc::new(previous.to_vec()));
        self.on_ranks(move |_, b| b.launch_step(&batch, &previous))?;
        Ok(())
    }

    fn finish_step(&mut self) -> Result<Vec<SeqOutput>> {
        Ok(self.on_ranks(|_, b| b.finish_step())?.swap_remove(0))
    }

    fn queues_steps(&self) -> bool {
        true
    }

    fn export_blocks(&mut self, blocks: &[u32]) -> Result<Vec<u8>> {
        let blocks = blocks.to_vec();
        let shards = self.on_ranks(move |_, b| b.export_blocks(&blocks))?;
        Ok(merge_heads(&shards, self.rank_part_bytes()))
    }

    fn import_blocks(&mut self, blocks: &[u32], data: &[u8]) -> Result<()> {
        let want = blocks.len() * self.layout.block_bytes();
        ensure!(
            data.len() == want,
            "KV import of {} bytes, expected {want}",
            data.len()
        );
        let shards = Arc::new(split_heads(data, self.world(), self.rank_part_bytes()));
        let blocks = blocks.to_vec();
        self.on_ranks(move |r, b| b.import_blocks(&blocks, &shards[r]))?;
        Ok(())
    }
}

impl Drop for TpBackend {
    fn drop(&mut self) {
        let threads: Vec<_> = self
            .ranks
            .drain(..)
            .filter_map(|r| {
                drop(r.jobs);
                r.thread
            })
            .collect();
        // A rank stuck in a collective never returns; leave it rather than hang here.
        if self.broken.is_none() {
            for t in threads {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_merge_and_split_back() {
        // 2 ranks, slab groups of 3 bytes, 4 groups each.
        let a: Vec<u8> = (0..12).collect();
        let b: Vec<u8> = (100..112).collect();
        let merged = merge_heads(&[a.clone(), b.clone()], 3);
        assert_eq!(&merged[..9], &[0, 1, 2, 100, 101, 102, 3, 4, 5]);
        assert_eq!(merged.len(), 24);
        assert_eq!(split_heads(&merged, 2, 3), vec![a, b]);
        let one: Vec<u8> = (0..6).collect();
        assert_eq!(merge_heads(std::slice::from_ref(&one), 3), one);
    }
}
