// FP8 products for decode-sized batches: out[m, n] = sx[m] * sw[n] * sum_k xq[m, k] * w[n, k], with
// e4m3 weights w[N, K] (row-major, one f32 scale per output channel) and e4m3 activations xq[M, K]
// (one f32 scale per token). At M <= 64 the product is bound by reading the weights once, so
// gemm_fp8_stream_t streams them with TMA (kernels/tma.cuh is prepended):
//
// The weights are cut into tiles of 64 rows and chunks of 512 k bytes; the chunks, tile by tile,
// are split evenly between the CTAs (one per SM: "stream-K"), so every SM streams the same number
// of bytes whatever the shape. A producer warp loads each chunk by TMA into a ring of stages: the
// weights as 4 boxes of 64 rows x 128 bytes, the activations' same k range as 4 boxes of 8 * MT
// tokens x 128 bytes, both with the 128-byte swizzle and zeros past N, M and K. It issues the
// first stages' weights before the PDL wait (they do not depend on the previous kernel), their
// activations after it. Four consumer warps take 16 rows each and read both operands' MMA
// fragments (mma.m16n8k32: weights as A, tokens as B) with ldmatrix, conflict-free: the 8 rows of
// a matrix sit in 8 different 16-byte slots of the swizzle.
// A tile's chunks split between CTAs leave partial sums (a slot per CTA for its first and for its
// last tile); the last CTA to finish the tile (counted with an atomic, reset after) adds them in
// CTA order. The sums of a token therefore do not depend on the other tokens of the batch.
//
// On an H200 (70B shapes, M = 1; cuBLASLt without scales in brackets): qkv 26.9 us (28.5), o 23.2
// (22.4), gate_up 120.5 (112.4), down 62.1 (60.7). Inside the decode step each launch took about
// 5 us more than alone and the step 1.9 ms more than with cuBLASLt, so it is off by default
// (Fp8Policy in src/backend/cuda/gemm.rs).

