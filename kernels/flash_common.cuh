// Shared by flash_attention.cu (prefill and mixed batches) and flash_decode.cu (pure decode steps):
// the mma.sync / ldmatrix / cp.async helpers, the work-item arguments, and the kernels' parameter list.
// Prepended to both modules (src/backend/cuda/kernels.rs), after common.cuh.

#define FA_KT 64
#define FA_WARPS 4
#define FA_LN2 0.6931471805599453f
#define FA_LOG2E 1.4426950408889634f

// 16 bytes global -> shared, asynchronously; zero-filled when !valid (src must still be mapped).
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm4(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm2(unsigned addr, unsigned& r0, unsigned& r1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];" : "=r"(r0), "=r"(r1) : "r"(addr));
}
__device__ __forceinline__ void ldsm2_t(unsigned addr, unsigned& r0, unsigned& r1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];" : "=r"(r0), "=r"(r1) : "r"(addr));
}
__device__ __forceinline__ void ldsm4_t(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

// c += a (16x16, row-major) * b (16x8, column-major).
__device__ __forceinline__ void mma_bf16(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// c += a (16x16, row-major) * b (16x8, column-major), F16 inputs.
__device__ __forceinline__ void mma_f16(float* c, const unsigned* a, unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as F16x2 (`lo` in the low half), saturating at +-65504 instead of overflowing.
__device__ __forceinline__ unsigned pack_f16(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.satfinite.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// BF16x2 as F16x2: exact for magnitudes in [2^-14, 65504] (BF16's 8 significant bits fit F16's 11).
__device__ __forceinline__ unsigned bf16x2_to_f16x2(unsigned v) {
    return pack_f16(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));
}

// Two floats as BF16x2: `lo` in the low half (the lower column).
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// (lo, hi) as BF16x2 `h` plus the BF16x2 `l` of what rounding left over.
__device__ __forceinline__ void split_bf16(float lo, float hi, unsigned& h, unsigned& l) {
    h = pack_bf16(lo, hi);
    l = pack_bf16(lo - __uint_as_float(h << 16), hi - __uint_as_float(h & 0xffff0000u));
}

__device__ __forceinline__ float ex2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

// Two e4m3 codes (`x`'s low byte in the low half) as F16x2; exact.
__device__ __forceinline__ unsigned e4m3x2_to_f16x2(unsigned x) {
    unsigned r;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(r) : "h"((unsigned short)(x & 0xffffu)));
    return r;
}

__device__ __forceinline__ float f16_lo(unsigned x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((unsigned short)(x & 0xffffu)));
    return f;
}

// (lo, hi) as F16x2 `h` plus the F16x2 `l` of what rounding left over.
__device__ __forceinline__ void split_f16(float lo, float hi, unsigned& h, unsigned& l) {
    h = pack_f16(lo, hi);
    l = pack_f16(lo - f16_lo(h), hi - f16_lo(h >> 16));
}

// Two e4m3 codes (`x`'s low byte the lower column) times `scale` as BF16x2. e4m3 -> F16 is exact.
__device__ __forceinline__ unsigned e4m3x2_to_bf16x2(unsigned short x, float scale) {
    unsigned h2;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(x));
    float lo, hi;
    asm("cvt.f32.f16 %0, %1;" : "=f"(lo) : "h"((unsigned short)(h2 & 0xffffu)));
    asm("cvt.f32.f16 %0, %1;" : "=f"(hi) : "h"((unsigned short)(h2 >> 16)));
    return pack_bf16(lo * scale, hi * scale);
}

// FP8 KV (`--kv-cache-dtype fp8`): `rows` key rows of D e4m3 codes (dense, as cp.async landed
// them) into BF16 rows of stride D + 8 (the layout the MMA loops read), times the pool's scale.
// Threads tid, tid + nthreads, ... take 16-code chunks.
template <int D>
__device__ __forceinline__ void kv8_to_bf16_rows(bf16* dst, const fp8* raw, int rows, float scale, int tid,
                                                 int nthreads) {
    constexpr int CH8 = D / 16;
    for (int idx = tid; idx < rows * CH8; idx += nthreads) {
        int j = idx / CH8, ch = idx % CH8;
        uint4 x = *(const uint4*)(raw + j * D + ch * 16);
        unsigned w[4] = {x.x, x.y, x.z, x.w}, o[8];
#pragma unroll
        for (int e = 0; e < 4; e++) {
            o[2 * e] = e4m3x2_to_bf16x2((unsigned short)(w[e] & 0xffffu), scale);
            o[2 * e + 1] = e4m3x2_to_bf16x2((unsigned short)(w[e] >> 16), scale);
        }
        uint4* out = (uint4*)(dst + j * (D + 8) + ch * 16);
        out[0] = make_uint4(o[0], o[1], o[2], o[3]);
        out[1] = make_uint4(o[4], o[5], o[6], o[7]);
    }
}

struct FlashArgs {
    bf16* out;
    const bf16 *qkv, *k_cache, *v_cache;
    const int *positions, *tile_seq, *tile_q_start, *tile_q_len, *block_tables, *block_table_start;
    const int *tile_kbeg, *tile_kend, *tile_part;
    float *part_ml, *part_acc;
    int row_stride, num_q_heads, num_kv_heads, block_size;
    float scale;
    // FP8 KV pools (the _kv8 kernels, which read k_cache / v_cache as e4m3): value = code * scale.
    float k_scale, v_scale;
};

#define FLASH_PARAMS                                                                                           \
    bf16 *out, const bf16 *qkv, const bf16 *k_cache, const bf16 *v_cache, const int *positions,                \
        const int *tile_seq, const int *tile_q_start, const int *tile_q_len, const int *block_tables,          \
        const int *block_table_start, const int *tile_kbeg, const int *tile_kend, const int *tile_part,        \
        float *part_ml, float *part_acc, int row_stride, int num_q_heads, int num_kv_heads, int block_size,    \
        float scale, float k_scale, float v_scale
#define FLASH_ARGS                                                                                             \
    FlashArgs {                                                                                                \
        out, qkv, k_cache, v_cache, positions, tile_seq, tile_q_start, tile_q_len, block_tables,               \
            block_table_start, tile_kbeg, tile_kend, tile_part, part_ml, part_acc, row_stride, num_q_heads,   \
            num_kv_heads, block_size, scale, k_scale, v_scale                                                  \
    }
