// Prefill attention on Hopper's warpgroup MMA (wgmma), head_dim 128, BF16 or FP8 KV pools: the
// multi-query work items of flash_attention.cu's plan (same arguments, same rows: token r / G,
// head r % G of the kv head), each by a block of 2 warpgroups (64 rows each). One-query items of
// a mixed batch are left to flash_attention_single_hd128 (flash_attention.cu), launched after.
//
// Per 64-key tile (loaded FW_AHEAD tiles ahead: by TMA where the tile's 64 keys are consecutive
// rows of one block, else by cp.async, each key row gathered through the block table): S = Q K^T
// by 8 wgmma m64n64k16 (Q as register fragments, K from shared memory), the online softmax in
// registers (scores in log2 units, as flash_attention.cu), then O += P V by wgmma m64n128k16 (P as
// register fragments: BF16 hi + lo, or BF16 only for the _bf16p kernel; V from shared memory,
// transposed by the descriptor), issued with the next tile's scores so the tensor cores have work
// during the softmax. mma.sync's register layouts are wgmma's per warp (A and the accumulators),
// so the softmax follows flash_attention.cu's.
//
// FP8 (e4m3) pools (the _kv8 kernel): the raw 64-key tiles (64 rows x 128 bytes each, the same
// swizzle) land in the stages by TMA or cp.async; at its turn a tile is converted (exactly, without
// the pool's scale) into one of two F16 K / V tile pairs, which F16 MMAs read with Q and P as F16
// (P hi + lo), the K scale folded into the score scale and the V scale into the output (as the
// decode kernel of flash_decode_kv8.cu): tile i's pair (i & 1) holds K(i) for its scores and V(i)
// for the next step's P V.
//
// Shared tiles use the 128-byte swizzle (as TMA would write them): a tile is two halves of 64 dims,
// each 64 key rows of 128 bytes whose 16-byte chunk c sits at c ^ (row % 8). Read as K (K-major
// B) and as V (MN-major B, transposed by the descriptor). Measured on an H200 (3000-token 70B
// prefill, attention of 80 layers, hi + lo): 49 ms with TMA loads (BF16 P: 41), 63 ms with
// cp.async (44 without any loads); the no-swizzle layout (core matrices of 8 rows x 16 bytes,
// filled 8 rows a warp) took 81 ms, one warpgroup per block (two blocks an SM, each loading its
// own tiles) 97 ms; the mma.sync kernel 76 ms.

#define FW_D 128
#define FW_KT 64
#define FW_THREADS 256  // two warpgroups
#define FW_STAGES 5     // K / V stages: the tile in P V, the tile in Q K^T, FW_AHEAD loading
#define FW_AHEAD 3
#define FW_TILE_BYTES (FW_KT * FW_D * 2)  // one K or V tile: 16 KB
// P V products (as flash_attention.cu): P rounded to BF16, or BF16 hi + lo.
#define P_BF16 0
#define P_HILO 1

// A shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format"), no swizzle.
__device__ __forceinline__ u64 wgmma_desc(unsigned addr, unsigned lbo, unsigned sbo) {
    return (u64)((addr & 0x3FFFF) >> 4) | ((u64)(lbo >> 4) << 16) | ((u64)(sbo >> 4) << 32);
}
// The same with the 128-byte swizzle (layout type 1; the atom's base 1024-byte aligned).
__device__ __forceinline__ u64 wgmma_desc_sw128(unsigned addr, unsigned lbo, unsigned sbo) {
    return wgmma_desc(addr, lbo, sbo) | (1ull << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }
// Keeps the compiler from moving accesses of an accumulator across a wgmma issue or wait.
template <int N>
__device__ __forceinline__ void wgmma_fence_regs(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(d[i])::"memory");
}
// cp.async's writes (generic proxy) made visible to wgmma's reads (async proxy).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// d (+)= a (64x16 BF16, or F16, register fragments) * b (16 x N of the same, shared-memory
// descriptor); F32 d. S = Q K^T: N = 64 keys, K-major. O += P V: N = 128 dims, MN-major
// (transposed).
#define FW_WGMMA_QK(T) \
    asm volatile( \
        "{ .reg .pred p; setp.ne.b32 p, %37, 0;\n" \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." T "." T " " \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, " \
        "{%32, %33, %34, %35}, %36, p, 1, 1, 0; }" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate))

