// Tensor-core (mma.sync m16n8k16, BF16 in, F32 accumulate) causal attention over the paged KV
// cache, for prefill chunks and decode alike. Same work items and arguments as paged_attention
// in attention.cu (which stays for F32 and for shapes this kernel does not take).
//
// One block (4 warps) per (work item, kv head). Rows are the item's query tokens x the G query
// heads of the kv head (row r = token r / G, head r % G), so the heads of a kv head share each
// K/V tile. Keys stream through shared memory 64 at a time (cp.async, double-buffered; each key
// row is gathered through the block table, so any block size works and each K/V element is read
// once per block). Scores are kept in log2 units (scale * log2 e) so the exponentials are ex2.
// - Multi-query items (prefill chunks, flash_prefill_body): up to 128 rows, 32 per warp (two
//   16-row MMA tiles share every K/V fragment read from shared memory), Q staged in shared memory.
//   The _hilo kernels (the default) keep P as BF16 hi + lo (two P V MMAs); the _f16p kernels take
//   P and V as F16 (one MMA; each V tile converted from BF16 in shared memory, exact in F16's
//   range; P 3 more bits than BF16); the others round P to BF16 (one MMA, as FlashAttention does).
//   Tiles wholly below every row's position skip the mask.
// - One-query items in mixed batches (flash_body): at most 64 rows, MT = ceil(rows / 16) row tiles
//   of 16; warp w takes row tile w % MT and the key slice w / MT of each 64-key tile
//   (KS = 4 / MT slices), so G <= 16 rows keep all 4 warps busy; P keeps BF16 hi + lo. The warps'
//   online-softmax states are merged through shared memory at the end.
// Pure decode steps (G <= 8) run flash_decode_hd* (flash_decode.cu) instead. flash_common.cuh is
// prepended (mma.sync / ldmatrix / cp.async helpers, FlashArgs, the parameter list).

// FP8 KV: tile k0.. of keys (before kend) as e4m3 rows into raw stage `stage` (16-code chunks).
template <int D>
__device__ __forceinline__ void kv8_load_tile(fp8* Kr, fp8* Vr, const FlashArgs& a, int stage, int k0, int kend,
                                              const int* bt, int kvh, int tid) {
    constexpr int CH8 = D / 16;
    const fp8 *kc = (const fp8*)a.k_cache, *vc = (const fp8*)a.v_cache;
    int bs = a.block_size, nkv = a.num_kv_heads;
#pragma unroll
    for (int u = 0; u < (FA_KT * CH8 + 127) / 128; u++) {
        int idx = tid + u * 128;
        if (FA_KT * CH8 % 128 == 0 || idx < FA_KT * CH8) {
            int j = idx / CH8, ch = idx % CH8, key = k0 + j;
            bool ok = key < kend;
            u64 src = 0;
            if (ok) src = (((u64)bt[key / bs] * nkv + kvh) * bs + key % bs) * D + ch * 16;
            int dst = (stage * FA_KT + j) * D + ch * 16;
            cp_async16(smem_u32(Kr + dst), kc + src, ok);
            cp_async16(smem_u32(Vr + dst), vc + src, ok);
        }
    }
}

// FP8 KV: the landed raw stage into the BF16 tiles; a block barrier after (the MMAs read them).
template <int D>
__device__ __forceinline__ void kv8_convert_tile(bf16* Ks, bf16* Vs, const fp8* Kr, const fp8* Vr,
                                                 const FlashArgs& a, int stage, int tid) {
    kv8_to_bf16_rows<D>(Ks, Kr + stage * FA_KT * D, FA_KT, a.k_scale, tid, FA_WARPS * 32);
    kv8_to_bf16_rows<D>(Vs, Vr + stage * FA_KT * D, FA_KT, a.v_scale, tid, FA_WARPS * 32);
    __syncthreads();
}

