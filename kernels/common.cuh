// Shared helpers, prepended to every kernel module. No CUDA headers: BF16 and FP8 are raw bit
// patterns converted with PTX `cvt` (sm_90a), so NVRTC needs no include path.
typedef unsigned short bf16;
typedef unsigned char fp8;
typedef unsigned long long u64;

#define FP8_MAX 448.0f
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float bf2f(bf16 x) { return __uint_as_float(((unsigned)x) << 16); }

__device__ __forceinline__ bf16 f2bf(float f) {
    unsigned short r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}

// Round to nearest e4m3, saturating to +-448 (NaN stays NaN).
__device__ __forceinline__ fp8 f2e4m3(float f) {
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(0.0f), "f"(f));
    return (fp8)(r & 0xff);
}

__device__ __forceinline__ float e4m32f(fp8 x) {
    unsigned r;
    unsigned short in = x;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(r) : "h"(in));
    unsigned short h = (unsigned short)(r & 0xffff);
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum; every thread gets the result. `scratch` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < nwarps ? scratch[lane] : 0.0f;
    return warp_sum(t);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < nwarps ? scratch[lane] : NEG_INF;
    return warp_max(t);
}

// Loads and stores that convert to and from F32, so kernels can be templated on the storage type
// of activations and KV (BF16 for serving, F32 for the reference-precision mode).
__device__ __forceinline__ float ld(const float* p, u64 i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16* p, u64 i) { return bf2f(p[i]); }
__device__ __forceinline__ void st(float* p, u64 i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16* p, u64 i, float v) { p[i] = f2bf(v); }

// FP8 code of v at a row's scale: e4m3(v / scale), saturating. BF16 activations (serving) multiply
// by the scale's reciprocal, as vLLM does: a division per element made the prefill kernels
// compute-bound; the code differs from the division's only where v / scale lies within an f32
// rounding of a code boundary. F32 (the reference mode) divides, like the CPU backend.
template <typename A>
struct Fp8Quant {
    float inv;
    __device__ __forceinline__ explicit Fp8Quant(float scale) : inv(1.0f / scale) {}
    __device__ __forceinline__ fp8 operator()(float v) const { return f2e4m3(v * inv); }
};
template <>
struct Fp8Quant<float> {
    float scale;
    __device__ __forceinline__ explicit Fp8Quant(float s) : scale(s) {}
    __device__ __forceinline__ fp8 operator()(float v) const { return f2e4m3(v / scale); }
};

// Programmatic dependent launch (PDL). A kernel launched with programmatic stream serialization (see
// `launch` in kernels.rs) may start while the previous kernel of its stream still runs, so the launch
// and the CTAs' start overlap that kernel's tail. It must wait for that kernel before it reads its outputs
// or writes memory the kernel may still read: every kernel of a PDL module calls pdl_enter() before it
// touches activations (a GEMM may load its first weights before). The trigger right after the wait lets the
// next kernel launch once this one's CTAs all run, never further ahead. Without the attribute both are
// no-ops.
__device__ __forceinline__ void pdl_enter() {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// Loads that bypass L1, for values other blocks (or a peer GPU) wrote during this kernel.
__device__ __forceinline__ float load_cg(const float* p) {
    float r;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(r) : "l"(p));
    return r;
}
__device__ __forceinline__ void load4_cg(const float* p, float* f) {
    asm volatile("ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(f[0]), "=f"(f[1]), "=f"(f[2]), "=f"(f[3])
                 : "l"(p));
}
__device__ __forceinline__ void load4_cg(const bf16* p, float* f) {
    unsigned a, b;
    asm volatile("ld.global.cg.v2.u32 {%0, %1}, [%2];" : "=r"(a), "=r"(b) : "l"(p));
    f[0] = __uint_as_float(a << 16);
    f[1] = __uint_as_float(a & 0xffff0000u);
    f[2] = __uint_as_float(b << 16);
    f[3] = __uint_as_float(b & 0xffff0000u);
}

// The 32-bit shared-memory address of a generic pointer into shared memory (cp.async, mapa).
__device__ __forceinline__ unsigned smem_u32(const void* p) {
    unsigned r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}
