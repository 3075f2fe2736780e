//! The one-shot peer all-reduce (kernels/all_reduce.cu) against a host sum, on 2 GPUs (and 4 when
//! there are): every rank must end with the bits of the rank-order F32 sum (rounded to BF16 for
//! BF16), over several calls in a row (the two buffer slots and the epoch flags alternate), and
//! messages it does not take (too big, not 16-byte units) must be left to NCCL untouched.
//! On one GPU: two ranks whose buffers share it replay their calls from CUDA graphs (the epochs
//! come from device memory), interleaved with eager calls; and the norm that takes the all-reduce
//! in (`add_rmsnorm_fp8_peer`) gives the bits of the all-reduce followed by the fused norm.
//!
//! Skips (with a message) without a GPU or with fewer than two; with two GPUs and no libnccl it
//! fails, since the GPU machine's setup (scripts/gpu_check.sh) is then wrong.

use half::bf16;
use tandem::backend::cuda::device::{DeviceBuffer, Gpu};
use tandem::backend::cuda::gpu_available;
use tandem::backend::cuda::kernels::Kernels;
use tandem::backend::cuda::nccl::{nccl_available, NcclComm, NcclId};
use tandem::backend::cuda::ops::{Ops, Precision};
use tandem::backend::cuda::peer_all_reduce::{PeerAllReduce, SLOT_BYTES};

fn gpus() -> usize {
    if !gpu_available() {
        eprintln!("skipping: no CUDA GPU on this machine");
        return 0;
    }
    let n = cudarc::driver::result::device::get_count().unwrap_or(0) as usize;
    if n < 2 {
        eprintln!("skipping: the peer all-reduce needs 2 GPUs, {n} visible");
        return 0;
    }
    assert!(
        nccl_available(),
        "2 GPUs but libnccl.so is not on LD_LIBRARY_PATH (see scripts/gpu_check.sh)"
    );
    n
}

