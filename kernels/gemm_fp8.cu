// FP8 products for decode-sized batches: out[m, n] = sx[m] * sw[n] * sum_k xq[m, k] * w[n, k], with
// e4m3 weights w[N, K] (row-major, one f32 scale per output channel) and e4m3 activations xq[M, K]
// (one f32 scale per token).
//
// At M <= 64 the product is bound by reading the weights once, so the kernel streams them: each warp
// owns 16 weight rows (the A operand of mma.m16n8k32 e4m3) and every token tile of 8 (the B operand).
// Each lane reads 16 contiguous bytes of rows g and g+8 per 64-byte k step; the MMA only needs A and B
// to agree on which k sits in which fragment slot, so the same byte order is used for both.
// Weights bypass L1 (read once); activations are read through L1 (shared by the CTA's warps).
// When row tiles alone do not fill the GPU, K is split across CTAs (grid.y): each writes raw partial
// sums and the last CTA of a row block (counted with an atomic, reset after) adds them and scales.

#define GEMM_WARPS 4
#define GEMM_ROWS (16 * GEMM_WARPS)
// 64-byte k steps loaded per batch (per lane: 2 * GEMM_UNROLL 16-byte loads in flight).
#define GEMM_UNROLL 4
#define GEMM_KSTEP (64 * GEMM_UNROLL)

struct u32x4 {
    unsigned x, y, z, w;
};

__device__ __forceinline__ u32x4 ld_weights(const fp8* p) {
    u32x4 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

__device__ __forceinline__ u32x4 ld_acts(const fp8* p) {
    u32x4 v;
    asm("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ void mma_e4m3(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                         unsigned b1) {
    asm("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void store_out(float* out, u64 i, float v) { out[i] = v; }
__device__ __forceinline__ void store_out(bf16* out, u64 i, float v) { out[i] = f2bf(v); }

// Weights of k step [kb, kb + GEMM_KSTEP) for rows lo and hi; zeros past k1.
__device__ __forceinline__ void load_step(u32x4* lo, u32x4* hi, const fp8* w_lo, const fp8* w_hi, int kb, int k1,
                                          int t) {
#pragma unroll
    for (int u = 0; u < GEMM_UNROLL; u++) {
        int k = kb + u * 64 + t * 16;
        if (k < k1) {
            lo[u] = ld_weights(w_lo + k);
            hi[u] = ld_weights(w_hi + k);
        } else {
            lo[u] = u32x4{0, 0, 0, 0};
            hi[u] = u32x4{0, 0, 0, 0};
        }
    }
}

// MT token tiles of 8 (M <= 8 * MT). Grid (ceil(N / GEMM_ROWS), splits), GEMM_WARPS warps.
// `partial` [splits, M, N] f32 and `counters` [grid.x] (zero) are used only when splits > 1.
template <int MT, typename O>
__device__ void gemm_fp8_stream_t(O* out, float* partial, int* counters, const fp8* x, const float* sx, const fp8* w,
                                  const float* sw, int M, int N, int K, int k_per_split) {
    __shared__ int last;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int g = lane >> 2, t = lane & 3;
    int row0 = blockIdx.x * GEMM_ROWS + warp * 16;
    int splits = gridDim.y;
    int k0 = blockIdx.y * k_per_split, k1 = min(K, k0 + k_per_split);
    int r_lo = row0 + g, r_hi = row0 + g + 8;
    // Rows past N read row N-1 (valid memory) and are never stored.
    const fp8* w_lo = w + (u64)min(r_lo, N - 1) * K;
    const fp8* w_hi = w + (u64)min(r_hi, N - 1) * K;
    const fp8* xr[MT];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) xr[mt] = x + (u64)min(mt * 8 + g, M - 1) * K;
    float acc[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) acc[mt][0] = acc[mt][1] = acc[mt][2] = acc[mt][3] = 0.0f;

    // The weights do not depend on the previous kernel: load the first step, then wait for it (PDL;
    // see pdl_enter).
    u32x4 lo[GEMM_UNROLL], hi[GEMM_UNROLL];
    load_step(lo, hi, w_lo, w_hi, k0, k1, t);
    pdl_enter();
    for (int kb = k0; kb < k1; kb += GEMM_KSTEP) {
        u32x4 nlo[GEMM_UNROLL], nhi[GEMM_UNROLL];
        load_step(nlo, nhi, w_lo, w_hi, kb + GEMM_KSTEP, k1, t);
#pragma unroll
        for (int u = 0; u < GEMM_UNROLL; u++) {
            int k = kb + u * 64 + t * 16;
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                u32x4 b = k < k1 ? ld_acts(xr[mt] + k) : u32x4{0, 0, 0, 0};
                mma_e4m3(acc[mt], lo[u].x, hi[u].x, lo[u].y, hi[u].y, b.x, b.y);
                mma_e4m3(acc[mt], lo[u].z, hi[u].z, lo[u].w, hi[u].w, b.z, b.w);
            }
        }
#pragma unroll
        for (int u = 0; u < GEMM_UNROLL; u++) {
            lo[u] = nlo[u];
            hi[u] = nhi[u];
        }
    }

    // Accumulator fragment: acc[mt][j] is row (j < 2 ? r_lo : r_hi), token mt * 8 + 2t + (j & 1).
    if (splits == 1) {
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int j = 0; j < 4; j++) {
                int tok = mt * 8 + 2 * t + (j & 1), row = j < 2 ? r_lo : r_hi;
                if (tok < M && row < N) store_out(out, (u64)tok * N + row, acc[mt][j] * sx[tok] * sw[row]);
            }
        return;
    }
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int tok = mt * 8 + 2 * t + (j & 1), row = j < 2 ? r_lo : r_hi;
            if (tok < M && row < N) partial[((u64)blockIdx.y * M + tok) * N + row] = acc[mt][j];
        }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(&counters[blockIdx.x], 1) == splits - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    int rb = blockIdx.x * GEMM_ROWS;
    for (int i = threadIdx.x; i < M * GEMM_ROWS; i += blockDim.x) {
        int tok = i / GEMM_ROWS, row = rb + i % GEMM_ROWS;
        if (row >= N) continue;
        float s = 0.0f;
        for (int p = 0; p < splits; p++) s += __ldcg(&partial[((u64)p * M + tok) * N + row]);
        store_out(out, (u64)tok * N + row, s * sx[tok] * sw[row]);
    }
    if (threadIdx.x == 0) counters[blockIdx.x] = 0;
}

#define GEMM_FP8_STREAM(MT, O, SUFFIX)                                                                          \
    extern "C" __global__ void __launch_bounds__(GEMM_WARPS * 32)                                              \
        gemm_fp8_stream_t##MT##_##SUFFIX(O* out, float* partial, int* counters, const fp8* x, const float* sx, \
                                         const fp8* w, const float* sw, int M, int N, int K, int k_per_split) { \
        gemm_fp8_stream_t<MT, O>(out, partial, counters, x, sx, w, sw, M, N, K, k_per_split);                 \
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
