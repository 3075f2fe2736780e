// Prefill attention on wgmma with a producer warpgroup (appended to flash_prefill_wgmma.cu's
// module): the items of flash_prefill_wgmma.cu whose tiles all load by TMA (the pool's tensor
// maps given, block size a multiple of 64), in the same arithmetic (fw_mainloop: the same bits).
//
// Block: 3 warpgroups. Warpgroup 0 produces: its thread 0 issues the TMA loads into a ring of
// stages as soon as both consumers have released a stage (an mbarrier pair per stage: full,
// empty), so no block-wide barrier paces the tiles. For FP8 pools thread 0 loads raw e4m3 tiles
// (their own ring, WS_RAW ahead) and the warpgroup converts each into the F16 stage the consumers
// read. Warpgroups 1 and 2 consume (rows 0..63 and 64..127 of the item) and, with PP, take turns
// issuing their MMAs (FlashAttention-3's ping-pong). The producer gives registers to the consumers
// (setmaxnreg).
//
// Measured on an H200 (3000-token 70B prefill, attention of 80 layers): BF16 pools 44.1 ms with
// ping-pong, 43.9 without (flash_prefill_wgmma_hd128: 49.9), 42.3 once the softmax masks only
// diagonal tiles; FP8 pools 52.5 (63.7), 67.6 (68.8) while the tiles were converted to BF16 times
// the scale; converting on 3 warps instead of 4 gave the same 52.5. Q in shared memory (SS score
// MMAs, 32 registers fewer) took 47.4 ms.
#define WS_THREADS 384
#define WS_STAGES 5      // BF16 pools: K / V stages, TMA's destinations
#define WS_KV8_STAGES 4  // FP8 pools: F16 K / V stages the producer converts into,
#define WS_RAW 4         // from raw code stages (K and V codes, 8 KB each) loaded by TMA
#define WS_PRODUCER_REGS 40
#define WS_CONSUMER_REGS 232

__device__ __forceinline__ void named_bar_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// Ping-pong between the two consumer warpgroups: warpgroup w takes its turn on named barrier
// 2 + w and passes it on barrier 3 - w (no predicates: ptxas serializes the wgmmas around a
// conditional barrier). Warpgroup 1 opens (a pass before its first turn) and warpgroup 0 closes (a
// take after its last), so no arrival is left over.
struct FwPingPong {
    int wg;
    __device__ __forceinline__ void take() { asm volatile("bar.sync %0, 256;" ::"r"(2 + wg) : "memory"); }
    __device__ __forceinline__ void pass() { asm volatile("bar.arrive %0, 256;" ::"r"(3 - wg) : "memory"); }
};

