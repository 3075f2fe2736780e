// Per-token kernels of the Llama forward pass. One block per token row unless noted.
// Activations are BF16, the residual stream F32, accumulation F32.

// residual[t, :] = table[tokens[t] - first, :] for tokens in first .. first + count (the rank's
// vocab slice under tensor parallelism, whose all-reduce then sums to the full embedding), else 0.
extern "C" __global__ void embed(float* residual, const bf16* table, const int* tokens, int hidden,
                                 int first, int count) {
    pdl_enter();
    int t = blockIdx.x;
    int local = tokens[t] - first;
    float* out = residual + (u64)t * hidden;
    if (local < 0 || local >= count) {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) out[i] = 0.0f;
        return;
    }
    const bf16* row = table + (u64)local * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) out[i] = bf2f(row[i]);
}

// Kernels templated on the activation type A (bf16 or float) are instantiated below as
// `<name>_bf16` and `<name>_f32`.

// For each selected row s: out[s] = rmsnorm(residual[rows[s]] + delta[rows[s]]) * weight, without
// writing the residual (the last layer's add is needed only for the tokens that produce logits).
template <typename A>
__device__ void final_norm_rows_t(A* out, const float* residual, const A* delta, const int* rows, const bf16* weight,
                                  int hidden, float eps) {
    __shared__ float scratch[32];
    int s = blockIdx.x;
    u64 base = (u64)rows[s] * hidden;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = residual[base + i] + ld(delta, base + i);
        ss += v * v;
    }
    float inv = rsqrtf(block_sum(ss, scratch) / hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = residual[base + i] + ld(delta, base + i);
        st(out, (u64)s * hidden + i, v * inv * bf2f(weight[i]));
    }
}

// One rotary pair: (x0, x1) rotated by the angle whose sine and cosine are s and c. The FMAs are
// explicit so that rope and rope_kv_write give the same bits whatever the compiler contracts.
__device__ __forceinline__ void rotate_pair(float x0, float x1, float s, float c, float* y0, float* y1) {
    *y0 = fmaf(x0, c, -__fmul_rn(x1, s));
    *y1 = fmaf(x1, c, __fmul_rn(x0, s));
}

// silu(x) * u. BF16 activations (serving) use the fast exponential and division, as vLLM's
// fast-math build does (the exact ones made the prefill kernel compute-bound); F32 (the reference
// mode) keeps the exact ones, like the CPU backend.
template <typename A>
__device__ __forceinline__ float silu_mul1(float x, float u) {
    return __fdividef(x, 1.0f + __expf(-x)) * u;
}
template <>
__device__ __forceinline__ float silu_mul1<float>(float x, float u) {
    return x / (1.0f + expf(-x)) * u;
}

// Rotary embedding (rotate-half pairing i, i + head_dim/2), in place on the q and k heads of a fused
// qkv row: q heads start at column 0, k heads right after. inv_freq already has llama3 scaling.
// Grid (rows, pair blocks): a decode row's pairs are spread over several blocks.
template <typename A>
__device__ void rope_t(A* qkv, const int* positions, const float* inv_freq, int row_stride, int num_q_heads,
                       int num_kv_heads, int head_dim) {
    int t = blockIdx.x;
    int half = head_dim / 2;
    float pos = (float)positions[t];
    int pairs = (num_q_heads + num_kv_heads) * half;
    A* row = qkv + (u64)t * row_stride;
    for (int p = blockIdx.y * blockDim.x + threadIdx.x; p < pairs; p += gridDim.y * blockDim.x) {
        int head = p / half, i = p % half;
        u64 at = (u64)head * head_dim + i;
        float y0, y1, sn, cs;
        sincosf(pos * inv_freq[i], &sn, &cs);
        rotate_pair(ld(row, at), ld(row, at + half), sn, cs, &y0, &y1);
        st(row, at, y0);
        st(row, at + half, y1);
    }
}

// out[t, i] = silu(gate_up[t, i]) * gate_up[t, inter + i]; grid (rows, column chunks).
template <typename A>
__device__ void silu_mul_t(A* out, const A* gate_up, int inter) {
    int t = blockIdx.x;
    u64 g = (u64)t * 2 * inter;
    for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < inter; i += gridDim.y * blockDim.x) {
        st(out, (u64)t * inter + i, silu_mul1<A>(ld(gate_up, g + i), ld(gate_up, g + inter + i)));
    }
}

// Dynamic per-token FP8: scale = max(max|x| / 448, 1 / (448 * 512)), q = e4m3(x / scale), saturating.
template <typename A>
__device__ void quantize_fp8_t(fp8* out, float* scales, const A* in, int cols) {
    __shared__ float scratch[32];
    int t = blockIdx.x;
    u64 row = (u64)t * cols;
    float amax = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) amax = fmaxf(amax, fabsf(ld(in, row + i)));
    amax = block_max(amax, scratch);
    // The floor keeps all-zero rows finite (the same rule as the CPU backend and the fixtures).
    float scale = fmaxf(amax / FP8_MAX, 1.0f / (FP8_MAX * 512.0f));
    Fp8Quant<A> quant(scale);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) out[row + i] = quant(ld(in, row + i));
    if (threadIdx.x == 0) scales[t] = scale;
}

// The two halves of quantize_fp8, for tensor-parallel row-parallel linears whose per-token scale
// must cover the whole row across ranks (the ranks' scales are max-reduced in between).
template <typename A>
__device__ void fp8_row_scale_t(float* scales, const A* in, int cols) {
    __shared__ float scratch[32];
    u64 row = (u64)blockIdx.x * cols;
    float amax = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) amax = fmaxf(amax, fabsf(ld(in, row + i)));
    amax = block_max(amax, scratch);
    if (threadIdx.x == 0) scales[blockIdx.x] = fmaxf(amax / FP8_MAX, 1.0f / (FP8_MAX * 512.0f));
}

template <typename A>
__device__ void quantize_fp8_scaled_t(fp8* out, const float* scales, const A* in, int cols) {
    u64 row = (u64)blockIdx.x * cols;
    Fp8Quant<A> quant(scales[blockIdx.x]);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) out[row + i] = quant(ld(in, row + i));
}

// ---- Fusions that write an FP8 linear's quantized input directly (the same values, bit for bit,
// as the unfused kernel followed by quantize_fp8).
//
// Rows are handled in chunks of 4 consecutive columns per lane (one 16- or 8-byte load), 128
// columns per warp. The RMS norm's sum of squares has one fixed order, whatever the launch shape:
// each lane sums its 4 squares in column order, a warp butterfly sums a chunk, and the chunk sums
// are added in chunk order. So the fused norm gives the same bits as add_rmsnorm at any block size.
#define LANE_COLS 4
#define CHUNK_COLS 128
// Largest row of add_rmsnorm (chunk sums in shared memory).
#define MAX_NORM_CHUNKS 512

