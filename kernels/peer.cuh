// The flag handshake of the one-shot peer all-reduce (all_reduce.cu), shared with the fused
// all-reduce + norm (add_rmsnorm_fp8_peer_k*, elementwise.cu).
//
// Each rank's buffer: [flags: ALL_REDUCE_MAX_BLOCKS x ALL_REDUCE_MAX_RANKS u32][slot 0][slot 1].
// Call e (epoch, counting from 1 on every rank alike) uses slot e & 1; a rank can only reach call
// e + 2, which overwrites that slot, after every peer has signalled call e + 1, which each does only
// after its call e has finished reading (every call has a block 0, which waits for all peers). Block
// b of every rank handles the same elements within a call and handshakes on flag [b][rank], so
// blocks never wait on each other within a rank. All ranks add in rank order, so every rank ends
// with the same bits.
//
// The epoch comes from device memory, so a CUDA graph can replay the calls: call k (1, 2, ...) of a
// step uses *epoch_base + k, and all_reduce_epoch_advance adds the step's count of calls after
// its last one. Every block reads the base; nothing changes it until the step's calls are done.

#define ALL_REDUCE_MAX_BLOCKS 64
#define ALL_REDUCE_MAX_RANKS 8
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

// Byte offset of the data slot of `epoch` in every rank's buffer.
__device__ __forceinline__ u64 peer_slot_offset(unsigned epoch, u64 slot_bytes) {
    return (u64)ALL_REDUCE_MAX_BLOCKS * ALL_REDUCE_MAX_RANKS * 4 + (u64)(epoch & 1u) * slot_bytes;
}

// This block tells every peer that its data of `epoch` is in place, then waits for theirs. Call it
// after a __syncthreads that follows the block's writes to its slot, and __syncthreads after.
__device__ __forceinline__ void peer_handshake(const u64* bufs, int world, int rank, unsigned epoch) {
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
}
