//! Attention launches: the tensor-core kernels (`flash_attention.cu`: prefill tiles and the
//! decode-only kernel; `flash_prefill_wgmma.cu`: prefill tiles of head_dim 128 on wgmma) where
//! they take the shape, the CUDA-core kernel (`attention.cu`) otherwise, and the merge of split
//! decode parts.

use super::{Fp8KvScales, Ops, Precision};
use crate::backend::cuda::kernels::{Arg, WGMMA_SHARED_BYTES, WS_SHARED_BYTES};
use crate::backend::cuda::tensor_map::{swizzled_2d, Element};
use anyhow::{ensure, Context, Result};
use cudarc::driver::sys;

/// Query tokens × heads per attention block (the kernel's R limit).
pub const ATTENTION_ROWS: usize = 32;
const ATTENTION_KEYS_PER_TILE: usize = 32;
pub const MAX_HEAD_DIM: usize = 128;
/// Query tokens × heads per multi-query block of the tensor-core attention (4 warps × 32 rows).
pub const FLASH_ROWS: usize = 128;
/// Most query heads per kv head of the tensor-core attention (a one-query item: 4 warps × 16 rows).
pub const FLASH_MAX_GROUP: usize = 64;
const FLASH_KEYS_PER_TILE: usize = 64;

/// Whether the tensor-core attention takes this shape.
pub fn flash_supported(group: usize, head_dim: usize, act: Precision) -> bool {
    act == Precision::Bf16
        && head_dim.is_multiple_of(16)
        && (16..=MAX_HEAD_DIM).contains(&head_dim)
        && (1..=FLASH_MAX_GROUP).contains(&group)
}

/// How prefill (multi-query) blocks multiply P by V. Measured on an H200 (one 3000-token 70B
/// prefill, attention of all 80 layers), mma.sync kernel: hi + lo 76.6 ms, F16 67.3 ms, BF16
/// 62.6 ms; the wgmma kernel (head_dim 128, the default there): hi + lo 49.1 ms, BF16 40.7 ms
/// (tiles loaded by TMA; by cp.async hi + lo took 63.4 ms); with a producer warpgroup (the
/// default for TMA-loaded items) hi + lo 42.3 ms (benchmarks/results/cuda-h200-round12.json).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillP {
    /// P as BF16 hi + lo (the default): F32-like accuracy, two P·V MMAs. Decode (which keeps
    /// hi + lo) then gives the logits of a fresh prefill of the same text bit for bit on the
    /// mma.sync kernel, and to rounding on the wgmma one (its MMAs sum in their own order).
    HiLo,
    /// P and V as F16 (`TANDEM_FLASH_PREFILL=f16`): one MMA; P keeps 11 significant bits (BF16 8),
    /// V is exact within F16's range (saturating at 65504). The fixtures give the same tokens as
    /// hi + lo, but decode and a fresh prefill then differ (tiny models' logits: 5e-3 relative in
    /// BF16, 3.1e-2 in FP8, over tests/cuda_backend.rs's 3e-2), so it is not the default.
    F16,
    /// P rounded to BF16 (`TANDEM_FLASH_PREFILL=bf16`), as FlashAttention does: attention 63
    /// instead of 78 ms in a 3000-token 70B prefill on an H200, but it flips the first greedy
    /// token of the tiny FP8 fixture in BF16 precision (tests/cuda_fixtures.rs).
    Bf16,
}

/// The prefill P·V product `TANDEM_FLASH_PREFILL` asks for (hilo, f16 or bf16; hilo if unset).
pub fn flash_prefill_p() -> PrefillP {
    static MODE: std::sync::OnceLock<PrefillP> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("TANDEM_FLASH_PREFILL").as_deref() {
        Ok("bf16") => PrefillP::Bf16,
        Ok("f16") => PrefillP::F16,
        _ => PrefillP::HiLo,
    })
}

/// The head_dim of the wgmma prefill kernel (Llama 3's).
pub const WGMMA_HEAD_DIM: usize = 128;

