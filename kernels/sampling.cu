// Token selection on the device, one cluster of SAMPLE_CLUSTER blocks (1024 threads each) per
// sequence: block r of the cluster streams slice r of the row, and every reduction is summed over
// the cluster in block order through distributed shared memory, so all blocks reach the same bits.
// One block per row read its 128K logits some 20 times a sample through one SM (about 0.3 ms at
// temperature 1); the cluster reads them through 8.
//
// params[s] = {temperature, top_k, top_p, uniform}. temperature <= 0: argmax (lowest index on ties).
// Otherwise w_i = exp((x_i - max) / temperature); keep w_i >= (k-th largest w) when 0 < top_k < vocab;
// then keep the smallest set of largest w whose sum reaches top_p of the kept mass (whole tie groups);
// then walk the kept tokens by (w descending, index ascending) and return the first whose running
// sum exceeds uniform * (kept mass). Thresholds are found by a search on the float bit patterns
// (positive floats order like their bits), so no sort is needed.

#define SAMPLE_THREADS 1024
#define SAMPLE_CLUSTER 8
#define SAMPLE_UNROLL 8

// Every thread of every block of the cluster arrives; shared-memory writes before it are visible
// to the whole cluster after it (it is also a block barrier).
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// *p (a variable of this block's shared memory) in block `rank` of the cluster.
__device__ __forceinline__ float cluster_ld(const float* p, unsigned rank) {
    unsigned remote;
    float v;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_u32(p)), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
    return v;
}

// part[0..m) of every block summed in block order into out[0..m) (shared memory; m <= threads).
__device__ __forceinline__ void cluster_sum_array(const float* part, float* out, int m) {
    cluster_sync();  // every block's part is written
    if (threadIdx.x < m) {
        float t = 0.0f;
        for (int r = 0; r < SAMPLE_CLUSTER; r++) t += cluster_ld(part + threadIdx.x, r);
        out[threadIdx.x] = t;
    }
    cluster_sync();  // every read of part is done before it is written again; out is visible
}

// This block's slice of the row (lengths a multiple of 4 but the last).
struct Slice {
    int begin, end;
};

__device__ __forceinline__ Slice row_slice(int vocab) {
    int per = ((vocab + SAMPLE_CLUSTER - 1) / SAMPLE_CLUSTER + 3) & ~3;
    int r = blockIdx.x % SAMPLE_CLUSTER;
    int b = min(r * per, vocab);
    return Slice{b, min(b + per, vocab)};
}

// Calls f(w_i) for this thread's elements of the slice, in index order, w_i = exp((x_i - mx) *
// inv_temp). Each thread loads UNROLL elements before it uses them, so UNROLL loads are in flight
// instead of one L2 round trip per element.
template <int UNROLL, typename F>
__device__ __forceinline__ void for_each_weight(const float* x, Slice sl, float mx, float inv_temp, F f) {
    for (int base = sl.begin + threadIdx.x; base < sl.end; base += UNROLL * blockDim.x) {
        float v[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            int i = base + u * blockDim.x;
            v[u] = i < sl.end ? x[i] : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            if (base + u * blockDim.x >= sl.end) break;
            f(__expf((v[u] - mx) * inv_temp));
        }
    }
}

// Sum (or count) of w >= t over the row.
__device__ float mass_at_least(const float* x, Slice sl, float mx, float inv_temp, float t, bool count,
                               float* scratch) {
    __shared__ float part, total;
    float acc = 0.0f;
    for_each_weight<SAMPLE_UNROLL>(x, sl, mx, inv_temp, [&](float w) {
        if (w >= t) acc += count ? 1.0f : w;
    });
    acc = block_sum(acc, scratch);
    if (threadIdx.x == 0) part = acc;
    cluster_sum_array(&part, &total, 1);
    return total;
}

// Thresholds a search pass evaluates at once (the interval shrinks SEARCH_WAYS + 1-fold a pass).
#define SEARCH_WAYS 16
// Loads in flight per thread in a search pass (fewer than SAMPLE_UNROLL: the sums take registers).
#define SEARCH_UNROLL 4