template <bool F16>
__device__ __forceinline__ void wgmma_qk(float (&d)[32], const unsigned (&a)[4], u64 b, int accumulate) {
    if constexpr (F16)
        FW_WGMMA_QK("f16");
    else
        FW_WGMMA_QK("bf16");
}

#define FW_WGMMA_PV(T) \
    asm volatile( \
        "{ .reg .pred p; setp.ne.b32 p, %69, 0;\n" \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." T "." T " " \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, " \
        "{%64, %65, %66, %67}, %68, p, 1, 1, 1; }" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate))

template <bool F16>
__device__ __forceinline__ void wgmma_pv(float (&d)[64], const unsigned (&a)[4], u64 b, int accumulate) {
    if constexpr (F16)
        FW_WGMMA_PV("f16");
    else
        FW_WGMMA_PV("bf16");
}

// A warpgroup's online softmax over one 64-key tile of scores s (the accumulator of wgmma_qk:
// s[4j + e] is key k0 + 8j + 2t + (e & 1) of row r0 for e < 2, else of row r1): masks keys past a
// row's position or kend (always, branch-free: a branch between a wgmma and its wait serializes
// them), updates the running max m and sums l, returns in corr the factors the output rows must
// take, and P of 16 keys per k-step as A fragments (hi, and lo for hi + lo) in the accumulator's
// layout (n8 blocks 2ks and 2ks + 1).
template <int PM, bool F16>
__device__ __forceinline__ void fw_softmax(float (&s)[32], int k0, int pos0, int pos1, int kend, float c,
                                           int t, float (&m)[2], float (&l)[2], float (&corr)[2],
                                           unsigned (&ph)[4][4], unsigned (&pl)[4][4]) {
    // Key k0 + 8j + 2t + (e & 1) is masked past min(row position, kend - 1), relative to this
    // thread's first key: only in tiles that reach past some row's position (one warp-uniform
    // test; the others skip the 32 compares).
    int d0 = min(pos0, kend - 1) - k0 - 2 * t, d1 = min(pos1, kend - 1) - k0 - 2 * t;
    if (!__all_sync(0xffffffffu, FW_KT - 1 <= min(d0, d1)))
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++)
                if (8 * j + (e & 1) > (e < 2 ? d0 : d1)) s[4 * j + e] = NEG_INF;
    float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
    for (int j = 0; j < 8; j++) {
        mx[0] = fmaxf(mx[0], fmaxf(s[4 * j], s[4 * j + 1]));
        mx[1] = fmaxf(mx[1], fmaxf(s[4 * j + 2], s[4 * j + 3]));
    }
    float b[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
#pragma unroll
        for (int x = 1; x <= 2; x <<= 1) mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], x));
        // Raw scores: scaling by c > 0 keeps the maximum (and -inf stays -inf).
        float mn = fmaxf(m[h], mx[h] * c);
        // A row with no visible key yet keeps m = -inf; subtract 0 then (exponentials are 0).
        b[h] = mn == NEG_INF ? 0.0f : mn;
        corr[h] = ex2(m[h] - b[h]);
        m[h] = mn;
    }
    float ps[2] = {0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            s[4 * j + e] = ex2(fmaf(s[4 * j + e], c, -b[e >> 1]));
            ps[e >> 1] += s[4 * j + e];
        }
    // Per-thread partial row sums; the quad is summed at the end.
    l[0] = l[0] * corr[0] + ps[0];
    l[1] = l[1] * corr[1] + ps[1];
#pragma unroll
    for (int ks = 0; ks < 4; ks++)
#pragma unroll
        for (int f = 0; f < 4; f++) {
            int j = 2 * ks + (f >> 1), e = 2 * (f & 1);
            static_assert(!F16 || PM == P_HILO, "F16 MMAs take P as F16 hi + lo");
            if (PM == P_HILO && F16)
                split_f16(s[4 * j + e], s[4 * j + e + 1], ph[ks][f], pl[ks][f]);
            else if (PM == P_HILO)
                split_bf16(s[4 * j + e], s[4 * j + e + 1], ph[ks][f], pl[ks][f]);
            else
                ph[ks][f] = pack_bf16(s[4 * j + e], s[4 * j + e + 1]);
        }
}

