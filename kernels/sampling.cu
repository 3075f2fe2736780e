// Token selection on the device, one block (1024 threads) per sequence.
//
// params[s] = {temperature, top_k, top_p, uniform}. temperature <= 0: argmax (lowest index on ties).
// Otherwise w_i = exp((x_i - max) / temperature); keep w_i >= (k-th largest w) when 0 < top_k < vocab;
// then keep the smallest set of largest w whose sum reaches top_p of the kept mass (whole tie groups);
// then walk the kept tokens by (w descending, index ascending) and return the first whose running
// sum exceeds uniform * (kept mass). Thresholds are found by a search on the float bit patterns
// (positive floats order like their bits), so no sort is needed.

#define SAMPLE_THREADS 1024
#define SAMPLE_UNROLL 8

// Calls f(w_i) for this thread's elements of the row, in index order, w_i = exp((x_i - mx) *
// inv_temp). One block streams the row several times per sample: each thread loads UNROLL elements
// before it uses them, so UNROLL loads are in flight instead of one L2 round trip per element.
template <int UNROLL, typename F>
__device__ __forceinline__ void for_each_weight(const float* x, int vocab, float mx, float inv_temp, F f) {
    for (int base = threadIdx.x; base < vocab; base += UNROLL * blockDim.x) {
        float v[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            int i = base + u * blockDim.x;
            v[u] = i < vocab ? x[i] : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            if (base + u * blockDim.x >= vocab) break;
            f(__expf((v[u] - mx) * inv_temp));
        }
    }
}

// Sum (or count) of w >= t over the row.
__device__ float mass_at_least(const float* x, int vocab, float mx, float inv_temp, float t, bool count,
                               float* scratch) {
    float acc = 0.0f;
    for_each_weight<SAMPLE_UNROLL>(x, vocab, mx, inv_temp, [&](float w) {
        if (w >= t) acc += count ? 1.0f : w;
    });
    return block_sum(acc, scratch);
}

// Thresholds a search pass evaluates at once (the interval shrinks SEARCH_WAYS + 1-fold a pass).
#define SEARCH_WAYS 16
// Loads in flight per thread in a search pass (fewer than SAMPLE_UNROLL: the sums take registers).
#define SEARCH_UNROLL 4