// Shared memory: max(K and V stages: 2 * 2 * FA_KT * (D + 8) BF16, merge: 4 * 16 * (D + 4) + 4 * 16 * 2 F32).
// KV8 (FP8 pools): cp.async lands e4m3 tiles in a double-buffered raw stage after the BF16 tiles,
// which are then single (Ks / Vs stage 0): each tile is converted there before the MMAs read it.
template <int D, int KS, bool KV8>
__device__ __forceinline__ void flash_body(const FlashArgs& a, int tile, int kvh, int MT) {
    constexpr int STR = D + 8;      // shared row stride (BF16): odd number of 16-byte chunks, no bank conflicts
    constexpr int KW = FA_KT / KS;  // keys per warp per tile
    constexpr int NB = KW / 16;     // 16-key blocks per warp per tile
    constexpr int DK = D / 16;      // k-steps of Q K^T
    constexpr int DN = D / 8;       // 8-wide column tiles of the output
    constexpr int CH = D / 8;       // 16-byte chunks per key row
    constexpr int OSTR = D + 4;     // merge buffer row stride (F32)
    extern __shared__ __align__(16) unsigned char fa_smem[];
    bf16* Ks = (bf16*)fa_smem;       // [2][FA_KT][STR] (KV8: [1])
    bf16* Vs = Ks + (KV8 ? 1 : 2) * FA_KT * STR;
    fp8* Kr = (fp8*)(Vs + (KV8 ? 1 : 2) * FA_KT * STR);  // KV8: [2][FA_KT][D] e4m3
    fp8* Vr = Kr + 2 * FA_KT * D;

    int tid = threadIdx.x;
    int G = a.num_q_heads / a.num_kv_heads;
    int seq = a.tile_seq[tile], q0 = a.tile_q_start[tile], qn = a.tile_q_len[tile];
    if (seq < 0) return;  // padding: decode plans round their work items up (graph keys)
    int R = qn * G;
    int warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    int mt = warp % MT, ks = warp / MT;
    bool active = ks < KS;
    int r0 = mt * 16 + g, r1 = r0 + 8;
    int pos0 = r0 < R ? a.positions[q0 + r0 / G] : -1;
    int pos1 = r1 < R ? a.positions[q0 + r1 / G] : -1;
    int wpos = max(pos0, pos1);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) wpos = max(wpos, __shfl_xor_sync(0xffffffffu, wpos, o));

    // Q fragments (A operand): rows r0 / r1, dims 2t, 2t + 1 (+8) of each 16-dim step.
    unsigned qf[DK][4];
    auto qword = [&](int r, int d) -> unsigned {
        if (r >= R) return 0u;
        int i = r / G, h = kvh * G + r % G;
        return *(const unsigned*)(a.qkv + (u64)(q0 + i) * a.row_stride + h * D + d);
    };
#pragma unroll
    for (int kk = 0; kk < DK; kk++) {
        qf[kk][0] = qword(r0, kk * 16 + 2 * t);
        qf[kk][1] = qword(r1, kk * 16 + 2 * t);
        qf[kk][2] = qword(r0, kk * 16 + 2 * t + 8);
        qf[kk][3] = qword(r1, kk * 16 + 2 * t + 8);
    }

    float o[DN][4];
