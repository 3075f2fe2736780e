// Per-token kernels of the Llama forward pass. One block per token row unless noted.
// Activations are BF16, the residual stream F32, accumulation F32.

// residual[t, :] = table[tokens[t], :]
extern "C" __global__ void embed(float* residual, const bf16* table, const int* tokens, int hidden) {
    int t = blockIdx.x;
    const bf16* row = table + (u64)tokens[t] * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) residual[(u64)t * hidden + i] = bf2f(row[i]);
}

// Kernels templated on the activation type A (bf16 or float) are instantiated below as
// `<name>_bf16` and `<name>_f32`.

// residual[t] += delta[t] (when delta is not null); out[t] = rmsnorm(residual[t]) * weight.
template <typename A>
__device__ void add_rmsnorm_t(float* residual, const A* delta, const bf16* weight, A* out, int hidden, float eps) {
    __shared__ float scratch[32];
    int t = blockIdx.x;
    float* r = residual + (u64)t * hidden;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = r[i];
        if (delta) {
            v += ld(delta, (u64)t * hidden + i);
            r[i] = v;
        }
        ss += v * v;
    }
    float inv = rsqrtf(block_sum(ss, scratch) / hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) st(out, (u64)t * hidden + i, r[i] * inv * bf2f(weight[i]));
}

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

// Rotary embedding (rotate-half pairing i, i + head_dim/2), in place on the q and k heads of a fused
// qkv row: q heads start at column 0, k heads right after. inv_freq already has llama3 scaling.
template <typename A>
__device__ void rope_t(A* qkv, const int* positions, const float* inv_freq, int row_stride, int num_q_heads,
                       int num_kv_heads, int head_dim) {
    int t = blockIdx.x;
    int half = head_dim / 2;
    float pos = (float)positions[t];
    int pairs = (num_q_heads + num_kv_heads) * half;
    A* row = qkv + (u64)t * row_stride;
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        int head = p / half, i = p % half;
        float s, c;
        sincosf(pos * inv_freq[i], &s, &c);
        u64 at = (u64)head * head_dim + i;
        float x0 = ld(row, at), x1 = ld(row, at + half);
        st(row, at, x0 * c - x1 * s);
        st(row, at + half, x1 * c + x0 * s);
    }
}

// out[t, i] = silu(gate_up[t, i]) * gate_up[t, inter + i]; grid (rows, column chunks).
template <typename A>
__device__ void silu_mul_t(A* out, const A* gate_up, int inter) {
    int t = blockIdx.x;
    u64 g = (u64)t * 2 * inter;
    for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < inter; i += gridDim.y * blockDim.x) {
        float x = ld(gate_up, g + i);
        float silu = x / (1.0f + expf(-x));
        st(out, (u64)t * inter + i, silu * ld(gate_up, g + inter + i));
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
    for (int i = threadIdx.x; i < cols; i += blockDim.x) out[row + i] = f2e4m3(ld(in, row + i) / scale);
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
    float scale = scales[blockIdx.x];
    for (int i = threadIdx.x; i < cols; i += blockDim.x) out[row + i] = f2e4m3(ld(in, row + i) / scale);
}

// ---- Fusions that write an FP8 linear's quantized input directly (the same values, bit for bit,
// as the unfused kernel followed by quantize_fp8). A row lives in registers, blockDim.x = 1024:
// at most NORM_VALS * 1024 columns for the norm, SILU_VALS * 1024 for silu_mul.
#define NORM_VALS 16
#define SILU_VALS 32

// The value after a round trip through the activation type (what the unfused kernel stored).
template <typename A>
__device__ __forceinline__ float as_act(float v) {
    A tmp;
    st(&tmp, 0, v);
    return ld(&tmp, 0);
}

// Quantizes the block's row held in v (columns threadIdx.x + j * blockDim.x) like quantize_fp8.
template <int VALS>
__device__ __forceinline__ void quantize_row_regs(fp8* out, float* scales, const float* v, int cols,
                                                  float* scratch) {
    int t = blockIdx.x;
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < VALS; j++)
        if (threadIdx.x + j * blockDim.x < cols) amax = fmaxf(amax, fabsf(v[j]));
    amax = block_max(amax, scratch);
    float scale = fmaxf(amax / FP8_MAX, 1.0f / (FP8_MAX * 512.0f));
#pragma unroll
    for (int j = 0; j < VALS; j++) {
        int i = threadIdx.x + j * blockDim.x;
        if (i < cols) out[(u64)t * cols + i] = f2e4m3(v[j] / scale);
    }
    if (threadIdx.x == 0) scales[t] = scale;
}

// add_rmsnorm, then quantize_fp8 of its output, without storing the BF16 row.
template <typename A>
__device__ void add_rmsnorm_fp8_t(float* residual, const A* delta, const bf16* weight, fp8* xq, float* xs, int hidden,
                                  float eps) {
    __shared__ float scratch[32];
    int t = blockIdx.x;
    float* r = residual + (u64)t * hidden;
    float v[NORM_VALS];
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < NORM_VALS; j++) {
        int i = threadIdx.x + j * blockDim.x;
        v[j] = 0.0f;
        if (i < hidden) {
            float x = r[i];
            if (delta) {
                x += ld(delta, (u64)t * hidden + i);
                r[i] = x;
            }
            v[j] = x;
            ss += x * x;
        }
    }
    float inv = rsqrtf(block_sum(ss, scratch) / hidden + eps);