/// Whether multi-query items run on the wgmma kernel (`flash_prefill_wgmma.cu`): head_dim 128,
/// BF16 KV pools with P as BF16 or hi + lo, or FP8 pools, and `TANDEM_FLASH_WGMMA` not `0`
/// (which keeps the mma.sync kernel, for comparisons). Timings: see [`PrefillP`].
pub fn flash_prefill_wgmma_supported(head_dim: usize, p: PrefillP, kv_fp8: bool) -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let enabled =
        *ENABLED.get_or_init(|| std::env::var("TANDEM_FLASH_WGMMA").map_or(true, |v| v != "0"));
    // FP8 pools have the hi + lo kernel only (as on mma.sync), whatever `p` says.
    enabled && head_dim == WGMMA_HEAD_DIM && (kv_fp8 || p != PrefillP::F16)
}

/// The wgmma prefill's version with a producer warpgroup (`flash_prefill_ws.cu`), for items
/// whose tiles all load by TMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillWs {
    /// The consumer warpgroups take turns issuing their MMAs (the default).
    PingPong,
    /// Each issues when ready (`TANDEM_FLASH_WS=nopp`).
    Free,
}

impl PrefillWs {
    fn kernel_infix(self) -> &'static str {
        match self {
            PrefillWs::PingPong => "",
            PrefillWs::Free => "nopp_",
        }
    }
}

/// The producer-warpgroup version `TANDEM_FLASH_WS` asks for: ping-pong unless `nopp`; `0`
/// keeps the version where every thread loads (for comparisons).
pub fn flash_prefill_ws() -> Option<PrefillWs> {
    static MODE: std::sync::OnceLock<Option<PrefillWs>> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("TANDEM_FLASH_WS").as_deref() {
        Ok("0") => None,
        Ok("nopp") => Some(PrefillWs::Free),
        _ => Some(PrefillWs::PingPong),
    })
}

/// Bytes of [`kv_tensor_maps`]: a K and a V tensor map.
pub const KV_TENSOR_MAPS_BYTES: usize = 2 * std::mem::size_of::<sys::CUtensorMap>();

/// The TMA tensor maps (K, then V) the wgmma kernel loads the tiles of a pool of head_dim 128
/// with: each pool as `rows` rows of 128 dims (blocks x kv heads x block size), boxes of 64 rows x
/// 64 dims of BF16, or 64 rows x 128 codes of e4m3 (`fp8`), written with the 128-byte swizzle.
/// They go to device memory, 64-byte aligned, and [`AttentionArgs::tensor_maps`] points there.
pub fn kv_tensor_maps(k_cache: u64, v_cache: u64, rows: usize, fp8: bool) -> Result<Vec<u8>> {
    let (element, box_cols) = if fp8 {
        (Element::U8, WGMMA_HEAD_DIM)
    } else {
        (Element::Bf16, 64)
    };
    let mut out = Vec::with_capacity(KV_TENSOR_MAPS_BYTES);
    for pool in [k_cache, v_cache] {
        let map = swizzled_2d(pool, element, rows, WGMMA_HEAD_DIM, 64, box_cols)
            .context("the KV pool's tensor map")?;
        out.extend(map.iter().flat_map(|w| w.to_le_bytes()));
    }
    Ok(out)
}

/// Most query heads per kv head of the decode kernel (the top half of a 16-row MMA tile; the
/// bottom half stays zero, which keeps the kernel under 128 registers).
pub const FLASH_DECODE_GROUP: usize = 8;

/// Whether the tensor-core decode kernel takes this shape (and `TANDEM_FLASH_DECODE` is not `0`,
/// which falls back to the general kernel, for comparisons).
pub fn flash_decode_supported(group: usize, head_dim: usize, act: Precision) -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let enabled =
        *ENABLED.get_or_init(|| std::env::var("TANDEM_FLASH_DECODE").map_or(true, |v| v != "0"));
    enabled && group <= FLASH_DECODE_GROUP && flash_supported(group, head_dim, act)
}

/// Threads the fused combine aims for per block. Measured on the H200 (70B, 64 heads of 128,
/// launches back to back): 1 row of 23 parts 29.2 / 19.0 / 13.7 / 11.1 / 10.5 us at 1 / 2 / 4 / 8
/// / 16 heads per block (the pair: 10.4 us), 32 rows of 2 parts 29.7 / 17.3 / 10.9 / 7.9 / 6.7 us
/// (the pair: 9.1 us): few wide blocks win, the last block's quantize of the row being serial.
const COMBINE_FP8_THREADS: usize = 512;

