// One-shot all-reduce for small messages between the GPUs of one process (tensor parallelism):
// every rank copies its values into its own peer-visible buffer, tells every peer so with a flag
// written into the peer's memory, waits for all peers' flags, then sums all ranks' buffers over
// NVLink into its output. One kernel and one hop instead of NCCL's ring: at decode sizes
// (16 KiB per token row) the collective is all latency.
//
// The buffers, epochs and handshake: peer.cuh (prepended).

#define ALL_REDUCE_THREADS 512

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
    const u64 data_off = peer_slot_offset(epoch, slot_bytes);
    ar_v16* mine = (ar_v16*)((unsigned char*)bufs[rank] + data_off);
    const u64 stride = (u64)gridDim.x * blockDim.x;
    const u64 first = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    for (u64 i = first; i < n16; i += stride) mine[i] = x[i];
    __syncthreads();
    peer_handshake(bufs, world, rank, epoch);
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
