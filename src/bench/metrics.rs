//! genai-perf's metric definitions and statistics, computed from per-request records.
//!
//! Per request: TTFT = first streamed content − request sent; request latency = last streamed
//! content − request sent; ITL = (latency − TTFT) / (OSL − 1); tokens/s/user = 1000 / ITL(ms).
//! Per level: output token throughput = Σ OSL / duration, request throughput = N / duration,
//! duration = last response − first request (warm-up excluded).
//! Statistics: mean, min, max, population std and numpy's default (linear) percentiles.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What one measured request produced.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestRecord {
    /// Seconds since the level's clock origin.
    pub start_s: f64,
    /// Seconds since the origin when the first non-empty content arrived.
    pub first_token_s: f64,
    /// Seconds since the origin when the last output arrived.
    pub end_s: f64,
    pub input_tokens: usize,
    pub output_tokens: usize,
}

impl RequestRecord {
    pub fn ttft_ms(&self) -> f64 {
        (self.first_token_s - self.start_s) * 1e3
    }
    pub fn latency_ms(&self) -> f64 {
        (self.end_s - self.start_s) * 1e3
    }
    /// Undefined for a single output token (genai-perf drops those from ITL too).
    pub fn itl_ms(&self) -> Option<f64> {
        (self.output_tokens > 1)
            .then(|| (self.latency_ms() - self.ttft_ms()) / (self.output_tokens - 1) as f64)
    }
}

/// Statistics of one request-level metric, with genai-perf's keys.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub unit: String,
    pub avg: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p25: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p75: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p90: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p95: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub std: Option<f64>,
}

impl Stats {
    /// Full statistics of a sample (`None` when it is empty).
    pub fn of(unit: &str, values: &[f64]) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let n = values.len() as f64;
        let avg = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|v| (v - avg).powi(2)).sum::<f64>() / n;
        let p = |q: f64| Some(percentile_sorted(&sorted, q));
        Some(Self {
            unit: unit.into(),
            avg,
            p25: p(25.0),
            p50: p(50.0),
            p75: p(75.0),
            p90: p(90.0),
            p95: p(95.0),
            p99: p(99.0),
            min: Some(sorted[0]),
            max: Some(sorted[sorted.len() - 1]),
            std: Some(var.sqrt()),
        })
    }

    /// A system metric: only the average.
    pub fn avg_only(unit: &str, avg: f64) -> Self {
        Self {
            unit: unit.into(),
            avg,
            ..Default::default()
        }
    }

    /// The value of a statistic by its genai-perf key (`avg`, `p99`, `min`, ...).
    pub fn get(&self, key: &str) -> Option<f64> {
        match key {
            "avg" => Some(self.avg),
            "p25" => self.p25,
            "p50" => self.p50,
            "p75" => self.p75,
            "p90" => self.p90,
            "p95" => self.p95,
            "p99" => self.p99,
            "min" => self.min,
            "max" => self.max,
            "std" => self.std,
            _ => None,
        }
    }
}

/// numpy.percentile's default method: linear interpolation between closest ranks.
pub fn percentile_sorted(sorted: &[f64], q: f64) -> f64 {
    let rank = q / 100.0 * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

/// Request-level metrics in genai-perf's order, with their units.
pub const REQUEST_METRICS: [(&str, &str); 6] = [
    ("time_to_first_token", "ms"),
    ("inter_token_latency", "ms"),
    ("request_latency", "ms"),
    ("output_token_throughput_per_user", "tokens/sec/user"),
    ("output_sequence_length", "tokens"),
    ("input_sequence_length", "tokens"),
];

/// System metrics (average only), in genai-perf's order.
pub const SYSTEM_METRICS: [(&str, &str); 3] = [
    ("output_token_throughput", "tokens/sec"),
    ("request_throughput", "requests/sec"),
    ("request_count", "count"),
];

/// All metrics of one concurrency level, keyed by genai-perf's metric names.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LevelMetrics {
    pub metrics: BTreeMap<String, Stats>,
}

impl LevelMetrics {
    pub fn from_records(records: &[RequestRecord]) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !records.is_empty(),
            "no successful requests to compute metrics from"
        );
        let col = |f: &dyn Fn(&RequestRecord) -> Option<f64>| -> Vec<f64> {
            records.iter().filter_map(f).collect()
        };
        let ttft = col(&|r| Some(r.ttft_ms()));
        let itl = col(&|r| r.itl_ms());
        let latency = col(&|r| Some(r.latency_ms()));
        let per_user = col(&|r| r.itl_ms().filter(|v| *v > 0.0).map(|v| 1e3 / v));
        let osl = col(&|r| Some(r.output_tokens as f64));
        let isl = col(&|r| Some(r.input_tokens as f64));
        let mut metrics = BTreeMap::new();
        let columns = [ttft, itl, latency, per_user, osl, isl];
        for ((name, unit), values) in REQUEST_METRICS.iter().zip(columns.iter()) {
            if let Some(s) = Stats::of(unit, values) {
                metrics.insert(name.to_string(), s);
            }
        }
        let first = records
            .iter()
            .map(|r| r.start_s)
            .fold(f64::INFINITY, f64::min);
        let last = records
            .iter()
            .map(|r| r.end_s)
            .fold(f64::NEG_INFINITY, f64::max);
        let duration_s = (last - first).max(f64::MIN_POSITIVE);
        let tokens: usize = records.iter().map(|r| r.output_tokens).sum();
        let system = [
            tokens as f64 / duration_s,
            records.len() as f64 / duration_s,
            records.len() as f64,
        ];
        for ((name, unit), value) in SYSTEM_METRICS.iter().zip(system) {
            metrics.insert(name.to_string(), Stats::avg_only(unit, value));
        }
        Ok(Self { metrics })
    }

    pub fn get(&self, metric: &str, stat: &str) -> Option<f64> {
        self.metrics.get(metric).and_then(|s| s.get(stat))
    }

    /// The average of a metric, or NaN when it is missing (for tables).
    pub fn avg(&self, metric: &str) -> f64 {
        self.get(metric, "avg").unwrap_or(f64::NAN)
    }
}