/// Heads per block of [`Ops::attention_combine_fp8`] (None: the shape needs the unfused pair):
/// the most heads, dividing `q_heads`, whose dims (4 per thread) fit in the aimed-for threads.
pub fn combine_fp8_heads_per_block(q_heads: usize, head_dim: usize) -> Option<usize> {
    if q_heads == 0 || !head_dim.is_multiple_of(4) || !(4..=4096).contains(&head_dim) {
        return None;
    }
    let most = (4 * COMBINE_FP8_THREADS / head_dim).max(1);
    (1..=most.min(q_heads))
        .rev()
        .find(|h| q_heads.is_multiple_of(*h))
}

/// Bytes of the `scratch` of [`Ops::attention_combine_fp8`] (the blocks' partial maxima) for up
/// to `rows` rows.
pub fn combine_fp8_scratch_bytes(rows: usize, q_heads: usize) -> usize {
    4 * rows * q_heads
}

impl Ops<'_> {
    /// Query tokens per attention tile for a model with `group` query heads per kv head: as many
    /// as the kernel that [`Self::paged_attention`] picks takes rows.
    pub fn attention_tokens_per_tile(group: usize, head_dim: usize, act: Precision) -> usize {
        let rows = if flash_supported(group, head_dim, act) {
            FLASH_ROWS
        } else {
            ATTENTION_ROWS
        };
        (rows / group).max(1)
    }

    /// Causal paged attention; `meta` holds device pointers to the tile and block-table arrays.
    /// BF16 with a head_dim of 16..=128 (multiple of 16) runs on tensor cores
    /// (`flash_attention.cu`: the decode kernel for decode-only steps with at most
    /// [`FLASH_DECODE_GROUP`] query heads per kv head, else the general one); everything else on
    /// CUDA cores (`attention.cu`).
    pub fn paged_attention(&self, a: &AttentionArgs) -> Result<()> {
        let group = a.q_heads / a.kv_heads;
        if a.decode_only && flash_decode_supported(group, a.head_dim, self.act) {
            self.flash_decode(a)
        } else if flash_supported(group, a.head_dim, self.act) && a.q_per_tile * group <= FLASH_ROWS
        {
            self.flash_attention(a)
        } else {
            self.paged_attention_cuda_cores(a)
        }
    }

    /// The tensor-core kernel: one block per (work item, kv head); P of prefill blocks as
    /// [`flash_prefill_p`] says, multi-query items on wgmma where [`flash_prefill_wgmma_supported`].
    pub fn flash_attention(&self, a: &AttentionArgs) -> Result<()> {
        self.flash_attention_p(a, flash_prefill_p())
    }

    /// The tensor-core kernels with the given P·V product for multi-query blocks (one-query items
    /// always keep P as BF16 hi + lo): wgmma for the multi-query items where it takes the shape
    /// (then the mma.sync kernel for the one-query items of a mixed batch), else mma.sync for all.
    pub fn flash_attention_p(&self, a: &AttentionArgs, p: PrefillP) -> Result<()> {
        self.flash_attention_ws(a, p, flash_prefill_ws())
    }

    /// [`Self::flash_attention_p`] with the given producer-warpgroup version of the wgmma kernel
    /// (None: the one where every thread loads).
    pub fn flash_attention_ws(
        &self,
        a: &AttentionArgs,
        p: PrefillP,
        ws: Option<PrefillWs>,
    ) -> Result<()> {
        if flash_prefill_wgmma_supported(a.head_dim, p, a.kv_fp8.is_some()) {
            self.flash_prefill_wgmma(a, p, ws)?;
            if !a.single_query_items {
                return Ok(());
            }
            let single = match a.kv_fp8 {
                Some(_) => "flash_attention_single_kv8",
                None => "flash_attention_single",
            };
            return self.launch_mma_sync(a, single);
        }
        self.flash_attention_mma_sync(a, p)
    }

    /// The mma.sync kernels (4 warps per block) for all work items (FP8 pools have the hi + lo
    /// kernels only, whatever `p` says).
    pub fn flash_attention_mma_sync(&self, a: &AttentionArgs, p: PrefillP) -> Result<()> {
        let name = match (p, a.kv_fp8) {
            (_, Some(_)) => "flash_attention_hilo_kv8",
            (PrefillP::HiLo, None) => "flash_attention_hilo",
            (PrefillP::F16, None) => "flash_attention_f16p",
            (PrefillP::Bf16, None) => "flash_attention",
        };
        self.launch_mma_sync(a, name)
    }

    /// The mma.sync kernel family `name` (`_hd<head_dim>` appended).
    fn launch_mma_sync(&self, a: &AttentionArgs, name: &str) -> Result<()> {
        self.check_flash(a)?;
        let (hd, keys) = (a.head_dim, FLASH_KEYS_PER_TILE);
        // Q of a multi-query block, then double-buffered K and V tiles (rows padded by 8); a
        // one-query item's final merge of 4 warps reuses them. FP8 pools: single BF16 tiles, then
        // double-buffered e4m3 tiles.
        let q = FLASH_ROWS * (hd + 8) * 2;
        let stages = match a.kv_fp8 {
            Some(_) => 2 * keys * (hd + 8) * 2 + 2 * 2 * keys * hd,
            None => 2 * 2 * keys * (hd + 8) * 2,
        };
        let merge = (4 * 16 * (hd + 4) + 4 * 16 * 2) * 4;
        self.go(
            &format!("{name}_hd{hd}"),
            (a.num_tiles as u32, a.kv_heads as u32, 1),
            128,
            (q + stages).max(merge) as u32,
            &flash_args(a),
        )
    }

    /// The wgmma kernel (`flash_prefill_wgmma.cu`) for the multi-query items; it skips one-query
    /// items, which [`Self::flash_attention_p`] then gives the mma.sync kernel. Where every tile
    /// loads by TMA (tensor maps, block size a multiple of 64) the version with a producer
    /// warpgroup runs, unless `ws` is None.
    pub fn flash_prefill_wgmma(
        &self,
        a: &AttentionArgs,
        p: PrefillP,
        ws: Option<PrefillWs>,
    ) -> Result<()> {
        self.check_flash(a)?;
        ensure!(
            a.head_dim == WGMMA_HEAD_DIM && (a.kv_fp8.is_some() || p != PrefillP::F16),
            "the wgmma prefill kernel takes head_dim {WGMMA_HEAD_DIM} and P as BF16 or BF16 hi + lo \
             (got head_dim {}, {p:?})",
            a.head_dim
        );
        let ws = ws.filter(|_| a.tensor_maps != 0 && a.block_size.is_multiple_of(64));
        let kind = match (p, a.kv_fp8) {
            (_, Some(_)) => "kv8_",
            (PrefillP::Bf16, None) => "bf16p_",
            _ => "",
        };
        let (name, threads, shared) = match ws {
            Some(ws) => (
                format!("flash_prefill_ws_{}{kind}hd128", ws.kernel_infix()),
                384,
                WS_SHARED_BYTES,
            ),
            None => (
                format!("flash_prefill_wgmma_{kind}hd128"),
                256,
                WGMMA_SHARED_BYTES,
            ),
        };
        // A block of two (consuming) warpgroups per (work item, kv head).
        self.go(
            &name,
            (a.num_tiles as u32, a.kv_heads as u32, 1),
            threads,
            shared as u32,
            &[flash_args(a), vec![Arg::Ptr(a.tensor_maps)]].concat(),
        )
    }

    fn check_flash(&self, a: &AttentionArgs) -> Result<()> {
        let group = a.q_heads / a.kv_heads;
        ensure!(
            flash_supported(group, a.head_dim, self.act),
            "flash attention takes BF16, head_dim 16..=128 in steps of 16 and at most \
             {FLASH_MAX_GROUP} query heads per kv head (got {:?}, head_dim {}, group {group})",
            self.act,
            a.head_dim
        );
        let r = a.q_per_tile * group;
        ensure!(
            r <= FLASH_ROWS,
            "flash attention tile of {r} rows (at most {FLASH_ROWS})"
        );
        Ok(())
    }

    /// The tensor-core decode kernel: every work item must have one query token (`decode_only`);
    /// one block of 4 warps per (work item, kv head), each warp streaming its quarter of the keys.
    pub fn flash_decode(&self, a: &AttentionArgs) -> Result<()> {
        let group = a.q_heads / a.kv_heads;
        ensure!(
            a.decode_only && flash_decode_supported(group, a.head_dim, self.act),
            "flash decode takes one-query work items, BF16, head_dim 16..=128 in steps of 16 and at \
             most {FLASH_DECODE_GROUP} query heads per kv head (got {:?}, head_dim {}, group {group})",
            self.act,
            a.head_dim
        );
        let hd = a.head_dim;
        // Per warp a ring of 3 slots of 16 key rows (padded by 8), then Q's 8 rows; the final
        // merge of the 4 warps reuses the rings. FP8 pools: rings of e4m3 rows (padded by 16
        // bytes), Q as F16.
        let merge = (4 * 8 * (hd + 4) + 4 * 8 * 2) * 4;
        let q = 8 * (hd + 8) * 2;
        let (name, shared) = match a.kv_fp8 {
            Some(_) => ("flash_decode_kv8", (4 * 3 * 16 * (hd + 16)).max(merge) + q),
            None => ("flash_decode", (4 * 3 * 16 * (hd + 8) * 2).max(merge) + q),
        };
        self.go(
            &format!("{name}_hd{hd}"),
            (a.num_tiles as u32, a.kv_heads as u32, 1),
            128,
            shared as u32,
            &flash_args(a),
        )
    }

    /// The CUDA-core kernel (F32 reference precision, and shapes the tensor-core one does not take).
    pub fn paged_attention_cuda_cores(&self, a: &AttentionArgs) -> Result<()> {
        ensure!(
            a.kv_fp8.is_none(),
            "an FP8 KV pool needs the tensor-core attention (BF16, head_dim 16..=128 in steps of 16)"
        );
        let group = a.q_heads / a.kv_heads;
        ensure!(
            group <= ATTENTION_ROWS,
            "{group} query heads per kv head (at most {ATTENTION_ROWS})"
        );
        // 16-byte loads of the cache: head_dim * element size must be a multiple of 16 bytes.
        ensure!(
            a.head_dim <= MAX_HEAD_DIM && (a.head_dim * self.act.bytes()).is_multiple_of(16),
            "head_dim {} is not supported (a multiple of {} up to {MAX_HEAD_DIM})",
            a.head_dim,
            16 / self.act.bytes()
        );
        let r = a.q_per_tile * group;
        ensure!(r <= ATTENTION_ROWS, "attention tile of {r} rows");
        let shared = 4
            * (r * a.head_dim
                + ATTENTION_KEYS_PER_TILE * (a.head_dim + 4)
                + ATTENTION_KEYS_PER_TILE * a.head_dim);
        self.go(
            &self.typed("paged_attention"),
            (a.num_tiles as u32, a.kv_heads as u32, 1),
            256,
            shared as u32,
            &[
                common_args(a).as_slice(),
                &[
                    Arg::I32(a.head_dim as i32),
                    Arg::I32(a.block_size as i32),
                    Arg::F32(a.scale),
                    Arg::I32(a.q_per_tile as i32),
                ],
            ]
            .concat(),
        )
    }

    /// Merges split decode tiles' partials into the output: `groups` of (first part, parts, query).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_combine(
        &self,
        out: u64,
        part_ml: u64,
        part_acc: u64,
        group_part0: u64,
        group_nparts: u64,
        group_q0: u64,
        groups: usize,
        q_heads: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        ensure!(
            kv_heads > 0 && q_heads.is_multiple_of(kv_heads),
            "{q_heads} query heads over {kv_heads} kv heads"
        );
        self.go(
            &self.typed("attention_combine"),
            (groups as u32, q_heads as u32, 1),
            head_dim.next_multiple_of(32) as u32,
            0,
            &[
                Arg::Ptr(out),
                Arg::Ptr(part_ml),
                Arg::Ptr(part_acc),
                Arg::Ptr(group_part0),
                Arg::Ptr(group_nparts),
                Arg::Ptr(group_q0),
                Arg::I32(q_heads as i32),
                Arg::I32(head_dim as i32),
            ],
        )
    }

    /// [`Self::attention_combine`] then `quantize_fp8` of the merged rows into `xq` / `xs`, in one
    /// launch and with the same bits (`out` gets the merged rows too). Every row of the step must
    /// be a group. `counters`: a u32 per group, zeroed once before the first launch (each launch
    /// leaves them zero, so keep them in one place); `scratch`: [`combine_fp8_scratch_bytes`].
    /// Blocks of `heads_per_block` heads ([`combine_fp8_heads_per_block`]).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_combine_fp8(
        &self,
        out: u64,
        xq: u64,
        xs: u64,
        counters: u64,
        scratch: u64,
        part_ml: u64,
        part_acc: u64,
        groups_at: [u64; 3],
        groups: usize,
        q_heads: usize,
        head_dim: usize,
        heads_per_block: usize,
    ) -> Result<()> {
        ensure!(
            combine_fp8_heads_per_block(q_heads, head_dim).is_some()
                && heads_per_block > 0
                && q_heads.is_multiple_of(heads_per_block)
                && heads_per_block * head_dim / 4 <= 1024,
            "fused combine of {q_heads} heads of {head_dim} in blocks of {heads_per_block} heads"
        );
        ensure!(groups <= 65535, "{groups} rows for the fused combine");
        let [part0, nparts, q0] = groups_at;
        let blocks = q_heads / heads_per_block;
        self.go(
            &self.typed("attention_combine_fp8"),
            (blocks as u32, groups as u32, 1),
            (heads_per_block * head_dim / 4).next_multiple_of(32) as u32,
            0,
            &[
                Arg::Ptr(out),
                Arg::Ptr(xq),
                Arg::Ptr(xs),
                Arg::Ptr(counters),
                Arg::Ptr(scratch),
                Arg::Ptr(part_ml),
                Arg::Ptr(part_acc),
                Arg::Ptr(part0),
                Arg::Ptr(nparts),
                Arg::Ptr(q0),
                Arg::I32(q_heads as i32),
                Arg::I32(head_dim as i32),
                Arg::I32(heads_per_block as i32),
            ],
        )
    }
}

