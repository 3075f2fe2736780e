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
#define KPAD 4  // floats of padding per K row in shared memory (keeps 16-byte reads conflict-free)

struct alignas(16) V16 { unsigned x, y, z, w; };
struct alignas(16) F4 { float x, y, z, w; };

// A 16-byte vector of cache elements as floats: 8 BF16 values or 4 F32 values.
__device__ __forceinline__ void unpack(const V16& v, float* f, const bf16*) {
    unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
__device__ __forceinline__ void unpack(const V16& v, float* f, const float*) {
    f[0] = __uint_as_float(v.x);
    f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z);
    f[3] = __uint_as_float(v.w);
}

// A: type of q and out; C: type of the cache. Instantiated below as paged_attention_{bf16,f32}.
// Needs head_dim <= 128 and head_dim * sizeof(C) a multiple of 16 bytes.
template <typename A, typename C>
__device__ __forceinline__ void paged_attention_t(
    A* out, const A* qkv, const C* k_cache, const C* v_cache, const int* positions,
    const int* tile_seq, const int* tile_q_start, const int* tile_q_len, const int* block_tables,
    const int* block_table_start, const int* tile_kbeg, const int* tile_kend, const int* tile_part,
    float* part_ml, float* part_acc, int row_stride, int num_q_heads, int num_kv_heads, int head_dim,
    int block_size, float scale, int q_per_tile) {
    constexpr int VN = 16 / sizeof(C);                      // cache elements per 16-byte load
    constexpr int MAXV = (KT * HD_MAX) / (VN * 256);        // loads per thread per K (or V) tile
    extern __shared__ float smem[];
    int tile = blockIdx.x, kvh = blockIdx.y;
    int G = num_q_heads / num_kv_heads;
    int seq = tile_seq[tile], q0 = tile_q_start[tile], qn = tile_q_len[tile];
    if (seq < 0) return;  // padding: decode plans round their work items up (graph keys)
    int R = q_per_tile * G;
    int kstride = head_dim + KPAD;
    float* Qs = smem;                      // [R, head_dim], pre-scaled
    float* Ks = Qs + R * head_dim;         // [KT, head_dim + KPAD]
    float* Vs = Ks + KT * kstride;         // [KT, head_dim]
    const int* bt = block_tables + block_table_start[seq];

    for (int idx = threadIdx.x; idx < R * head_dim; idx += blockDim.x) {
        int r = idx / head_dim, d = idx % head_dim;
        int i = r / G, h = kvh * G + r % G;
        Qs[idx] = i < qn ? ld(qkv, (u64)(q0 + i) * row_stride + h * head_dim + d) * scale : 0.0f;
    }
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float m[MAX_RPW], l[MAX_RPW], acc[MAX_RPW][4];
    int rpos[MAX_RPW];
#pragma unroll
    for (int k = 0; k < MAX_RPW; k++) {
        int r = warp + k * NWARPS;
        m[k] = NEG_INF;
        l[k] = 0.0f;
        rpos[k] = (r < R && r / G < qn) ? positions[q0 + r / G] : -1;
#pragma unroll
        for (int c = 0; c < 4; c++) acc[k][c] = 0.0f;
    }
    // Positions increase within a chunk, so the tile's last query sees the most keys. A split
    // decode tile covers only keys [kbeg, kend) (flash-decoding; combined by attention_combine).
    int kbeg = tile_kbeg[tile];
    int kmax = min(positions[q0 + qn - 1], tile_kend[tile] - 1);
    int vk = head_dim / VN, tile_vecs = KT * vk;

    // K/V tiles go global -> registers (all loads in flight at once) -> shared memory; the next
    // tile's loads are issued before the current tile's math.
    V16 kreg[MAXV], vreg[MAXV];
    auto load = [&](int k0) {
#pragma unroll
        for (int u = 0; u < MAXV; u++) {
            int v = threadIdx.x + u * 256;
            int j = v / vk, dv = v % vk, key = k0 + j;
            kreg[u] = V16{0, 0, 0, 0};
            vreg[u] = V16{0, 0, 0, 0};
            if (v < tile_vecs && key <= kmax) {
                int blk = bt[key / block_size], off = key % block_size;
                u64 src = (((u64)blk * num_kv_heads + kvh) * block_size + off) * head_dim + dv * VN;
                kreg[u] = *(const V16*)(k_cache + src);
                vreg[u] = *(const V16*)(v_cache + src);
            }
        }
    };
    auto stash = [&]() {
#pragma unroll
        for (int u = 0; u < MAXV; u++) {
            int v = threadIdx.x + u * 256;
            if (v < tile_vecs) {
                int j = v / vk, d = (v % vk) * VN;
                float f[VN];
                unpack(kreg[u], f, k_cache);
#pragma unroll
                for (int e = 0; e < VN; e++) Ks[j * kstride + d + e] = f[e];
                unpack(vreg[u], f, v_cache);
#pragma unroll
                for (int e = 0; e < VN; e++) Vs[j * head_dim + d + e] = f[e];
            }
        }
    };

    load(kbeg);
    for (int k0 = kbeg; k0 <= kmax; k0 += KT) {
        __syncthreads();
        stash();
        __syncthreads();
        if (k0 + KT <= kmax) load(k0 + KT);
        // A warp's rows share each K and V read from shared memory (4 independent chains).
        // `live` is warp-uniform: a row is live when some key of this tile is visible to it.
        bool live[MAX_RPW];
        float s[MAX_RPW], p[MAX_RPW];
#pragma unroll
        for (int k = 0; k < MAX_RPW; k++) {
            live[k] = rpos[k] >= k0;
            s[k] = 0.0f;
        }
        const float* kr = Ks + lane * kstride;
        for (int d = 0; d < head_dim; d += 4) {
            F4 b = *(const F4*)(kr + d);
#pragma unroll
            for (int k = 0; k < MAX_RPW; k++) {
                if (live[k]) {
                    F4 a = *(const F4*)(Qs + (warp + k * NWARPS) * head_dim + d);
                    s[k] += a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
                }
            }
        }
#pragma unroll
        for (int k = 0; k < MAX_RPW; k++) {
            p[k] = 0.0f;
            if (!live[k]) continue;
            float sk = k0 + lane > min(rpos[k], kmax) ? NEG_INF : s[k];
            float mn = fmaxf(m[k], warp_max(sk));
            p[k] = __expf(sk - mn);
            float corr = __expf(m[k] - mn);
            l[k] = l[k] * corr + warp_sum(p[k]);
            m[k] = mn;
#pragma unroll
            for (int c = 0; c < 4; c++) acc[k][c] *= corr;
        }
        bool owns = 4 * lane < head_dim;  // lane owns dims 4*lane .. 4*lane+3
#pragma unroll 4
        for (int j = 0; j < KT; j++) {
            F4 v = owns ? *(const F4*)(Vs + j * head_dim + 4 * lane) : F4{0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
            for (int k = 0; k < MAX_RPW; k++) {
                if (live[k]) {
                    float pj = __shfl_sync(0xffffffffu, p[k], j);
                    acc[k][0] += pj * v.x;
                    acc[k][1] += pj * v.y;
                    acc[k][2] += pj * v.z;
                    acc[k][3] += pj * v.w;
                }
            }
        }
    }
    int part = tile_part[tile];
#pragma unroll
    for (int k = 0; k < MAX_RPW; k++) {
        int r = warp + k * NWARPS;
        if (rpos[k] < 0 || 4 * lane >= head_dim) continue;
        if (part >= 0) {  // a split decode tile (one query, rows r < G): unnormalized partials
            u64 row = ((u64)part * num_kv_heads + kvh) * G + r;
            if (lane == 0) {
                part_ml[2 * row] = m[k];
                part_ml[2 * row + 1] = l[k];
            }
#pragma unroll
            for (int c = 0; c < 4; c++) part_acc[row * head_dim + 4 * lane + c] = acc[k][c];
            continue;
        }
        int i = r / G, h = kvh * G + r % G;
        u64 o = (u64)(q0 + i) * num_q_heads * head_dim + h * head_dim + 4 * lane;
        float inv = 1.0f / l[k];
#pragma unroll
        for (int c = 0; c < 4; c++) st(out, o + c, acc[k][c] * inv);
    }
}

struct alignas(8) F2 { float x, y; };

// The softmax merge of one head's split parts (flash-decoding) for N consecutive dims d..d+N-1.
// Both combine kernels use it, with explicit fma and division, so they give the same bits.
// Partial row of (part p, q head h): p * num_q_heads + h (= [parts, kv_heads, group] order).
template <int N>
__device__ __forceinline__ void merge_parts(float* o, const float* part_ml, const float* part_acc, int p0, int np,
                                            int num_q_heads, int h, int head_dim, int d) {
    // Unrolled so that several parts' loads are in flight at once (the loops are latency bound).
    float mx = NEG_INF;
#pragma unroll 8
    for (int p = 0; p < np; p++) mx = fmaxf(mx, part_ml[2 * ((u64)(p0 + p) * num_q_heads + h)]);
    float sum = 0.0f, acc[N];
#pragma unroll
    for (int c = 0; c < N; c++) acc[c] = 0.0f;
#pragma unroll 8
    for (int p = 0; p < np; p++) {
        u64 row = (u64)(p0 + p) * num_q_heads + h;
        F2 ml = *(const F2*)(part_ml + 2 * row);
        float w = ml.y > 0.0f ? __expf(ml.x - mx) : 0.0f;
        sum = __fmaf_rn(ml.y, w, sum);
        const float* a = part_acc + row * head_dim + d;
        if constexpr (N == 4) {
            F4 v = *(const F4*)a;
            acc[0] = __fmaf_rn(v.x, w, acc[0]);
            acc[1] = __fmaf_rn(v.y, w, acc[1]);
            acc[2] = __fmaf_rn(v.z, w, acc[2]);
            acc[3] = __fmaf_rn(v.w, w, acc[3]);
        } else {
#pragma unroll
            for (int c = 0; c < N; c++) acc[c] = __fmaf_rn(a[c], w, acc[c]);
        }
    }
#pragma unroll
    for (int c = 0; c < N; c++) o[c] = __fdiv_rn(acc[c], sum);
}

// Merges the partial softmax states of a split decode tile: grid (groups, q heads), one thread per
// head dimension (a block per kv head was too few blocks at batch 1: 8 for the 70B).
template <typename A>
__device__ void attention_combine_t(A* out, const float* part_ml, const float* part_acc, const int* group_part0,
                                    const int* group_nparts, const int* group_q0, int num_q_heads, int head_dim) {
    int g = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
    if (d >= head_dim) return;
    float v;
    merge_parts<1>(&v, part_ml, part_acc, group_part0[g], group_nparts[g], num_q_heads, h, head_dim, d);
    st(out, (u64)group_q0[g] * num_q_heads * head_dim + (u64)h * head_dim + d, v);
}

// ---- attention_combine then quantize_fp8 of its rows (the o_proj input), the same bits as the pair.
//
// Grid (column blocks, groups): a block merges `heads_per_block` heads of one row, 4 dims per
// thread, stores them (as A) into `out` and its max |value| into amax_part[g, block]. The last block
// of a row to finish (a ticket from counters[g], which it resets to 0) quantizes the whole row with
// quantize_fp8's scale; so a row is spread over several blocks without a second launch.

__device__ __forceinline__ float act_round(float x, const float*) { return x; }
__device__ __forceinline__ float act_round(float x, const bf16*) { return bf2f(f2bf(x)); }

__device__ __forceinline__ void store4(float* p, const float* v) { *(F4*)p = F4{v[0], v[1], v[2], v[3]}; }
__device__ __forceinline__ void store4(bf16* p, const float* v) {
    F2 w;
    w.x = __uint_as_float((unsigned)f2bf(v[0]) | ((unsigned)f2bf(v[1]) << 16));
    w.y = __uint_as_float((unsigned)f2bf(v[2]) | ((unsigned)f2bf(v[3]) << 16));
    *(F2*)p = w;
}


// Needs head_dim % 4 == 0; counters zeroed before the first launch (every launch leaves them 0).
template <typename A>
__device__ void attention_combine_fp8_t(A* out, fp8* xq, float* xs, unsigned* counters, float* amax_part,
                                        const float* part_ml, const float* part_acc, const int* group_part0,
                                        const int* group_nparts, const int* group_q0, int num_q_heads, int head_dim,
                                        int heads_per_block) {
    __shared__ float scratch[32];
    __shared__ bool last;
    int g = blockIdx.y, blk = blockIdx.x, nblk = gridDim.x, t = threadIdx.x;
    int per_head = head_dim / 4, cols = num_q_heads * head_dim, q0 = group_q0[g];
    A* o = out + (u64)q0 * cols;
    float amax = 0.0f;
    if (t < heads_per_block * per_head) {
        int h = blk * heads_per_block + t / per_head, d = (t % per_head) * 4;
        float v[4];
        merge_parts<4>(v, part_ml, part_acc, group_part0[g], group_nparts[g], num_q_heads, h, head_dim, d);
#pragma unroll
        for (int c = 0; c < 4; c++) amax = fmaxf(amax, fabsf(act_round(v[c], o)));
        store4(o + h * head_dim + d, v);
    }
    amax = block_max(amax, scratch);
    if (t == 0) amax_part[(u64)g * nblk + blk] = amax;
    // Publish this block's values before taking a ticket (the threadFenceReduction pattern).
    __threadfence();
    __syncthreads();
    if (t == 0) last = atomicAdd(counters + g, 1u) == (unsigned)(nblk - 1);
    __syncthreads();
    if (!last) return;
    __threadfence();
    float m = 0.0f;
    for (int b = 0; b < nblk; b++) m = fmaxf(m, load_cg(amax_part + (u64)g * nblk + b));
    // quantize_fp8's scale and rounding (elementwise.cu), on the values as stored.
    float scale = fmaxf(m / FP8_MAX, 1.0f / (FP8_MAX * 512.0f));
    Fp8Quant<A> quant(scale);
    fp8* q = xq + (u64)q0 * cols;
    for (int i = 4 * t; i < cols; i += 4 * blockDim.x) {
        float f[4];
        load4_cg(o + i, f);
        unsigned packed = 0;
#pragma unroll
        for (int c = 0; c < 4; c++) packed |= (unsigned)quant(f[c]) << (8 * c);
        *(unsigned*)(q + i) = packed;
    }
    if (t == 0) {
        xs[q0] = scale;
        counters[g] = 0;
    }
}

#define ATTENTION_KERNEL(A, SUFFIX)                                                                          \
    extern "C" __global__ void __launch_bounds__(256) paged_attention_##SUFFIX(                              \
        A* out, const A* qkv, const A* k_cache, const A* v_cache, const int* positions, const int* tile_seq, \
        const int* tile_q_start, const int* tile_q_len, const int* block_tables, const int* block_table_start, \
        const int* tile_kbeg, const int* tile_kend, const int* tile_part, float* part_ml, float* part_acc,    \
        int row_stride, int num_q_heads, int num_kv_heads, int head_dim, int block_size, float scale,          \
        int q_per_tile) { pdl_enter();                                                                         \
        paged_attention_t<A, A>(out, qkv, k_cache, v_cache, positions, tile_seq, tile_q_start, tile_q_len,    \
                                block_tables, block_table_start, tile_kbeg, tile_kend, tile_part, part_ml,    \
                                part_acc, row_stride, num_q_heads, num_kv_heads, head_dim, block_size, scale, \
                                q_per_tile);                                                                  \
    }                                                                                                         \
    extern "C" __global__ void attention_combine_##SUFFIX(A* out, const float* part_ml, const float* part_acc,   \
                                                          const int* group_part0, const int* group_nparts,     \
                                                          const int* group_q0, int num_q_heads, int head_dim) { pdl_enter(); \
        attention_combine_t<A>(out, part_ml, part_acc, group_part0, group_nparts, group_q0, num_q_heads,      \
                               head_dim);                                                                     \
    }                                                                                                         \
    extern "C" __global__ void attention_combine_fp8_##SUFFIX(                                                \
        A* out, fp8* xq, float* xs, unsigned* counters, float* amax_part, const float* part_ml,               \
        const float* part_acc, const int* group_part0, const int* group_nparts, const int* group_q0,          \
        int num_q_heads, int head_dim, int heads_per_block) { pdl_enter();                                    \
        attention_combine_fp8_t<A>(out, xq, xs, counters, amax_part, part_ml, part_acc, group_part0,          \
                                   group_nparts, group_q0, num_q_heads, head_dim, heads_per_block);           \
    }

ATTENTION_KERNEL(bf16, bf16)
ATTENTION_KERNEL(float, f32)