#pragma unroll
    for (int n = 0; n < DN; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.0f, l1 = 0.0f;
    float c = a.scale * FA_LOG2E;

    int kbeg = a.tile_kbeg[tile];
    int kend = min(a.positions[q0 + qn - 1] + 1, a.tile_kend[tile]);  // exclusive
    const int* bt = a.block_tables + a.block_table_start[seq];
    int bs = a.block_size, nkv = a.num_kv_heads;
    auto load = [&](int stage, int k0) {
        if constexpr (KV8) {
            kv8_load_tile<D>(Kr, Vr, a, stage, k0, kend, bt, kvh, tid);
            return;
        }
#pragma unroll
        for (int u = 0; u < (FA_KT * CH + 127) / 128; u++) {
            int idx = tid + u * 128;
            if (FA_KT * CH % 128 == 0 || idx < FA_KT * CH) {
                int j = idx / CH, ch = idx % CH, key = k0 + j;
                bool ok = key < kend;
                u64 src = 0;
                if (ok) src = (((u64)bt[key / bs] * nkv + kvh) * bs + key % bs) * D + ch * 8;
                int dst = (stage * FA_KT + j) * STR + ch * 8;
                cp_async16(smem_u32(Ks + dst), a.k_cache + src, ok);
                cp_async16(smem_u32(Vs + dst), a.v_cache + src, ok);
            }
        }
    };

    int ntiles = kend > kbeg ? (kend - kbeg + FA_KT - 1) / FA_KT : 0;
    if (ntiles > 0) load(0, kbeg);
    cp_async_commit();
    for (int it = 0; it < ntiles; it++) {
        int k0 = kbeg + it * FA_KT;
        if (it + 1 < ntiles) load((it + 1) & 1, k0 + FA_KT);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        if constexpr (KV8) kv8_convert_tile<D>(Ks, Vs, Kr, Vr, a, it & 1, tid);
        int stage = KV8 ? 0 : (it & 1);
        int kw0 = k0 + ks * KW;
        if (active && kw0 <= wpos && kw0 < kend) {
            const bf16* Kt = Ks + (stage * FA_KT + ks * KW) * STR;
            const bf16* Vt = Vs + (stage * FA_KT + ks * KW) * STR;
            int mi = lane >> 3, rr = lane & 7;
            float s[2 * NB][4];
#pragma unroll
            for (int n = 0; n < 2 * NB; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
            for (int nb = 0; nb < NB; nb++) {
                // x4: keys +0..7 / +8..15 (matrix bit 1) x dims +0..7 / +8..15 (matrix bit 0).
                unsigned base = smem_u32(Kt + (nb * 16 + (mi >> 1) * 8 + rr) * STR + (mi & 1) * 8);
#pragma unroll
                for (int kk = 0; kk < DK; kk++) {
                    unsigned b0, b1, b2, b3;
                    ldsm4(base + kk * 32, b0, b1, b2, b3);
                    mma_bf16(s[2 * nb], qf[kk], b0, b1);
                    mma_bf16(s[2 * nb + 1], qf[kk], b2, b3);
                }
            }
            float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
            for (int n = 0; n < 2 * NB; n++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int key = kw0 + n * 8 + 2 * t + (e & 1);
                    int pos = e < 2 ? pos0 : pos1;
                    s[n][e] = (key <= pos && key < kend) ? s[n][e] * c : NEG_INF;
                }
                mx0 = fmaxf(mx0, fmaxf(s[n][0], s[n][1]));
                mx1 = fmaxf(mx1, fmaxf(s[n][2], s[n][3]));
            }
#pragma unroll
            for (int x = 1; x <= 2; x <<= 1) {
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, x));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, x));
            }
            float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
            // A row with no visible key yet keeps m = -inf; subtract 0 then (exponentials are 0).
            float b0 = mn0 == NEG_INF ? 0.0f : mn0, b1 = mn1 == NEG_INF ? 0.0f : mn1;
            float corr0 = ex2(m0 - b0), corr1 = ex2(m1 - b1);
            m0 = mn0;
            m1 = mn1;
            float ps0 = 0.0f, ps1 = 0.0f;
#pragma unroll
            for (int n = 0; n < 2 * NB; n++) {
                s[n][0] = ex2(s[n][0] - b0);
                s[n][1] = ex2(s[n][1] - b0);
                s[n][2] = ex2(s[n][2] - b1);
                s[n][3] = ex2(s[n][3] - b1);
                ps0 += s[n][0] + s[n][1];
                ps1 += s[n][2] + s[n][3];
            }
            l0 = l0 * corr0 + ps0;  // per-thread partial row sums; the quad is summed at the end
            l1 = l1 * corr1 + ps1;
#pragma unroll
            for (int n = 0; n < DN; n++) {
                o[n][0] *= corr0;
                o[n][1] *= corr0;
                o[n][2] *= corr1;
                o[n][3] *= corr1;
            }
#pragma unroll
            for (int nb = 0; nb < NB; nb++) {
                // P = hi + lo, both BF16 (16 mantissa bits together): P V is as exact as the F32 kernel's,
                // so the order in which keys are visited (splits, chunks) stays invisible after rounding.
                unsigned ph[4], pl[4];
                split_bf16(s[2 * nb][0], s[2 * nb][1], ph[0], pl[0]);
                split_bf16(s[2 * nb][2], s[2 * nb][3], ph[1], pl[1]);
                split_bf16(s[2 * nb + 1][0], s[2 * nb + 1][1], ph[2], pl[2]);
                split_bf16(s[2 * nb + 1][2], s[2 * nb + 1][3], ph[3], pl[3]);
                // x4 trans: keys +0..7 / +8..15 (matrix bit 0) x dims +0..7 / +8..15 (matrix bit 1).
                unsigned base = smem_u32(Vt + (nb * 16 + (mi & 1) * 8 + rr) * STR + (mi >> 1) * 8);
#pragma unroll
                for (int dp = 0; dp < D / 16; dp++) {
                    unsigned v0, v1, v2, v3;
                    ldsm4_t(base + dp * 32, v0, v1, v2, v3);
                    mma_bf16(o[2 * dp], ph, v0, v1);
                    mma_bf16(o[2 * dp + 1], ph, v2, v3);
                    mma_bf16(o[2 * dp], pl, v0, v1);
                    mma_bf16(o[2 * dp + 1], pl, v2, v3);
                }
            }
        }
        __syncthreads();
    }
    cp_async_wait<0>();
    __syncthreads();

    // Merge the warps' states: each warp stores its unnormalized rows, then all threads combine.
    float* Os = (float*)fa_smem;           // [4 warps][16][OSTR]
    float* ML = Os + FA_WARPS * 16 * OSTR;  // [4 warps][16][2]