// The value after a round trip through the activation type (what the unfused kernel stored).
template <typename A>
__device__ __forceinline__ float as_act(float v) {
    A tmp;
    st(&tmp, 0, v);
    return ld(&tmp, 0);
}

// Whether 4-column vector accesses of rows of `cols` elements starting at p are aligned.
template <typename T>
__device__ __forceinline__ bool vec_ok(const T* p, int cols) {
    return (cols % LANE_COLS) == 0 && ((u64)p % (LANE_COLS * sizeof(T))) == 0;
}

// v[0..4] = p[c..c+4] (zero past cols); vec: the rows are 4-aligned (vec_ok).
__device__ __forceinline__ void load4(const float* p, int c, int cols, bool vec, float* v) {
    if (vec && c + LANE_COLS <= cols) {
        float4 x = *(const float4*)(p + c);
        v[0] = x.x, v[1] = x.y, v[2] = x.z, v[3] = x.w;
    } else {
#pragma unroll
        for (int j = 0; j < LANE_COLS; j++) v[j] = c + j < cols ? p[c + j] : 0.0f;
    }
}

__device__ __forceinline__ void load4(const bf16* p, int c, int cols, bool vec, float* v) {
    if (vec && c + LANE_COLS <= cols) {
        uint2 x = *(const uint2*)(p + c);
        v[0] = __uint_as_float(x.x << 16), v[1] = __uint_as_float(x.x & 0xffff0000u);
        v[2] = __uint_as_float(x.y << 16), v[3] = __uint_as_float(x.y & 0xffff0000u);
    } else {
#pragma unroll
        for (int j = 0; j < LANE_COLS; j++) v[j] = c + j < cols ? bf2f(p[c + j]) : 0.0f;
    }
}

__device__ __forceinline__ void store4(float* p, int c, int cols, bool vec, const float* v) {
    if (vec && c + LANE_COLS <= cols) {
        *(float4*)(p + c) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
#pragma unroll
        for (int j = 0; j < LANE_COLS; j++)
            if (c + j < cols) p[c + j] = v[j];
    }
}

// out[c..c+4] = the FP8 codes of v.
template <typename A>
__device__ __forceinline__ void store4_e4m3(fp8* p, int c, int cols, bool vec, const float* v, Fp8Quant<A> quant) {
    fp8 q[LANE_COLS];
#pragma unroll
    for (int j = 0; j < LANE_COLS; j++) q[j] = quant(v[j]);
    if (vec && c + LANE_COLS <= cols) {
        *(unsigned*)(p + c) = q[0] | (q[1] << 8) | (q[2] << 16) | ((unsigned)q[3] << 24);
    } else {
#pragma unroll
        for (int j = 0; j < LANE_COLS; j++)
            if (c + j < cols) p[c + j] = q[j];
    }
}

// Loads residual row chunk columns (c..c+4), adds delta (if any) and stores the sum back.
template <typename A>
__device__ __forceinline__ void residual_add4(float* r, const A* d, int c, int cols, bool vr, bool vd, float* v) {
    load4(r, c, cols, vr, v);
    if (d) {
        float dv[LANE_COLS];
        load4(d, c, cols, vd, dv);
#pragma unroll
        for (int j = 0; j < LANE_COLS; j++) v[j] += dv[j];
        store4(r, c, cols, vr, v);
    }
}

// N consecutive values of a row in registers, stored as A (BF16 pairs: half the registers, and
// the bytes of one 8- or 16-byte load as they are).
template <typename A, int N>
struct Packed {
    unsigned w[N / 2];
    // p[c..c+N], zero past cols; vec: the rows are N-aligned (vec_ok / vec8_ok).
    __device__ __forceinline__ void load(const bf16* p, int c, int cols, bool vec) {
        if (vec && c + N <= cols) {
            if constexpr (N == 8) {
                uint4 x = *(const uint4*)(p + c);
                w[0] = x.x, w[1] = x.y, w[2] = x.z, w[3] = x.w;
            } else {
                uint2 x = *(const uint2*)(p + c);
                w[0] = x.x, w[1] = x.y;
            }
        } else {
#pragma unroll
            for (int j = 0; j < N / 2; j++) {
                unsigned lo = c + 2 * j < cols ? p[c + 2 * j] : 0, hi = c + 2 * j + 1 < cols ? p[c + 2 * j + 1] : 0;
                w[j] = lo | (hi << 16);
            }
        }
    }
    // v rounded to BF16 already.
    __device__ __forceinline__ void set(const float* v) {
#pragma unroll
        for (int j = 0; j < N / 2; j++)
            w[j] = (__float_as_uint(v[2 * j]) >> 16) | (__float_as_uint(v[2 * j + 1]) & 0xffff0000u);
    }
    __device__ __forceinline__ void get(float* v) const {
#pragma unroll
        for (int j = 0; j < N / 2; j++) v[2 * j] = __uint_as_float(w[j] << 16), v[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
    }
};
template <int N>
struct Packed<float, N> {
    float f[N];
    __device__ __forceinline__ void load(const float* p, int c, int cols, bool vec) {
#pragma unroll
        for (int j = 0; j < N; j += LANE_COLS) load4(p, c + j, cols, vec, f + j);
    }
    __device__ __forceinline__ void set(const float* v) {
#pragma unroll
        for (int j = 0; j < N; j++) f[j] = v[j];
    }
    __device__ __forceinline__ void get(float* v) const {
#pragma unroll
        for (int j = 0; j < N; j++) v[j] = f[j];
    }
};
// The chunk's sum of squares (the same in every lane of the warp).
__device__ __forceinline__ float chunk_ss(const float* v) {
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < LANE_COLS; j++) s = fmaf(v[j], v[j], s);
    return warp_sum(s);
}

// rsqrt(mean square + eps) from the chunk sums, added in chunk order.
__device__ __forceinline__ float inv_rms(const float* chunk_sums, int nchunks, int hidden, float eps) {
    float s = 0.0f;
    for (int c = 0; c < nchunks; c++) s += chunk_sums[c];
    return rsqrtf(s / hidden + eps);
}

__device__ __forceinline__ float fp8_scale(float amax) {
    // The floor keeps all-zero rows finite (the same rule as the CPU backend and the fixtures).
    return fmaxf(amax / FP8_MAX, 1.0f / (FP8_MAX * 512.0f));
}

