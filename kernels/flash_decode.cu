// Tensor-core decode attention (flash_common.cuh is prepended). Pure decode steps (every work item has one query token; G <= 8 heads per kv head, the top half of a
// 16-row MMA tile whose bottom half is zero registers): one block of 4 warps per (item, kv head),
// each warp owning a contiguous quarter of the item's keys and streaming it through its own ring
// of 3 shared-memory slots of 16 key rows (K and V of a 16-key step take one slot each, so 2-3
// slots, 8-13 KB, are in flight per warp) with warp-only syncs. 54 KB of shared memory
// (head_dim 128) and 125 registers: 4 blocks (16 independent pipelines) per SM. The warps' states
// are merged in shared memory at the end as in flash_attention.cu's flash_body. P keeps the hi+lo BF16 split, so
// decode agrees with the prefill kernel to F32-like accuracy.
#define FD_SLOTS 3
#define FD_KEYS 16

// The end of a decode block: each warp's unnormalized rows (o, with its max m0 and partial sum l0)
// go to shared memory, reusing the rings, at the columns col(n, e) gives for o[n][e]; then all
// threads merge the 4 warps' states and write the item's row (or its split part). The output
// is scaled by out_scale (an FP8 pool's v scale).
template <int D, typename Col>
__device__ __forceinline__ void flash_decode_merge(const FlashArgs& a, float (&o)[D / 8][4], float m0, float l0,
                                                   Col col, float out_scale) {
    constexpr int DN = D / 8;
    constexpr int OSTR = D + 4;
    extern __shared__ __align__(16) unsigned char fa_smem[];
    int tile = blockIdx.x, kvh = blockIdx.y, tid = threadIdx.x;
    int warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    int G = a.num_q_heads / a.num_kv_heads;
    int q0 = a.tile_q_start[tile];
    float* Os = (float*)fa_smem;           // [4 warps][8][OSTR]
    float* ML = Os + FA_WARPS * 8 * OSTR;  // [4 warps][8][2]
#pragma unroll
    for (int x = 1; x <= 2; x <<= 1) l0 += __shfl_xor_sync(0xffffffffu, l0, x);
    {
        float* row0 = Os + (warp * 8 + g) * OSTR;  // rows 8..15 are padding
#pragma unroll
        for (int n = 0; n < DN; n++) {
            row0[col(n, 0)] = o[n][0];
            row0[col(n, 1)] = o[n][1];
        }
        if (t == 0) {
            ML[(warp * 8 + g) * 2] = m0;
            ML[(warp * 8 + g) * 2 + 1] = l0;
        }
    }
    __syncthreads();
    int part = a.tile_part[tile];
    for (int idx = tid; idx < G * D; idx += FA_WARPS * 32) {
        int r = idx / D, d = idx % D;
        float M = NEG_INF;
#pragma unroll
        for (int w = 0; w < FA_WARPS; w++) M = fmaxf(M, ML[(w * 8 + r) * 2]);
        float base = M == NEG_INF ? 0.0f : M;
        float L = 0.0f, acc = 0.0f;
#pragma unroll
        for (int w = 0; w < FA_WARPS; w++) {
            float sc = ex2(ML[(w * 8 + r) * 2] - base);  // 0 for a warp without keys (m = -inf)
            L += ML[(w * 8 + r) * 2 + 1] * sc;
            acc += Os[(w * 8 + r) * OSTR + d] * sc;
        }
        acc *= out_scale;
        if (part >= 0) {
            u64 row = ((u64)part * a.num_kv_heads + kvh) * G + r;
            if (d == 0) {
                a.part_ml[2 * row] = M * FA_LN2;
                a.part_ml[2 * row + 1] = L;
            }
            a.part_acc[row * D + d] = acc;
        } else {
            a.out[(u64)q0 * a.num_q_heads * D + (kvh * G + r) * D + d] = f2bf(acc / L);
        }
    }
}

// One 16-key step's online softmax for a decode warp: the scores sc (keys n * 8 + 2t + e of head g,
// unscaled) times c, masked past wend, become the probabilities p; the running
// max m0, partial row sum l0 and the accumulator o are rescaled to the new max.
template <int D>
__device__ __forceinline__ void decode_softmax_step(const float (&sc)[2][4], float (&p)[2][2], float (&o)[D / 8][4],
                                                    float& m0, float& l0, int k0, int wend, float c) {
    int t = threadIdx.x & 3;
    float mx = NEG_INF;
#pragma unroll
    for (int n = 0; n < 2; n++) {
#pragma unroll
        for (int e = 0; e < 2; e++) {
            int key = k0 + n * 8 + 2 * t + e;
            p[n][e] = key < wend ? sc[n][e] * c : NEG_INF;
            mx = fmaxf(mx, p[n][e]);
        }
    }
#pragma unroll
    for (int x = 1; x <= 2; x <<= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, x));
    // Every step has a valid key (k0 < wend), so the new maximum is finite.
    float mn = fmaxf(m0, mx);
    float corr = ex2(m0 - mn);
    m0 = mn;
    float ps = 0.0f;