#pragma unroll
    for (int x = 1; x <= 2; x <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, x);
        l1 += __shfl_xor_sync(0xffffffffu, l1, x);
    }
    if (active) {
        float* row0 = Os + (warp * 16 + g) * OSTR + 2 * t;
        float* row1 = row0 + 8 * OSTR;
#pragma unroll
        for (int n = 0; n < DN; n++) {
            row0[n * 8] = o[n][0];
            row0[n * 8 + 1] = o[n][1];
            row1[n * 8] = o[n][2];
            row1[n * 8 + 1] = o[n][3];
        }
        if (t == 0) {
            ML[(warp * 16 + g) * 2] = m0;
            ML[(warp * 16 + g) * 2 + 1] = l0;
            ML[(warp * 16 + g + 8) * 2] = m1;
            ML[(warp * 16 + g + 8) * 2 + 1] = l1;
        }
    }
    __syncthreads();
    int part = a.tile_part[tile];
    for (int idx = tid; idx < R * D; idx += FA_WARPS * 32) {
        int r = idx / D, d = idx % D;
        int rt = r >> 4, rl = r & 15;
        float M = NEG_INF;
#pragma unroll
        for (int k = 0; k < KS; k++) M = fmaxf(M, ML[((k * MT + rt) * 16 + rl) * 2]);
        float base = M == NEG_INF ? 0.0f : M;
        float L = 0.0f, acc = 0.0f;
#pragma unroll
        for (int k = 0; k < KS; k++) {
            int w = k * MT + rt;
            float sc = ex2(ML[(w * 16 + rl) * 2] - base);
            L += ML[(w * 16 + rl) * 2 + 1] * sc;
            acc += Os[(w * 16 + rl) * OSTR + d] * sc;
        }
        if (part >= 0) {  // a split decode item (one query, rows r < G): natural-log partials
            u64 row = ((u64)part * a.num_kv_heads + kvh) * G + r;
            if (d == 0) {
                a.part_ml[2 * row] = M * FA_LN2;
                a.part_ml[2 * row + 1] = L;
            }
            a.part_acc[row * D + d] = acc;
        } else {
            int i = r / G, h = kvh * G + r % G;
            a.out[(u64)(q0 + i) * a.num_q_heads * D + h * D + d] = f2bf(acc / L);
        }
    }
}

#define FP_ROWS 128  // rows per multi-query item: 4 warps x 32

// How a prefill block multiplies P by V (the kernel families below).
#define P_BF16 0
#define P_HILO 1
#define P_F16 2

// A multi-query item (flash_body's layout, without key slices): warp w owns rows 32w..32w+31 as
// two 16-row MMA tiles over all keys, so a row's result does not depend on how many tokens share
// its item (chunked and whole prefills agree bit for bit). Q sits in shared memory and is read per
// 16-dim step; each K/V fragment read from shared memory feeds both row tiles.
// Shared memory: Q FP_ROWS * (D + 8) BF16, then K and V stages 2 * 2 * FA_KT * (D + 8) BF16.
template <int D, int PM, bool KV8>
__device__ __forceinline__ void flash_prefill_body(const FlashArgs& a, int tile, int kvh) {
    constexpr int STR = D + 8;
    constexpr int DK = D / 16;
    constexpr int DN = D / 8;
    constexpr int CH = D / 8;
    constexpr int NB = FA_KT / 16;
    extern __shared__ __align__(16) unsigned char fa_smem[];
    bf16* Qs = (bf16*)fa_smem;         // [FP_ROWS][STR]
    bf16* Ks = Qs + FP_ROWS * STR;     // [2][FA_KT][STR] (KV8: [1], as in flash_body)
    bf16* Vs = Ks + (KV8 ? 1 : 2) * FA_KT * STR;
    fp8* Kr = (fp8*)(Vs + (KV8 ? 1 : 2) * FA_KT * STR);  // KV8: [2][FA_KT][D] e4m3
    fp8* Vr = Kr + 2 * FA_KT * D;
    int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    int G = a.num_q_heads / a.num_kv_heads;
    int seq = a.tile_seq[tile], q0 = a.tile_q_start[tile], qn = a.tile_q_len[tile];
    if (seq < 0) return;  // padding: decode plans round their work items up (graph keys)
    int R = qn * G;
    bool active = warp * 32 < R;

    // Q rows (zero past R) into shared memory; they land with the first K/V stage.
    for (int idx = tid; idx < FP_ROWS * CH; idx += FA_WARPS * 32) {
        int r = idx / CH, ch = idx % CH;
        bool ok = r < R;
        u64 src = ok ? (u64)(q0 + r / G) * a.row_stride + (kvh * G + r % G) * D + ch * 8 : 0;
        cp_async16(smem_u32(Qs + r * STR + ch * 8), a.qkv + src, ok);
    }

    // Positions of this thread's rows: [row tile][g / g + 8]; -1 for rows past R (fully masked).
    int pos[2][2];
    int wmax = -1, wmin = 0x7fffffff;
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            int r = warp * 32 + mt * 16 + h * 8 + g;
            pos[mt][h] = r < R ? a.positions[q0 + r / G] : -1;
            wmax = max(wmax, pos[mt][h]);
            if (r < R) wmin = min(wmin, pos[mt][h]);
        }