// residual[t] += delta[t] (when delta is not null); out[t] = rmsnorm(residual[t]) * weight.
// One block per row; hidden <= MAX_NORM_CHUNKS * CHUNK_COLS.
template <typename A>
__device__ void add_rmsnorm_t(float* residual, const A* delta, const bf16* weight, A* out, int hidden, float eps) {
    __shared__ float sums[MAX_NORM_CHUNKS];
    int t = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    float* r = residual + (u64)t * hidden;
    const A* d = delta ? delta + (u64)t * hidden : nullptr;
    bool vr = vec_ok(r, hidden), vd = d && vec_ok(d, hidden);
    int nchunks = (hidden + CHUNK_COLS - 1) / CHUNK_COLS;
    for (int c = warp; c < nchunks; c += nwarps) {
        float v[LANE_COLS];
        residual_add4(r, d, c * CHUNK_COLS + lane * LANE_COLS, hidden, vr, vd, v);
        float s = chunk_ss(v);
        if (lane == 0) sums[c] = s;
    }
    __syncthreads();
    float inv = inv_rms(sums, nchunks, hidden, eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) st(out, (u64)t * hidden + i, r[i] * inv * bf2f(weight[i]));
}

// ---- add_rmsnorm then quantize_fp8 of its output, without storing the normalized row. One block
// per row, the row held in registers: warp w owns chunks w, w + nwarps, ... (K per warp), so the
// residual and delta are read once and there is a single launch at any row count.
// hidden <= 32 warps * FUSED_MAX_K * CHUNK_COLS.
#define FUSED_MAX_K 8

// A delta still in the accumulator of an unscaled FP8 product (decode's o_proj / down_proj): `acc`
// [rows, hidden] F32, token scales `sx` (the product's input scales, which this kernel then
// overwrites with its own: each block reads its row's first), channel scales `sw`. The value is
// what the product's epilogue (scale_rows_cols_bf16) would have stored: f2bf(acc * sx * sw).
struct UnscaledDelta {
    const float* acc;
    const float* sx;
    const float* sw;
};

// A delta that is this rank's part of a row-parallel product (tensor parallelism), summed over the
// ranks on the way in: the one-shot all-reduce of all_reduce.cu fused into the norm, with its
// buffers, epochs and handshake (peer.cuh). The block of row t puts the rank's row into its slot at
// row t, handshakes as block t, and adds every rank's row in rank order in F32, rounded to BF16:
// the all-reduce's bits, one launch and one pass over the delta fewer. At most
// ALL_REDUCE_MAX_BLOCKS rows, hidden a multiple of 8, the slot's rows 16-byte aligned.
struct PeerDelta {
    const u64* bufs;
    int world, rank;
    const unsigned* epoch_base;
    unsigned call;
    u64 slot_bytes;
};


template <typename A, int K, bool ACC = false, bool PEER = false>
__device__ void add_rmsnorm_fp8_t(float* residual, const A* delta, const bf16* weight, fp8* xq, float* xs,
                                  int hidden, float eps, UnscaledDelta u = {}, PeerDelta p = {}) {
    __shared__ float sums[32 * FUSED_MAX_K];
    __shared__ float scratch[32];
    int t = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    float* r = residual + (u64)t * hidden;
    const A* d = delta ? delta + (u64)t * hidden : nullptr;
    bool vr = vec_ok(r, hidden), vd = d && vec_ok(d, hidden), vw = vec_ok(weight, hidden);
    const float* ua = ACC ? u.acc + (u64)t * hidden : nullptr;
    float usx = ACC ? u.sx[t] : 0.0f;
    bool vu = ACC && vec_ok(ua, hidden) && vec_ok(u.sw, hidden);
    bool has_delta = ACC || PEER || d;
    int nchunks = (hidden + CHUNK_COLS - 1) / CHUNK_COLS;
    u64 peer_off = 0;
    if constexpr (PEER) {
        const unsigned epoch = *p.epoch_base + p.call;
        peer_off = peer_slot_offset(epoch, p.slot_bytes) + (u64)t * hidden * sizeof(bf16);
        uint4* mine = (uint4*)((unsigned char*)p.bufs[p.rank] + peer_off);
        for (int i = threadIdx.x; i < hidden / 8; i += blockDim.x) mine[i] = ((const uint4*)d)[i];
        __syncthreads();
        peer_handshake(p.bufs, p.world, p.rank, epoch);
        __syncthreads();
    }
    // Few chunks per warp (decode shapes): the weights are loaded with the row, before the
    // reduction, so their latency is hidden; more would cost too many registers.
    constexpr bool PREFETCH = K <= 2;
    float v[K][LANE_COLS], w[PREFETCH ? K : 1][LANE_COLS];
    // Every load of the row first (the delta as stored), then the adds and residual stores: a loop
    // of load-add-store would wait a memory round trip per chunk (the stores may alias the loads).
    Packed<A, LANE_COLS> dr[K];
#pragma unroll
    for (int k = 0; k < K; k++) {
        int c = warp + nwarps * k;
        if (c < nchunks) {
            int c0 = c * CHUNK_COLS + lane * LANE_COLS;
            if constexpr (PREFETCH) load4(weight, c0, hidden, vw, w[k]);
            load4(r, c0, hidden, vr, v[k]);
            if constexpr (ACC) {
                float a[LANE_COLS], sw[LANE_COLS];
                load4(ua, c0, hidden, vu, a);
                load4(u.sw, c0, hidden, vu, sw);
#pragma unroll
                for (int j = 0; j < LANE_COLS; j++) a[j] = as_act<A>(a[j] * usx * sw[j]);
                dr[k].set(a);
            } else if constexpr (PEER) {
                float a[LANE_COLS] = {0.0f, 0.0f, 0.0f, 0.0f};
                // Lanes past the row's end (hidden is a multiple of 8) add nothing: zeros.
                for (int q = 0; q < p.world && c0 < hidden; q++) {
                    float f[LANE_COLS];
                    load4_cg((const bf16*)((const unsigned char*)p.bufs[q] + peer_off) + c0, f);
#pragma unroll
                    for (int j = 0; j < LANE_COLS; j++) a[j] += f[j];
                }
#pragma unroll
                for (int j = 0; j < LANE_COLS; j++) a[j] = as_act<A>(a[j]);
                dr[k].set(a);
            } else if (d) {
                dr[k].load(d, c0, hidden, vd);
            }
        }
    }
#pragma unroll
    for (int k = 0; k < K; k++) {
        int c = warp + nwarps * k;
        if (c < nchunks) {
            int c0 = c * CHUNK_COLS + lane * LANE_COLS;
            if (has_delta) {
                float dv[LANE_COLS];
                dr[k].get(dv);
#pragma unroll
                for (int j = 0; j < LANE_COLS; j++) v[k][j] += dv[j];
                store4(r, c0, hidden, vr, v[k]);
            }
            float s = chunk_ss(v[k]);
            if (lane == 0) sums[c] = s;
        }
    }
    __syncthreads();
    float inv = inv_rms(sums, nchunks, hidden, eps);
    float amax = 0.0f;
#pragma unroll
    for (int k = 0; k < K; k++) {
        int c0 = (warp + nwarps * k) * CHUNK_COLS + lane * LANE_COLS;
        if (c0 < hidden) {
            float wk[LANE_COLS];
            if constexpr (PREFETCH) {
#pragma unroll
                for (int j = 0; j < LANE_COLS; j++) wk[j] = w[k][j];
            } else {
                load4(weight, c0, hidden, vw, wk);
            }
#pragma unroll
            for (int j = 0; j < LANE_COLS; j++) {
                if (c0 + j < hidden) {
                    v[k][j] = as_act<A>(v[k][j] * inv * wk[j]);
                    amax = fmaxf(amax, fabsf(v[k][j]));
                }
            }
        }
    }
    float scale = fp8_scale(block_max(amax, scratch));
    fp8* q = xq + (u64)t * hidden;
    bool vq = vec_ok(q, hidden);
#pragma unroll
    for (int k = 0; k < K; k++) {
        int c0 = (warp + nwarps * k) * CHUNK_COLS + lane * LANE_COLS;
        if (c0 < hidden) store4_e4m3(q, c0, hidden, vq, v[k], Fp8Quant<A>(scale));
    }
    if (threadIdx.x == 0) xs[t] = scale;
}