#pragma unroll
    for (int j = 0; j < NORM_VALS; j++) {
        int i = threadIdx.x + j * blockDim.x;
        if (i < hidden) v[j] = as_act<A>(v[j] * inv * bf2f(weight[i]));
    }
    quantize_row_regs<NORM_VALS>(xq, xs, v, hidden, scratch);
}

// silu_mul, then quantize_fp8 of its output, without storing the BF16 row. One block per row.
template <typename A>
__device__ void silu_mul_fp8_t(fp8* xq, float* xs, const A* gate_up, int inter) {
    __shared__ float scratch[32];
    u64 g = (u64)blockIdx.x * 2 * inter;
    float v[SILU_VALS];
#pragma unroll
    for (int j = 0; j < SILU_VALS; j++) {
        int i = threadIdx.x + j * blockDim.x;
        v[j] = 0.0f;
        if (i < inter) {
            float x = ld(gate_up, g + i);
            float silu = x / (1.0f + expf(-x));
            v[j] = as_act<A>(silu * ld(gate_up, g + inter + i));
        }
    }
    quantize_row_regs<SILU_VALS>(xq, xs, v, inter, scratch);
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
    for (int i = threadIdx.x; i < num_kv_heads * head_dim; i += blockDim.x) {
        int h = i / head_dim, d = i % head_dim;
        u64 dst = (((u64)block * num_kv_heads + h) * block_size + off) * head_dim + d;
        st(k_cache, dst, ld(qkv, row + k_col + i));
        st(v_cache, dst, ld(qkv, row + v_col + i));
    }
}

#define ELEMENTWISE_KERNELS(A, SUFFIX)                                                                        \
    extern "C" __global__ void add_rmsnorm_##SUFFIX(float* residual, const A* delta, const bf16* weight, A* out, \
                                                    int hidden, float eps) {                                 \
        add_rmsnorm_t<A>(residual, delta, weight, out, hidden, eps);                                          \
    }                                                                                                         \
    extern "C" __global__ void final_norm_rows_##SUFFIX(A* out, const float* residual, const A* delta,        \
                                                        const int* rows, const bf16* weight, int hidden,      \
                                                        float eps) {                                          \
        final_norm_rows_t<A>(out, residual, delta, rows, weight, hidden, eps);                                \
    }                                                                                                         \
    extern "C" __global__ void rope_##SUFFIX(A* qkv, const int* positions, const float* inv_freq,             \
                                             int row_stride, int num_q_heads, int num_kv_heads, int head_dim) { \
        rope_t<A>(qkv, positions, inv_freq, row_stride, num_q_heads, num_kv_heads, head_dim);                 \
    }                                                                                                         \
    extern "C" __global__ void silu_mul_##SUFFIX(A* out, const A* gate_up, int inter) {                       \
        silu_mul_t<A>(out, gate_up, inter);                                                                   \
    }                                                                                                         \
    extern "C" __global__ void quantize_fp8_##SUFFIX(fp8* out, float* scales, const A* in, int cols) {        \
        quantize_fp8_t<A>(out, scales, in, cols);                                                             \
    }                                                                                                         \
    extern "C" __global__ void fp8_row_scale_##SUFFIX(float* scales, const A* in, int cols) {                 \
        fp8_row_scale_t<A>(scales, in, cols);                                                                 \
    }                                                                                                         \
    extern "C" __global__ void quantize_fp8_scaled_##SUFFIX(fp8* out, const float* scales, const A* in,       \
                                                            int cols) {                                       \
        quantize_fp8_scaled_t<A>(out, scales, in, cols);                                                      \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(1024) add_rmsnorm_fp8_##SUFFIX(float* residual, const A* delta, const bf16* weight,      \
                                                        fp8* xq, float* xs, int hidden, float eps) {             \
        add_rmsnorm_fp8_t<A>(residual, delta, weight, xq, xs, hidden, eps);                                     \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(1024) silu_mul_fp8_##SUFFIX(fp8* xq, float* xs, const A* gate_up, int inter) {       \
        silu_mul_fp8_t<A>(xq, xs, gate_up, inter);                                                            \
    }                                                                                                         \
    extern "C" __global__ void kv_write_##SUFFIX(A* k_cache, A* v_cache, const A* qkv, const int* slots,      \
                                                 int row_stride, int k_col, int v_col, int num_kv_heads,      \
                                                 int head_dim, int block_size) {                              \
        kv_write_t<A, A>(k_cache, v_cache, qkv, slots, row_stride, k_col, v_col, num_kv_heads, head_dim,      \
                         block_size);                                                                         \
    }

ELEMENTWISE_KERNELS(bf16, bf16)
ELEMENTWISE_KERNELS(float, f32)

// In place, F32 rows: x = e4m3(x / scale) * scale with the per-row scale of quantize_fp8. The
// reference-precision mode computes an FP8 linear as an F32 product of exactly these values and
// the dequantized weight, equal to (x_q . W_q) * scale_x * scale_w up to f32 rounding.
extern "C" __global__ void fake_quant_fp8_f32(float* x, int cols) {
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
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        out[i] = f2bf(uniform_at(seed, i, lo, hi));
}

extern "C" __global__ void fill_uniform_fp8(fp8* out, u64 n, u64 seed, float lo, float hi) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        out[i] = f2e4m3(uniform_at(seed, i, lo, hi));
}

extern "C" __global__ void fill_uniform_f32(float* out, u64 n, u64 seed, float lo, float hi) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        out[i] = uniform_at(seed, i, lo, hi);
}
