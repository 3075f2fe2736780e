//! The engine: sequences, scheduler, sampling, the step loop and its metrics.
//!
//! `Engine::start` moves a `Backend` onto a dedicated OS thread (backends are not `Sync`, and CUDA
//! wants one thread) that loops: apply commands from `EngineHandle`s, schedule a step
//! (`scheduler`), launch it on the backend, read the step before it (`step`: with async
//! scheduling the GPU computes step n + 1 while the host reads step n), sample (`sampler`),
//! detokenize and stream (`output`). Dropping a request's stream cancels it; its blocks are free within one step.
//! If the backend fails or the thread panics, every live stream gets `EngineError::Internal`
//! and new requests are refused.
//!
//! # Disaggregation hooks (block ids explicit)
//!
//! Decode side:
//! 1. `EngineHandle::generate_remote_prefill(req)` validates the request, allocates KV blocks
//!    for the whole prompt (reusing local prefix-cache hits) and *parks* the sequence. It returns a
//!    `RemotePrefillTicket { request_id, block_ids, num_cached_blocks, layout, expires_at_unix_ms }`
//!    and the output stream (a prefill worker drops a job popped from `expires_at_unix_ms` on). Blocks `block_ids[num_cached_blocks..]` must be written; the first ones already hold
//!    this prompt's KV. If no blocks are free it answers `Unavailable` (prefill locally instead).
//! 2. The transfer writes the KV: `EngineHandle::import_kv(request_id, block_ids, bytes)` runs
//!    `Backend::import_blocks` on the step thread, and only into the parked request's own
//!    writable blocks (so a late transfer can never scribble over blocks reused by another
//!    request after a timeout). `import_kv_device(request_id, block_ids, staged, from)` does the
//!    same GPU to GPU from a prefill engine's staged blocks (`device_kv`). Any transfer backend
//!    that writes device memory directly must equally finish before step 3.
//! 3. `EngineHandle::complete_remote_prefill(request_id, first_token)` marks the prompt's KV as
//!    computed, streams `first_token` and decodes on. `fail_remote_prefill(request_id)` (or
//!    `EngineConfig::remote_prefill_timeout` passing) frees the blocks and queues the request
//!    for a local prefill. A seeded request's random stream skips the draw the prefill side used
//!    for the first token, so its tokens match an aggregated run.
//!
//! Prefill side: `EngineHandle::prefill_and_export(req)` queues the prompt like any other request
//! (so several prompts share a step under the token budget), and when its last chunk has run,
//! samples the first token, exports the prompt's blocks (`Backend::export_blocks` wire format,
//! `ceil(prompt_len / block_size)` blocks) and frees them: `PrefillExport { first_token, kv,
//! num_blocks, layout, .. }`. `PrefillExport::blocks_from(num_cached_blocks)` gives the bytes
//! for the decode side's `blocks_to_write()`. `prefill_and_export_on_device(req)` keeps the
//! blocks on the GPU instead (`PrefillExport::device`, a CUDA backend; host bytes otherwise), and
//! `PrefillExport::into_payload(num_cached_blocks)` gives either as a `KvPayload`.

pub mod config;
pub mod core;
pub mod detokenize;
pub mod device_kv;
pub mod handle;
pub mod mock_backend;
pub mod output;
mod parking;
pub mod remote;
pub mod sampler;
pub mod scheduler;
pub mod sequence;
mod step;
pub mod types;
pub mod validate;

pub use config::EngineConfig;
pub use detokenize::TokenDecoder;
pub use handle::{EngineHandle, Limits};
pub use remote::{PrefillExport, RemotePrefillTicket};

use crate::backend::Backend;
use crate::kv::BlockPool;
use crate::model::Tokenizer;
use core::{Core, Shared};
use scheduler::Scheduler;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

pub struct Engine;

impl Engine {
    /// Starts the step thread and returns the handle that feeds it. Without a tokenizer the
    /// outputs carry token ids only (no text, no stop strings).
    pub fn start(
        backend: Box<dyn Backend>,
        tokenizer: Option<Tokenizer>,
        config: EngineConfig,
    ) -> EngineHandle {
        let decoder = tokenizer.map(|t| Arc::new(t) as Arc<dyn TokenDecoder>);
        Self::start_with_decoder(backend, decoder, config)
    }

    /// `start` with any detokenizer (tests use small fakes).
    pub fn start_with_decoder(
        backend: Box<dyn Backend>,
        decoder: Option<Arc<dyn TokenDecoder>>,
        config: EngineConfig,
    ) -> EngineHandle {
        let model = backend.config().clone();
        let layout = backend.kv_layout();
        let num_blocks = backend.num_kv_blocks();
        let max_model_len = config
            .max_model_len
            .unwrap_or(model.max_position_embeddings)
            .max(1);
        let mut budget = config.max_num_batched_tokens.max(1);
        if !config.enable_chunked_prefill {
            budget = budget.max(max_model_len);
        }
        let mut eos_token_ids = model.eos_token_ids.clone();
        if let Some(d) = &decoder {
            eos_token_ids.extend(d.eos_token_ids());
        }
        eos_token_ids.sort_unstable();
        eos_token_ids.dedup();
        let limits = Limits {
            max_model_len,
            block_size: layout.block_size,
            num_blocks,
            vocab_size: model.vocab_size,
            max_queue_len: config.max_queue_len,
            has_tokenizer: decoder.is_some(),
            eos_token_ids,
            kv_layout: layout,
        };
        let shared = Arc::new(Shared::default());
        let has_pools = !backend.cuda_kv_pools().is_empty();
        let queues_steps = backend.queues_steps();
        shared
            .cuda_kv
            .store(has_pools, std::sync::atomic::Ordering::Relaxed);
        let pool = BlockPool::new(num_blocks, layout.block_size, config.enable_prefix_caching);
        let sched = Scheduler::new(
            pool,
            budget,
            config.max_num_seqs.max(1),
            config.enable_chunked_prefill,
            shared.queued.clone(),
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let core = Core {
            backend,
            sched,
            decoder,
            shared: shared.clone(),
            rx,
            remote_prefill_timeout: config.remote_prefill_timeout,
            parked: HashMap::new(),
            layout,
            vocab_size: model.vocab_size,
            steps: 0,
            last_step_ms: 0.0,
            recent: VecDeque::new(),
            stalled: false,
            outbox: vec![],
            device_kv: Default::default(),
            async_scheduling: config.async_scheduling && queues_steps,
            in_flight: None,
            last_finish: None,
        };
        core.publish_initial_metrics();
        let thread = std::thread::Builder::new()
            .name("tandem-engine".into())
            .spawn(move || core.run())
            .expect("spawn the engine thread");
        EngineHandle::new(tx, shared, limits, thread)
    }
}