// ---- silu_mul then quantize_fp8 of its output: one block per row, gate_up read once, the
// products held in registers (K groups of SILU_COLS columns per thread). No fixed order is needed
// here (a max), so groups are 8 columns: one 16-byte load of BF16.
#define SILU_COLS 8

template <typename T>
__device__ __forceinline__ bool vec8_ok(const T* p, int cols) {
    return (cols % SILU_COLS) == 0 && ((u64)p % (SILU_COLS * sizeof(T))) == 0;
}

// out[c..c+8] = the FP8 codes of v.
template <typename A>
__device__ __forceinline__ void store8_e4m3(fp8* p, int c, int cols, bool vec, const float* v, Fp8Quant<A> quant) {
    unsigned q[SILU_COLS];
#pragma unroll
    for (int j = 0; j < SILU_COLS; j++) q[j] = quant(v[j]);
    if (vec && c + SILU_COLS <= cols) {
        *(uint2*)(p + c) = make_uint2(q[0] | (q[1] << 8) | (q[2] << 16) | (q[3] << 24),
                                      q[4] | (q[5] << 8) | (q[6] << 16) | (q[7] << 24));
    } else {
#pragma unroll
        for (int j = 0; j < SILU_COLS; j++)
            if (c + j < cols) p[c + j] = (fp8)q[j];
    }
}

template <typename A>
using Held8 = Packed<A, SILU_COLS>;

// One block per row, K groups of 8 columns per thread. fetch(c0) loads what columns c0..c0+8 need
// (zero past cols); all K fetches are issued before any is used, so a thread has its whole share
// of the row in flight at once (a loop of load-then-use waits a memory round trip per group).
// value8(fetched, c0, v) then gives the values (of type A), held in registers while the block
// finds the row's maximum, and written as FP8 with the per-row scale: one pass over global memory.
template <typename A, int K, typename Fetch, typename Value8>
__device__ __forceinline__ void quantize_held_row(fp8* xq, float* xs, int cols, Fetch fetch, Value8 value8) {
    __shared__ float scratch[32];
    decltype(fetch(0)) fetched[K];
#pragma unroll
    for (int k = 0; k < K; k++) {
        int c0 = (threadIdx.x + blockDim.x * k) * SILU_COLS;
        if (c0 < cols) fetched[k] = fetch(c0);
    }
    Held8<A> held[K];
    float amax = 0.0f;
#pragma unroll
    for (int k = 0; k < K; k++) {
        int c0 = (threadIdx.x + blockDim.x * k) * SILU_COLS;
        if (c0 < cols) {
            float v[SILU_COLS];
            value8(fetched[k], c0, v);
#pragma unroll
            for (int j = 0; j < SILU_COLS; j++) amax = fmaxf(amax, fabsf(v[j]));
            held[k].set(v);
        }
    }
    float scale = fp8_scale(block_max(amax, scratch));
    Fp8Quant<A> quant(scale);
    fp8* q = xq + (u64)blockIdx.x * cols;
    bool vq = vec8_ok(q, cols);
#pragma unroll
    for (int k = 0; k < K; k++) {
        int c0 = (threadIdx.x + blockDim.x * k) * SILU_COLS;
        if (c0 < cols) {
            float v[SILU_COLS];
            held[k].get(v);
            store8_e4m3(q, c0, cols, vq, v, quant);
        }
    }
    if (threadIdx.x == 0) xs[blockIdx.x] = scale;
}

template <typename A>
struct GateUp8 {
    Held8<A> gate, up;
};

template <typename A, int K>
__device__ void silu_mul_fp8_t(fp8* xq, float* xs, const A* gate_up, int inter) {
    const A* g = gate_up + (u64)blockIdx.x * 2 * inter;
    bool vec = vec8_ok(g, inter);
    quantize_held_row<A, K>(
        xq, xs, inter,
        [&](int c0) {
            GateUp8<A> f;
            f.gate.load(g, c0, inter, vec);
            f.up.load(g + inter, c0, inter, vec);
            return f;
        },
        [&](const GateUp8<A>& f, int c0, float* v) {
            float u[SILU_COLS];
            f.gate.get(v);
            f.up.get(u);
#pragma unroll
            for (int j = 0; j < SILU_COLS; j++) v[j] = c0 + j < inter ? as_act<A>(silu_mul1<A>(v[j], u[j])) : 0.0f;
        });
}

// quantize_fp8 for rows of at most 1024 * K * 8 columns, the row in registers.
template <typename A, int K>
__device__ void quantize_fp8_held_t(fp8* out, float* scales, const A* in, int cols) {
    const A* x = in + (u64)blockIdx.x * cols;
    bool vec = vec8_ok(x, cols);
    quantize_held_row<A, K>(
        out, scales, cols,
        [&](int c0) {
            Held8<A> h;
            h.load(x, c0, cols, vec);
            return h;
        },
        [&](const Held8<A>& h, int c0, float* v) { h.get(v); });
}