// The descriptors of one stage's tiles: K per 16-dim k-step (K-major), V per 16-key k-step
// (MN-major, transposed). A tile is two 64-dim halves of 64 rows x 128 swizzled bytes, 8 KB
// apart; 8-row groups are 1024 bytes apart.
struct FwDescs {
    u64 k[FW_D / 16], v[FW_KT / 16];
};
__device__ __forceinline__ FwDescs fw_descs(unsigned kt) {
    FwDescs d;
#pragma unroll
    for (int kk = 0; kk < FW_D / 16; kk++)  // K-major: a k-step is 32 bytes into the swizzled rows
        d.k[kk] = wgmma_desc_sw128(kt + (kk >> 2) * 8192 + (kk & 3) * 32, 16, 1024);
#pragma unroll
    for (int ks = 0; ks < FW_KT / 16; ks++)  // MN-major: the dim halves LBO 8192 apart
        d.v[ks] = wgmma_desc_sw128(kt + FW_TILE_BYTES + ks * 2048, 8192, 1024);
    return d;
}
// Keeps an in-flight wgmma's descriptors alive until its wait (else ptxas may reuse their
// registers, and then serializes every wgmma).
__device__ __forceinline__ void fw_keep_descs(FwDescs& d) {
#pragma unroll
    for (int i = 0; i < FW_D / 16; i++) asm volatile("" : "+l"(d.k[i])::"memory");
#pragma unroll
    for (int i = 0; i < FW_KT / 16; i++) asm volatile("" : "+l"(d.v[i])::"memory");
}

// Issues S = Q K^T over a stage's K tile (8 k-steps of 16 dims).
template <bool F16>
__device__ __forceinline__ void fw_scores(float (&s)[32], const unsigned (&qf)[FW_D / 16][4], const FwDescs& d) {
#pragma unroll
    for (int kk = 0; kk < FW_D / 16; kk++) wgmma_qk<F16>(s, qf[kk], d.k[kk], kk);
}

// Issues O += P V over a stage's V tile (4 k-steps of 16 keys; hi, then lo).
template <int PM, bool F16>
__device__ __forceinline__ void fw_pv(float (&o)[64], const unsigned (&ph)[4][4], const unsigned (&pl)[4][4],
                                      const FwDescs& d) {
#pragma unroll
    for (int ks = 0; ks < 4; ks++) {
        wgmma_pv<F16>(o, ph[ks], d.v[ks], 1);
        if (PM == P_HILO) wgmma_pv<F16>(o, pl[ks], d.v[ks], 1);
    }
}

template <int N>
__device__ __forceinline__ void fw_scale(float (&o)[N], const float (&corr)[2]) {
#pragma unroll
    for (int i = 0; i < N; i++) o[i] *= corr[(i >> 1) & 1];
}

// Keeps P's registers (an in-flight wgmma's A operand) alive until the wait.
__device__ __forceinline__ void fw_keep_regs(unsigned (&p)[4][4]) {
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int f = 0; f < 4; f++) asm volatile("" : "+r"(p[i][f])::"memory");
}

// FlashArgs and the pools' tensor maps (null: cp.async loads).
struct FlashTmaArgs : FlashArgs {
    const void* tensor_maps;
};

