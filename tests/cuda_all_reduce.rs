//! The one-shot peer all-reduce (kernels/all_reduce.cu) against a host sum, on 2 GPUs (and 4 when
//! there are): every rank must end with the bits of the rank-order F32 sum (rounded to BF16 for
//! BF16), over several calls in a row (the two buffer slots and the epoch flags alternate), and
//! messages it does not take (too big, not 16-byte units) must be left to NCCL untouched.
//!
//! Skips (with a message) without a GPU or with fewer than two; with two GPUs and no libnccl it
//! fails, since the GPU machine's setup (scripts/gpu_check.sh) is then wrong.

use half::bf16;
use tandem::backend::cuda::device::Gpu;
use tandem::backend::cuda::gpu_available;
use tandem::backend::cuda::kernels::Kernels;
use tandem::backend::cuda::nccl::{nccl_available, NcclComm, NcclId};
use tandem::backend::cuda::ops::Precision;
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