// silu_mul_fp8 with the row's products in shared memory instead of registers (BF16 activations,
// prefill rows): 256 threads and ceil(inter / 8) * 16 bytes of dynamic shared memory a block, so
// that several rows share an SM and one row's loads overlap another's reduction and stores (the
// register version holds a 70B row in a whole SM's registers: one row at a time). The same values,
// maximum and rounding as silu_mul_fp8_t: the same bits.
#define SILU_SMEM_UNROLL 4
extern "C" __global__ void __launch_bounds__(256) silu_mul_fp8_smem_bf16(fp8* xq, float* xs, const bf16* gate_up,
                                                                          int inter) {
    pdl_enter();
    extern __shared__ __align__(16) unsigned char silu_smem[];
    __shared__ float scratch[32];
    uint4* prod = (uint4*)silu_smem;  // 8 BF16 products per group
    const bf16* g = gate_up + (u64)blockIdx.x * 2 * inter;
    bool vec = vec8_ok(g, inter);
    int groups = (inter + SILU_COLS - 1) / SILU_COLS;
    float amax = 0.0f;
    for (int base = threadIdx.x; base < groups; base += SILU_SMEM_UNROLL * blockDim.x) {
        Held8<bf16> gate[SILU_SMEM_UNROLL], up[SILU_SMEM_UNROLL];
#pragma unroll
        for (int k = 0; k < SILU_SMEM_UNROLL; k++) {
            int c0 = (base + k * blockDim.x) * SILU_COLS;
            if (c0 < inter) {
                gate[k].load(g, c0, inter, vec);
                up[k].load(g + inter, c0, inter, vec);
            }
        }
#pragma unroll
        for (int k = 0; k < SILU_SMEM_UNROLL; k++) {
            int c0 = (base + k * blockDim.x) * SILU_COLS;
            if (c0 < inter) {
                float v[SILU_COLS], u[SILU_COLS];
                gate[k].get(v);
                up[k].get(u);
#pragma unroll
                for (int j = 0; j < SILU_COLS; j++) {
                    v[j] = c0 + j < inter ? as_act<bf16>(silu_mul1<bf16>(v[j], u[j])) : 0.0f;
                    amax = fmaxf(amax, fabsf(v[j]));
                }
                Held8<bf16> p;
                p.set(v);
                uint4 w;
                w.x = p.w[0], w.y = p.w[1], w.z = p.w[2], w.w = p.w[3];
                prod[c0 / SILU_COLS] = w;
            }
        }
    }
    float scale = fp8_scale(block_max(amax, scratch));  // its barriers order the products too
    Fp8Quant<bf16> quant(scale);
    fp8* q = xq + (u64)blockIdx.x * inter;
    bool vq = vec8_ok(q, inter);
    for (int i = threadIdx.x; i < groups; i += blockDim.x) {
        uint4 w = prod[i];
        Held8<bf16> p;
        p.w[0] = w.x, p.w[1] = w.y, p.w[2] = w.z, p.w[3] = w.w;
        float v[SILU_COLS];
        p.get(v);
        store8_e4m3(q, i * SILU_COLS, inter, vq, v, quant);
    }
    if (threadIdx.x == 0) xs[blockIdx.x] = scale;
}

// Few rows (decode): one SM per row is too slow for silu's expf and divisions, so each row is
// split over blocks of SPLIT_COLS columns in two launches (partial maxima into a scratch buffer,
// then quantize from recomputed values). Grid (column blocks, rows).
#define SPLIT_THREADS 128
#define SPLIT_COLS (SPLIT_THREADS * LANE_COLS)

// With `ACC`, gate_up is still an unscaled FP8 product (UnscaledDelta, `sx` the row's token scale):
// each value is what the product's epilogue would have stored, f2bf(acc * sx * sw).
template <typename A, bool ACC = false>
__device__ __forceinline__ int silu_split_values(const A* gate_up, int inter, float* v, UnscaledDelta u = {},
                                                 float sx = 0.0f) {
    int c0 = blockIdx.x * SPLIT_COLS + threadIdx.x * LANE_COLS;
    float w[LANE_COLS];
    if constexpr (ACC) {
        const float* a = u.acc + (u64)blockIdx.y * 2 * inter;
        bool vec = vec_ok(a, inter) && vec_ok(u.sw, inter);
        float sg[LANE_COLS], su[LANE_COLS];
        load4(a, c0, inter, vec, v);
        load4(a + inter, c0, inter, vec, w);
        load4(u.sw, c0, inter, vec, sg);
        load4(u.sw + inter, c0, inter, vec, su);
#pragma unroll
        for (int j = 0; j < LANE_COLS; j++) {
            v[j] = as_act<A>(v[j] * sx * sg[j]);
            w[j] = as_act<A>(w[j] * sx * su[j]);
        }
    } else {
        const A* g = gate_up + (u64)blockIdx.y * 2 * inter;
        bool vec = vec_ok(g, inter);
        load4(g, c0, inter, vec, v);
        load4(g + inter, c0, inter, vec, w);
    }
#pragma unroll
    for (int j = 0; j < LANE_COLS; j++) v[j] = c0 + j < inter ? as_act<A>(silu_mul1<A>(v[j], w[j])) : 0.0f;
    return c0;
}

// With ACC (BF16), `u` is the unscaled gate_up product and `sx` this row's token scale.
template <typename A, bool ACC = false>
__device__ void silu_split_amax_t(const A* gate_up, float* amax_part, int inter, UnscaledDelta u = {},
                                  float sx = 0.0f) {
    __shared__ float scratch[32];
    float v[LANE_COLS];
    silu_split_values<A, ACC>(gate_up, inter, v, u, sx);
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < LANE_COLS; j++) amax = fmaxf(amax, fabsf(v[j]));
    amax = block_max(amax, scratch);
    if (threadIdx.x == 0) amax_part[(u64)blockIdx.y * gridDim.x + blockIdx.x] = amax;
}

template <typename A, bool ACC = false>
__device__ void silu_split_quant_t(fp8* xq, float* xs, const A* gate_up, const float* amax_part, int inter,
                                   UnscaledDelta u = {}, float sx = 0.0f) {
    float v[LANE_COLS];
    int c0 = silu_split_values<A, ACC>(gate_up, inter, v, u, sx);
    // The row's scale from the partial maxima (a max: any order gives the same bits).
    const float* p = amax_part + (u64)blockIdx.y * gridDim.x;
    float amax = 0.0f;
    for (int b = 0; b < gridDim.x; b++) amax = fmaxf(amax, p[b]);
    float scale = fp8_scale(amax);
    fp8* q = xq + (u64)blockIdx.y * inter;
    if (c0 < inter) store4_e4m3(q, c0, inter, vec_ok(q, inter), v, Fp8Quant<A>(scale));
    if (blockIdx.x == 0 && threadIdx.x == 0) xs[blockIdx.y] = scale;
}

