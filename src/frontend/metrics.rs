//! `/metrics` in Prometheus text format: what the frontend measures itself (requests by status,
//! time to first token, inter-token latency) and each worker's load snapshot.

use super::router::WorkerLoad;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fmt::Write;

/// Bucket upper bounds in seconds.
const BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Name, help text, and how to read the value from a worker's load.
type Gauge = (&'static str, &'static str, fn(&WorkerLoad) -> f64);

#[derive(Debug, Default, Clone)]
struct Histogram {
    /// Non-cumulative counts per bucket; the last slot is +Inf.
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        let i = BUCKETS
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(BUCKETS.len());
        self.counts[i] += 1;
        self.sum += seconds;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += self.counts[i];
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

#[derive(Debug, Default, Clone)]
struct Inner {
    requests_by_status: BTreeMap<u16, u64>,
    ttft: Histogram,
    itl: Histogram,
    latency: Histogram,
    output_tokens: u64,
}

#[derive(Debug, Default)]
pub struct FrontendMetrics {
    inner: Mutex<Inner>,
}

impl FrontendMetrics {
    pub fn record_status(&self, status: u16) {
        *self
            .inner
            .lock()
            .requests_by_status
            .entry(status)
            .or_default() += 1;
    }

    pub fn observe_ttft(&self, seconds: f64) {
        self.inner.lock().ttft.observe(seconds);
    }

    pub fn observe_itl(&self, seconds: f64) {
        self.inner.lock().itl.observe(seconds);
    }

    pub fn observe_request(&self, seconds: f64, output_tokens: usize) {
        let mut m = self.inner.lock();
        m.latency.observe(seconds);
        m.output_tokens += output_tokens as u64;
    }

    /// Requests answered with `status` so far.
    pub fn requests_with_status(&self, status: u16) -> u64 {
        self.inner
            .lock()
            .requests_by_status
            .get(&status)
            .copied()
            .unwrap_or(0)
    }

    pub fn render(&self, workers: &[WorkerLoad]) -> String {
        let m = self.inner.lock().clone();
        let mut out = String::new();
        out.push_str("# HELP tandem_requests_total Finished API requests by HTTP status.\n");
        out.push_str("# TYPE tandem_requests_total counter\n");
        for (status, n) in &m.requests_by_status {
            let _ = writeln!(out, "tandem_requests_total{{status=\"{status}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP tandem_output_tokens_total Tokens streamed to clients.\n\
             # TYPE tandem_output_tokens_total counter\ntandem_output_tokens_total {}",
            m.output_tokens
        );
        m.ttft.render(
            &mut out,
            "tandem_time_to_first_token_seconds",
            "Time from request to first token.",
        );
        m.itl.render(
            &mut out,
            "tandem_inter_token_latency_seconds",
            "Time between streamed tokens.",
        );
        m.latency.render(
            &mut out,
            "tandem_request_latency_seconds",
            "Time from request to last token.",
        );
        let gauges: [Gauge; 10] = [
            (
                "tandem_queue_length",
                "Requests waiting in the worker's queue.",
                |w| w.metrics.waiting as f64,
            ),
            (
                "tandem_running_requests",
                "Requests the worker is running.",
                |w| w.metrics.running as f64,
            ),
            (
                "tandem_router_in_flight",
                "Requests this router has in flight on the worker.",
                |w| w.in_flight as f64,
            ),
            (
                "tandem_kv_blocks_total",
                "KV blocks in the worker's pool.",
                |w| w.metrics.kv_blocks_total as f64,
            ),
            (
                "tandem_kv_blocks_active",
                "KV blocks held by requests.",
                |w| w.metrics.kv_blocks_active as f64,
            ),
            (
                "tandem_kv_usage_ratio",
                "Fraction of KV blocks held by requests.",
                |w| w.metrics.kv_blocks_active as f64 / w.metrics.kv_blocks_total.max(1) as f64,
            ),
            (
                "tandem_prefix_cache_hit_rate",
                "Fraction of prompt tokens found in the prefix cache.",
                |w| w.metrics.prefix_hit_rate,
            ),
            (
                "tandem_worker_available",
                "1 unless the router skips the worker.",
                |w| w.available as u8 as f64,
            ),
            (
                "tandem_engine_steps",
                "Steps the worker's engine has run.",
                |w| w.metrics.steps as f64,
            ),
            (
                "tandem_engine_last_step_seconds",
                "Wall time of the engine's last step.",
                |w| w.metrics.last_step_ms / 1e3,
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for w in workers {
                let _ = writeln!(out, "{name}{{worker=\"{}\"}} {}", escape(&w.id), value(w));
            }
        }
        out
    }
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::types::EngineMetrics;

    #[test]
    fn renders_counters_histograms_and_gauges() {
        let m = FrontendMetrics::default();
        m.record_status(200);
        m.record_status(200);
        m.record_status(429);
        m.observe_ttft(0.003);
        m.observe_ttft(100.0);
        let w = WorkerLoad {
            id: "w0".into(),
            in_flight: 1,
            available: true,
            metrics: EngineMetrics {
                kv_blocks_total: 10,
                kv_blocks_active: 5,
                waiting: 2,
                ..Default::default()
            },
        };
        let text = m.render(&[w]);
        assert!(text.contains("tandem_requests_total{status=\"200\"} 2"));
        assert!(text.contains("tandem_requests_total{status=\"429\"} 1"));
        assert!(text.contains("tandem_time_to_first_token_seconds_bucket{le=\"0.0025\"} 0"));
        assert!(text.contains("tandem_time_to_first_token_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("tandem_time_to_first_token_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("tandem_kv_usage_ratio{worker=\"w0\"} 0.5"));
        assert!(text.contains("tandem_queue_length{worker=\"w0\"} 2"));
    }
}