template <int PM, bool KV8, bool PP>
__device__ __forceinline__ void flash_prefill_ws_t(const FlashTmaArgs& a) {
    constexpr int S = KV8 ? WS_KV8_STAGES : WS_STAGES, PAIR = 2 * FW_TILE_BYTES, RAW = FW_TILE_BYTES;
    extern __shared__ __align__(128) unsigned char ws_smem[];
    FwItem it;
    if (!fw_item(a, it)) return;  // the same for every thread of the block
    int tid = threadIdx.x;
    unsigned smem = (smem_u32(ws_smem) + 1023) & ~1023u;  // swizzle atoms are 1024-byte aligned
    unsigned raw = smem + S * PAIR;  // FP8 pools: the raw stages
    unsigned full = raw + (KV8 ? WS_RAW * RAW : 0), empty = full + 8 * S;
    unsigned raw_full = empty + 8 * S;
    if (tid == 0) {
        for (int s = 0; s < S; s++) {
            mbar_init(full + 8 * s, KV8 ? 128 : 1);  // TMA's arrival, or the converting threads'
            mbar_init(empty + 8 * s, 8);             // each consumer warp
        }
        if (KV8)
            for (int r = 0; r < WS_RAW; r++) mbar_init(raw_full + 8 * r, 1);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    __syncthreads();
    const unsigned char* maps = (const unsigned char*)a.tensor_maps;
    const int* bt = a.block_tables + a.block_table_start[it.seq];
    int ntiles = it.ntiles;

    if (tid < 128) {  // the producer
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(WS_PRODUCER_REGS));
        // Pool row of tile i's first key (TMA needs the tile's 64 keys in one block).
        auto row = [&](int i) {
            int k0 = it.kbeg + i * FW_KT, blk = k0 / a.block_size;
            return (__ldg(bt + blk) * a.num_kv_heads + it.kvh) * a.block_size + (k0 - blk * a.block_size);
        };
        if (!KV8) {
            if (tid == 0)
                for (int i = 0; i < ntiles; i++) {
                    int s = i % S, u = i / S, r = row(i);
                    if (u > 0) mbar_wait(empty + 8 * s, (u - 1) & 1);
                    unsigned st = smem + s * PAIR, bar = full + 8 * s;
                    mbar_expect_tx(bar, PAIR);
                    tma_load_2d(st, maps, 0, r, bar);
                    tma_load_2d(st + 8192, maps, 64, r, bar);
                    tma_load_2d(st + FW_TILE_BYTES, maps + 128, 0, r, bar);
                    tma_load_2d(st + FW_TILE_BYTES + 8192, maps + 128, 64, r, bar);
                }
            return;
        }
        // FP8 pools: thread 0 loads raw tiles (a box is a whole tile: 64 rows x 128 codes)
        // WS_RAW ahead; the warpgroup converts them.
        auto load_raw = [&](int i) {
            unsigned st = raw + (i % WS_RAW) * RAW, bar = raw_full + 8 * (i % WS_RAW);
            int k0 = row(i);
            mbar_expect_tx(bar, RAW);
            tma_load_2d(st, maps, 0, k0, bar);
            tma_load_2d(st + 8192, maps + 128, 0, k0, bar);
        };
        if (tid == 0)
            for (int i = 0; i < min(WS_RAW, ntiles); i++) load_raw(i);
        for (int i = 0; i < ntiles; i++) {
            int s = i % S, u = i / S, r = i % WS_RAW;
            mbar_wait(raw_full + 8 * r, (i / WS_RAW) & 1);
            if (u > 0) mbar_wait(empty + 8 * s, (u - 1) & 1);
            fw_kv8_convert<128>(smem + s * PAIR, raw + r * RAW, tid);
            fence_proxy_async();  // the conversions (generic proxy) before wgmma's reads
            mbar_arrive(full + 8 * s);
            named_bar_sync(1, 128);  // every producer thread is past raw tile i: reload its stage
            if (tid == 0 && i + WS_RAW < ntiles) load_raw(i + WS_RAW);
        }
        return;
    }

    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(WS_CONSUMER_REGS));
    int ct = tid - 128, wg = ct >> 7, warp = (ct >> 5) & 3, lane = ct & 31, g = lane >> 2, t = lane & 3;
    int r0, r1, pos0, pos1;
    fw_rows(a, it, wg * 64, warp, g, r0, r1, pos0, pos1);
    unsigned qf[FW_D / 16][4];
    fw_load_q<KV8>(qf, a, it, r0, r1, t);
    float o[64], l[2], c = fw_score_scale<KV8>(a);
    auto landed = [&](int i) { mbar_wait(full + 8 * (i % S), (i / S) & 1); };
    auto descs = [&](int i) { return fw_descs(smem + (i % S) * PAIR); };
    auto done = [&](int i) {
        if (lane == 0) mbar_arrive(empty + 8 * (i % S));
    };
    if (PP) {
        FwPingPong turn{wg};
        if (wg == 1) turn.pass();
        fw_mainloop<PM, KV8>(o, l, qf, it, pos0, pos1, c, t, landed, descs, done, turn);
        if (wg == 0) turn.take();
    } else {
        FwAnyTurn turn;
        fw_mainloop<PM, KV8>(o, l, qf, it, pos0, pos1, c, t, landed, descs, done, turn);
    }
    fw_store<KV8>(a, it, o, l, r0, r1, t);
}

// Shared memory: WS_SHARED_BYTES (kernels.rs): the stages (BF16: 5 x 32 KB; FP8: 4 x 32 KB of
// F16 and 4 x 16 KB of codes), the mbarriers, 1 KB of alignment. One block per SM. The last
// parameter: the K and V pools' tensor maps (2 x 128 bytes, global memory), never null.
#define WS_KERNEL(NAME, PM, KV8, PP)                                                                  \
    extern "C" __global__ void __launch_bounds__(WS_THREADS, 1)                                       \
        flash_prefill_ws_##NAME(FLASH_PARAMS, const void* tensor_maps) {                              \
        flash_prefill_ws_t<PM, KV8, PP>(FlashTmaArgs{FLASH_ARGS, tensor_maps});                      \
    }
WS_KERNEL(hd128, P_HILO, false, true)
WS_KERNEL(bf16p_hd128, P_BF16, false, true)
WS_KERNEL(kv8_hd128, P_HILO, true, true)
WS_KERNEL(nopp_hd128, P_HILO, false, false)
WS_KERNEL(nopp_bf16p_hd128, P_BF16, false, false)
WS_KERNEL(nopp_kv8_hd128, P_HILO, true, false)