// The split pair on an unscaled gate_up product (BF16). The token scales `xs` are the product's
// input scales and then this pair's output: the amax kernel copies row r's input scale to
// amax_part[rows * gridDim.x + r], which the quant kernel's blocks read while its first block
// writes the new one.
extern "C" __global__ void __launch_bounds__(SPLIT_THREADS)
    silu_split_amax_acc_bf16(const float* acc, const float* sx, const float* sw, float* amax_part, int inter) {
    pdl_enter();
    silu_split_amax_t<bf16, true>(nullptr, amax_part, inter, UnscaledDelta{acc, sx, sw}, sx[blockIdx.y]);
    if (blockIdx.x == 0 && threadIdx.x == 0) amax_part[(u64)gridDim.y * gridDim.x + blockIdx.y] = sx[blockIdx.y];
}

extern "C" __global__ void __launch_bounds__(SPLIT_THREADS) silu_split_quant_acc_bf16(
    fp8* xq, float* xs, const float* acc, const float* sw, const float* amax_part, int inter) {
    pdl_enter();
    float sx = amax_part[(u64)gridDim.y * gridDim.x + blockIdx.y];
    silu_split_quant_t<bf16, true>(xq, xs, nullptr, amax_part, inter, UnscaledDelta{acc, nullptr, sw}, sx);
}

// Writes token t's k and v heads (from the fused qkv row) to its cache slot; slot < 0 skips.
// Cache layout per layer: [num_blocks, num_kv_heads, block_size, head_dim].
template <typename A, typename C>
__device__ void kv_write_t(C* k_cache, C* v_cache, const A* qkv, const int* slots, int row_stride, int k_col,
                           int v_col, int num_kv_heads, int head_dim, int block_size) {
    int t = blockIdx.x;
    int slot = slots[t];
    if (slot < 0) return;
    int block = slot / block_size, off = slot % block_size;
    u64 row = (u64)t * row_stride;
    // 16-byte copies of the raw bits when everything is aligned to them (same type both sides).
    constexpr int VEC = 16 / sizeof(A);
    if (sizeof(A) == sizeof(C) && head_dim % VEC == 0 && row_stride % VEC == 0 && k_col % VEC == 0 &&
        v_col % VEC == 0 && (u64)qkv % 16 == 0 && (u64)k_cache % 16 == 0 && (u64)v_cache % 16 == 0) {
        for (int i = threadIdx.x * VEC; i < num_kv_heads * head_dim; i += blockDim.x * VEC) {
            int h = i / head_dim, d = i % head_dim;
            u64 dst = (((u64)block * num_kv_heads + h) * block_size + off) * head_dim + d;
            *(uint4*)(k_cache + dst) = *(const uint4*)(qkv + row + k_col + i);
            *(uint4*)(v_cache + dst) = *(const uint4*)(qkv + row + v_col + i);
        }
        return;
    }
    for (int i = threadIdx.x; i < num_kv_heads * head_dim; i += blockDim.x) {
        int h = i / head_dim, d = i % head_dim;
        u64 dst = (((u64)block * num_kv_heads + h) * block_size + off) * head_dim + d;
        st(k_cache, dst, ld(qkv, row + k_col + i));
        st(v_cache, dst, ld(qkv, row + v_col + i));
    }
}

// rope then kv_write in one launch (the same bits): thread (i, g) of a block takes rotary pair
// (i, i + head_dim/2) of heads g, g + groups, ... of the token's q|k|v row (groups = blockDim.x /
// (head_dim/2); grid.y splits the heads further for few rows). Its angle is computed once for all of
// them: q and k pairs are rotated in place, k (rotated) and v pairs also written to the token's
// cache slot (slot < 0: no cache write). Grid (rows, head blocks).
// A KV element: the activation type's value, or for FP8 pools (C = fp8) e4m3(v / scale), saturating
// (`inv_scale` = 1 / the pool's scale).
__device__ __forceinline__ void st_kv(float* p, u64 i, float v, float) { p[i] = v; }
__device__ __forceinline__ void st_kv(bf16* p, u64 i, float v, float) { p[i] = f2bf(v); }
__device__ __forceinline__ void st_kv(fp8* p, u64 i, float v, float inv_scale) { p[i] = f2e4m3(v * inv_scale); }

// With ACC the row is read from an unscaled FP8 qkv product (UnscaledDelta): the values its epilogue
// would have stored; rotated q and k still go to `qkv`, where attention reads q.
template <typename A, typename C, bool ACC = false>
__device__ void rope_kv_write_t(A* qkv, C* k_cache, C* v_cache, const int* positions, const float* inv_freq,
                                const int* slots, int row_stride, int num_q_heads, int num_kv_heads, int head_dim,
                                int block_size, float k_inv_scale, float v_inv_scale, UnscaledDelta u = {}) {
    int t = blockIdx.x, half = head_dim / 2;
    const float* ua = ACC ? u.acc + (u64)t * row_stride : nullptr;
    float usx = ACC ? u.sx[t] : 0.0f;
    auto load = [&](u64 at) { return ACC ? as_act<A>(ua[at] * usx * u.sw[at]) : ld(qkv + (u64)t * row_stride, at); };
    int i = threadIdx.x % half, groups = blockDim.x / half, g = threadIdx.x / half;
    int slot = slots[t];
    int heads = num_q_heads + 2 * num_kv_heads;
    A* row = qkv + (u64)t * row_stride;
    u64 cache_base = 0;
    if (slot >= 0) cache_base = ((u64)(slot / block_size) * num_kv_heads * block_size + slot % block_size) * head_dim + i;
    float s, c;
    sincosf((float)positions[t] * inv_freq[i], &s, &c);
    // Heads in batches: all of a batch's loads first (the stores may alias later loads, so a loop
    // of load-rotate-store would wait a memory round trip per head).
    constexpr int BATCH = 8;
    int stride = gridDim.y * groups;
    for (int h0 = blockIdx.y * groups + g; h0 < heads; h0 += BATCH * stride) {
        float x0[BATCH], x1[BATCH];
#pragma unroll
        for (int b = 0; b < BATCH; b++) {
            int head = h0 + b * stride;
            if (head < heads) {
                u64 at = (u64)head * head_dim + i;
                x0[b] = load(at);
                x1[b] = load(at + half);
            }
        }
#pragma unroll
        for (int b = 0; b < BATCH; b++) {
            int head = h0 + b * stride;
            if (head >= heads) break;
            u64 at = (u64)head * head_dim + i;
            int kv = head - num_q_heads;  // k heads 0..num_kv_heads, then v heads
            C* cache = kv >= 0 && slot >= 0 ? (kv < num_kv_heads ? k_cache : v_cache) : nullptr;
            float inv_scale = kv < num_kv_heads ? k_inv_scale : v_inv_scale;
            u64 dst = cache_base + (u64)(kv % num_kv_heads) * block_size * head_dim;
            float y0 = x0[b], y1 = x1[b];
            if (kv < num_kv_heads) {
                rotate_pair(x0[b], x1[b], s, c, &y0, &y1);
                st(row, at, y0);
                st(row, at + half, y1);
            }
            if (cache) {
                // The cache takes the value as the activation type holds it (what attention reads
                // back from a BF16 pool), then its own type.
                st_kv(cache, dst, as_act<A>(y0), inv_scale);
                st_kv(cache, dst + half, as_act<A>(y1), inv_scale);
            }
        }
    }
}