#pragma unroll
    for (int x = 16; x > 0; x >>= 1) {
        wmax = max(wmax, __shfl_xor_sync(0xffffffffu, wmax, x));
        wmin = min(wmin, __shfl_xor_sync(0xffffffffu, wmin, x));
    }

    float o[2][DN][4];
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int n = 0; n < DN; n++) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.0f;
    float m[2][2], l[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; mt++) m[mt][0] = m[mt][1] = NEG_INF, l[mt][0] = l[mt][1] = 0.0f;
    float c = a.scale * FA_LOG2E;

    int kbeg = a.tile_kbeg[tile];
    int kend = min(a.positions[q0 + qn - 1] + 1, a.tile_kend[tile]);  // exclusive
    const int* bt = a.block_tables + a.block_table_start[seq];
    int bs = a.block_size, nkv = a.num_kv_heads;
    // Block sizes are usually powers of two: shifts instead of an integer division per key row.
    bool bs_pow2 = (bs & (bs - 1)) == 0;
    int bs_log2 = __ffs(bs) - 1;
    auto load = [&](int stage, int k0) {
        if constexpr (KV8) {
            kv8_load_tile<D>(Kr, Vr, a, stage, k0, kend, bt, kvh, tid);
            return;
        }
#pragma unroll
        for (int u = 0; u < (FA_KT * CH + 127) / 128; u++) {
            int idx = tid + u * 128;
            if (FA_KT * CH % 128 == 0 || idx < FA_KT * CH) {
                int j = idx / CH, ch = idx % CH, key = k0 + j;
                bool ok = key < kend;
                u64 src = 0;
                if (ok) {
                    int blk, off;
                    if (bs_pow2) {
                        blk = key >> bs_log2;
                        off = key & (bs - 1);
                    } else {
                        blk = key / bs;
                        off = key - blk * bs;
                    }
                    src = (((u64)bt[blk] * nkv + kvh) * bs + off) * D + ch * 8;
                }
                int dst = (stage * FA_KT + j) * STR + ch * 8;
                cp_async16(smem_u32(Ks + dst), a.k_cache + src, ok);
                cp_async16(smem_u32(Vs + dst), a.v_cache + src, ok);
            }
        }
    };

    int mi = lane >> 3, rr = lane & 7;
    // ldmatrix x4 addresses: Q (rows +0..7 / +8..15 by matrix bit 0, dims +0..7 / +8..15 by bit 1).
    unsigned qaddr = smem_u32(Qs + (warp * 32 + (mi & 1) * 8 + rr) * STR + (mi >> 1) * 8);
    int ntiles = kend > kbeg ? (kend - kbeg + FA_KT - 1) / FA_KT : 0;
    if (ntiles > 0) load(0, kbeg);
    cp_async_commit();
    for (int it = 0; it < ntiles; it++) {
        int k0 = kbeg + it * FA_KT;
        if (it + 1 < ntiles) load((it + 1) & 1, k0 + FA_KT);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        if constexpr (KV8) kv8_convert_tile<D>(Ks, Vs, Kr, Vr, a, it & 1, tid);
        int stage = KV8 ? 0 : (it & 1);
        if (PM == P_F16) {
            // The V tile to F16 in place, once for the block's 4 warps (padding columns included).
            uint4* vt = (uint4*)(Vs + stage * FA_KT * STR);
            for (int idx = tid; idx < FA_KT * STR / 8; idx += FA_WARPS * 32) {
                uint4 x = vt[idx];
                vt[idx] = make_uint4(bf16x2_to_f16x2(x.x), bf16x2_to_f16x2(x.y), bf16x2_to_f16x2(x.z),
                                     bf16x2_to_f16x2(x.w));
            }
            __syncthreads();
        }
        if (active && k0 <= wmax) {
            const bf16* Kt = Ks + stage * FA_KT * STR;
            const bf16* Vt = Vs + stage * FA_KT * STR;
            float s[2][2 * NB][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int n = 0; n < 2 * NB; n++) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.0f;
            unsigned kaddr = smem_u32(Kt + ((mi >> 1) * 8 + rr) * STR + (mi & 1) * 8);
#pragma unroll
            for (int kk = 0; kk < DK; kk++) {
                unsigned qa[2][4];
                ldsm4(qaddr + kk * 32, qa[0][0], qa[0][1], qa[0][2], qa[0][3]);
                ldsm4(qaddr + 16 * STR * 2 + kk * 32, qa[1][0], qa[1][1], qa[1][2], qa[1][3]);
#pragma unroll
                for (int nb = 0; nb < NB; nb++) {
                    // x4: keys +0..7 / +8..15 (matrix bit 1) x dims +0..7 / +8..15 (matrix bit 0).
                    unsigned b0, b1, b2, b3;
                    ldsm4(kaddr + nb * 16 * STR * 2 + kk * 32, b0, b1, b2, b3);
#pragma unroll
                    for (int mt = 0; mt < 2; mt++) {
                        mma_bf16(s[mt][2 * nb], qa[mt], b0, b1);
                        mma_bf16(s[mt][2 * nb + 1], qa[mt], b2, b3);
                    }
                }
            }
            // Mask only where some key of the tile is past some row's position (or past kend).
            if (!(k0 + FA_KT - 1 <= wmin && k0 + FA_KT <= kend)) {
#pragma unroll
                for (int mt = 0; mt < 2; mt++)
#pragma unroll
                    for (int n = 0; n < 2 * NB; n++)
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            int key = k0 + n * 8 + 2 * t + (e & 1);
                            if (key > pos[mt][e >> 1] || key >= kend) s[mt][n][e] = NEG_INF;
                        }
            }
#pragma unroll
            for (int mt = 0; mt < 2; mt++) {
                float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
                for (int n = 0; n < 2 * NB; n++) {
                    mx0 = fmaxf(mx0, fmaxf(s[mt][n][0], s[mt][n][1]));
                    mx1 = fmaxf(mx1, fmaxf(s[mt][n][2], s[mt][n][3]));
                }
#pragma unroll
                for (int x = 1; x <= 2; x <<= 1) {
                    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, x));
                    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, x));
                }
                // Raw scores: scaling by c > 0 keeps the maximum (and -inf stays -inf).
                float mn0 = fmaxf(m[mt][0], mx0 * c), mn1 = fmaxf(m[mt][1], mx1 * c);
                // A row with no visible key yet keeps m = -inf; subtract 0 then (exponentials are 0).
                float b0 = mn0 == NEG_INF ? 0.0f : mn0, b1 = mn1 == NEG_INF ? 0.0f : mn1;
                float corr0 = ex2(m[mt][0] - b0), corr1 = ex2(m[mt][1] - b1);
                m[mt][0] = mn0;
                m[mt][1] = mn1;
                float ps0 = 0.0f, ps1 = 0.0f;
