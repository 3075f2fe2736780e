//! The host-side plan of one step: every index array the kernels need, packed into one `i32`
//! buffer so a step costs a single host-to-device copy.

use crate::backend::{Batch, Emit};
use anyhow::{bail, Result};

/// Offsets (in `i32` elements) of each array inside the packed buffer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Offsets {
    pub tokens: usize,
    pub positions: usize,
    pub slots: usize,
    pub tile_seq: usize,
    pub tile_q_start: usize,
    pub tile_q_len: usize,
    /// Key range `[kbeg, kend)` of each attention work item and its partial-result slot (-1:
    /// not split, the item writes the output itself).
    pub tile_kbeg: usize,
    pub tile_kend: usize,
    pub tile_part: usize,
    /// Split decode tiles: first partial slot, number of slots, query token.
    pub group_part0: usize,
    pub group_nparts: usize,
    pub group_q0: usize,
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
    /// Attention work items (query tiles, split decode tiles count once per part).
    pub num_tiles: usize,
    /// Split decode tiles, and the partial slots they use.
    pub num_groups: usize,
    pub num_parts: usize,
    pub num_seqs: usize,
    /// Every work item has one query token (a pure decode step: the decode attention kernel runs).
    pub all_decode: bool,
    /// Some work item has one query token.
    pub single_query_items: bool,
    /// Sequence index of each emitting row, in batch order.
    pub emit_seqs: Vec<usize>,
    /// Whether each emitting row wants full logits (else a sampled token).
    pub emit_logits: Vec<bool>,
}

/// A decode step's attention work items are padded to a multiple of this.
pub const DECODE_ITEM_ROUNDING: usize = 8;

/// How one-query (decode) tiles are split over their keys (flash-decoding), so that a few long
/// sequences still give enough blocks to fill the GPU. Parts per tile are rounded down, so the
/// blocks stay within `target_blocks` (one wave when that is what fits on the GPU at once).
#[derive(Debug, Clone, Copy)]
pub struct SplitPolicy {
    /// Blocks (work items × kv heads) to aim for.
    pub target_blocks: usize,
    pub kv_heads: usize,
    /// Partial-result slots available.
    pub max_parts: usize,
    /// Fewest keys per part (a multiple of the kernel's 32-key tile).
    pub min_keys: usize,
}