/// Deterministic, distinct values per (rank, call, index), in [-4, 4).
fn value(rank: usize, call: usize, i: usize) -> f32 {
    let h = (i as u64 ^ ((rank as u64) << 40) ^ ((call as u64) << 48))
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .rotate_left(17);
    ((h >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
}

/// One rank: `calls` all-reduces of `counts[c]` values; returns (call, ok) mismatches.
fn rank_main(id: NcclId, rank: usize, world: usize, cases: &[(usize, Precision)]) -> Vec<String> {
    let gpu = Gpu::new(rank).unwrap();
    let comm = NcclComm::join(id, rank, world).unwrap();
    let kernels = Kernels::load().unwrap();
    let peer = PeerAllReduce::new(&gpu, &comm, rank, world).unwrap();
    let mut errors = vec![];
    for (call, &(count, p)) in cases.iter().enumerate() {
        let mine: Vec<f32> = (0..count).map(|i| value(rank, call, i)).collect();
        let sum = |i: usize| (0..world).fold(0.0f32, |acc, r| acc + value(r, call, i));
        let fits = count * p.bytes() <= SLOT_BYTES && (count * p.bytes()) % 16 == 0;
        let took = match p {
            Precision::Bf16 => {
                let host: Vec<bf16> = mine.iter().map(|&v| bf16::from_f32(v)).collect();
                let buf = gpu.upload(&host).unwrap();
                let took = peer
                    .try_all_reduce(&kernels, buf.ptr, count, p, gpu.cu_stream())
                    .unwrap();
                gpu.sync().unwrap();
                let got: Vec<bf16> = gpu.download(&buf, count).unwrap();
                for i in 0..count {
                    let want = if took {
                        // Ranks' BF16 inputs summed in F32 in rank order, rounded once.
                        let s = (0..world).fold(0.0f32, |acc, r| {
                            acc + bf16::from_f32(value(r, call, i)).to_f32()
                        });
                        bf16::from_f32(s)
                    } else {
                        host[i]
                    };
                    if got[i].to_bits() != want.to_bits() {
                        errors.push(format!(
                            "rank {rank} call {call} ({count} bf16) [{i}]: {} != {}",
                            got[i], want
                        ));
                        break;
                    }
                }
                took
            }
            Precision::F32 => {
                let buf = gpu.upload(&mine).unwrap();
                let took = peer
                    .try_all_reduce(&kernels, buf.ptr, count, p, gpu.cu_stream())
                    .unwrap();
                gpu.sync().unwrap();
                let got: Vec<f32> = gpu.download(&buf, count).unwrap();
                for i in 0..count {
                    let want = if took { sum(i) } else { mine[i] };
                    if got[i].to_bits() != want.to_bits() {
                        errors.push(format!(
                            "rank {rank} call {call} ({count} f32) [{i}]: {} != {want}",
                            got[i]
                        ));
                        break;
                    }
                }
                took
            }
        };
        if took != fits {
            errors.push(format!(
                "rank {rank} call {call}: took {took}, expected {fits} for {count} values"
            ));
        }
    }
    errors
}

fn run(world: usize) {
    let id = NcclId::new().unwrap();
    let h = 8192;
    let cases = [
        (h, Precision::Bf16),                  // a decode row
        (32 * h, Precision::Bf16),             // batch 32
        (h, Precision::F32),                   // the F32 embedding sum
        (SLOT_BYTES / 2, Precision::Bf16),     // exactly one slot
        (SLOT_BYTES / 2 + 8, Precision::Bf16), // too big: NCCL's
        (h + 4, Precision::Bf16),              // not 16-byte units: NCCL's
        (3 * h, Precision::F32),
        (7 * 8, Precision::Bf16), // fewer values than threads
        (h, Precision::Bf16),
    ];
    let threads: Vec<_> = (0..world)
        .map(|rank| std::thread::spawn(move || rank_main(id, rank, world, &cases)))
        .collect();
    let errors: Vec<String> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert!(errors.is_empty(), "world {world}: {errors:#?}");
}

/// `world` ranks sharing GPU 0, each with a `Gpu` (a stream) of its own; None (with a message)
/// without a GPU.
fn ranks_on_one_gpu(world: usize) -> Option<(Vec<Gpu>, Kernels, Vec<PeerAllReduce>)> {
    if !gpu_available() {
        eprintln!("skipping: no CUDA GPU on this machine");
        return None;
    }
    let gpus: Vec<Gpu> = (0..world).map(|_| Gpu::new(0).unwrap()).collect();
    let kernels = Kernels::load().unwrap();
    let ranks = PeerAllReduce::on_one_gpu(&gpus[0], world).unwrap();
    Some((gpus, kernels, ranks))
}

/// Two ranks on one GPU, each on a stream of its own: a step of three all-reduces (BF16, F32,
/// BF16 again) and its `end_step`, captured once per rank and replayed with new inputs, every third
/// step run eagerly instead. Replays reuse the same kernel arguments, so only epochs read from
/// the device keep the ranks' handshakes and slots apart.
#[test]
fn peer_all_reduce_replays_from_cuda_graphs() {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let Some((gpus, kernels, ranks)) = ranks_on_one_gpu(2) else {
        return;
    };
    let world = ranks.len();
    let (h, wide) = (8192, 3 * 8192);
    let bufs: Vec<_> = (0..world)
        .map(|_| {
            (
                gpus[0].alloc(h * 2).unwrap(),
                gpus[0].alloc(wide * 4).unwrap(),
                gpus[0].alloc(h * 2).unwrap(),
            )
        })
        .collect();
    let queue_step = |r: usize| {
        let stream = gpus[r].cu_stream();
        let (a, b, c) = &bufs[r];
        let peer = &ranks[r];
        assert!(peer
            .try_all_reduce(&kernels, a.ptr, h, Precision::Bf16, stream)
            .unwrap());
        assert!(peer
            .try_all_reduce(&kernels, b.ptr, wide, Precision::F32, stream)
            .unwrap());
        assert!(peer
            .try_all_reduce(&kernels, c.ptr, h, Precision::Bf16, stream)
            .unwrap());
        peer.end_step(&kernels, stream).unwrap();
    };
    let graphs: Vec<_> = (0..world)
        .map(|r| {
            let stream = &gpus[r].stream;
            stream
                .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .unwrap();
            queue_step(r);
            stream
                .end_capture(CUgraphInstantiate_flags(0))
                .unwrap()
                .expect("a captured step")
        })
        .collect();
    let bf16s = |r: usize, call: usize, n: usize| -> Vec<bf16> {
        (0..n).map(|i| bf16::from_f32(value(r, call, i))).collect()
    };
    for step in 0..12 {
        let calls = [3 * step, 3 * step + 1, 3 * step + 2];
        for r in 0..world {
            let (a, b, c) = &bufs[r];
            gpus[r].copy_to(a, 0, &bf16s(r, calls[0], h)).unwrap();
            let wide_in: Vec<f32> = (0..wide).map(|i| value(r, calls[1], i)).collect();
            gpus[r].copy_to(b, 0, &wide_in).unwrap();
            gpus[r].copy_to(c, 0, &bf16s(r, calls[2], h)).unwrap();
        }
        // Both ranks' steps must be queued before either can finish (they wait on each other).
        for (r, graph) in graphs.iter().enumerate() {
            if step % 3 == 2 {
                queue_step(r);
            } else {
                graph.launch().unwrap();
            }
        }
        for gpu in &gpus {
            gpu.sync().unwrap();
        }
        let bf16_sum = |call: usize, i: usize| {
            let s = (0..world).fold(0.0f32, |acc, r| {
                acc + bf16::from_f32(value(r, call, i)).to_f32()
            });
            bf16::from_f32(s)
        };
        for r in 0..world {
            let (a, b, c) = &bufs[r];
            let got_a: Vec<bf16> = gpus[r].download(a, h).unwrap();
            let got_b: Vec<f32> = gpus[r].download(b, wide).unwrap();
            let got_c: Vec<bf16> = gpus[r].download(c, h).unwrap();
            for i in 0..h {
                assert_eq!(
                    got_a[i],
                    bf16_sum(calls[0], i),
                    "step {step} rank {r} call 0 [{i}]"
                );
                assert_eq!(
                    got_c[i],
                    bf16_sum(calls[2], i),
                    "step {step} rank {r} call 2 [{i}]"
                );
            }
            for (i, got) in got_b.iter().enumerate() {
                let want = (0..world).fold(0.0f32, |acc, q| acc + value(q, calls[1], i));
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "step {step} rank {r} call 1 [{i}]"
                );
            }
        }
    }
    println!("12 steps of 3 all-reduces on 2 ranks of one GPU: 8 replayed from graphs, 4 eager");
}

/// Two ranks on one GPU (a stream each): residual += all-reduced delta, RMS norm, FP8 quantization,
/// fused (`add_rmsnorm_fp8_peer`) against the peer all-reduce then `add_rmsnorm_fp8`, byte for byte
/// on every rank (residual, FP8 codes, scales), at decode row counts and an uneven width; the
/// fused calls and the plain ones share one epoch sequence.
#[test]
fn norm_taking_the_all_reduce_in_equals_all_reduce_then_norm() {
    let Some((gpus, kernels, ranks)) = ranks_on_one_gpu(2) else {
        return;
    };
    let world = ranks.len();
    let ops = |r: usize| Ops {
        k: &kernels,
        stream: gpus[r].cu_stream(),
        act: Precision::Bf16,
    };
    let eps = 1e-5f32;
    for (case, (rows, hidden)) in [(1, 8192), (5, 8192), (64, 8192), (3, 1000)]
        .into_iter()
        .enumerate()
    {
        let n = rows * hidden;
        // The residual is replicated; each rank has its own part of the delta.
        let residual: Vec<f32> = (0..n).map(|i| value(9, case, i)).collect();
        let weight: Vec<bf16> = (0..hidden)
            .map(|i| bf16::from_f32(1.0 + value(8, case, i) / 16.0))
            .collect();
        let w = gpus[0].upload(&weight).unwrap();
        // (residual, delta, xq, xs) per rank, for the fused run and the reference.
        let bufs = |r: usize| {
            let delta: Vec<bf16> = (0..n).map(|i| bf16::from_f32(value(r, case, i))).collect();
            (
                gpus[r].upload(&residual).unwrap(),
                gpus[r].upload(&delta).unwrap(),
                gpus[r].alloc(n).unwrap(),
                gpus[r].alloc(rows * 4).unwrap(),
            )
        };
        let fused: Vec<_> = (0..world).map(bufs).collect();
        let plain: Vec<_> = (0..world).map(bufs).collect();
        for r in 0..world {
            let (res, delta, xq, xs) = &fused[r];
            let call = ranks[r].norm_call(rows, hidden).expect("decode rows fit");
            ops(r)
                .add_rmsnorm_fp8_peer(
                    res.ptr, delta.ptr, w.ptr, xq.ptr, xs.ptr, rows, hidden, eps, call,
                )
                .unwrap();
        }
        for r in 0..world {
            let (res, delta, xq, xs) = &plain[r];
            let stream = gpus[r].cu_stream();
            assert!(ranks[r]
                .try_all_reduce(&kernels, delta.ptr, n, Precision::Bf16, stream)
                .unwrap());
            ops(r)
                .add_rmsnorm_fp8(res.ptr, delta.ptr, w.ptr, xq.ptr, xs.ptr, rows, hidden, eps)
                .unwrap();
            ranks[r].end_step(&kernels, stream).unwrap();
        }
        let read = |r: usize, (res, _, xq, xs): &(DeviceBuffer, DeviceBuffer, DeviceBuffer, DeviceBuffer)| {
            let res: Vec<u32> = gpus[r].download(res, n).unwrap();
            let xq: Vec<u8> = gpus[r].download(xq, n).unwrap();
            let xs: Vec<u32> = gpus[r].download(xs, rows).unwrap();
            (res, xq, xs)
        };
        let first = read(0, &fused[0]);
        for r in 0..world {
            let got = read(r, &fused[r]);
            let want = read(r, &plain[r]);
            assert!(
                got.0 == want.0,
                "rows {rows} x {hidden}, rank {r}: residual differs"
            );
            assert!(
                got.1 == want.1,
                "rows {rows} x {hidden}, rank {r}: FP8 codes differ"
            );
            assert_eq!(
                got.2, want.2,
                "rows {rows} x {hidden}, rank {r}: scales differ"
            );
            assert!(
                got == first,
                "rows {rows} x {hidden}: rank {r} differs from rank 0"
            );
        }
        println!(
            "{rows} x {hidden}: fused all-reduce + norm equals all-reduce then norm on both ranks"
        );
    }
    assert!(
        ranks[0].norm_call(65, 8192).is_none() && ranks[0].norm_call(4, 8196).is_none(),
        "more rows than flag blocks, or rows not in 16-byte pieces, go to the plain pair"
    );
}

#[test]
fn peer_all_reduce_matches_the_rank_order_sum_on_two_gpus() {
    if gpus() >= 2 {
        run(2);
    }
}

#[test]
fn peer_all_reduce_matches_the_rank_order_sum_on_four_gpus() {
    let n = gpus();
    if n >= 4 {
        run(4);
    } else if n > 0 {
        eprintln!("skipping the 4-GPU case: {n} GPUs visible");
    }
}
