//! The decode side of disaggregation on the step thread: parked sequences whose prompt KV is
//! written from elsewhere (see the module doc of `engine`).

use crate::engine::core::{Core, Reply};
use crate::engine::remote::RemotePrefillTicket;
use crate::engine::scheduler::blocks_for;
use crate::engine::sequence::{SeqId, SeqState, Sequence};
use crate::engine::types::EngineError;
use crate::kv::block_hashes;
use std::time::Instant;

impl Core {
    /// Decode side: allocates the prompt's blocks and parks the sequence until its KV arrives.
    pub(crate) fn park(&mut self, mut seq: Sequence, reply: Reply<RemotePrefillTicket>) {
        if self.parked.contains_key(&seq.request_id) {
            let msg = format!(
                "request id {} is already waiting for a remote prefill",
                seq.request_id
            );
            let _ = reply.send(Err(EngineError::InvalidRequest(msg)));
            return;
        }
        let pool = &mut self.sched.pool;
        let bs = pool.block_size();
        let hashes = if pool.prefix_caching() {
            block_hashes(&seq.tokens[..(seq.prompt_len - 1) / bs * bs], bs)
        } else {
            vec![]
        };
        let hits = pool.lookup(&hashes);
        let need = blocks_for(seq.prompt_len, bs) - hits.len();
        if !pool.can_allocate(need, &hits) {
            let msg = "no free KV blocks for a remote prefill; prefill locally".to_string();
            let _ = reply.send(Err(EngineError::Unavailable(msg)));
            return;
        }
        pool.acquire(&hits);
        let new = pool.allocate(need).expect("checked");
        pool.record_lookup(seq.prompt_len, hits.len() * bs);
        seq.admitted_once = true;
        seq.cached_tokens = hits.len() * bs;
        seq.num_computed = hits.len() * bs;
        seq.hashes = hashes[..hits.len()].to_vec();
        let num_cached_blocks = hits.len();
        seq.blocks = hits;
        seq.blocks.extend(new);
        // The wall clock first, so the ticket never expires after the engine stops waiting.
        let (wall, now) = (std::time::SystemTime::now(), Instant::now());
        seq.state = SeqState::Parked {
            deadline: now + self.remote_prefill_timeout,
        };
        let ticket = RemotePrefillTicket {
            request_id: seq.request_id.clone(),
            block_ids: seq.blocks.clone(),
            num_cached_blocks,
            layout: self.layout,
            expires_at_unix_ms: Some(super::remote::unix_ms(wall + self.remote_prefill_timeout)),
        };
        let (id, request_id) = (seq.id, seq.request_id.clone());
        self.sched.insert(seq);
        self.parked.insert(request_id.clone(), id);
        self.publish_metrics(0);
        if reply.send(Ok(ticket)).is_err() {
            self.parked.remove(&request_id);
            self.sched.remove(id); // the caller gave up
        }
    }

    pub(crate) fn import_kv(
        &mut self,
        request_id: &str,
        block_ids: &[u32],
        data: &[u8],
    ) -> Result<(), EngineError> {
        self.check_import(request_id, block_ids)?;
        let expected = block_ids.len() * self.layout.block_bytes();
        if data.len() != expected {
            return Err(EngineError::InvalidRequest(format!(
                "KV data for {} blocks must be {expected} bytes, got {}",
                block_ids.len(),
                data.len()
            )));
        }
        self.backend
            .import_blocks(block_ids, data)
            .map_err(|e| EngineError::Internal(format!("KV import failed: {e:#}")))
    }

    /// Refuses an import unless the request is parked and every block is one of its blocks
    /// awaiting KV (a late write must not touch blocks that may belong to another request now).
    pub(crate) fn check_import(
        &self,
        request_id: &str,
        block_ids: &[u32],
    ) -> Result<(), EngineError> {
        let id = *self
            .parked
            .get(request_id)
            .ok_or_else(|| not_parked(request_id))?;
        let seq = &self.sched.seqs[&id];
        let writable = &seq.blocks[seq.num_computed / self.layout.block_size..];
        if let Some(b) = block_ids.iter().find(|b| !writable.contains(b)) {
            return Err(EngineError::InvalidRequest(format!(
                "block {b} is not a block of request {request_id} awaiting KV"
            )));
        }
        Ok(())
    }

    /// A remote prefill failed or timed out: free the blocks and prefill locally.
    fn unpark_to_local(&mut self, id: SeqId) {
        let seq = self.sched.seqs.get_mut(&id).expect("parked sequence");
        seq.release_blocks(&mut self.sched.pool);
        self.sched.set_state(id, SeqState::Waiting);
    }

    pub(crate) fn expire_parked(&mut self) {
        let now = Instant::now();
        let expired: Vec<(String, SeqId)> = self
            .parked
            .iter()
            .filter(|(_, id)| matches!(self.sched.seqs[id].state, SeqState::Parked { deadline } if deadline <= now))
            .map(|(r, id)| (r.clone(), *id))
            .collect();
        for (request_id, id) in expired {
            tracing::warn!(request_id, "remote prefill timed out; prefilling locally");
            self.parked.remove(&request_id);
            self.unpark_to_local(id);
        }
    }

    /// The KV is in place: the prompt counts as computed, and `first_token` is the first output.
    pub(crate) fn complete_remote(&mut self, request_id: &str, first_token: u32, reply: Reply<()>) {
        let Some(id) = self.parked.remove(request_id) else {
            let _ = reply.send(Err(not_parked(request_id)));
            return;
        };
        if first_token as usize >= self.vocab_size {
            self.unpark_to_local(id);
            let _ = reply.send(Err(EngineError::InvalidRequest(format!(
                "first token {first_token} is outside the vocabulary; prefilling locally"
            ))));
            return;
        }
        let seq = self.sched.seqs.get_mut(&id).expect("parked sequence");
        seq.num_computed = seq.prompt_len;
        seq.commit_full_blocks(&mut self.sched.pool);
        seq.sampler.skip_draw();
        self.sched.set_state(id, SeqState::Running);
        let _ = reply.send(Ok(()));
        self.on_token(id, first_token, None);
    }

    pub(crate) fn fail_remote(&mut self, request_id: &str) -> Result<(), EngineError> {
        let id = self
            .parked
            .remove(request_id)
            .ok_or_else(|| not_parked(request_id))?;
        self.unpark_to_local(id);
        Ok(())
    }
}

fn not_parked(request_id: &str) -> EngineError {
    EngineError::InvalidRequest(format!(
        "request {request_id} is not waiting for a remote prefill"
    ))
}
