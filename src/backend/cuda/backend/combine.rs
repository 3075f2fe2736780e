//! A layer's o_proj after the attention: first the merge of split decode rows (flash-decoding),
//! fused with o_proj's FP8 input quantization when every row was split and o_proj takes FP8
//! input scaled per rank (one launch instead of attention_combine + quantize_fp8, same bits).

use super::super::ops::combine_fp8_heads_per_block;
use super::linear::{Lin, LinOut};
use super::CudaBackend;
use anyhow::Result;

impl CudaBackend {
    /// o_proj of layer `layer` on the `n` attention rows (`ws.attn`) into `out`; `groups` split
    /// decode rows (device arrays of first part, parts, row: `groups_at`) are merged first.
    /// `fold`: see [`CudaBackend::linear_quantized_into`].
    pub(super) fn combine_o_proj(
        &mut self,
        layer: usize,
        groups_at: [u64; 3],
        groups: usize,
        n: usize,
        out: u64,
        fold: bool,
    ) -> Result<LinOut> {
        let lin = Lin::O(layer);
        let attn = self.ws.attn.ptr;
        if groups == 0 {
            return self.linear_into(lin, attn, n, out, fold);
        }
        let c = &self.config;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (ml, acc) = (self.ws.part_ml.ptr, self.ws.part_acc.ptr);
        // Each group is one row: as many groups as rows means no row is left unquantized.
        let fused = combine_fp8_heads_per_block(nh, hd).filter(|_| {
            self.fused_combine && groups == n && self.fp8_fusable(lin, nh * hd, usize::MAX)
        });
        if let Some(heads_per_block) = fused {
            let ws = &self.ws;
            self.ops().attention_combine_fp8(
                attn,
                ws.xq.ptr,
                ws.xs.ptr,
                ws.combine_counters.ptr,
                ws.combine_amax.ptr,
                ml,
                acc,
                groups_at,
                groups,
                nh,
                hd,
                heads_per_block,
            )?;
            self.mark("attention combine fp8")?;
            return self.linear_quantized_into(lin, n, out, fold);
        }
        let [part0, nparts, q0] = groups_at;
        self.ops()
            .attention_combine(attn, ml, acc, part0, nparts, q0, groups, nh, nkv, hd)?;
        self.mark("attention combine")?;
        self.linear_into(lin, attn, n, out, fold)
    }
}