// FP8 pools: raw tile i's 64 x 128 codes (K at `raw`, V 8 KB after) as F16 (exact; the pools'
// scales go into the score scale and the output) into the tile pair at `dst`, by NT threads (tid
// 0 .. NT - 1). One conversion per pair of codes: BF16 tiles times the scale (4 more instructions
// per pair) made the conversions the FP8 prefill's bound. (The bound check below never fails for
// NT = 128 or 256; without it ptxas allocates the NT = 256 kernel differently and spills.)
template <int NT>
__device__ __forceinline__ void fw_kv8_convert(unsigned dst, unsigned raw, int tid) {
    static_assert(2 * 64 * 8 % NT == 0, "whole 16-byte chunks per thread");
#pragma unroll 4
    for (int u = 0; u < (2 * 64 * 8 + NT - 1) / NT; u++) {
        int idx = tid + u * NT, pool = idx >> 9, j = (idx >> 3) & 63, c8 = idx & 7;
        if (idx >= 2 * 64 * 8) break;
        uint4 x;
        asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];"
                     : "=r"(x.x), "=r"(x.y), "=r"(x.z), "=r"(x.w)
                     : "r"(raw + pool * 8192 + j * 128 + ((c8 ^ (j & 7)) << 4)));
        unsigned w[4] = {x.x, x.y, x.z, x.w}, o[8];
#pragma unroll
        for (int e = 0; e < 4; e++) {
            o[2 * e] = e4m3x2_to_f16x2(w[e]);
            o[2 * e + 1] = e4m3x2_to_f16x2(w[e] >> 16);
        }
        // Dims 16 c8 .. + 15: 16-byte chunks 2 c8 and 2 c8 + 1 of the row, in half c8 / 4.
#pragma unroll
        for (int e = 0; e < 2; e++) {
            int cb = 2 * c8 + e;
            unsigned at = dst + pool * FW_TILE_BYTES + (cb >> 3) * 8192 + j * 128 + (((cb & 7) ^ (j & 7)) << 4);
            asm volatile("st.shared.v4.u32 [%0], {%1,%2,%3,%4};" ::"r"(at), "r"(o[4 * e]), "r"(o[4 * e + 1]),
                         "r"(o[4 * e + 2]), "r"(o[4 * e + 3])
                         : "memory");
        }
    }
}

// A block's work item (longest items first): kv head kvh, query tokens q0 .. q0 + qn of sequence
// seq (R = qn * G rows), keys kbeg .. kend in ntiles tiles. False for padding, one-query items
// (the single-query kernel's) and items without keys.
struct FwItem {
    int seq, q0, qn, R, G, kvh, kbeg, kend, ntiles;
};
__device__ __forceinline__ bool fw_item(const FlashArgs& a, FwItem& it) {
    int lin = blockIdx.y * gridDim.x + blockIdx.x;
    int tile = gridDim.x - 1 - lin / gridDim.y;
    it.kvh = lin % gridDim.y;
    it.G = a.num_q_heads / a.num_kv_heads;
    it.seq = a.tile_seq[tile];
    it.q0 = a.tile_q_start[tile];
    it.qn = a.tile_q_len[tile];
    if (it.seq < 0 || it.qn == 1) return false;
    it.R = it.qn * it.G;
    it.kbeg = a.tile_kbeg[tile];
    it.kend = min(a.positions[it.q0 + it.qn - 1] + 1, a.tile_kend[tile]);  // exclusive
    it.ntiles = it.kend > it.kbeg ? (it.kend - it.kbeg + FW_KT - 1) / FW_KT : 0;
    return it.ntiles > 0;  // a multi-query item always has keys (its first query's own)
}

// Rows r0 / r1 of the item for lane (g, t) of warp `warp` of the warpgroup whose first row is
// `first`, and their positions: -1 past R (such rows, a warpgroup may have only those, are fully
// masked: they compute, and are not written).
__device__ __forceinline__ void fw_rows(const FlashArgs& a, const FwItem& it, int first, int warp, int g, int& r0,
                                        int& r1, int& pos0, int& pos1) {
    r0 = first + warp * 16 + g;
    r1 = r0 + 8;
    pos0 = r0 < it.R ? a.positions[it.q0 + r0 / it.G] : -1;
    pos1 = r1 < it.R ? a.positions[it.q0 + r1 / it.G] : -1;
}

// The softmax's scale of raw scores (log2 units); FP8 pools: of the scores of the raw K codes.
template <bool KV8>
__device__ __forceinline__ float fw_score_scale(const FlashArgs& a) {
    return a.scale * FA_LOG2E * (KV8 ? a.k_scale : 1.0f);
}