/// The arguments every attention kernel starts with.
fn common_args(a: &AttentionArgs) -> [Arg; 18] {
    [
        Arg::Ptr(a.out),
        Arg::Ptr(a.qkv),
        Arg::Ptr(a.k_cache),
        Arg::Ptr(a.v_cache),
        Arg::Ptr(a.positions),
        Arg::Ptr(a.tile_seq),
        Arg::Ptr(a.tile_q_start),
        Arg::Ptr(a.tile_q_len),
        Arg::Ptr(a.block_tables),
        Arg::Ptr(a.block_table_start),
        Arg::Ptr(a.tile_kbeg),
        Arg::Ptr(a.tile_kend),
        Arg::Ptr(a.tile_part),
        Arg::Ptr(a.part_ml),
        Arg::Ptr(a.part_acc),
        Arg::I32(a.row_stride as i32),
        Arg::I32(a.q_heads as i32),
        Arg::I32(a.kv_heads as i32),
    ]
}

/// The argument list shared by `flash_attention_hd*` and `flash_decode_hd*`.
fn flash_args(a: &AttentionArgs) -> Vec<Arg> {
    let s = a.kv_fp8.unwrap_or(Fp8KvScales { k: 1.0, v: 1.0 });
    [
        common_args(a).as_slice(),
        &[
            Arg::I32(a.block_size as i32),
            Arg::F32(a.scale),
            Arg::F32(s.k),
            Arg::F32(s.v),
        ],
    ]
    .concat()
}