// Largest t (as bits, in [lo, 0x7f800000)) with mass_at_least(t) >= goal (or > goal when strict).
// A (SEARCH_WAYS + 1)-ary search: each pass over the row sums the mass at SEARCH_WAYS thresholds
// at once (8 passes instead of bisection's 31). Each threshold's sum is added in mass_at_least's
// order (per thread in index order, then block_sum's two butterflies), so the result is the
// bisection's, bit for bit.
__device__ unsigned largest_threshold(const float* x, int vocab, float mx, float inv_temp, unsigned lo, float goal,
                                      bool count, bool strict) {
    __shared__ float partial[SEARCH_WAYS][32];
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
        for_each_weight<SEARCH_UNROLL>(x, vocab, mx, inv_temp, [&](float w) {
            float add = count ? 1.0f : w;
#pragma unroll
            for (int j = 0; j < SEARCH_WAYS; j++)
                if (w >= t[j]) acc[j] += add;
        });
        __syncthreads();  // the previous pass's totals are read
#pragma unroll
        for (int j = 0; j < SEARCH_WAYS; j++) {
            float r = warp_sum(acc[j]);
            if (lane == 0) partial[j][warp] = r;
        }
        __syncthreads();
        for (int j = warp; j < SEARCH_WAYS; j += nwarps) {
            float r = warp_sum(lane < nwarps ? partial[j][lane] : 0.0f);
            if (lane == 0) total[j] = r;
        }
        __syncthreads();
        // The mass falls as t rises: the first threshold that fails bounds the answer above.
        unsigned new_lo = lo, new_hi = hi;
        for (int j = 0; j < SEARCH_WAYS; j++) {
            unsigned tj = __float_as_uint(t[j]);
            if (tj <= new_lo || tj >= new_hi) continue;
            bool ok = strict ? total[j] > goal : total[j] >= goal;
            if (ok) new_lo = tj; else new_hi = tj;
        }
        lo = new_lo, hi = new_hi;
    }
    return lo;
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample_tokens(int* out, const float* logits,
                                                                          const float* params, int vocab) {
    pdl_enter();
    __shared__ float scratch[32];
    __shared__ float best_v[32];
    __shared__ int best_i[32];
    __shared__ int counts[SAMPLE_THREADS];
    int s = blockIdx.x;
    const float* x = logits + (u64)s * vocab;
    float temp = params[4 * s], top_p = params[4 * s + 2], u = params[4 * s + 3];
    int top_k = (int)params[4 * s + 1];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    // Argmax, lowest index on ties (also the max for the softmax).
    float bv = NEG_INF;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        float v = x[i];
        if (v > bv) { bv = v; bi = i; }
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
        if (lane == 0) { best_v[0] = bv; best_i[0] = bi; }
    }
    __syncthreads();
    float mx = best_v[0];
    if (temp <= 0.0f) {
        if (threadIdx.x == 0) out[s] = best_i[0];
        return;
    }
    float inv_temp = 1.0f / temp;

    unsigned t_keep = 0;  // keep w >= t_keep
    if (top_k > 0 && top_k < vocab)
        t_keep = largest_threshold(x, vocab, mx, inv_temp, 0u, (float)top_k, true, false);
    if (top_p < 1.0f) {
        float kept = mass_at_least(x, vocab, mx, inv_temp, __uint_as_float(t_keep), false, scratch);
        t_keep = largest_threshold(x, vocab, mx, inv_temp, t_keep, top_p * kept, false, false);
    }
    float z = mass_at_least(x, vocab, mx, inv_temp, __uint_as_float(t_keep), false, scratch);
    float target = u * z;
    // The chosen token's weight: the largest w whose "at least w" mass exceeds target.
    unsigned level_bits = largest_threshold(x, vocab, mx, inv_temp, t_keep, target, false, true);
    float level = __uint_as_float(level_bits);
    float above = mass_at_least(x, vocab, mx, inv_temp, __uint_as_float(level_bits + 1), false, scratch);
    int nth = (int)((target - above) / level);  // which of the tokens tied at `level`, by index

    // Ordered search among the tokens with w == level: contiguous chunks per thread, prefix counts.
    int chunk = (vocab + blockDim.x - 1) / blockDim.x;
    int begin = threadIdx.x * chunk, end = min(begin + chunk, vocab);
    int c = 0;
    for (int i = begin; i < end; i++)
        if (__expf((x[i] - mx) * inv_temp) == level) c++;
    counts[threadIdx.x] = c;
    __syncthreads();
    if (threadIdx.x == 0) {
        int total = 0;
        for (int i = 0; i < blockDim.x; i++) { int v = counts[i]; counts[i] = total; total += v; }
        if (nth >= total) nth = total - 1;
        if (nth < 0) nth = 0;
        best_i[1] = nth;
        best_i[2] = -1;
    }
    __syncthreads();
    nth = best_i[1];
    int seen = counts[threadIdx.x];
    if (nth >= seen && nth < seen + c) {
        for (int i = begin; i < end; i++) {
            if (__expf((x[i] - mx) * inv_temp) == level) {
                if (seen == nth) { best_i[2] = i; break; }
                seen++;
            }
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) out[s] = best_i[2] >= 0 ? best_i[2] : best_i[0];
}

// Async scheduling: a decode token the host has not read yet. pairs[2i] is a flat token index of
// this step's plan, pairs[2i + 1] the row of the previous step's sampled tokens that goes there.
extern "C" __global__ void take_previous_tokens(int* tokens, const int* sampled, const int* pairs, int n) {
    pdl_enter();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) tokens[pairs[2 * i]] = sampled[pairs[2 * i + 1]];
}
