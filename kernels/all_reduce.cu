// One-shot all-reduce for small messages between the GPUs of one process (tensor parallelism):
// every rank copies its values into its own peer-visible buffer, tells every peer so with a flag
// written into the peer's memory, waits for all peers' flags, then sums all ranks' buffers over
// NVLink into its output. One kernel and one hop instead of NCCL's ring: at decode sizes
// (16 KiB per token row) the collective is all latency.
//
// Each rank's buffer: [flags: ALL_REDUCE_MAX_BLOCKS x ALL_REDUCE_MAX_RANKS u32][slot 0][slot 1].
// Call e (epoch, counting from 1 on every rank alike) uses slot e & 1; a rank can only reach call
// e + 2, which overwrites that slot, after every peer has signalled call e + 1, which each does only
// after its call e has finished reading. Block b of every rank handles the same elements and
// handshakes on flag [b][rank], so blocks never wait on each other within a rank.
// All ranks add in rank order, so every rank ends with the same bits.
//
// The epoch comes from device memory, so a CUDA graph can replay the calls: call k (1, 2, ...) of a
// step uses *epoch_base + k, and all_reduce_epoch_advance adds the step's count of calls after
// its last one. Every block reads the base; nothing changes it until the step's calls are done.

#define ALL_REDUCE_MAX_BLOCKS 64
#define ALL_REDUCE_MAX_RANKS 8
#define ALL_REDUCE_THREADS 512
// Spin this long for a peer (a rank that died or diverged) before trapping, which fails the
// context and so the step, instead of hanging it.
#define ALL_REDUCE_TIMEOUT_NS 10000000000ull

__device__ __forceinline__ void store_release_sys(unsigned* p, unsigned v) {
    asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ unsigned load_acquire_sys(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ u64 global_ns() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

struct alignas(16) ar_v16 {
    unsigned a, b, c, d;
};

__device__ __forceinline__ ar_v16 load_cg(const ar_v16* p) {
    ar_v16 v;
    asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.a), "=r"(v.b), "=r"(v.c), "=r"(v.d)
                 : "l"(p));
    return v;
}

template <typename T>
struct ArLanes;  // values per 16 bytes, and their sum into f32 accumulators

template <>
struct ArLanes<bf16> {
    static constexpr int N = 8;
    __device__ static void add(float* acc, ar_v16 v) {
        const unsigned w[4] = {v.a, v.b, v.c, v.d};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            acc[2 * i] += bf2f((bf16)(w[i] & 0xffff));
            acc[2 * i + 1] += bf2f((bf16)(w[i] >> 16));
        }
    }
    __device__ static ar_v16 pack(const float* acc) {
        unsigned w[4];
#pragma unroll
        for (int i = 0; i < 4; i++) w[i] = (unsigned)f2bf(acc[2 * i]) | ((unsigned)f2bf(acc[2 * i + 1]) << 16);
        return ar_v16{w[0], w[1], w[2], w[3]};
    }
};

template <>
struct ArLanes<float> {
    static constexpr int N = 4;
    __device__ static void add(float* acc, ar_v16 v) {
        acc[0] += __uint_as_float(v.a);
        acc[1] += __uint_as_float(v.b);
        acc[2] += __uint_as_float(v.c);
        acc[3] += __uint_as_float(v.d);
    }
    __device__ static ar_v16 pack(const float* acc) {
        return ar_v16{__float_as_uint(acc[0]), __float_as_uint(acc[1]), __float_as_uint(acc[2]),
                      __float_as_uint(acc[3])};
    }
};

// `x`: n16 16-byte vectors of this rank's values, summed in place. `bufs[r]`: rank r's buffer
// base (peer pointers, valid here through peer access). `slot_bytes`: size of one data slot.
template <typename T>
__device__ void all_reduce_oneshot(ar_v16* x, const u64* bufs, int world, int rank, u64 n16,
                                   const unsigned* epoch_base, unsigned call, u64 slot_bytes) {
    const unsigned epoch = *epoch_base + call;
    const u64 flag_bytes = ALL_REDUCE_MAX_BLOCKS * ALL_REDUCE_MAX_RANKS * 4;
    const u64 data_off = flag_bytes + (u64)(epoch & 1u) * slot_bytes;
    ar_v16* mine = (ar_v16*)((unsigned char*)bufs[rank] + data_off);
    const u64 stride = (u64)gridDim.x * blockDim.x;
    const u64 first = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    for (u64 i = first; i < n16; i += stride) mine[i] = x[i];
    __syncthreads();
    if (threadIdx.x < world) {
        // The block's writes (ordered before this thread's by the barrier) become visible to
        // the peer before the flag does: release at system scope is cumulative.
        unsigned* peer_flags = (unsigned*)bufs[threadIdx.x];
        store_release_sys(peer_flags + blockIdx.x * ALL_REDUCE_MAX_RANKS + rank, epoch);
        const unsigned* my_flag =
            (const unsigned*)bufs[rank] + blockIdx.x * ALL_REDUCE_MAX_RANKS + threadIdx.x;
        const u64 t0 = global_ns();
        while ((int)(load_acquire_sys(my_flag) - epoch) < 0) {
            if (global_ns() - t0 > ALL_REDUCE_TIMEOUT_NS) __trap();
        }
    }
    __syncthreads();
    for (u64 i = first; i < n16; i += stride) {
        float acc[ArLanes<T>::N];
#pragma unroll
        for (int j = 0; j < ArLanes<T>::N; j++) acc[j] = 0.0f;
        for (int r = 0; r < world; r++) {
            const ar_v16* src = (const ar_v16*)((const unsigned char*)bufs[r] + data_off);
            ArLanes<T>::add(acc, load_cg(src + i));
        }
        x[i] = ArLanes<T>::pack(acc);
    }
}

extern "C" __global__ void __launch_bounds__(ALL_REDUCE_THREADS)
    all_reduce_oneshot_bf16(ar_v16* x, const u64* bufs, int world, int rank, u64 n16,
                            const unsigned* epoch_base, unsigned call, u64 slot_bytes) {
    pdl_enter();
    all_reduce_oneshot<bf16>(x, bufs, world, rank, n16, epoch_base, call, slot_bytes);
}

extern "C" __global__ void __launch_bounds__(ALL_REDUCE_THREADS)
    all_reduce_oneshot_f32(ar_v16* x, const u64* bufs, int world, int rank, u64 n16,
                           const unsigned* epoch_base, unsigned call, u64 slot_bytes) {
    pdl_enter();
    all_reduce_oneshot<float>(x, bufs, world, rank, n16, epoch_base, call, slot_bytes);
}

// One thread: moves the epoch base past a step's `calls` all-reduces.
extern "C" __global__ void all_reduce_epoch_advance(unsigned* epoch_base, unsigned calls) {
    pdl_enter();
    *epoch_base += calls;
}