// Q fragments (A operand) of rows r0 / r1 (zero past R), dims 2t, 2t + 1 (+ 8) of each k-step;
// as F16 for F16 (exact for magnitudes in [2^-14, 65504]).
template <bool F16>
__device__ __forceinline__ void fw_load_q(unsigned (&qf)[FW_D / 16][4], const FlashArgs& a, const FwItem& it, int r0,
                                          int r1, int t) {
    const bf16* qrow[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        int r = h ? r1 : r0;
        qrow[h] = r < it.R ? a.qkv + (u64)(it.q0 + r / it.G) * a.row_stride + (it.kvh * it.G + r % it.G) * FW_D + 2 * t
                           : nullptr;
    }
#pragma unroll
    for (int kk = 0; kk < FW_D / 16; kk++)
#pragma unroll
        for (int f = 0; f < 4; f++) {
            const bf16* q = qrow[f & 1];
            unsigned v = q ? *(const unsigned*)(q + kk * 16 + (f >> 1) * 8) : 0u;
            qf[kk][f] = F16 ? bf16x2_to_f16x2(v) : v;
        }
}

// Rows r0 (o[4j], o[4j + 1]) and r1 (o[4j + 2], o[4j + 3]), dims 8j + 2t, + 1, over their sums
// (times the V pool's scale for F16: the products took the FP8 codes as they are).
template <bool F16>
__device__ __forceinline__ void fw_store(const FlashArgs& a, const FwItem& it, const float (&o)[64], const float (&l)[2],
                                         int r0, int r1, int t) {
#pragma unroll
    for (int h = 0; h < 2; h++) {
        float L = l[h];
        L += __shfl_xor_sync(0xffffffffu, L, 1);
        L += __shfl_xor_sync(0xffffffffu, L, 2);
        int r = h ? r1 : r0;
        if (r < it.R) {
            int i = r / it.G, hd = it.kvh * it.G + r % it.G;
            unsigned* dst = (unsigned*)(a.out + (u64)(it.q0 + i) * a.num_q_heads * FW_D + hd * FW_D + 2 * t);
#pragma unroll
            for (int j = 0; j < 16; j++) {
                float x = o[4 * j + 2 * h], y = o[4 * j + 2 * h + 1];
                if (F16) x *= a.v_scale, y *= a.v_scale;
                dst[j * 4] = pack_bf16(x / L, y / L);
            }
        }
    }
}

// No turns: the warpgroups issue their MMAs whenever they are ready.
struct FwAnyTurn {
    __device__ __forceinline__ void take() {}
    __device__ __forceinline__ void pass() {}
};