#pragma unroll
    for (int n = 0; n < 2; n++) {
        p[n][0] = ex2(p[n][0] - mn);
        p[n][1] = ex2(p[n][1] - mn);
        ps += p[n][0] + p[n][1];
    }
    l0 = l0 * corr + ps;  // per-thread partial row sum; the quad is summed at the end
#pragma unroll
    for (int n = 0; n < D / 8; n++) {
        o[n][0] *= corr;
        o[n][1] *= corr;
    }
}

template <int D>
__device__ __forceinline__ void flash_decode_body(const FlashArgs& a) {
    constexpr int STR = D + 8;
    constexpr int DK = D / 16;
    constexpr int DN = D / 8;
    constexpr int CH = D / 8;        // 16-byte chunks per key row
    constexpr int SLOT = FD_KEYS * STR;  // BF16 elements per slot
    extern __shared__ __align__(16) unsigned char fa_smem[];
    int tile = blockIdx.x, kvh = blockIdx.y, tid = threadIdx.x;
    int warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    bf16* ring = (bf16*)fa_smem + warp * FD_SLOTS * SLOT;
    int G = a.num_q_heads / a.num_kv_heads;
    int seq = a.tile_seq[tile], q0 = a.tile_q_start[tile];
    if (seq < 0) return;  // padding: decode plans round their work items up (graph keys)
    int kbeg = a.tile_kbeg[tile];
    int kend = min(a.positions[q0] + 1, a.tile_kend[tile]);
    // This warp's keys [wbeg, wend): quarters in whole 16-key steps.
    int steps = kend > kbeg ? (kend - kbeg + FD_KEYS - 1) / FD_KEYS : 0;
    int per = (steps + FA_WARPS - 1) / FA_WARPS;
    int wbeg = kbeg + warp * per * FD_KEYS;
    int wend = min(kend, wbeg + per * FD_KEYS);
    int nsteps = wend > wbeg ? (wend - wbeg + FD_KEYS - 1) / FD_KEYS : 0;

    // Q (rows = the G heads, zero up to 8) in shared memory after the rings; read per k-step with
    // ldmatrix (rows 8..15 of the MMA tile are zero registers), which keeps the kernel under 128
    // registers.
    bf16* Qs = (bf16*)fa_smem + FA_WARPS * FD_SLOTS * SLOT;  // [8][STR]
    for (int idx = tid; idx < 8 * CH; idx += FA_WARPS * 32) {
        int r = idx / CH, ch = idx % CH;
        bool ok = r < G;
        u64 src = ok ? (u64)q0 * a.row_stride + (kvh * G + r) * D + ch * 8 : 0;
        cp_async16(smem_u32(Qs + r * STR + ch * 8), a.qkv + src, ok);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    unsigned qbase = smem_u32(Qs + (lane & 7) * STR + ((lane >> 3) & 1) * 8);
    float o[DN][4];
#pragma unroll
    for (int n = 0; n < DN; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m0 = NEG_INF, l0 = 0.0f;
    float c = a.scale * FA_LOG2E;
    const int* bt = a.block_tables + a.block_table_start[seq];
    int bs = a.block_size, nkv = a.num_kv_heads;

    // Half-step h: K (even h) or V (odd h) of 16-key step h / 2, into slot h % FD_SLOTS.
    auto issue = [&](int h) {
        if (h < 2 * nsteps) {
            const bf16* cache = (h & 1) ? a.v_cache : a.k_cache;
            int k0 = wbeg + (h >> 1) * FD_KEYS;
            bf16* dst = ring + (h % FD_SLOTS) * SLOT;
            if (bs % FD_KEYS == 0) {
                // Steps start at multiples of 16 keys, so the step's keys are consecutive rows of one
                // cache block: one table lookup, then consecutive 16-byte chunks (keys past wend
                // still lie inside the block and are zero-filled).
                const bf16* rows = cache + (((u64)bt[k0 / bs] * nkv + kvh) * bs + k0 % bs) * D;
#pragma unroll
                for (int u = 0; u < FD_KEYS * CH / 32; u++) {
                    int idx = lane + u * 32;
                    int j = idx / CH, ch = idx % CH;
                    cp_async16(smem_u32(dst + j * STR + ch * 8), rows + idx * 8, k0 + j < wend);
                }
            } else {
#pragma unroll
                for (int u = 0; u < FD_KEYS * CH / 32; u++) {
                    int idx = lane + u * 32;
                    int j = idx / CH, ch = idx % CH, key = k0 + j;
                    bool ok = key < wend;
                    u64 src = 0;
                    if (ok) src = (((u64)bt[key / bs] * nkv + kvh) * bs + key % bs) * D + ch * 8;
                    cp_async16(smem_u32(dst + j * STR + ch * 8), cache + src, ok);
                }
            }
        }
        cp_async_commit();  // one group per half-step, empty or not, so wait_group counts stay fixed
    };
#pragma unroll
    for (int h = 0; h < FD_SLOTS; h++) issue(h);

    int mi = lane >> 3, rr = lane & 7;
    for (int st = 0; st < nsteps; st++) {
        int k0 = wbeg + st * FD_KEYS, h = 2 * st;
        float p[2][2];  // this thread's probabilities: keys n * 8 + 2t (+1), head g
        {  // K of the step: scores and the online softmax
            cp_async_wait<FD_SLOTS - 1>();
            __syncwarp();
            const bf16* buf = ring + (h % FD_SLOTS) * SLOT;
            float sc[2][4];
#pragma unroll
            for (int n = 0; n < 2; n++) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.0f;
            unsigned base = smem_u32(buf + ((mi >> 1) * 8 + rr) * STR + (mi & 1) * 8);
#pragma unroll
            for (int kk = 0; kk < DK; kk++) {
                unsigned qa[4], b0, b1, b2, b3;
                ldsm2(qbase + kk * 32, qa[0], qa[2]);
                qa[1] = qa[3] = 0u;
                ldsm4(base + kk * 32, b0, b1, b2, b3);
                mma_bf16(sc[0], qa, b0, b1);
                mma_bf16(sc[1], qa, b2, b3);
            }
            decode_softmax_step<D>(sc, p, o, m0, l0, k0, wend, c);
            __syncwarp();  // every lane is done with the slot before it is refilled
            issue(h + FD_SLOTS);
        }
        {  // V of the step: O += P V with P = hi + lo
            cp_async_wait<FD_SLOTS - 1>();
            __syncwarp();
            const bf16* buf = ring + ((h + 1) % FD_SLOTS) * SLOT;
            unsigned ph[4], pl[4];  // rows 8..15 (words 1 and 3) are padding: zero
            split_bf16(p[0][0], p[0][1], ph[0], pl[0]);
            split_bf16(p[1][0], p[1][1], ph[2], pl[2]);
            ph[1] = ph[3] = pl[1] = pl[3] = 0u;
            unsigned base = smem_u32(buf + ((mi & 1) * 8 + rr) * STR + (mi >> 1) * 8);
#pragma unroll
            for (int dp = 0; dp < D / 16; dp++) {
                unsigned v0, v1, v2, v3;
                ldsm4_t(base + dp * 32, v0, v1, v2, v3);
                mma_bf16(o[2 * dp], ph, v0, v1);
                mma_bf16(o[2 * dp + 1], ph, v2, v3);
                mma_bf16(o[2 * dp], pl, v0, v1);
                mma_bf16(o[2 * dp + 1], pl, v2, v3);
            }
            __syncwarp();
            issue(h + 1 + FD_SLOTS);
        }
    }
    cp_async_wait<0>();
    __syncthreads();

    // Thread (g, t) holds output columns 8n + 2t, 8n + 2t + 1 of row g in o[n][0], o[n][1].
    flash_decode_merge<D>(a, o, m0, l0, [](int n, int e) { return n * 8 + 2 * (threadIdx.x & 3) + e; }, 1.0f);
}

// Decode-only launches (every item one query, G <= 8); 4 warps, 4 blocks per SM.
extern "C" __global__ void __launch_bounds__(128, 4) flash_decode_hd16(FLASH_PARAMS) { pdl_enter(); flash_decode_body<16>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 4) flash_decode_hd32(FLASH_PARAMS) { pdl_enter(); flash_decode_body<32>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 4) flash_decode_hd48(FLASH_PARAMS) { pdl_enter(); flash_decode_body<48>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 4) flash_decode_hd64(FLASH_PARAMS) { pdl_enter(); flash_decode_body<64>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 4) flash_decode_hd80(FLASH_PARAMS) { pdl_enter(); flash_decode_body<80>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 4) flash_decode_hd96(FLASH_PARAMS) { pdl_enter(); flash_decode_body<96>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 4) flash_decode_hd112(FLASH_PARAMS) { pdl_enter(); flash_decode_body<112>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 4) flash_decode_hd128(FLASH_PARAMS) { pdl_enter(); flash_decode_body<128>(FLASH_ARGS); }
