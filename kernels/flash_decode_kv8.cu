// The decode kernel for FP8 (e4m3) KV pools (`--kv-cache-dtype fp8`), appended to flash_decode.cu
// (same work items, warps, rings of 3 slots and merge; 5 slots measured no faster). Each warp's
// ring slots hold 16 raw key rows (D codes, padded by 16 bytes so ldmatrix is free of bank
// conflicts), read straight into MMA fragments:
// - Q K^T in F16: ldmatrix of code pairs gives thread (g, t) codes 4t..4t+3 of key g in a 16-dim
//   group, converted to two F16x2 as the k-step's b0 (dims 4t, 4t+1) and b1 (4t+2, 4t+3). The dot
//   product is the same sum in another order of dims, so Q's fragments take the same order (Q is
//   staged once as F16: exact for BF16 values within F16's range).
// - P V in F16 with P as hi + lo (~22 bits; P rounded to F16 alone was 5% faster, but the FP8
//   test model's decode then left its fresh prefill by up to 7e-2, with hi + lo by nothing):
//   transposed ldmatrix gives keys 2t, 2t+1 of dims 2g, 2g+1;
//   a byte permute splits them into the fragments of even dims and of odd dims (two MMAs), so
//   o[2j] holds dims 16j + 4t, + 2 and o[2j + 1] dims 16j + 4t + 1, + 3.
// k_scale folds into the score scale, v_scale into the merged output: codes are used as they are.