/// Builds the plan; rejects chunks whose block table does not cover their positions.
pub fn plan_step(
    batch: &Batch,
    block_size: usize,
    num_blocks: usize,
    vocab: usize,
    q_per_tile: usize,
    split: Option<SplitPolicy>,
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
    // Work items: each tile once over all its keys, or a split decode tile once per key range.
    let tiles = tile_seq.len();
    let (mut items_seq, mut items_q0, mut items_qn) = (vec![], vec![], vec![]);
    let (mut kbeg, mut kend, mut part) = (vec![], vec![], vec![]);
    let (mut g_part0, mut g_nparts, mut g_q0) = (vec![], vec![], vec![]);
    let mut parts = 0usize;
    for t in 0..tiles {
        let (q0, qn) = (tile_q_start[t] as usize, tile_q_len[t] as usize);
        let keys = positions[q0 + qn - 1] as usize + 1;
        let mut ns = 1;
        if let (Some(sp), 1) = (split, qn) {
            let want = sp.target_blocks / (tiles * sp.kv_heads.max(1));
            ns = want.min(keys / sp.min_keys.max(32)).max(1);
            if parts + ns > sp.max_parts {
                ns = 1;
            }
        }
        let chunk = keys.div_ceil(ns).div_ceil(32) * 32;
        let ns = keys.div_ceil(chunk);
        if ns > 1 {
            g_part0.push(parts as i32);
            g_nparts.push(ns as i32);
            g_q0.push(q0 as i32);
        }
        for i in 0..ns {
            items_seq.push(tile_seq[t]);
            items_q0.push(q0 as i32);
            items_qn.push(qn as i32);
            kbeg.push((i * chunk) as i32);
            kend.push(((i + 1) * chunk).min(keys) as i32);
            part.push(if ns > 1 { (parts + i) as i32 } else { -1 });
        }
        if ns > 1 {
            parts += ns;
        }
    }
    // A decode step's item count moves with the context (the split above); rounded up with
    // items the kernels skip (sequence -1), it changes rarely, and so does the step's graph key.
    let all_decode = items_qn.iter().all(|&q| q == 1);
    let single_query_items = items_qn.contains(&1);
    if all_decode {
        while items_seq.len() % DECODE_ITEM_ROUNDING != 0 {
            items_seq.push(-1);
            items_q0.push(0);
            items_qn.push(1);
            kbeg.push(0);
            kend.push(0);
            part.push(-1);
        }
    }
    let (tile_seq, tile_q_start, tile_q_len) = (items_seq, items_q0, items_qn);
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
        tile_kbeg: put(&kbeg),
        tile_kend: put(&kend),
        tile_part: put(&part),
        group_part0: put(&g_part0),
        group_nparts: put(&g_nparts),
        group_q0: put(&g_q0),
        block_table_start: put(&bt_start),
        emit_rows: put(&emit_rows),
        sample_params: put(&params),
        // Last: the only array whose length grows with the context (CUDA graphs key on offsets).
        block_tables: put(&tables),
    };
    Ok(StepPlan {
        packed,
        at,
        num_tokens: n,
        num_tiles: tile_seq.len(),
        num_groups: g_part0.len(),
        num_parts: parts,
        num_seqs: batch.seqs.len(),
        all_decode,
        single_query_items,
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
        let p = plan_step(&batch, 4, 8, 10, 2, None).unwrap();
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
    fn a_longer_context_moves_no_offset() {
        // CUDA graphs bake the offsets in: a sequence crossing into a new block must not move them.
        let at = |start: usize| {
            let batch = Batch {
                seqs: vec![
                    chunk(vec![1], start, (0..8).collect(), Emit::Logits),
                    chunk(vec![2], 3, vec![9], Emit::Logits),
                ],
            };
            plan_step(&batch, 4, 16, 10, 2, None).unwrap()
        };
        let (short, long) = (at(2), at(13));
        assert_eq!(short.at, long.at);
        assert!(long.packed.len() > short.packed.len());
        assert_eq!(long.at.block_tables + 4 + 1, long.packed.len());
    }

    #[test]
    fn rejects_short_block_table_and_bad_ids() {
        let short = Batch {
            seqs: vec![chunk(vec![1; 5], 0, vec![0], Emit::Logits)],
        };
        assert!(plan_step(&short, 4, 8, 10, 2, None)
            .unwrap_err()
            .to_string()
            .contains("need 2"));
        let bad_block = Batch {
            seqs: vec![chunk(vec![1], 0, vec![8], Emit::Logits)],
        };
        assert!(plan_step(&bad_block, 4, 8, 10, 2, None).is_err());
        let bad_token = Batch {
            seqs: vec![chunk(vec![10], 0, vec![0], Emit::Logits)],
        };
        assert!(plan_step(&bad_token, 4, 8, 10, 2, None).is_err());
    }

    #[test]
    fn splits_long_decode_tiles_into_key_ranges() {
        let batch = Batch {
            seqs: vec![
                chunk(vec![7], 199, (0..50).collect(), Emit::Logits),
                chunk(vec![1, 2], 0, vec![60], Emit::Logits),
            ],
        };
        let policy = SplitPolicy {
            target_blocks: 64,
            kv_heads: 2,
            max_parts: 100,
            min_keys: 32,
        };
        let p = plan_step(&batch, 4, 100, 10, 4, Some(policy)).unwrap();
        let at = &p.at;
        let get = |o: usize, n: usize| p.packed[o..o + n].to_vec();
        // 200 keys: 16 parts wanted, at most 200/32 = 6, in 32-key multiples: 4 parts of 64.
        assert_eq!(p.num_tiles, 5);
        assert_eq!(get(at.tile_kbeg, 5), vec![0, 64, 128, 192, 0]);
        assert_eq!(get(at.tile_kend, 5), vec![64, 128, 192, 200, 2]);
        assert_eq!(get(at.tile_part, 5), vec![0, 1, 2, 3, -1]);
        assert_eq!((p.num_groups, p.num_parts), (1, 4));
        assert_eq!(get(at.group_part0, 1), vec![0]);
        assert_eq!(get(at.group_nparts, 1), vec![4]);
        assert_eq!(get(at.group_q0, 1), vec![0]);
        // No room for parts: no split.
        let tight = SplitPolicy {
            max_parts: 2,
            ..policy
        };
        assert_eq!(
            plan_step(&batch, 4, 100, 10, 4, Some(tight))
                .unwrap()
                .num_parts,
            0
        );
    }

    #[test]
    fn decode_splits_stay_within_one_wave() {
        // 32 decode sequences at 3000 keys, 8 kv heads, 528 blocks fit at once: 2 parts each
        // (512 blocks), not 3 (768, a second wave).
        let seqs = (0..32)
            .map(|s| {
                chunk(
                    vec![1],
                    2999,
                    (s * 24..s * 24 + 24).collect(),
                    Emit::Nothing,
                )
            })
            .collect();
        let policy = SplitPolicy {
            target_blocks: 528,
            kv_heads: 8,
            max_parts: 2048,
            min_keys: 128,
        };
        let p = plan_step(&Batch { seqs }, 128, 32 * 24, 10, 8, Some(policy)).unwrap();
        assert!(p.all_decode);
        assert_eq!((p.num_tiles, p.num_groups, p.num_parts), (64, 32, 64));
        assert!(p.num_tiles * 8 <= 528);
        let get = |o: usize| p.packed[o..o + 2].to_vec();
        assert_eq!(get(p.at.tile_kbeg), vec![0, 1504]);
        assert_eq!(get(p.at.tile_kend), vec![1504, 3000]);
        // One sequence: as many parts as min_keys allows (3000 / 128 = 23), under 528 / 8 = 66.
        let one = Batch {
            seqs: vec![chunk(vec![1], 2999, (0..24).collect(), Emit::Nothing)],
        };
        let p = plan_step(&one, 128, 24, 10, 8, Some(policy)).unwrap();
        assert!(p.all_decode);
        assert!(p.num_parts > 16 && p.num_parts <= 23, "{}", p.num_parts);
        // More sequences than fit: no split at all.
        let many = Batch {
            seqs: (0..80)
                .map(|s| {
                    chunk(
                        vec![1],
                        299,
                        vec![s * 3, s * 3 + 1, s * 3 + 2],
                        Emit::Nothing,
                    )
                })
                .collect(),
        };
        let p = plan_step(&many, 128, 240, 10, 8, Some(policy)).unwrap();
        assert_eq!((p.num_tiles, p.num_parts), (80, 0));
        // A prefill chunk in the batch: not a decode-only step.
        let mixed = Batch {
            seqs: vec![
                chunk(vec![1], 10, vec![0], Emit::Nothing),
                chunk(vec![1, 2], 0, vec![1], Emit::Nothing),
            ],
        };
        assert!(
            !plan_step(&mixed, 128, 2, 10, 8, Some(policy))
                .unwrap()
                .all_decode
        );
    }

    #[test]
    fn decode_items_are_padded_so_the_key_holds_as_the_context_grows() {
        let policy = SplitPolicy {
            target_blocks: 528,
            kv_heads: 8,
            max_parts: 2048,
            min_keys: 128,
        };
        let mut seen = std::collections::HashSet::new();
        // A served request's decode: context 3,000 to 3,150 (ISL 3000 / OSL 150).
        for pos in 2999..3150 {
            let one = Batch {
                seqs: vec![chunk(vec![1], pos, (0..25).collect(), Emit::Logits)],
            };
            let p = plan_step(&one, 128, 25, 10, 8, Some(policy)).unwrap();
            assert_eq!(p.num_tiles % DECODE_ITEM_ROUNDING, 0);
            let real = (0..p.num_tiles)
                .filter(|&t| p.packed[p.at.tile_seq + t] >= 0)
                .count();
            assert_eq!(real, p.num_parts, "every real item is a part of the split");
            for t in real..p.num_tiles {
                assert_eq!(p.packed[p.at.tile_seq + t], -1, "padding comes last");
                assert_eq!(p.packed[p.at.tile_part + t], -1);
            }
            seen.insert((p.num_tiles, p.num_groups, p.at.clone()));
        }
        // Unpadded, the item count takes the values 19, 20 and 24 over this range.
        assert_eq!(seen.len(), 1, "{seen:?}");
    }
}