// Largest t (as bits, in [lo, 0x7f800000)) with mass_at_least(t) >= goal (or > goal when strict).
// A (SEARCH_WAYS + 1)-ary search: each pass over the row sums the mass at SEARCH_WAYS thresholds
// at once (8 passes instead of bisection's 31). Each threshold's sum is added in mass_at_least's
// order (per thread in index order, then block_sum's two butterflies, then the blocks in order),
// so the result is the bisection's, bit for bit.
__device__ unsigned largest_threshold(const float* x, Slice sl, float mx, float inv_temp, unsigned lo, float goal,
                                      bool count, bool strict) {
    __shared__ float partial[SEARCH_WAYS][32];
    __shared__ float block_total[SEARCH_WAYS];
    __shared__ float total[SEARCH_WAYS];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
    unsigned hi = 0x7f800000u;
    while (hi - lo > 1) {
        float t[SEARCH_WAYS], acc[SEARCH_WAYS];
#pragma unroll
        for (int j = 0; j < SEARCH_WAYS; j++) {
            t[j] = __uint_as_float(lo + (unsigned)((unsigned long long)(hi - lo) * (j + 1) / (SEARCH_WAYS + 1)));
            acc[j] = 0.0f;
        }
        for_each_weight<SEARCH_UNROLL>(x, sl, mx, inv_temp, [&](float w) {
            float add = count ? 1.0f : w;
#pragma unroll
            for (int j = 0; j < SEARCH_WAYS; j++)
                if (w >= t[j]) acc[j] += add;
        });
#pragma unroll
        for (int j = 0; j < SEARCH_WAYS; j++) {
            float r = warp_sum(acc[j]);
            if (lane == 0) partial[j][warp] = r;
        }
        __syncthreads();
        for (int j = warp; j < SEARCH_WAYS; j += nwarps) {
            float r = warp_sum(lane < nwarps ? partial[j][lane] : 0.0f);
            if (lane == 0) block_total[j] = r;
        }
        cluster_sum_array(block_total, total, SEARCH_WAYS);
        // The mass falls as t rises: the first threshold that fails bounds the answer above.
        unsigned new_lo = lo, new_hi = hi;
        for (int j = 0; j < SEARCH_WAYS; j++) {
            unsigned tj = __float_as_uint(t[j]);
            if (tj <= new_lo || tj >= new_hi) continue;
            bool ok = strict ? total[j] > goal : total[j] >= goal;
            if (ok) new_lo = tj; else new_hi = tj;
        }
        lo = new_lo, hi = new_hi;
        __syncthreads();  // every thread has read this pass's totals
    }
    return lo;
}