template <int D>
__device__ __forceinline__ void flash_decode_kv8_body(const FlashArgs& a) {
    constexpr int RSTR = D + 16;           // bytes per raw key row in a slot
    constexpr int SLOT = FD_KEYS * RSTR;   // bytes per slot
    constexpr int QSTR = D + 8;            // F16 elements per staged Q row
    constexpr int DN = D / 8;
    constexpr int CH8 = D / 16;            // 16-code chunks per key row
    extern __shared__ __align__(16) unsigned char fa_smem[];
    int tile = blockIdx.x, kvh = blockIdx.y, tid = threadIdx.x;
    int warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    fp8* ring = (fp8*)fa_smem + warp * FD_SLOTS * SLOT;
    unsigned short* Qs = (unsigned short*)(fa_smem + FA_WARPS * FD_SLOTS * SLOT);  // [8][QSTR] F16
    int G = a.num_q_heads / a.num_kv_heads;
    int seq = a.tile_seq[tile], q0 = a.tile_q_start[tile];
    if (seq < 0) return;  // padding: decode plans round their work items up (graph keys)
    int kbeg = a.tile_kbeg[tile];
    int kend = min(a.positions[q0] + 1, a.tile_kend[tile]);
    int steps = kend > kbeg ? (kend - kbeg + FD_KEYS - 1) / FD_KEYS : 0;
    int per = (steps + FA_WARPS - 1) / FA_WARPS;
    int wbeg = kbeg + warp * per * FD_KEYS;
    int wend = min(kend, wbeg + per * FD_KEYS);
    int nsteps = wend > wbeg ? (wend - wbeg + FD_KEYS - 1) / FD_KEYS : 0;

    // Q rows (the G heads, zero up to 8) as F16.
    for (int idx = tid; idx < 8 * (D / 8); idx += FA_WARPS * 32) {
        int r = idx / (D / 8), ch = idx % (D / 8);
        uint4 x = make_uint4(0, 0, 0, 0);
        if (r < G) x = *(const uint4*)(a.qkv + (u64)q0 * a.row_stride + (kvh * G + r) * D + ch * 8);
        *(uint4*)(Qs + r * QSTR + ch * 8) =
            make_uint4(bf16x2_to_f16x2(x.x), bf16x2_to_f16x2(x.y), bf16x2_to_f16x2(x.z), bf16x2_to_f16x2(x.w));
    }
    __syncthreads();

    float o[DN][4];
#pragma unroll
    for (int n = 0; n < DN; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m0 = NEG_INF, l0 = 0.0f;
    float c = a.scale * a.k_scale * FA_LOG2E;
    const int* bt = a.block_tables + a.block_table_start[seq];
    int bs = a.block_size, nkv = a.num_kv_heads;
    const fp8 *kc = (const fp8*)a.k_cache, *vc = (const fp8*)a.v_cache;

    // Half-step h: K (even h) or V (odd h) codes of 16-key step h / 2, into slot h % FD_SLOTS.
    auto issue = [&](int h) {
        if (h < 2 * nsteps) {
            const fp8* cache = (h & 1) ? vc : kc;
            int k0 = wbeg + (h >> 1) * FD_KEYS;
            fp8* dst = ring + (h % FD_SLOTS) * SLOT;
            // Steps start at multiples of 16 keys: with blocks of a multiple of 16 keys, a step's
            // rows are consecutive in one cache block (one table lookup; rows past wend still lie
            // inside the block and are zero-filled).
            const fp8* rows = bs % FD_KEYS == 0 ? cache + (((u64)bt[k0 / bs] * nkv + kvh) * bs + k0 % bs) * D
                                                : nullptr;
#pragma unroll
            for (int u = 0; u < (FD_KEYS * CH8 + 31) / 32; u++) {
                int idx = lane + u * 32;
                if (FD_KEYS * CH8 % 32 == 0 || idx < FD_KEYS * CH8) {
                    int j = idx / CH8, ch = idx % CH8, key = k0 + j;
                    bool ok = key < wend;
                    const fp8* src = cache;
                    if (rows)
                        src = rows + idx * 16;
                    else if (ok)
                        src = cache + (((u64)bt[key / bs] * nkv + kvh) * bs + key % bs) * D + ch * 16;
                    cp_async16(smem_u32(dst + j * RSTR + ch * 16), src, ok);
                }
            }
        }
        cp_async_commit();  // one group per half-step, empty or not, so wait_group counts stay fixed
    };
#pragma unroll
    for (int h = 0; h < FD_SLOTS; h++) issue(h);

    int mi = lane >> 3, rr = lane & 7;
    const unsigned short* qrow = Qs + g * QSTR + 4 * t;
    for (int st = 0; st < nsteps; st++) {
        int k0 = wbeg + st * FD_KEYS, h = 2 * st;
        float p[2][2];  // this thread's probabilities: keys n * 8 + 2t (+1), head g
        {  // K of the step: scores and the online softmax
            cp_async_wait<FD_SLOTS - 1>();
            __syncwarp();
            const fp8* buf = ring + (h % FD_SLOTS) * SLOT;
            float sc[2][4];
#pragma unroll
            for (int n = 0; n < 2; n++) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.0f;
            // x4: keys +0..7 / +8..15 (matrix bit 0) x dims +0..15 / +16..31 (matrix bit 1).
            unsigned base = smem_u32(buf + ((mi & 1) * 8 + rr) * RSTR + (mi >> 1) * 16);
#pragma unroll
            for (int j = 0; j < D / 32; j++) {
                unsigned r0, r1, r2, r3;
                ldsm4(base + j * 32, r0, r1, r2, r3);
#pragma unroll
                for (int half = 0; half < 2; half++) {
                    uint2 q = *(const uint2*)(qrow + j * 32 + half * 16);
                    unsigned qa[4] = {q.x, 0u, q.y, 0u};
                    unsigned k_lo = half ? r2 : r0, k_hi = half ? r3 : r1;  // keys 0..7, 8..15
                    mma_f16(sc[0], qa, e4m3x2_to_f16x2(k_lo), e4m3x2_to_f16x2(k_lo >> 16));
                    mma_f16(sc[1], qa, e4m3x2_to_f16x2(k_hi), e4m3x2_to_f16x2(k_hi >> 16));
                }
            }
            if constexpr (D % 32 == 16) {  // the last 16 dims: keys 0..7 and 8..15 only
                unsigned r0, r1;
                ldsm2(base + (D / 32) * 32, r0, r1);
                uint2 q = *(const uint2*)(qrow + (D / 32) * 32);
                unsigned qa[4] = {q.x, 0u, q.y, 0u};
                mma_f16(sc[0], qa, e4m3x2_to_f16x2(r0), e4m3x2_to_f16x2(r0 >> 16));
                mma_f16(sc[1], qa, e4m3x2_to_f16x2(r1), e4m3x2_to_f16x2(r1 >> 16));
            }
            decode_softmax_step<D>(sc, p, o, m0, l0, k0, wend, c);
            __syncwarp();  // every lane is done with the slot before it is refilled
            issue(h + FD_SLOTS);
        }
        {  // V of the step: O += P V with P = hi + lo (F16)
            cp_async_wait<FD_SLOTS - 1>();
            __syncwarp();
            const fp8* buf = ring + ((h + 1) % FD_SLOTS) * SLOT;
            unsigned ph[4], pl[4];  // rows 8..15 (words 1 and 3) are padding: zero
            split_f16(p[0][0], p[0][1], ph[0], pl[0]);
            split_f16(p[1][0], p[1][1], ph[2], pl[2]);
            ph[1] = ph[3] = pl[1] = pl[3] = 0u;
            // x4 trans: keys +0..7 / +8..15 (matrix bit 0) x dims +0..15 / +16..31 (matrix bit 1).
            unsigned base = smem_u32(buf + ((mi & 1) * 8 + rr) * RSTR + (mi >> 1) * 16);
            // A transposed register holds codes (key 2t: dims 2g, 2g + 1 | key 2t + 1: the same).
            auto mma_dims = [&](int dp, unsigned lo_keys, unsigned hi_keys) {
                unsigned e0 = e4m3x2_to_f16x2(__byte_perm(lo_keys, 0, 0x4420));
                unsigned e1 = e4m3x2_to_f16x2(__byte_perm(hi_keys, 0, 0x4420));
                unsigned d0 = e4m3x2_to_f16x2(__byte_perm(lo_keys, 0, 0x4431));
                unsigned d1 = e4m3x2_to_f16x2(__byte_perm(hi_keys, 0, 0x4431));
                mma_f16(o[2 * dp], ph, e0, e1);
                mma_f16(o[2 * dp + 1], ph, d0, d1);
                mma_f16(o[2 * dp], pl, e0, e1);
                mma_f16(o[2 * dp + 1], pl, d0, d1);
            };
#pragma unroll
            for (int j = 0; j < D / 32; j++) {
                unsigned v0, v1, v2, v3;
                ldsm4_t(base + j * 32, v0, v1, v2, v3);
                mma_dims(2 * j, v0, v1);
                mma_dims(2 * j + 1, v2, v3);
            }
            if constexpr (D % 32 == 16) {
                unsigned v0, v1;
                ldsm2_t(base + (D / 32) * 32, v0, v1);
                mma_dims(D / 16 - 1, v0, v1);
            }
            __syncwarp();
            issue(h + 1 + FD_SLOTS);
        }
    }
    cp_async_wait<0>();
    __syncthreads();

    // o[2j] holds dims 16j + 4t (+2), o[2j + 1] dims 16j + 4t + 1 (+2).
    flash_decode_merge<D>(
        a, o, m0, l0, [](int n, int e) { return (n >> 1) * 16 + 4 * (threadIdx.x & 3) + (n & 1) + 2 * e; },
        a.v_scale);
}

// FP8 KV pools: 4 warps, 4 blocks per SM.
extern "C" __global__ void __launch_bounds__(128, 4) flash_decode_kv8_hd16(FLASH_PARAMS) { pdl_enter(); flash_decode_kv8_body<16>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 4) flash_decode_kv8_hd32(FLASH_PARAMS) { pdl_enter(); flash_decode_kv8_body<32>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 4) flash_decode_kv8_hd48(FLASH_PARAMS) { pdl_enter(); flash_decode_kv8_body<48>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 4) flash_decode_kv8_hd64(FLASH_PARAMS) { pdl_enter(); flash_decode_kv8_body<64>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 4) flash_decode_kv8_hd80(FLASH_PARAMS) { pdl_enter(); flash_decode_kv8_body<80>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 4) flash_decode_kv8_hd96(FLASH_PARAMS) { pdl_enter(); flash_decode_kv8_body<96>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 4) flash_decode_kv8_hd112(FLASH_PARAMS) { pdl_enter(); flash_decode_kv8_body<112>(FLASH_ARGS); }
extern "C" __global__ void __launch_bounds__(128, 4) flash_decode_kv8_hd128(FLASH_PARAMS) { pdl_enter(); flash_decode_kv8_body<128>(FLASH_ARGS); }
