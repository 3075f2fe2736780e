//! Sampling math shared by the engine and the backends' device-side fast path.
//!
//! Deterministic: the randomness is one uniform number drawn by the caller, so the CPU and GPU
//! backends pick the same token for the same logits and the same number.

use super::DeviceSampling;

/// The id of the largest logit; the lowest id wins ties, NaN never wins.
pub fn greedy(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_value {
            best = i;
            best_value = v;
        }
    }
    best as u32
}

/// Temperature, then top-k, then top-p (nucleus), then inverse-CDF sampling with `uniform`.
/// `temperature <= 0` is greedy.
pub fn sample(logits: &[f32], params: &DeviceSampling) -> u32 {
    if params.temperature <= 0.0 || logits.is_empty() {
        return greedy(logits);
    }
    let candidates = top_k_candidates(logits, params.top_k);
    // Softmax over the candidates (sorted by logit, largest first).
    let max = logits[candidates[0]];
    let mut probs: Vec<f32> = candidates
        .iter()
        .map(|&i| ((logits[i] - max) / params.temperature).exp())
        .collect();
    let total: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    // Keep the smallest prefix whose mass reaches top_p (at least one token).
    let mut keep = probs.len();
    if params.top_p < 1.0 {
        let mut mass = 0.0;
        for (n, p) in probs.iter().enumerate() {
            mass += p;
            if mass >= params.top_p {
                keep = n + 1;
                break;
            }
        }
    }
    let kept_mass: f32 = probs[..keep].iter().sum();
    let target = params.uniform.clamp(0.0, 1.0) * kept_mass;
    let mut cumulative = 0.0;
    for n in 0..keep {
        cumulative += probs[n];
        if target < cumulative {
            return candidates[n] as u32;
        }
    }
    // Rounding left `target` at the very top: the last kept token.
    candidates[keep - 1] as u32
}

/// Ids of the `top_k` largest finite logits (all when `top_k == 0`), largest first, lowest id
/// first among equals.
fn top_k_candidates(logits: &[f32], top_k: usize) -> Vec<usize> {
    let order = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
    let mut ids: Vec<usize> = (0..logits.len()).filter(|&i| !logits[i].is_nan()).collect();
    if ids.is_empty() {
        return vec![0];
    }
    if top_k > 0 && top_k < ids.len() {
        ids.select_nth_unstable_by(top_k - 1, order);
        ids.truncate(top_k);
    }
    ids.sort_unstable_by(order);
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, uniform: f32) -> DeviceSampling {
        DeviceSampling {
            temperature,
            top_k,
            top_p,
            uniform,
        }
    }

    #[test]
    fn greedy_takes_lowest_id_on_ties_and_skips_nan() {
        assert_eq!(greedy(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(greedy(&[f32::NAN, -1.0, -2.0]), 1);
        assert_eq!(sample(&[0.5, 2.0, 2.0], &params(0.0, 0, 1.0, 0.9)), 1);
    }

    #[test]
    fn uniform_walks_the_cdf() {
        // Probabilities ~ [0.0900, 0.2447, 0.6652] for logits [0, 1, 2] at temperature 1.
        let logits = [0.0, 1.0, 2.0];
        assert_eq!(sample(&logits, &params(1.0, 0, 1.0, 0.0)), 2);
        assert_eq!(sample(&logits, &params(1.0, 0, 1.0, 0.60)), 2);
        assert_eq!(sample(&logits, &params(1.0, 0, 1.0, 0.70)), 1);
        assert_eq!(sample(&logits, &params(1.0, 0, 1.0, 0.95)), 0);
        assert_eq!(sample(&logits, &params(1.0, 0, 1.0, 0.9999999)), 0);
    }

    #[test]
    fn top_k_and_top_p_cut_the_tail() {
        let logits = [0.0, 1.0, 2.0];
        // top_k = 2 removes id 0: u near 1 must land on id 1.
        assert_eq!(sample(&logits, &params(1.0, 2, 1.0, 0.99)), 1);
        // top_p = 0.5: the first token (0.665) already reaches it, so only id 2 remains.
        assert_eq!(sample(&logits, &params(1.0, 0, 0.5, 0.99)), 2);
        // top_p = 0.8 keeps ids 2 and 1 (0.665 + 0.245 = 0.91).
        assert_eq!(sample(&logits, &params(1.0, 0, 0.8, 0.99)), 1);
    }

    #[test]
    fn low_temperature_sharpens() {
        let logits = [0.0, 1.0, 2.0];
        // At temperature 0.05 id 2 holds all but ~2e-9 of the mass.
        assert_eq!(sample(&logits, &params(0.05, 0, 1.0, 0.999)), 2);
        // At temperature 100 the distribution is nearly flat: u = 0.5 lands in the middle id.
        assert_eq!(sample(&logits, &params(100.0, 0, 1.0, 0.5)), 1);
    }
}
