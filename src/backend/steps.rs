//! Steps the engine queues ahead (async scheduling, vLLM's `--async-scheduling`): the engine
//! launches step n + 1 before it has read step n's sampled tokens, so its CPU work (outputs,
//! scheduling, the next plan) runs while the GPU computes. A decode chunk whose input token is
//! still on the device names it with a `PreviousToken`; the backend takes it from its last step's
//! samples.

use super::{Batch, SeqOutput};
use anyhow::{bail, Result};
use std::collections::VecDeque;

/// Chunk `seq` of this batch starts with the token the previous step sampled for its sequence
/// `row` (a batch index of that step); the chunk's `tokens[0]` is a placeholder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreviousToken {
    pub seq: usize,
    pub row: usize,
}

/// `launch_step` / `finish_step` for a backend that computes a step when it is finished: launched
/// batches wait here; `next` gives the oldest with its previous tokens filled in from the outputs
/// of the step before (`done`).
#[derive(Default)]
pub struct StepQueue {
    launched: VecDeque<(Batch, Vec<PreviousToken>)>,
    /// Tokens sampled by the last computed step, by batch index.
    last_tokens: Vec<Option<u32>>,
}

impl StepQueue {
    pub fn launch(&mut self, batch: &Batch, previous: &[PreviousToken]) {
        self.launched.push_back((batch.clone(), previous.to_vec()));
    }

    /// The oldest launched batch, ready to compute.
    pub fn take_next(&mut self) -> Result<Batch> {
        let Some((mut batch, previous)) = self.launched.pop_front() else {
            bail!("finish_step without a launched step");
        };
        for p in &previous {
            let token = self.last_tokens.get(p.row).copied().flatten();
            let Some(token) = token else {
                bail!("the previous step sampled no token for its row {}", p.row);
            };
            match batch.seqs.get_mut(p.seq).and_then(|c| c.tokens.first_mut()) {
                Some(t) => *t = token,
                None => bail!("previous token for chunk {} of a smaller batch", p.seq),
            }
        }
        Ok(batch)
    }

    /// Records a computed step's outputs (the next step's previous tokens).
    pub fn done(&mut self, outputs: &[SeqOutput]) {
        self.last_tokens = outputs
            .iter()
            .map(|o| match o {
                SeqOutput::Token(t) => Some(*t),
                _ => None,
            })
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Emit, SeqChunk};

    fn chunk(token: u32) -> SeqChunk {
        SeqChunk {
            tokens: vec![token],
            start_pos: 0,
            block_table: vec![0],
            emit: Emit::Nothing,
        }
    }

    /// Computes the oldest step, echoing each chunk's first token plus one as its sample.
    fn finish(q: &mut StepQueue) -> Result<Vec<SeqOutput>> {
        let b = q.take_next()?;
        let out: Vec<SeqOutput> = b
            .seqs
            .iter()
            .map(|c| SeqOutput::Token(c.tokens[0] + 1))
            .collect();
        q.done(&out);
        Ok(out)
    }

    #[test]
    fn previous_tokens_come_from_the_step_before_in_order() {
        let mut q = StepQueue::default();
        q.launch(
            &Batch {
                seqs: vec![chunk(10), chunk(20)],
            },
            &[],
        );
        // Rows swap places: chunk 0 continues row 1, chunk 1 continues row 0.
        let prev = [
            PreviousToken { seq: 0, row: 1 },
            PreviousToken { seq: 1, row: 0 },
        ];
        q.launch(
            &Batch {
                seqs: vec![chunk(0), chunk(0)],
            },
            &prev,
        );
        assert_eq!(
            finish(&mut q).unwrap(),
            vec![SeqOutput::Token(11), SeqOutput::Token(21)]
        );
        assert_eq!(
            finish(&mut q).unwrap(),
            vec![SeqOutput::Token(22), SeqOutput::Token(12)]
        );
        assert!(finish(&mut q).is_err(), "nothing launched");
    }

    #[test]
    fn a_row_that_sampled_nothing_is_an_error() {
        let mut q = StepQueue::default();
        q.done(&[SeqOutput::Nothing]);
        q.launch(
            &Batch {
                seqs: vec![chunk(1)],
            },
            &[PreviousToken { seq: 0, row: 0 }],
        );
        let err = finish(&mut q).unwrap_err();
        assert!(err.to_string().contains("no token"), "{err}");
    }
}