// The fused kernels per K (chunks per warp for the norm, 8-column groups per thread for silu).
#define FUSED_NORM_K(A, SUFFIX, K)                                                                            \
    extern "C" __global__ void __launch_bounds__(1024) add_rmsnorm_fp8_k##K##_##SUFFIX(                       \
        float* residual, const A* delta, const bf16* weight, fp8* xq, float* xs, int hidden, float eps) { pdl_enter(); \
        add_rmsnorm_fp8_t<A, K>(residual, delta, weight, xq, xs, hidden, eps);                                \
    }
// The same with the delta as an unscaled FP8 product (UnscaledDelta; BF16 activations only).
#define FUSED_NORM_ACC_K(K)                                                                                   \
    extern "C" __global__ void __launch_bounds__(1024) add_rmsnorm_fp8_acc_k##K##_bf16(                      \
        float* residual, const float* acc, const float* acc_sw, const bf16* weight, fp8* xq, float* xs,      \
        int hidden, float eps) {                                                                              \
        pdl_enter();                                                                                          \
        add_rmsnorm_fp8_t<bf16, K, true>(residual, nullptr, weight, xq, xs, hidden, eps,                     \
                                         UnscaledDelta{acc, xs, acc_sw});                                     \
    }
FUSED_NORM_ACC_K(1)
FUSED_NORM_ACC_K(2)
FUSED_NORM_ACC_K(4)
FUSED_NORM_ACC_K(8)
// The same with the delta summed over tensor-parallel ranks on the way in (PeerDelta).
#define FUSED_NORM_PEER_K(K)                                                                                  \
    extern "C" __global__ void __launch_bounds__(1024) add_rmsnorm_fp8_peer_k##K##_bf16(                     \
        float* residual, const bf16* delta, const bf16* weight, fp8* xq, float* xs, int hidden, float eps,  \
        const u64* bufs, int world, int rank, const unsigned* epoch_base, unsigned call, u64 slot_bytes) {  \
        pdl_enter();                                                                                          \
        add_rmsnorm_fp8_t<bf16, K, false, true>(residual, delta, weight, xq, xs, hidden, eps, {},            \
                                                PeerDelta{bufs, world, rank, epoch_base, call, slot_bytes}); \
    }
FUSED_NORM_PEER_K(1)
FUSED_NORM_PEER_K(2)
FUSED_NORM_PEER_K(4)
FUSED_NORM_PEER_K(8)
#define FUSED_SILU_K(A, SUFFIX, K)                                                                            \
    extern "C" __global__ void __launch_bounds__(1024)                                                        \
        silu_mul_fp8_k##K##_##SUFFIX(fp8* xq, float* xs, const A* gate_up, int inter) { pdl_enter();          \
        silu_mul_fp8_t<A, K>(xq, xs, gate_up, inter);                                                         \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(1024)                                                        \
        quantize_fp8_k##K##_##SUFFIX(fp8* out, float* scales, const A* in, int cols) { pdl_enter();           \
        quantize_fp8_held_t<A, K>(out, scales, in, cols);                                                     \
    }

#define ELEMENTWISE_KERNELS(A, SUFFIX)                                                                        \
    extern "C" __global__ void add_rmsnorm_##SUFFIX(float* residual, const A* delta, const bf16* weight, A* out, \
                                                    int hidden, float eps) { pdl_enter();                        \
        add_rmsnorm_t<A>(residual, delta, weight, out, hidden, eps);                                          \
    }                                                                                                         \
    extern "C" __global__ void final_norm_rows_##SUFFIX(A* out, const float* residual, const A* delta,        \
                                                        const int* rows, const bf16* weight, int hidden,      \
                                                        float eps) { pdl_enter();                             \
        final_norm_rows_t<A>(out, residual, delta, rows, weight, hidden, eps);                                \
    }                                                                                                         \
    extern "C" __global__ void rope_##SUFFIX(A* qkv, const int* positions, const float* inv_freq,             \
                                             int row_stride, int num_q_heads, int num_kv_heads, int head_dim) { pdl_enter(); \
        rope_t<A>(qkv, positions, inv_freq, row_stride, num_q_heads, num_kv_heads, head_dim);                 \
    }                                                                                                         \
    extern "C" __global__ void silu_mul_##SUFFIX(A* out, const A* gate_up, int inter) { pdl_enter();          \
        silu_mul_t<A>(out, gate_up, inter);                                                                   \
    }                                                                                                         \
    extern "C" __global__ void quantize_fp8_##SUFFIX(fp8* out, float* scales, const A* in, int cols) { pdl_enter(); \
        quantize_fp8_t<A>(out, scales, in, cols);                                                             \
    }                                                                                                         \
    extern "C" __global__ void fp8_row_scale_##SUFFIX(float* scales, const A* in, int cols) { pdl_enter();    \
        fp8_row_scale_t<A>(scales, in, cols);                                                                 \
    }                                                                                                         \
    extern "C" __global__ void quantize_fp8_scaled_##SUFFIX(fp8* out, const float* scales, const A* in,       \
                                                            int cols) { pdl_enter();                          \
        quantize_fp8_scaled_t<A>(out, scales, in, cols);                                                      \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(256, 3) add_rmsnorm_fp8_rows_##SUFFIX(                    \
        float* residual, const A* delta, const bf16* weight, fp8* xq, float* xs, int hidden, float eps) { pdl_enter(); \
        add_rmsnorm_fp8_t<A, 8>(residual, delta, weight, xq, xs, hidden, eps);                                \
    }                                                                                                         \
    FUSED_NORM_K(A, SUFFIX, 1)                                                                                \
    FUSED_NORM_K(A, SUFFIX, 2)                                                                                \
    FUSED_NORM_K(A, SUFFIX, 4)                                                                                \
    FUSED_NORM_K(A, SUFFIX, 8)                                                                                \
    FUSED_SILU_K(A, SUFFIX, 1)                                                                                \
    FUSED_SILU_K(A, SUFFIX, 2)                                                                                \
    FUSED_SILU_K(A, SUFFIX, 4)                                                                                \
    FUSED_SILU_K(A, SUFFIX, 8)                                                                                \
    extern "C" __global__ void __launch_bounds__(SPLIT_THREADS)                                               \
        silu_split_amax_##SUFFIX(const A* gate_up, float* amax_part, int inter) { pdl_enter();                \
        silu_split_amax_t<A>(gate_up, amax_part, inter);                                                      \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(SPLIT_THREADS) silu_split_quant_##SUFFIX(                    \
        fp8* xq, float* xs, const A* gate_up, const float* amax_part, int inter) { pdl_enter();               \
        silu_split_quant_t<A>(xq, xs, gate_up, amax_part, inter);                                             \
    }                                                                                                         \
    extern "C" __global__ void rope_kv_write_##SUFFIX(A* qkv, A* k_cache, A* v_cache, const int* positions,  \
                                                      const float* inv_freq, const int* slots, int row_stride, \
                                                      int num_q_heads, int num_kv_heads, int head_dim,         \
                                                      int block_size) { pdl_enter();                           \
        rope_kv_write_t<A, A>(qkv, k_cache, v_cache, positions, inv_freq, slots, row_stride, num_q_heads,     \
                              num_kv_heads, head_dim, block_size, 1.0f, 1.0f);                                \
    }                                                                                                         \
    extern "C" __global__ void kv_write_##SUFFIX(A* k_cache, A* v_cache, const A* qkv, const int* slots,      \
                                                 int row_stride, int k_col, int v_col, int num_kv_heads,      \
                                                 int head_dim, int block_size) { pdl_enter();                 \
        kv_write_t<A, A>(k_cache, v_cache, qkv, slots, row_stride, k_col, v_col, num_kv_heads, head_dim,      \
                         block_size);                                                                         \
    }