#pragma unroll
                for (int n = 0; n < 2 * NB; n++) {
                    s[mt][n][0] = ex2(fmaf(s[mt][n][0], c, -b0));
                    s[mt][n][1] = ex2(fmaf(s[mt][n][1], c, -b0));
                    s[mt][n][2] = ex2(fmaf(s[mt][n][2], c, -b1));
                    s[mt][n][3] = ex2(fmaf(s[mt][n][3], c, -b1));
                    ps0 += s[mt][n][0] + s[mt][n][1];
                    ps1 += s[mt][n][2] + s[mt][n][3];
                }
                l[mt][0] = l[mt][0] * corr0 + ps0;  // per-thread partial row sums; the quad is summed at the end
                l[mt][1] = l[mt][1] * corr1 + ps1;
#pragma unroll
                for (int n = 0; n < DN; n++) {
                    o[mt][n][0] *= corr0;
                    o[mt][n][1] *= corr0;
                    o[mt][n][2] *= corr1;
                    o[mt][n][3] *= corr1;
                }
            }
#pragma unroll
            for (int nb = 0; nb < NB; nb++) {
                unsigned ph[2][4], pl[2][4];
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
                    if (PM == P_HILO) {
                        split_bf16(s[mt][2 * nb][0], s[mt][2 * nb][1], ph[mt][0], pl[mt][0]);
                        split_bf16(s[mt][2 * nb][2], s[mt][2 * nb][3], ph[mt][1], pl[mt][1]);
                        split_bf16(s[mt][2 * nb + 1][0], s[mt][2 * nb + 1][1], ph[mt][2], pl[mt][2]);
                        split_bf16(s[mt][2 * nb + 1][2], s[mt][2 * nb + 1][3], ph[mt][3], pl[mt][3]);
                    } else if (PM == P_F16) {
                        ph[mt][0] = pack_f16(s[mt][2 * nb][0], s[mt][2 * nb][1]);
                        ph[mt][1] = pack_f16(s[mt][2 * nb][2], s[mt][2 * nb][3]);
                        ph[mt][2] = pack_f16(s[mt][2 * nb + 1][0], s[mt][2 * nb + 1][1]);
                        ph[mt][3] = pack_f16(s[mt][2 * nb + 1][2], s[mt][2 * nb + 1][3]);
                    } else {
                        ph[mt][0] = pack_bf16(s[mt][2 * nb][0], s[mt][2 * nb][1]);
                        ph[mt][1] = pack_bf16(s[mt][2 * nb][2], s[mt][2 * nb][3]);
                        ph[mt][2] = pack_bf16(s[mt][2 * nb + 1][0], s[mt][2 * nb + 1][1]);
                        ph[mt][3] = pack_bf16(s[mt][2 * nb + 1][2], s[mt][2 * nb + 1][3]);
                    }
                }
                // x4 trans: keys +0..7 / +8..15 (matrix bit 0) x dims +0..7 / +8..15 (matrix bit 1).
                unsigned base = smem_u32(Vt + (nb * 16 + (mi & 1) * 8 + rr) * STR + (mi >> 1) * 8);
