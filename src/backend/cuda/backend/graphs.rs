//! CUDA graphs for decode steps (on by default, as in vLLM; `--enforce-eager` turns them off).
//!
//! A decode step launches about 13 kernels a layer, ~1,100 for the 70B model. Replayed from a
//! graph they start without the host's per-launch cost and with shorter gaps between them. A graph
//! bakes in every launch's arguments, so it is keyed by all they depend on besides the packed
//! plan's contents (which the step copies into the same buffer before each replay): the token and
//! output counts, the attention work items and split groups, and the plan's offsets. Block tables
//! sit last in the plan, so a sequence growing by a block changes no offset.
//!
//! A key is captured the second step in a row that has it (a one-off shape runs eagerly, since a
//! capture costs the host as much as an eager step), and the least recently used graph goes when
//! more than the capacity are kept.

use super::super::meta::{Offsets, StepPlan};
use super::CudaBackend;
use anyhow::{Context, Result};
use cudarc::driver::{sys, CudaGraph};
use std::collections::HashMap;

/// Everything a decode step's launches depend on besides the plan's contents.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GraphKey {
    tokens: usize,
    emits: usize,
    tiles: usize,
    groups: usize,
    offsets: Offsets,
}

impl GraphKey {
    pub fn of(plan: &StepPlan) -> Self {
        Self {
            tokens: plan.num_tokens,
            emits: plan.emit_seqs.len(),
            tiles: plan.num_tiles,
            groups: plan.num_groups,
            offsets: plan.at.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphUse {
    Replay,
    Capture,
    Eager,
}

/// The kept graphs (`G`: a CUDA graph; the policy is tested with any type).
pub struct StepGraphs<G> {
    kept: HashMap<GraphKey, (G, u64)>,
    previous: Option<GraphKey>,
    clock: u64,
    capacity: usize,
    pub captures: usize,
    pub replays: usize,
}

impl<G> StepGraphs<G> {
    pub fn new(capacity: usize) -> Self {
        Self {
            kept: HashMap::new(),
            previous: None,
            clock: 0,
            capacity,
            captures: 0,
            replays: 0,
        }
    }

    /// What to do for a step with `key`.
    pub fn choose(&mut self, key: &GraphKey) -> GraphUse {
        self.clock += 1;
        let repeat = self.previous.as_ref() == Some(key);
        if !repeat {
            self.previous = Some(key.clone());
        }
        if let Some(entry) = self.kept.get_mut(key) {
            entry.1 = self.clock;
            self.replays += 1;
            GraphUse::Replay
        } else if repeat && self.capacity > 0 {
            GraphUse::Capture
        } else {
            GraphUse::Eager
        }
    }

    pub fn get(&self, key: &GraphKey) -> Option<&G> {
        self.kept.get(key).map(|(g, _)| g)
    }

    /// Keeps a captured graph, dropping the least recently used one when full.
    pub fn insert(&mut self, key: GraphKey, graph: G) {
        if self.kept.len() >= self.capacity {
            let oldest = self
                .kept
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.kept.remove(&k);
            }
        }
        self.captures += 1;
        self.kept.insert(key, (graph, self.clock));
    }

    /// Forgets every graph (their baked arguments no longer hold).
    pub fn clear(&mut self) {
        self.kept.clear();
        self.previous = None;
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.kept.len()
    }
}

/// A captured, instantiated decode step.
pub struct DecodeGraph(CudaGraph);

// SAFETY: CUDA graphs need only external serialization (no two threads at once), which the
// owning backend's `&mut self` gives; the driver handles are not tied to a thread.
unsafe impl Send for DecodeGraph {}

/// Graphs kept per backend: a few batch sizes with a few split shapes each.
pub const GRAPH_CAPACITY: usize = 32;

impl CudaBackend {
    /// Whether this step's launches may come from a graph: a pure decode step that samples or
    /// returns logits, with no per-layer host hook and no per-kernel profiling. Under tensor
    /// parallelism every rank sees the same steps, so all capture and replay alike; the graph
    /// holds the collectives (NCCL's and the peer all-reduce, whose epochs live on the device).
    pub(super) fn graphable(&self, plan: &StepPlan) -> bool {
        !self.opts.enforce_eager
            && plan.all_decode
            && !plan.emit_seqs.is_empty()
            && self.layer_kv_hook.is_none()
            && !self.profiler.enabled
    }

    /// Launches the step (layers and head) from a graph, capturing it first when due, or eagerly.
    pub(super) fn launch_decode(&mut self, plan: &StepPlan) -> Result<()> {
        let key = GraphKey::of(plan);
        match self.graphs.choose(&key) {
            GraphUse::Eager => self.queue_step(plan),
            GraphUse::Replay => {
                let graph = self.graphs.get(&key).context("a kept graph")?;
                graph.0.launch().context("replaying a decode graph")?;
                Ok(())
            }
            GraphUse::Capture => {
                let stream = self.gpu.stream.clone();
                stream
                    .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
                let launched = self.queue_step(plan);
                // Ends the capture even when a launch failed, so the stream is usable again.
                let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
                launched.context("capturing a decode step")?;
                let graph = graph
                    .context("instantiating a decode graph")?
                    .context("the captured decode step is empty")?;
                graph.launch().context("launching a new decode graph")?;
                self.graphs.insert(key, DecodeGraph(graph));
                Ok(())
            }
        }
    }

    /// (graphs captured, steps replayed from a graph) so far.
    pub fn graph_counts(&self) -> (usize, usize) {
        (self.graphs.captures, self.graphs.replays)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(tokens: usize) -> GraphKey {
        GraphKey {
            tokens,
            emits: tokens,
            tiles: tokens,
            groups: 0,
            offsets: Offsets::default(),
        }
    }

    #[test]
    fn captures_on_the_second_step_in_a_row_then_replays() {
        let mut g = StepGraphs::<u32>::new(4);
        assert_eq!(g.choose(&key(1)), GraphUse::Eager);
        assert_eq!(g.choose(&key(2)), GraphUse::Eager);
        assert_eq!(g.choose(&key(1)), GraphUse::Eager);
        assert_eq!(g.choose(&key(1)), GraphUse::Capture);
        g.insert(key(1), 7);
        assert_eq!(g.choose(&key(1)), GraphUse::Replay);
        assert_eq!(g.get(&key(1)), Some(&7));
        assert_eq!(g.choose(&key(2)), GraphUse::Eager);
        assert_eq!(g.choose(&key(1)), GraphUse::Replay);
        assert_eq!((g.captures, g.replays), (1, 2));
    }

    #[test]
    fn drops_the_least_recently_used_graph_when_full() {
        let mut g = StepGraphs::<usize>::new(2);
        for k in [1, 2] {
            g.choose(&key(k));
            assert_eq!(g.choose(&key(k)), GraphUse::Capture);
            g.insert(key(k), k);
        }
        assert_eq!(g.choose(&key(1)), GraphUse::Replay);
        g.choose(&key(3));
        assert_eq!(g.choose(&key(3)), GraphUse::Capture);
        g.insert(key(3), 3);
        assert_eq!(g.len(), 2);
        assert!(g.get(&key(2)).is_none(), "2 was used least recently");
        assert!(g.get(&key(1)).is_some() && g.get(&key(3)).is_some());
        g.clear();
        assert_eq!(g.len(), 0);
        assert_eq!(g.choose(&key(3)), GraphUse::Eager);
    }

    #[test]
    fn no_capacity_never_captures() {
        let mut g = StepGraphs::<()>::new(0);
        g.choose(&key(1));
        assert_eq!(g.choose(&key(1)), GraphUse::Eager);
    }
}