// A warpgroup's pass over the item's key tiles (rows r0 / r1 at positions pos0 / pos1, Q as
// fragments qf) into its output rows o and their sums l: landed(i) waits until tile i is in shared memory (descs(i): its descriptors);
// done(i) says the warpgroup's MMAs no longer read it. Per tile it issues the scores together with
// P V of the previous tile (the FlashAttention-3 order); turn.take() / turn.pass() bracket each
// issue (ping-pong between warpgroups). In the SASS (ptxas 12.9 and NVRTC 13.0 alike) the wait for
// P V lands before the softmax's first shuffle whatever the source order (register pressure, the
// shuffles, the keep-alive asm and FA3's o-scaling order changed nothing), so a warpgroup's
// softmax overlaps the other warpgroup's MMAs, not its own.
template <int PM, bool F16, typename Landed, typename Descs, typename Done, typename Turn>
__device__ __forceinline__ void fw_mainloop(float (&o)[64], float (&l)[2], const unsigned (&qf)[FW_D / 16][4],
                                            const FwItem& it, int pos0, int pos1, float c, int t, Landed landed,
                                            Descs descs, Done done, Turn& turn) {
#pragma unroll
    for (int i = 0; i < 64; i++) o[i] = 0.0f;
    l[0] = l[1] = 0.0f;
    float m[2] = {NEG_INF, NEG_INF}, corr[2];
    unsigned ph[4][4], pl[4][4], qh[4][4], ql[4][4];
    int ntiles = it.ntiles, kbeg = it.kbeg, kend = it.kend;
    landed(0);
    {
        float s[32];
        FwDescs d = descs(0);
        turn.take();
        wgmma_fence();
        fw_scores<F16>(s, qf, d);
        wgmma_commit();
        turn.pass();
        wgmma_wait0();
        wgmma_fence_regs(s);
        fw_softmax<PM, F16>(s, kbeg, pos0, pos1, kend, c, t, m, l, corr, ph, pl);
    }
    // Tile i: its scores, then P V of tile i - 1 (P in ih / il) while its softmax runs (P into
    // oh / ol). No branch may separate a wgmma from its wait (ptxas would serialize them all), so
    // every tile is masked; two P buffers alternate (no copies: ptxas must find each wgmma's A
    // fragments where the softmax left them, or it serializes).
    auto step = [&](int i, unsigned (&ih)[4][4], unsigned (&il)[4][4], unsigned (&oh)[4][4], unsigned (&ol)[4][4]) {
        landed(i);
        FwDescs cur = descs(i), prev = descs(i - 1);
        float s[32];
        turn.take();
        wgmma_fence();
        fw_scores<F16>(s, qf, cur);
        wgmma_commit();
        fw_pv<PM, F16>(o, ih, il, prev);
        wgmma_commit();
        turn.pass();
        asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
        wgmma_fence_regs(s);
        fw_softmax<PM, F16>(s, kbeg + i * FW_KT, pos0, pos1, kend, c, t, m, l, corr, oh, ol);
        wgmma_wait0();
        wgmma_fence_regs(o);
        fw_keep_regs(ih);
        if (PM == P_HILO) fw_keep_regs(il);
        fw_keep_descs(cur);
        fw_keep_descs(prev);
        done(i - 1);
        // Once the row maxima settle the factors are 1 (exact either way): skip the 64 products.
        if (__any_sync(0xffffffffu, corr[0] != 1.0f || corr[1] != 1.0f)) fw_scale(o, corr);
    };
    for (int i = 1; i < ntiles; i += 2) {
        step(i, ph, pl, qh, ql);
        if (i + 1 < ntiles) step(i + 1, qh, ql, ph, pl);
    }
    // The last tile's P V, its P picked without a branch (ptxas may take a wgmma under a
    // data-dependent branch for a divergent path and serialize them all); no MMA is in flight.
    FwDescs last = descs(ntiles - 1);
    bool even = ntiles % 2 == 0;
    unsigned lh[4][4], ll[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int f = 0; f < 4; f++) {
            lh[i][f] = even ? qh[i][f] : ph[i][f];
            ll[i][f] = even ? ql[i][f] : pl[i][f];
        }
    turn.take();
    wgmma_fence();
    fw_pv<PM, F16>(o, lh, ll, last);
    wgmma_commit();
    turn.pass();
    wgmma_wait0();
    wgmma_fence_regs(o);
    done(ntiles - 1);
}