#pragma unroll
                for (int dp = 0; dp < D / 16; dp++) {
                    unsigned v0, v1, v2, v3;
                    ldsm4_t(base + dp * 32, v0, v1, v2, v3);
#pragma unroll
                    for (int mt = 0; mt < 2; mt++) {
                        if (PM == P_F16) {
                            mma_f16(o[mt][2 * dp], ph[mt], v0, v1);
                            mma_f16(o[mt][2 * dp + 1], ph[mt], v2, v3);
                            continue;
                        }
                        mma_bf16(o[mt][2 * dp], ph[mt], v0, v1);
                        mma_bf16(o[mt][2 * dp + 1], ph[mt], v2, v3);
                        if (PM == P_HILO) {
                            mma_bf16(o[mt][2 * dp], pl[mt], v0, v1);
                            mma_bf16(o[mt][2 * dp + 1], pl[mt], v2, v3);
                        }
                    }
                }
            }
        }
        __syncthreads();
    }
    cp_async_wait<0>();

    // Each warp writes its own rows (multi-query items are never split over keys).
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            float L = l[mt][h];
            L += __shfl_xor_sync(0xffffffffu, L, 1);
            L += __shfl_xor_sync(0xffffffffu, L, 2);
            int r = warp * 32 + mt * 16 + h * 8 + g;
            if (r < R) {
                int i = r / G, hd = kvh * G + r % G;
                unsigned* dst = (unsigned*)(a.out + (u64)(q0 + i) * a.num_q_heads * D + hd * D + 2 * t);
#pragma unroll
                for (int n = 0; n < DN; n++) dst[n * 4] = pack_bf16(o[mt][n][2 * h] / L, o[mt][n][2 * h + 1] / L);
            }
        }
}