ELEMENTWISE_KERNELS(bf16, bf16)
ELEMENTWISE_KERNELS(float, f32)

// rope_kv_write of an unscaled FP8 qkv product (decode; `acc`, token scales `sx`, channel scales
// `sw`), into a BF16 or an FP8 pool.
extern "C" __global__ void rope_kv_write_acc_bf16(bf16* qkv, const float* acc, const float* sx, const float* sw,
                                                  bf16* k_cache, bf16* v_cache, const int* positions,
                                                  const float* inv_freq, const int* slots, int row_stride,
                                                  int num_q_heads, int num_kv_heads, int head_dim, int block_size) {
    pdl_enter();
    rope_kv_write_t<bf16, bf16, true>(qkv, k_cache, v_cache, positions, inv_freq, slots, row_stride, num_q_heads,
                                      num_kv_heads, head_dim, block_size, 1.0f, 1.0f, UnscaledDelta{acc, sx, sw});
}
extern "C" __global__ void rope_kv_write_acc_kv8_bf16(bf16* qkv, const float* acc, const float* sx, const float* sw,
                                                      fp8* k_cache, fp8* v_cache, const int* positions,
                                                      const float* inv_freq, const int* slots, int row_stride,
                                                      int num_q_heads, int num_kv_heads, int head_dim,
                                                      int block_size, float k_inv_scale, float v_inv_scale) {
    pdl_enter();
    rope_kv_write_t<bf16, fp8, true>(qkv, k_cache, v_cache, positions, inv_freq, slots, row_stride, num_q_heads,
                                     num_kv_heads, head_dim, block_size, k_inv_scale, v_inv_scale,
                                     UnscaledDelta{acc, sx, sw});
}

// rope_kv_write into an FP8 pool (`--kv-cache-dtype fp8`; BF16 activations).
extern "C" __global__ void rope_kv_write_kv8_bf16(bf16* qkv, fp8* k_cache, fp8* v_cache, const int* positions,
                                                  const float* inv_freq, const int* slots, int row_stride,
                                                  int num_q_heads, int num_kv_heads, int head_dim, int block_size,
                                                  float k_inv_scale, float v_inv_scale) {
    pdl_enter();
    rope_kv_write_t<bf16, fp8>(qkv, k_cache, v_cache, positions, inv_freq, slots, row_stride, num_q_heads,
                               num_kv_heads, head_dim, block_size, k_inv_scale, v_inv_scale);
}

// In place, F32 rows: x = e4m3(x / scale) * scale with the per-row scale of quantize_fp8. The
// reference-precision mode computes an FP8 linear as an F32 product of exactly these values and
// the dequantized weight, equal to (x_q . W_q) * scale_x * scale_w up to f32 rounding.
extern "C" __global__ void fake_quant_fp8_f32(float* x, int cols) {
    pdl_enter();
    __shared__ float scratch[32];
    u64 row = (u64)blockIdx.x * cols;
    float amax = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) amax = fmaxf(amax, fabsf(x[row + i]));
    amax = block_max(amax, scratch);
    float scale = fmaxf(amax / FP8_MAX, 1.0f / (FP8_MAX * 512.0f));
    for (int i = threadIdx.x; i < cols; i += blockDim.x) x[row + i] = e4m32f(f2e4m3(x[row + i] / scale)) * scale;
}

// fake_quant_fp8_f32 with given per-row scales (see fp8_row_scale).
extern "C" __global__ void fake_quant_fp8_f32_scaled(float* x, const float* scales, int cols) {
    pdl_enter();
    u64 row = (u64)blockIdx.x * cols;
    float scale = scales[blockIdx.x];
    for (int i = threadIdx.x; i < cols; i += blockDim.x) x[row + i] = e4m32f(f2e4m3(x[row + i] / scale)) * scale;
}

// ---- Random fill for dummy weights, generated on the device (counter-based, seeded). ----

__device__ __forceinline__ u64 splitmix64(u64 x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// Uniform in [lo, hi).
__device__ __forceinline__ float uniform_at(u64 seed, u64 i, float lo, float hi) {
    u64 r = splitmix64(seed * 0x2545F4914F6CDD1Dull + i);
    float u = (float)(r >> 40) * (1.0f / 16777216.0f);
    return lo + (hi - lo) * u;
}

extern "C" __global__ void fill_uniform_bf16(bf16* out, u64 n, u64 seed, float lo, float hi) {
    pdl_enter();
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        out[i] = f2bf(uniform_at(seed, i, lo, hi));
}

extern "C" __global__ void fill_uniform_fp8(fp8* out, u64 n, u64 seed, float lo, float hi) {
    pdl_enter();
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        out[i] = f2e4m3(uniform_at(seed, i, lo, hi));
}

extern "C" __global__ void fill_uniform_f32(float* out, u64 n, u64 seed, float lo, float hi) {
    pdl_enter();
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        out[i] = uniform_at(seed, i, lo, hi);
}