/// Arguments of [`Ops::paged_attention`].
pub struct AttentionArgs {
    pub out: u64,
    pub qkv: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    pub positions: u64,
    pub tile_seq: u64,
    pub tile_q_start: u64,
    pub tile_q_len: u64,
    pub block_tables: u64,
    pub block_table_start: u64,
    pub tile_kbeg: u64,
    pub tile_kend: u64,
    pub tile_part: u64,
    /// Partial results of split decode tiles: `[parts, kv_heads, group]` (m, l) pairs and
    /// `[parts, kv_heads, group, head_dim]` accumulators, F32.
    pub part_ml: u64,
    pub part_acc: u64,
    pub num_tiles: usize,
    pub row_stride: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub scale: f32,
    pub q_per_tile: usize,
    /// Every work item has one query token (a pure decode step): the decode kernel may run.
    pub decode_only: bool,
    /// Some work item has one query token (the wgmma prefill kernel leaves those to another).
    pub single_query_items: bool,
    /// The pool holds e4m3 codes with these scales (the tensor-core kernels' `_kv8` versions).
    pub kv_fp8: Option<Fp8KvScales>,
    /// Device address of the pools' [`kv_tensor_maps`] (0: none). With them the wgmma kernel
    /// loads whole 64-key tiles by TMA (block sizes that are multiples of 64); the pool must
    /// hold finite values everywhere (zeroed when allocated): a tile's keys past the last one
    /// are loaded too, and masked.
    pub tensor_maps: u64,
}
