//! genai-perf's artifact layout: `<dir>/<model>-openai-<endpoint>-concurrency<C>/profile_export_genai_perf.{json,csv}`
//! and, beside the run directories, `deployment_config.json`.

use super::metrics::{LevelMetrics, Stats, REQUEST_METRICS, SYSTEM_METRICS};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const JSON_FILE: &str = "profile_export_genai_perf.json";
pub const CSV_FILE: &str = "profile_export_genai_perf.csv";
pub const DEPLOYMENT_FILE: &str = "deployment_config.json";

/// What was benchmarked; `tandem pareto` divides throughput by `gpus()`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentConfig {
    /// Who serves: `tandem`, `vllm`, `dynamo`, `mock`, ...
    pub kind: String,
    /// `aggregated` or `disaggregated`.
    pub mode: String,
    pub tp: usize,
    pub dp: usize,
    pub prefill_tp: usize,
    pub prefill_dp: usize,
    pub decode_tp: usize,
    pub decode_dp: usize,
    pub model: String,
    pub isl: usize,
    pub osl: usize,
    /// Label in plots and tables (defaults to the artifact directory's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl DeploymentConfig {
    pub fn is_disaggregated(&self) -> bool {
        self.mode.eq_ignore_ascii_case("disaggregated")
    }

    pub fn gpus(&self) -> usize {
        let n = if self.is_disaggregated() {
            self.prefill_tp * self.prefill_dp + self.decode_tp * self.decode_dp
        } else {
            self.tp * self.dp
        };
        n.max(1)
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(DEPLOYMENT_FILE);
        std::fs::write(&path, serde_json::to_string_pretty(self)? + "\n")
            .with_context(|| format!("writing {}", path.display()))
    }

    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(DEPLOYMENT_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (every deployment directory needs one)",
                path.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// The run directory of one concurrency level, named as genai-perf names it.
pub fn level_dir(artifact_dir: &Path, model: &str, endpoint: &str, concurrency: usize) -> PathBuf {
    let model = model.replace('/', "_");
    artifact_dir.join(format!(
        "{model}-openai-{endpoint}-concurrency{concurrency}"
    ))
}

/// Writes both files of one level. `input_config` is recorded under genai-perf's key of that name.
pub fn write_level(
    dir: &Path,
    metrics: &LevelMetrics,
    input_config: serde_json::Value,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut json = serde_json::Map::new();
    for (name, stats) in &metrics.metrics {
        json.insert(name.clone(), serde_json::to_value(stats)?);
    }
    json.insert("input_config".into(), input_config);
    let text = serde_json::to_string_pretty(&serde_json::Value::Object(json))? + "\n";
    // Write to a temporary name first: a level counts as done (resumable sweeps) only when whole.
    std::fs::write(dir.join(CSV_FILE), to_csv(metrics))?;
    let tmp = dir.join(format!("{JSON_FILE}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join(JSON_FILE))?;
    Ok(())
}

/// Reads the metrics back from a run directory's JSON (other keys, like `input_config`, are skipped).
pub fn read_level(dir: &Path) -> Result<LevelMetrics> {
    let path = dir.join(JSON_FILE);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let object = value
        .as_object()
        .with_context(|| format!("{}: not a JSON object", path.display()))?;
    let mut metrics = BTreeMap::new();
    for (name, v) in object {
        if v.get("avg").is_some_and(|a| a.is_number()) {
            let stats: Stats = serde_json::from_value(v.clone())
                .with_context(|| format!("{}: metric {name}", path.display()))?;
            metrics.insert(name.clone(), stats);
        }
    }
    Ok(LevelMetrics { metrics })
}

/// The concurrency encoded in a run directory's name (`...-concurrency16`).
pub fn concurrency_of(dir: &Path) -> Option<usize> {
    let name = dir.file_name()?.to_str()?;
    name.rsplit_once("-concurrency")?.1.parse().ok()
}

/// genai-perf's CSV: a table of request metrics, a blank line, a table of system metrics.
pub fn to_csv(metrics: &LevelMetrics) -> String {
    const STATS: [&str; 9] = [
        "avg", "min", "max", "p99", "p95", "p90", "p75", "p50", "p25",
    ];
    let mut out = format!("Metric,{}\n", STATS.join(","));
    for (name, unit) in REQUEST_METRICS {
        let Some(stats) = metrics.metrics.get(name) else {
            continue;
        };
        let mut row = vec![csv_field(&title(name, unit, true))];
        for key in STATS {
            row.push(csv_field(&thousands(stats.get(key).unwrap_or(f64::NAN))));
        }
        out += &(row.join(",") + "\n");
    }
    out += "\nMetric,Value\n";
    for (name, unit) in SYSTEM_METRICS {
        if let Some(stats) = metrics.metrics.get(name) {
            out += &format!(
                "{},{:.2}\n",
                csv_field(&title(name, unit, false)),
                stats.avg
            );
        }
    }
    out
}

/// `time_to_first_token` → `Time To First Token (ms)`; token counts carry no unit in request rows.
fn title(name: &str, unit: &str, request_row: bool) -> String {
    let words: Vec<String> = name
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_uppercase().chain(c).collect())
                .unwrap_or_default()
        })
        .collect();
    let mut t = words.join(" ");
    if !(request_row && unit == "tokens") {
        t += &format!(" ({unit})");
    }
    t
}

/// Python's `f"{v:,.2f}"`.
fn thousands(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    let s = format!("{:.2}", v.abs());
    let (int, frac) = s.split_once('.').unwrap_or((&s, "00"));
    let mut grouped = String::new();
    for (i, ch) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(ch);
    }
    format!("{}{grouped}.{frac}", if v < 0.0 { "-" } else { "" })
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_python() {
        assert_eq!(thousands(1234567.891), "1,234,567.89");
        assert_eq!(thousands(12.0), "12.00");
        assert_eq!(thousands(-1000.0), "-1,000.00");
        assert_eq!(
            title("time_to_first_token", "ms", true),
            "Time To First Token (ms)"
        );
        assert_eq!(
            title("output_sequence_length", "tokens", true),
            "Output Sequence Length"
        );
    }
}