__device__ __forceinline__ void mma_e4m3(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                         unsigned b1) {
    asm("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void store_out(float* out, u64 i, float v) { out[i] = v; }
__device__ __forceinline__ void store_out(bf16* out, u64 i, float v) { out[i] = f2bf(v); }

#define TG_ROWS 64
#define TG_BOX_K 128
#define TG_BOXES 4
#define TG_CHUNK_K (TG_BOX_K * TG_BOXES)
#define TG_W_BYTES (TG_ROWS * TG_CHUNK_K)  // one chunk of weights: 32 KB
#define TG_RING_BYTES (192 * 1024)         // the stages share this much shared memory
#define TG_CONSUMERS 4
#define TG_THREADS (32 * (TG_CONSUMERS + 1))
// Floats of one partial tile: 64 rows x 64 tokens.
#define TG_SLOT (TG_ROWS * 64)

// A CUtensorMap (opaque, 128 bytes, 64-byte aligned), passed by value.
struct __align__(64) TmaMap {
    u64 words[16];
};

__device__ __forceinline__ void ldsm_x4(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3, unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

// Row r's 16-byte slot c of a 128-byte-swizzled box (rows of 128 bytes, 1024-byte aligned).
__device__ __forceinline__ unsigned swz(unsigned box, int r, int c) { return box + r * 128 + ((c ^ (r & 7)) << 4); }

// First chunk of CTA b (G CTAs share `total` chunks), and the CTA whose range holds chunk c.
__device__ __forceinline__ long long tg_start(int b, long long total, int G) { return total * b / G; }
__device__ __forceinline__ int tg_owner(long long c, long long total, int G) {
    return (int)(((c + 1) * G - 1) / total);
}

// MT token tiles of 8 (M <= 8 * MT). Grid: G CTAs of TG_THREADS threads (G at most the number of
// chunks, so that every CTA has one).
// `partial` holds 2 * G slots of TG_SLOT floats, `counters` one zero int per row tile.
template <int MT, typename O>
__device__ void gemm_fp8_stream_t(const TmaMap& wmap, const TmaMap& xmap, O* out, float* partial, int* counters,
                               const float* sx, const float* sw, int M, int N, int K) {
    constexpr int X_BOX = 8 * MT * TG_BOX_K, STAGE = TG_W_BYTES + TG_BOXES * X_BOX;
    constexpr int STAGES = TG_RING_BYTES / STAGE;  // 5, 4, 4, 3 for MT = 1, 2, 4, 8
    extern __shared__ __align__(128) unsigned char tg_smem[];
    unsigned raw = smem_u32(tg_smem), base = (raw + 1023) & ~1023u;  // the swizzle's 1024-byte atoms
    unsigned full = base + STAGES * STAGE, empty = full + 8 * STAGES;
    volatile int* last_flag = (volatile int*)(tg_smem + (empty + 8 * STAGES - raw));
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int cpt = (K + TG_CHUNK_K - 1) / TG_CHUNK_K, tiles = (N + TG_ROWS - 1) / TG_ROWS;
    long long total = (long long)tiles * cpt;
    int G = gridDim.x, b = blockIdx.x;
    long long c0 = tg_start(b, total, G), c1 = tg_start(b + 1, total, G);
    int n = (int)(c1 - c0);
    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; s++) {
            mbar_init(full + 8 * s, 1);
            mbar_init(empty + 8 * s, TG_CONSUMERS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();

    if (warp == TG_CONSUMERS) {
        // The producer: chunk i into stage i % STAGES once the consumers are done with chunk
        // i - STAGES. The barrier expects the weights and the activations.
        auto load_w = [&](int i) {
            long long c = c0 + i;
            int s = i % STAGES, tile = (int)(c / cpt), kc = (int)(c % cpt);
            unsigned bar = full + 8 * s, dst = base + s * STAGE;
            mbar_expect_tx(bar, STAGE);
#pragma unroll
            for (int bx = 0; bx < TG_BOXES; bx++)
                tma_load_2d(dst + bx * TG_ROWS * TG_BOX_K, &wmap, kc * TG_CHUNK_K + bx * TG_BOX_K, tile * TG_ROWS,
                            bar);
        };
        auto load_x = [&](int i) {
            int s = i % STAGES, kc = (int)((c0 + i) % cpt);
            unsigned dst = base + s * STAGE + TG_W_BYTES;
#pragma unroll
            for (int bx = 0; bx < TG_BOXES; bx++)
                tma_load_2d(dst + bx * X_BOX, &xmap, kc * TG_CHUNK_K + bx * TG_BOX_K, 0, full + 8 * s);
        };
        int ahead = min(n, STAGES);
        if (lane == 0)
            for (int i = 0; i < ahead; i++) load_w(i);
        pdl_enter();
        if (lane == 0) {
            for (int i = 0; i < ahead; i++) load_x(i);
            for (int i = STAGES; i < n; i++) {
                mbar_wait(empty + 8 * (i % STAGES), (i / STAGES - 1) & 1);
                load_w(i);
                load_x(i);
            }
        }
        return;
    }

    pdl_enter();
    int g = lane >> 2, t = lane & 3;
    // Two accumulators (even and odd 32-byte steps), so consecutive MMAs do not wait on each other.
    float acc[MT][4], acc2[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[mt][j] = acc2[mt][j] = 0.0f;
    // ldmatrix.x4 of weights: lanes 8j..8j+7 address matrix j's rows: rows 0-7 / 8-15 of the
    // warp's 16 (j & 1), k bytes 0-15 / 16-31 of the 32-byte step (j >> 1): a0..a3 of the MMA.
    // Of activations: tokens 0-7 of a tile, k bytes 16j..16j+15 of two steps: b0, b1 of each.
    int wrow = warp * 16 + ((lane >> 3) & 1) * 8 + (lane & 7), wslot = lane >> 4;
    int xrow = lane & 7, xslot = lane >> 3;
    int seg_first = (int)(c0 % cpt);  // the first chunk of the current tile this CTA has
    for (int i = 0; i < n; i++) {
        long long c = c0 + i;
        int s = i % STAGES, tile = (int)(c / cpt), kc = (int)(c % cpt);
        mbar_wait(full + 8 * s, (i / STAGES) & 1);
        unsigned wst = base + s * STAGE, xst = wst + TG_W_BYTES;
#pragma unroll
        for (int bx = 0; bx < TG_BOXES; bx++)
#pragma unroll
            for (int ks = 0; ks < TG_BOX_K / 32; ks += 2) {
                unsigned a[4], a2[4];
                unsigned wbox = wst + bx * TG_ROWS * TG_BOX_K;
                ldsm_x4(a[0], a[1], a[2], a[3], swz(wbox, wrow, 2 * ks + wslot));
                ldsm_x4(a2[0], a2[1], a2[2], a2[3], swz(wbox, wrow, 2 * ks + 2 + wslot));
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    unsigned b0, b1, b2, b3;
                    ldsm_x4(b0, b1, b2, b3, swz(xst + bx * X_BOX, mt * 8 + xrow, 2 * ks + xslot));
                    mma_e4m3(acc[mt], a[0], a[1], a[2], a[3], b0, b1);
                    mma_e4m3(acc2[mt], a2[0], a2[1], a2[2], a2[3], b2, b3);
                }
            }
        __syncwarp();
        if (lane == 0) mbar_arrive(empty + 8 * s);
        if (kc != cpt - 1 && i != n - 1) continue;

        // End of this CTA's part of the tile. acc[mt][j]: row g (+8 for j >= 2) of the warp's 16,
        // token mt * 8 + 2t + (j & 1).
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int j = 0; j < 4; j++) {
                acc[mt][j] += acc2[mt][j];
                acc2[mt][j] = 0.0f;
            }
        bool whole = seg_first == 0 && kc == cpt - 1;
        seg_first = 0;
        int r_lo = warp * 16 + g;
        if (whole) {
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    int tok = mt * 8 + 2 * t + (j & 1), row = tile * TG_ROWS + r_lo + (j >= 2 ? 8 : 0);
                    if (tok < M && row < N) store_out(out, (u64)tok * N + row, acc[mt][j] * sx[tok] * sw[row]);
                    acc[mt][j] = 0.0f;
                }
            continue;
        }
        float* mine = partial + (u64)(b * 2 + (tile == (int)(c0 / cpt) ? 0 : 1)) * TG_SLOT;
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int j = 0; j < 4; j++) {
                mine[(r_lo + (j >= 2 ? 8 : 0)) * 64 + mt * 8 + 2 * t + (j & 1)] = acc[mt][j];
                acc[mt][j] = 0.0f;
            }
        int first = tg_owner((long long)tile * cpt, total, G);
        int last = tg_owner((long long)tile * cpt + cpt - 1, total, G);
        __threadfence();
        asm volatile("bar.sync 1, %0;" ::"n"(TG_CONSUMERS * 32) : "memory");
        if (threadIdx.x == 0) *last_flag = atomicAdd(&counters[tile], 1) == last - first;
        asm volatile("bar.sync 1, %0;" ::"n"(TG_CONSUMERS * 32) : "memory");
        if (!*last_flag) continue;
        __threadfence();
        for (int idx = threadIdx.x; idx < TG_ROWS * M; idx += TG_CONSUMERS * 32) {
            int r = idx % TG_ROWS, tok = idx / TG_ROWS, row = tile * TG_ROWS + r;
            if (row >= N) continue;
            float sum = 0.0f;
            for (int q = first; q <= last; q++) {
                int slot = tile == (int)(tg_start(q, total, G) / cpt) ? 0 : 1;
                sum += __ldcg(partial + (u64)(q * 2 + slot) * TG_SLOT + r * 64 + tok);
            }
            store_out(out, (u64)tok * N + row, sum * sx[tok] * sw[row]);
        }
        if (threadIdx.x == 0) counters[tile] = 0;
    }
}

#define GEMM_FP8_STREAM(MT, O, SUFFIX)                                                                              \
    extern "C" __global__ void __launch_bounds__(TG_THREADS, 1)                                                  \
        gemm_fp8_stream_t##MT##_##SUFFIX(const __grid_constant__ TmaMap wmap, const __grid_constant__ TmaMap xmap, \
                                      O* out, float* partial, int* counters, const float* sx, const float* sw,    \
                                      int M, int N, int K) {                                                      \
        gemm_fp8_stream_t<MT, O>(wmap, xmap, out, partial, counters, sx, sw, M, N, K);                              \
    }

GEMM_FP8_STREAM(1, bf16, bf16)
GEMM_FP8_STREAM(2, bf16, bf16)
GEMM_FP8_STREAM(4, bf16, bf16)
GEMM_FP8_STREAM(8, bf16, bf16)
GEMM_FP8_STREAM(1, float, f32)
GEMM_FP8_STREAM(2, float, f32)
GEMM_FP8_STREAM(4, float, f32)
GEMM_FP8_STREAM(8, float, f32)

// Epilogue of an unscaled product: out[m, n] = acc[m, n] * sx[m] * sw[n]. Grid (M, ceil(N / (4 *
// blockDim.x))): each block scales 4 * blockDim.x columns of one row.
extern "C" __global__ void scale_rows_cols_bf16(bf16* out, const float* acc, const float* sx, const float* sw, int N) {
    pdl_enter();
    int m = blockIdx.x;
    float s = sx[m];
    for (int n = blockIdx.y * blockDim.x * 4 + threadIdx.x; n < N && n < (blockIdx.y + 1) * blockDim.x * 4;
         n += blockDim.x)
        out[(u64)m * N + n] = f2bf(acc[(u64)m * N + n] * s * sw[n]);
}
