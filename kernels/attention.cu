// Causal attention over the paged KV cache, for prefill chunks and decode alike.
//
// One block per (query tile, kv head). A tile is up to `q_per_tile` consecutive query tokens of one
// sequence; with the G query heads that share the kv head, that is R = q_per_tile * G rows
// (R <= 32). Keys stream through shared memory KT at a time (each K/V element is read once per
// block, for all its rows); each warp keeps an online softmax for its rows. The current chunk's
// K/V must already be in the cache (kv_write runs first), so earlier chunks and shared prefix
// blocks are read the same way as the chunk itself.

#define KT 32
#define NWARPS 8
#define MAX_RPW 4
#define HD_MAX 128

// A: type of q and out; C: type of the cache. Instantiated below as paged_attention_{bf16,f32}.
template <typename A, typename C>
__device__ __forceinline__ void paged_attention_t(
    A* out, const A* qkv, const C* k_cache, const C* v_cache, const int* positions,
    const int* tile_seq, const int* tile_q_start, const int* tile_q_len, const int* block_tables,
    const int* block_table_start, int row_stride, int num_q_heads, int num_kv_heads, int head_dim,
    int block_size, float scale, int q_per_tile) {
    extern __shared__ float smem[];
    int tile = blockIdx.x, kvh = blockIdx.y;
    int G = num_q_heads / num_kv_heads;
    int seq = tile_seq[tile], q0 = tile_q_start[tile], qn = tile_q_len[tile];
    int R = q_per_tile * G;
    float* Qs = smem;                      // [R, head_dim], pre-scaled
    float* Ks = Qs + R * head_dim;         // [KT, head_dim + 1] (padded: no bank conflicts)
    float* Vs = Ks + KT * (head_dim + 1);  // [KT, head_dim]
    const int* bt = block_tables + block_table_start[seq];

    for (int idx = threadIdx.x; idx < R * head_dim; idx += blockDim.x) {
        int r = idx / head_dim, d = idx % head_dim;
        int i = r / G, h = kvh * G + r % G;
        Qs[idx] = i < qn ? ld(qkv, (u64)(q0 + i) * row_stride + h * head_dim + d) * scale : 0.0f;
    }
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float m[MAX_RPW], l[MAX_RPW], acc[MAX_RPW][HD_MAX / 32];
    int rpos[MAX_RPW];
#pragma unroll
    for (int k = 0; k < MAX_RPW; k++) {
        int r = warp + k * NWARPS;
        m[k] = NEG_INF;
        l[k] = 0.0f;
        rpos[k] = (r < R && r / G < qn) ? positions[q0 + r / G] : -1;
#pragma unroll
        for (int c = 0; c < HD_MAX / 32; c++) acc[k][c] = 0.0f;
    }
    // Positions increase within a chunk, so the tile's last query sees the most keys.
    int kmax = positions[q0 + qn - 1];

    for (int k0 = 0; k0 <= kmax; k0 += KT) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < KT * head_dim; idx += blockDim.x) {
            int j = idx / head_dim, d = idx % head_dim;
            int key = k0 + j;
            float kv = 0.0f, vv = 0.0f;
            if (key <= kmax) {
                int blk = bt[key / block_size], off = key % block_size;
                u64 src = (((u64)blk * num_kv_heads + kvh) * block_size + off) * head_dim + d;
                kv = ld(k_cache, src);
                vv = ld(v_cache, src);
            }
            Ks[j * (head_dim + 1) + d] = kv;
            Vs[j * head_dim + d] = vv;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < MAX_RPW; k++) {
            int r = warp + k * NWARPS;
            if (rpos[k] < k0) continue;  // invalid row, or no key of this tile is visible (warp-uniform)
            const float* q = Qs + r * head_dim;
            const float* kr = Ks + lane * (head_dim + 1);
            float s = 0.0f;
            for (int d = 0; d < head_dim; d++) s += q[d] * kr[d];
            if (k0 + lane > rpos[k]) s = NEG_INF;
            float mn = fmaxf(m[k], warp_max(s));
            float p = __expf(s - mn);
            float corr = __expf(m[k] - mn);
            l[k] = l[k] * corr + warp_sum(p);
            m[k] = mn;
#pragma unroll
            for (int c = 0; c < HD_MAX / 32; c++) acc[k][c] *= corr;
            for (int j = 0; j < KT; j++) {
                float pj = __shfl_sync(0xffffffffu, p, j);
                const float* vr = Vs + j * head_dim;
#pragma unroll
                for (int c = 0; c < HD_MAX / 32; c++) {
                    int d = lane + 32 * c;
                    if (d < head_dim) acc[k][c] += pj * vr[d];
                }
            }
        }
    }
#pragma unroll
    for (int k = 0; k < MAX_RPW; k++) {
        int r = warp + k * NWARPS;
        if (rpos[k] < 0) continue;
        int i = r / G, h = kvh * G + r % G;
        u64 o = (u64)(q0 + i) * num_q_heads * head_dim + h * head_dim;
        float inv = 1.0f / l[k];
#pragma unroll
        for (int c = 0; c < HD_MAX / 32; c++) {
            int d = lane + 32 * c;
            if (d < head_dim) st(out, o + d, acc[k][c] * inv);
        }
    }
}

#define ATTENTION_KERNEL(A, SUFFIX)                                                                          \
    extern "C" __global__ void __launch_bounds__(256) paged_attention_##SUFFIX(                              \
        A* out, const A* qkv, const A* k_cache, const A* v_cache, const int* positions, const int* tile_seq, \
        const int* tile_q_start, const int* tile_q_len, const int* block_tables, const int* block_table_start, \
        int row_stride, int num_q_heads, int num_kv_heads, int head_dim, int block_size, float scale,          \
        int q_per_tile) {                                                                                    \
        paged_attention_t<A, A>(out, qkv, k_cache, v_cache, positions, tile_seq, tile_q_start, tile_q_len,    \
                                block_tables, block_table_start, row_stride, num_q_heads, num_kv_heads,       \
                                head_dim, block_size, scale, q_per_tile);                                     \
    }

ATTENTION_KERNEL(bf16, bf16)
ATTENTION_KERNEL(float, f32)
