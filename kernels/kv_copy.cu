// KV block copy between two paged KV pools (same GPU, a peer GPU, or a CUDA IPC mapping): the
// transfer of a prefilled prompt to a decode worker. Both pools have the backend's layout: per
// layer a K pool then a V pool, each [num_blocks, heads, block_size, head_dim]; within one block of
// one (layer, K|V), a run of heads is one contiguous byte range, so a TP split or merge is just a
// head offset on each side.
//
// One launch moves every (src block, dst block) pair of `pairs` for layers layer0..layer0+n_layers,
// K and V: blockIdx.x = (pair, layer, K|V), blockIdx.y = 16 KiB chunk of that run. 16-byte
// accesses, four loads in flight per thread before the stores.

struct alignas(16) v16 {
    unsigned a, b, c, d;
};

#define KV_COPY_THREADS 256
#define KV_COPY_UNROLL 4
#define KV_COPY_CHUNK (KV_COPY_THREADS * KV_COPY_UNROLL * 16)

extern "C" __global__ void kv_copy_blocks(const unsigned char* __restrict__ src,
                                          unsigned char* __restrict__ dst,
                                          const unsigned* __restrict__ pairs,  // [n_pairs][2]
                                          int n_layers, int layer0,
                                          u64 src_part_stride,   // bytes of one (layer, K|V) pool
                                          u64 src_block_stride,  // bytes of one block in it
                                          u64 dst_part_stride, u64 dst_block_stride,
                                          u64 src_head_off,  // first source head * slab bytes
                                          u64 dst_head_off,  // first destination head * slab bytes
                                          u64 run_bytes) {   // heads copied * slab bytes
    const unsigned unit = blockIdx.x;
    const unsigned per_pair = 2u * (unsigned)n_layers;
    const unsigned p = unit / per_pair;
    const unsigned r = unit % per_pair;
    const u64 part = 2ull * (u64)(layer0 + (int)(r >> 1)) + (r & 1u);
    const u64 src_block = pairs[2 * p], dst_block = pairs[2 * p + 1];
    const v16* s = (const v16*)(src + part * src_part_stride + src_block * src_block_stride + src_head_off);
    v16* d = (v16*)(dst + part * dst_part_stride + dst_block * dst_block_stride + dst_head_off);
    const u64 n = run_bytes / 16;
    const u64 base = (u64)blockIdx.y * (KV_COPY_CHUNK / 16) + threadIdx.x;
    v16 buf[KV_COPY_UNROLL];
#pragma unroll
    for (int k = 0; k < KV_COPY_UNROLL; ++k) {
        const u64 i = base + (u64)k * KV_COPY_THREADS;
        if (i < n) buf[k] = s[i];
    }
#pragma unroll
    for (int k = 0; k < KV_COPY_UNROLL; ++k) {
        const u64 i = base + (u64)k * KV_COPY_THREADS;
        if (i < n) d[i] = buf[k];
    }
}