// SINGLE_ONLY: one-query items only (after flash_prefill_wgmma, which takes the others).
template <int D, int PM, bool KV8 = false, bool SINGLE_ONLY = false>
__device__ __forceinline__ void flash_attention_t(const FlashArgs& a) {
    // Longest items first over all kv heads: a prefill's late tiles see the most keys, so they
    // should not form the tail.
    int lin = blockIdx.y * gridDim.x + blockIdx.x;
    int tile = gridDim.x - 1 - lin / gridDim.y, kvh = lin % gridDim.y;
    int qn = a.tile_q_len[tile];
    int rows = qn * (a.num_q_heads / a.num_kv_heads);
    int MT = (rows + 15) / 16;
    // A decode item (in a mixed batch) splits its keys over the warps its rows leave over.
    if (qn > 1) {
        if (!SINGLE_ONLY) flash_prefill_body<D, PM, KV8>(a, tile, kvh);
    } else if (MT == 1)
        flash_body<D, 4, KV8>(a, tile, kvh, 1);
    else if (MT == 2)
        flash_body<D, 2, KV8>(a, tile, kvh, 2);
    else
        flash_body<D, 1, KV8>(a, tile, kvh, MT);
}

// One kernel per head_dim (16..128, multiples of 16) and P V product; 4 warps per block, 2 blocks
// per SM. The _hilo kernels keep P as BF16 hi + lo for multi-query items too (F32-like accuracy,
// two P V MMAs), the _f16p kernels take P and V as F16.
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_hd16(FLASH_PARAMS) { flash_attention_t<16, P_BF16>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_hd32(FLASH_PARAMS) { flash_attention_t<32, P_BF16>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_hd48(FLASH_PARAMS) { flash_attention_t<48, P_BF16>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_hd64(FLASH_PARAMS) { flash_attention_t<64, P_BF16>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_hd80(FLASH_PARAMS) { flash_attention_t<80, P_BF16>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_hd96(FLASH_PARAMS) { flash_attention_t<96, P_BF16>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_hd112(FLASH_PARAMS) { flash_attention_t<112, P_BF16>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_hd128(FLASH_PARAMS) { flash_attention_t<128, P_BF16>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_hilo_hd16(FLASH_PARAMS) { flash_attention_t<16, P_HILO>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_hilo_hd32(FLASH_PARAMS) { flash_attention_t<32, P_HILO>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_hilo_hd48(FLASH_PARAMS) { flash_attention_t<48, P_HILO>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_hilo_hd64(FLASH_PARAMS) { flash_attention_t<64, P_HILO>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_hilo_hd80(FLASH_PARAMS) { flash_attention_t<80, P_HILO>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_hilo_hd96(FLASH_PARAMS) { flash_attention_t<96, P_HILO>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_hilo_hd112(FLASH_PARAMS) { flash_attention_t<112, P_HILO>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_hilo_hd128(FLASH_PARAMS) { flash_attention_t<128, P_HILO>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_f16p_hd16(FLASH_PARAMS) { flash_attention_t<16, P_F16>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_f16p_hd32(FLASH_PARAMS) { flash_attention_t<32, P_F16>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_f16p_hd48(FLASH_PARAMS) { flash_attention_t<48, P_F16>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_f16p_hd64(FLASH_PARAMS) { flash_attention_t<64, P_F16>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_f16p_hd80(FLASH_PARAMS) { flash_attention_t<80, P_F16>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_f16p_hd96(FLASH_PARAMS) { flash_attention_t<96, P_F16>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_f16p_hd112(FLASH_PARAMS) { flash_attention_t<112, P_F16>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_f16p_hd128(FLASH_PARAMS) { flash_attention_t<128, P_F16>(FLASH_ARGS); }
// FP8 KV pools (P as BF16 hi + lo).
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_hilo_kv8_hd16(FLASH_PARAMS) { flash_attention_t<16, P_HILO, true>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_hilo_kv8_hd32(FLASH_PARAMS) { flash_attention_t<32, P_HILO, true>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_hilo_kv8_hd48(FLASH_PARAMS) { flash_attention_t<48, P_HILO, true>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_hilo_kv8_hd64(FLASH_PARAMS) { flash_attention_t<64, P_HILO, true>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_hilo_kv8_hd80(FLASH_PARAMS) { flash_attention_t<80, P_HILO, true>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_hilo_kv8_hd96(FLASH_PARAMS) { flash_attention_t<96, P_HILO, true>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_hilo_kv8_hd112(FLASH_PARAMS) { flash_attention_t<112, P_HILO, true>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_hilo_kv8_hd128(FLASH_PARAMS) { flash_attention_t<128, P_HILO, true>(FLASH_ARGS); }
// One-query items of a mixed batch whose multi-query items flash_prefill_wgmma_hd128 took.
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_single_hd128(FLASH_PARAMS) { flash_attention_t<128, P_HILO, false, true>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 2) flash_attention_single_kv8_hd128(FLASH_PARAMS) { flash_attention_t<128, P_HILO, true, true>(FLASH_ARGS); }
