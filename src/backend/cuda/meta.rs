//! The host-side plan of one step: every index array the kernels need, packed into one `i32`
//! buffer so a step costs a single host-to-device copy.

use crate::backend::{Batch, Emit};
use anyhow::{bail, Result};

/// Offsets (in `i32` elements) of each array inside the packed buffer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Offsets {
    pub tokens: usize,
    pub positions: usize,
    pub slots: usize,
    pub tile_seq: usize,
    pub tile_q_start: usize,
    pub tile_q_len: usize,
    pub block_table_start: usize,
    pub block_tables: usize,
    /// Flat token index of the last token of each emitting sequence.
    pub emit_rows: usize,
    /// `[num_emit, 4]` f32 bit patterns: temperature, top_k, top_p, uniform.
    pub sample_params: usize,
}

#[derive(Debug, Clone, Default)]
pub struct StepPlan {
    pub packed: Vec<i32>,
    pub at: Offsets,
    pub num_tokens: usize,
    pub num_tiles: usize,
    pub num_seqs: usize,
    /// Sequence index of each emitting row, in batch order.
    pub emit_seqs: Vec<usize>,
    /// Whether each emitting row wants full logits (else a sampled token).
    pub emit_logits: Vec<bool>,
}

/// Builds the plan; rejects chunks whose block table does not cover their positions.
pub fn plan_step(
    batch: &Batch,
    block_size: usize,
    num_blocks: usize,
    vocab: usize,
    q_per_tile: usize,
) -> Result<StepPlan> {
    let n: usize = batch.num_tokens();
    let mut tokens = Vec::with_capacity(n);
    let mut positions = Vec::with_capacity(n);
    let mut slots = Vec::with_capacity(n);
    let (mut tile_seq, mut tile_q_start, mut tile_q_len) = (vec![], vec![], vec![]);
    let mut bt_start = Vec::with_capacity(batch.seqs.len());
    let mut tables = vec![];
    let (mut emit_rows, mut params, mut emit_seqs, mut emit_logits) =
        (vec![], vec![], vec![], vec![]);
    for (s, chunk) in batch.seqs.iter().enumerate() {
        if chunk.tokens.is_empty() {
            bail!("sequence {s} of the batch has no tokens");
        }
        let end = chunk.start_pos + chunk.tokens.len();
        let needed = end.div_ceil(block_size);
        if chunk.block_table.len() < needed {
            bail!(
                "sequence {s}: block table has {} blocks, positions 0..{end} need {needed}",
                chunk.block_table.len()
            );
        }
        if let Some(b) = chunk.block_table[..needed]
            .iter()
            .find(|&&b| b as usize >= num_blocks)
        {
            bail!("sequence {s}: block id {b} out of range (the pool has {num_blocks} blocks)");
        }
        let first = tokens.len();
        for (i, &t) in chunk.tokens.iter().enumerate() {
            if t as usize >= vocab {
                bail!("sequence {s}: token id {t} is outside the vocabulary ({vocab})");
            }
            let p = chunk.start_pos + i;
            tokens.push(t as i32);
            positions.push(p as i32);
            slots.push(
                (chunk.block_table[p / block_size] as usize * block_size + p % block_size) as i32,
            );
        }
        let mut q = 0;
        while q < chunk.tokens.len() {
            let len = q_per_tile.min(chunk.tokens.len() - q);
            tile_seq.push(s as i32);
            tile_q_start.push((first + q) as i32);
            tile_q_len.push(len as i32);
            q += len;
        }
        bt_start.push(tables.len() as i32);
        tables.extend(chunk.block_table[..needed].iter().map(|&b| b as i32));
        let sampling = match &chunk.emit {
            Emit::Nothing => None,
            Emit::Logits => Some([0.0f32, 0.0, 1.0, 0.0]),
            Emit::Sample(d) => Some([d.temperature, d.top_k as f32, d.top_p, d.uniform]),
        };
        if let Some(p) = sampling {
            emit_rows.push((first + chunk.tokens.len() - 1) as i32);
            params.extend(p.iter().map(|x| x.to_bits() as i32));
            emit_seqs.push(s);
            emit_logits.push(chunk.emit == Emit::Logits);
        }
    }
    let mut packed = Vec::with_capacity(
        3 * n + 3 * tile_seq.len() + bt_start.len() + tables.len() + 5 * emit_rows.len(),
    );
    let mut put = |v: &[i32]| {
        let at = packed.len();
        packed.extend_from_slice(v);
        at
    };
    let at = Offsets {
        tokens: put(&tokens),
        positions: put(&positions),
        slots: put(&slots),
        tile_seq: put(&tile_seq),
        tile_q_start: put(&tile_q_start),
        tile_q_len: put(&tile_q_len),
        block_table_start: put(&bt_start),
        block_tables: put(&tables),
        emit_rows: put(&emit_rows),
        sample_params: put(&params),
    };
    Ok(StepPlan {
        packed,
        at,
        num_tokens: n,
        num_tiles: tile_seq.len(),
        num_seqs: batch.seqs.len(),
        emit_seqs,
        emit_logits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{DeviceSampling, SeqChunk};

    fn chunk(tokens: Vec<u32>, start_pos: usize, block_table: Vec<u32>, emit: Emit) -> SeqChunk {
        SeqChunk {
            tokens,
            start_pos,
            block_table,
            emit,
        }
    }

    #[test]
    fn packs_slots_tiles_and_emits() {
        let batch = Batch {
            seqs: vec![
                chunk(vec![1, 2, 3, 4, 5], 2, vec![7, 3], Emit::Nothing),
                chunk(
                    vec![9],
                    4,
                    vec![5, 6],
                    Emit::Sample(DeviceSampling {
                        temperature: 0.5,
                        top_k: 3,
                        top_p: 0.9,
                        uniform: 0.25,
                    }),
                ),
            ],
        };
        let p = plan_step(&batch, 4, 8, 10, 2).unwrap();
        assert_eq!(p.num_tokens, 6);
        let at = &p.at;
        let get = |o: usize, n: usize| p.packed[o..o + n].to_vec();
        assert_eq!(get(at.positions, 6), vec![2, 3, 4, 5, 6, 4]);
        // positions 2,3 -> block 7; 4,5,6 -> block 3; seq 1 pos 4 -> block 6 slot 0
        assert_eq!(get(at.slots, 6), vec![30, 31, 12, 13, 14, 24]);
        assert_eq!(p.num_tiles, 4);
        assert_eq!(get(at.tile_q_start, 4), vec![0, 2, 4, 5]);
        assert_eq!(get(at.tile_q_len, 4), vec![2, 2, 1, 1]);
        assert_eq!(get(at.tile_seq, 4), vec![0, 0, 0, 1]);
        assert_eq!(get(at.block_table_start, 2), vec![0, 2]);
        assert_eq!(get(at.emit_rows, 1), vec![5]);
        assert_eq!(p.emit_seqs, vec![1]);
        assert_eq!(f32::from_bits(p.packed[at.sample_params + 1] as u32), 3.0);
    }

    #[test]
    fn rejects_short_block_table_and_bad_ids() {
        let short = Batch {
            seqs: vec![chunk(vec![1; 5], 0, vec![0], Emit::Logits)],
        };
        assert!(plan_step(&short, 4, 8, 10, 2)
            .unwrap_err()
            .to_string()
            .contains("need 2"));
        let bad_block = Batch {
            seqs: vec![chunk(vec![1], 0, vec![8], Emit::Logits)],
        };
        assert!(plan_step(&bad_block, 4, 8, 10, 2).is_err());
        let bad_token = Batch {
            seqs: vec![chunk(vec![10], 0, vec![0], Emit::Logits)],
        };
        assert!(plan_step(&bad_token, 4, 8, 10, 2).is_err());
    }
}