extern "C" __global__ void __cluster_dims__(SAMPLE_CLUSTER, 1, 1) __launch_bounds__(SAMPLE_THREADS)
    sample_tokens(int* out, const float* logits, const float* params, int vocab) {
    pdl_enter();
    __shared__ float scratch[32];
    __shared__ float best_v[32];
    __shared__ int best_i[32];
    __shared__ float part[2];
    __shared__ int counts[SAMPLE_THREADS];
    int s = blockIdx.x / SAMPLE_CLUSTER;
    unsigned rank = blockIdx.x % SAMPLE_CLUSTER;
    const float* x = logits + (u64)s * vocab;
    Slice sl = row_slice(vocab);
    float temp = params[4 * s], top_p = params[4 * s + 2], u = params[4 * s + 3];
    int top_k = (int)params[4 * s + 1];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    // Argmax, lowest index on ties (also the max for the softmax): the block's over its slice,
    // then the blocks' in order.
    float bv = NEG_INF;
    int bi = 0x7fffffff;
    for (int base = sl.begin + threadIdx.x; base < sl.end; base += SAMPLE_UNROLL * blockDim.x) {
        float v[SAMPLE_UNROLL];
#pragma unroll
        for (int k = 0; k < SAMPLE_UNROLL; k++) {
            int i = base + k * blockDim.x;
            v[k] = i < sl.end ? x[i] : NEG_INF;
        }
#pragma unroll
        for (int k = 0; k < SAMPLE_UNROLL; k++)
            if (v[k] > bv) { bv = v[k]; bi = base + k * blockDim.x; }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
    }
    if (lane == 0) { best_v[warp] = bv; best_i[warp] = bi; }
    __syncthreads();
    if (warp == 0) {
        int nw = blockDim.x >> 5;
        bv = lane < nw ? best_v[lane] : NEG_INF;
        bi = lane < nw ? best_i[lane] : 0x7fffffff;
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
        }
        if (lane == 0) { part[0] = bv; part[1] = __int_as_float(bi); }
    }
    cluster_sync();
    float mx = NEG_INF;
    int arg = 0x7fffffff;
    for (int r = 0; r < SAMPLE_CLUSTER; r++) {  // blocks in index order: ties keep the first
        float v = cluster_ld(&part[0], r);
        int i = __float_as_int(cluster_ld(&part[1], r));
        if (v > mx) { mx = v; arg = i; }
    }
    cluster_sync();  // part is read everywhere before it is reused
    if (temp <= 0.0f) {
        if (rank == 0 && threadIdx.x == 0) out[s] = arg;
        return;
    }
    float inv_temp = 1.0f / temp;

    unsigned t_keep = 0;  // keep w >= t_keep
    if (top_k > 0 && top_k < vocab)
        t_keep = largest_threshold(x, sl, mx, inv_temp, 0u, (float)top_k, true, false);
    if (top_p < 1.0f) {
        float kept = mass_at_least(x, sl, mx, inv_temp, __uint_as_float(t_keep), false, scratch);
        t_keep = largest_threshold(x, sl, mx, inv_temp, t_keep, top_p * kept, false, false);
    }
    float z = mass_at_least(x, sl, mx, inv_temp, __uint_as_float(t_keep), false, scratch);
    float target = u * z;
    // The chosen token's weight: the largest w whose "at least w" mass exceeds target.
    unsigned level_bits = largest_threshold(x, sl, mx, inv_temp, t_keep, target, false, true);
    float level = __uint_as_float(level_bits);
    float above = mass_at_least(x, sl, mx, inv_temp, __uint_as_float(level_bits + 1), false, scratch);
    int nth = (int)((target - above) / level);  // which of the tokens tied at `level`, by index

    // Ordered search among the tokens with w == level: contiguous chunks per thread of the block's
    // slice, prefix counts within the block, then over the blocks before it.
    int len = sl.end - sl.begin;
    int chunk = (len + blockDim.x - 1) / blockDim.x;
    int begin = sl.begin + threadIdx.x * chunk, end = min(begin + chunk, sl.end);
    int c = 0;
    for (int i = begin; i < end; i++)
        if (__expf((x[i] - mx) * inv_temp) == level) c++;
    counts[threadIdx.x] = c;
    __syncthreads();
    if (threadIdx.x == 0) {
        int total = 0;
        for (int i = 0; i < blockDim.x; i++) { int v = counts[i]; counts[i] = total; total += v; }
        part[0] = __int_as_float(total);
    }
    cluster_sync();
    int before = 0, all = 0;
    for (int r = 0; r < SAMPLE_CLUSTER; r++) {
        int n = __float_as_int(cluster_ld(&part[0], r));
        if (r < (int)rank) before += n;
        all += n;
    }
    cluster_sync();  // part is read everywhere before the blocks exit
    if (all == 0) {  // nothing at `level` (not expected): the argmax
        if (rank == 0 && threadIdx.x == 0) out[s] = arg;
        return;
    }
    nth = min(max(nth, 0), all - 1);
    int seen = before + counts[threadIdx.x];
    if (nth >= seen && nth < seen + c) {
        for (int i = begin; i < end; i++) {
            if (__expf((x[i] - mx) * inv_temp) == level) {
                if (seen == nth) { out[s] = i; break; }
                seen++;
            }
        }
    }
}

// Async scheduling: a decode token the host has not read yet. pairs[2i] is a flat token index of
// this step's plan, pairs[2i + 1] the row of the previous step's sampled tokens that goes there.
extern "C" __global__ void take_previous_tokens(int* tokens, const int* sampled, const int* pairs, int n) {
    pdl_enter();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) tokens[pairs[2 * i]] = sampled[pairs[2 * i + 1]];
}