// Two warpgroups per block (rows 0..63 and 64..127 of a work item) share each K / V tile; every
// thread takes part in the loads, which run FW_AHEAD tiles ahead (flash_prefill_ws.cu has a
// producer warpgroup instead, for TMA-loaded items).
template <int PM, bool KV8>
__device__ __forceinline__ void flash_prefill_wgmma_t(const FlashTmaArgs& a) {
    constexpr int D = FW_D, CH = D / 8;
    // A stage holds a K and a V tile: BF16 (16 KB each), or e4m3 codes (8 KB each) whose BF16
    // conversions go to two tile pairs after the stages.
    constexpr int STAGE_BYTES = KV8 ? FW_TILE_BYTES : 2 * FW_TILE_BYTES;
    constexpr int BF16_BYTES = KV8 ? 2 * 2 * FW_TILE_BYTES : 0;
    extern __shared__ __align__(128) unsigned char fw_smem[];
    FwItem it;
    if (!fw_item(a, it)) return;
    int tid = threadIdx.x, warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t = lane & 3;
    int r0, r1, pos0, pos1;
    fw_rows(a, it, (tid >> 7) * 64, warp, g, r0, r1, pos0, pos1);
    unsigned qf[FW_D / 16][4];
    fw_load_q<KV8>(qf, a, it, r0, r1, t);
    float o[64], l[2], c = fw_score_scale<KV8>(a);

    int kbeg = it.kbeg, kend = it.kend, ntiles = it.ntiles, kvh = it.kvh;
    const int* bt = a.block_tables + a.block_table_start[it.seq];
    int bs = a.block_size, nkv = a.num_kv_heads;
    bool bs_pow2 = (bs & (bs - 1)) == 0;
    int bs_log2 = __ffs(bs) - 1;
    unsigned smem = (smem_u32(fw_smem) + 1023) & ~1023u;  // swizzle atoms are 1024-byte aligned
    // Stage s: K tile at s * 2 * FW_TILE_BYTES, V tile right after. Sixteen threads take a key
    // row (256 contiguous global bytes): this thread its 16-byte chunk ch of rows j, j + 16, j + 32,
    // j + 48, stored at chunk (ch % 8) ^ (row % 8) of the row's 128 bytes in half ch / 8.
    int j0 = tid >> 4, ch = tid & 15;
    unsigned dst0 = smem + (ch >> 3) * 8192 + j0 * 128 + (((ch & 7) ^ (j0 & 7)) << 4);
    // TMA takes a tile when its 64 keys are consecutive rows of one block: the tensor maps view
    // each pool as rows of 128 dims, a box is 64 rows x 64 dims (the swizzled half tile). Keys
    // past kend in the last tile are loaded too (finite: the pool is zeroed when allocated), and
    // masked.
    const unsigned char* maps = (const unsigned char*)a.tensor_maps;
    bool tma = maps != nullptr && bs % FW_KT == 0 && kbeg % FW_KT == 0;
    unsigned conv = smem + FW_STAGES * STAGE_BYTES;        // FP8 pools: the BF16 tile pairs
    unsigned bars = conv + BF16_BYTES;                     // an 8-byte mbarrier per stage
    if (tma) {
        if (tid == 0)
            for (int st = 0; st < FW_STAGES; st++) mbar_init(bars + 8 * st, 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        __syncthreads();
    }
    // Tile i into its stage: by TMA (thread 0), or as one cp.async group of every thread (empty
    // past the last tile: the group counts stay even).
    auto load = [&](int i) {
        unsigned st = smem + (i % FW_STAGES) * STAGE_BYTES;
        if (tma) {
            if (tid == 0 && i < ntiles) {
                int k0 = kbeg + i * FW_KT, blk = bs_pow2 ? k0 >> bs_log2 : k0 / bs;
                int row = (__ldg(bt + blk) * nkv + kvh) * bs + (k0 - blk * bs);
                unsigned bar = bars + 8 * (i % FW_STAGES);
                mbar_expect_tx(bar, STAGE_BYTES);
                if (KV8) {  // a box is a whole tile: 64 rows of 128 codes
                    tma_load_2d(st, maps, 0, row, bar);
                    tma_load_2d(st + 8192, maps + 128, 0, row, bar);
                } else {
                    tma_load_2d(st, maps, 0, row, bar);
                    tma_load_2d(st + 8192, maps, 64, row, bar);
                    tma_load_2d(st + FW_TILE_BYTES, maps + 128, 0, row, bar);
                    tma_load_2d(st + FW_TILE_BYTES + 8192, maps + 128, 64, row, bar);
                }
            }
            return;
        }
        if (KV8) {
            // Eight threads take a key row (128 contiguous global bytes of codes): this thread
            // its chunk tid % 8 of rows tid / 8 and tid / 8 + 32.
            if (i < ntiles) {
                const fp8 *kc = (const fp8*)a.k_cache, *vc = (const fp8*)a.v_cache;
#pragma unroll
                for (int u = 0; u < 2; u++) {
                    int j = (tid >> 3) + 32 * u, c8 = tid & 7, key = kbeg + i * FW_KT + j;
                    bool ok = key < kend;
                    u64 src = 0;
                    if (ok) {
                        int blk = bs_pow2 ? key >> bs_log2 : key / bs;
                        src = (((u64)__ldg(bt + blk) * nkv + kvh) * bs + (key - blk * bs)) * D + c8 * 16;
                    }
                    unsigned dst = st + j * 128 + ((c8 ^ (j & 7)) << 4);
                    cp_async16(dst, kc + src, ok);
                    cp_async16(dst + 8192, vc + src, ok);
                }
            }
            cp_async_commit();
            return;
        }
        if (i < ntiles) {
            int k0 = kbeg + i * FW_KT;
#pragma unroll
            for (int u = 0; u < FW_KT * CH / FW_THREADS; u++) {
                int key = k0 + j0 + 16 * u;  // row j0 + 16u: the same swizzle (16u % 8 == 0)
                unsigned dst = dst0 + (i % FW_STAGES) * STAGE_BYTES + u * 16 * 128;
                bool ok = key < kend;
                u64 src = 0;
                if (ok) {
                    int blk = bs_pow2 ? key >> bs_log2 : key / bs;
                    int off = key - blk * bs;
                    src = (((u64)__ldg(bt + blk) * nkv + kvh) * bs + off) * D + ch * 8;
                }
                cp_async16(dst, a.k_cache + src, ok);
                cp_async16(dst + FW_TILE_BYTES, a.v_cache + src, ok);
            }
        }
        cp_async_commit();
    };
    auto descs = [&](int i) {
        return fw_descs(KV8 ? conv + (i & 1) * 2 * FW_TILE_BYTES : smem + (i % FW_STAGES) * STAGE_BYTES);
    };
    // Tile i landed for every thread (later tiles may be in flight), and every warp is past tile
    // i - 2, whose stage the load of tile i + FW_AHEAD then takes (FP8: and whose BF16 pair tile
    // i's conversion takes).
    auto landed = [&](int i) {
        if (tma) {
            mbar_wait(bars + 8 * (i % FW_STAGES), (i / FW_STAGES) & 1);
        } else {
            cp_async_wait<FW_AHEAD - 1>();
            fence_proxy_async();
        }
        __syncthreads();
        if (KV8) {
            fw_kv8_convert<FW_THREADS>(conv + (i & 1) * 2 * FW_TILE_BYTES, smem + (i % FW_STAGES) * STAGE_BYTES, tid);
            fence_proxy_async();  // the conversions (generic proxy) before wgmma's reads
            __syncthreads();
        }
        load(i + FW_AHEAD);
    };

    FwAnyTurn any;
    for (int i = 0; i < FW_AHEAD; i++) load(i);
    fw_mainloop<PM, KV8>(o, l, qf, it, pos0, pos1, c, t, landed, descs, [](int) {}, any);
    cp_async_wait<0>();
    fw_store<KV8>(a, it, o, l, r0, r1, t);
}

// Shared memory: FW_STAGES stages of a K and a V tile (16 KB each), their mbarriers. One block
// per SM.
// The last parameter: the K and V pools' tensor maps (2 x 128 bytes, global memory), or null
// (cp.async for every tile).
extern "C" __global__ void __launch_bounds__(FW_THREADS, 1)
    flash_prefill_wgmma_hd128(FLASH_PARAMS, const void* tensor_maps) {
    flash_prefill_wgmma_t<P_HILO, false>(FlashTmaArgs{FLASH_ARGS, tensor_maps});
}
extern "C" __global__ void __launch_bounds__(FW_THREADS, 1)
    flash_prefill_wgmma_bf16p_hd128(FLASH_PARAMS, const void* tensor_maps) {
    flash_prefill_wgmma_t<P_BF16, false>(FlashTmaArgs{FLASH_ARGS, tensor_maps});
}
// FP8 (e4m3) pools, P as hi + lo (as flash_attention_hilo_kv8); tensor maps of the code pools
// (boxes of 64 rows x 128 codes), or null. Shared memory: 5 stages of 16 KB, two BF16 tile pairs
// (64 KB), the mbarriers.
extern "C" __global__ void __launch_bounds__(FW_THREADS, 1)
    flash_prefill_wgmma_kv8_hd128(FLASH_PARAMS, const void* tensor_maps) {
    flash_prefill_wgmma_t<P_HILO, true>(FlashTmaArgs{FLASH_ARGS, tensor_maps});
}
