//! Plain-text tables for the terminal.

use super::pareto::{self, Deployment};
use super::plot;
use super::sweep::LevelResult;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// Pads columns to their widest cell; the first column left-aligned, the others right-aligned.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| -> String {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i == 0 {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect();
        parts.join("  ").trim_end().to_string() + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    out += &line(widths.iter().map(|w| "-".repeat(*w)).collect());
    for row in rows {
        out += &line(row.clone());
    }
    out
}

/// The end-of-sweep summary: one row per concurrency level.
pub fn summary(results: &[LevelResult]) -> String {
    let header = [
        "concurrency",
        "requests",
        "TTFT avg ms",
        "TTFT p99 ms",
        "ITL avg ms",
        "ITL p99 ms",
        "tok/s/user",
        "output tok/s",
        "req/s",
    ];
    let f = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            let m = &r.metrics;
            let count = m.get("request_count", "avg").unwrap_or(0.0) as usize;
            let mut requests = count.to_string();
            if r.errors > 0 {
                requests += &format!(" ({} failed)", r.errors);
            }
            if r.resumed {
                requests += " (resumed)";
            }
            vec![
                r.concurrency.to_string(),
                requests,
                f(m.get("time_to_first_token", "avg")),
                f(m.get("time_to_first_token", "p99")),
                f(m.get("inter_token_latency", "avg")),
                f(m.get("inter_token_latency", "p99")),
                f(m.get("output_token_throughput_per_user", "avg")),
                f(m.get("output_token_throughput", "avg")),
                f(m.get("request_throughput", "avg")),
            ]
        })
        .collect();
    table(&header, &rows)
}

/// Each deployment's gain over the baseline, along the frontiers at matching tokens/s/user.
pub fn gain_table(deployments: &[Deployment], baseline: usize) -> String {
    let base = &deployments[baseline];
    let base_front = base.frontier();
    let mut out = format!(
        "baseline: {} ({} GPUs); gains in tokens/s/gpu at the same tokens/s/user\n",
        base.name,
        base.config.gpus()
    );
    for (i, d) in deployments.iter().enumerate() {
        if i == baseline {
            continue;
        }
        let gains = pareto::gains(&base_front, &d.frontier());
        out += &format!(
            "\n{} ({} GPUs) vs {}:\n",
            d.name,
            d.config.gpus(),
            base.name
        );
        if gains.is_empty() {
            out += "  the frontiers cover no common tokens/s/user range; no comparison\n";
            continue;
        }
        let rows: Vec<Vec<String>> = gains
            .iter()
            .map(|g| {
                vec![
                    format!("{:.2}", g.x),
                    format!("{:.2}", g.baseline_y),
                    format!("{:.2}", g.y),
                    format!("{:.2}x", g.ratio()),
                ]
            })
            .collect();
        out += &table(
            &["tok/s/user", "baseline tok/s/gpu", "tok/s/gpu", "gain"],
            &rows,
        );
        let best = gains
            .iter()
            .max_by(|a, b| a.ratio().total_cmp(&b.ratio()))
            .expect("non-empty");
        out += &format!(
            "largest gain: {:.2}x at {:.2} tokens/s/user ({:.2} vs {:.2} tokens/s/gpu)\n",
            best.ratio(),
            best.x,
            best.y,
            best.baseline_y
        );
    }
    out
}

/// `tandem pareto`: loads the deployments, writes `pareto_plot.png` and `results.csv` into
/// `output_dir`, and returns the gain table. `baseline` names a deployment (default: the first).
pub fn analyze(dirs: &[PathBuf], output_dir: &Path, baseline: Option<&str>) -> Result<String> {
    anyhow::ensure!(
        !dirs.is_empty(),
        "give at least one deployment artifact directory"
    );
    let deployments: Vec<Deployment> = dirs
        .iter()
        .map(|d| Deployment::load(d))
        .collect::<Result<_>>()?;
    let baseline = match baseline {
        None => 0,
        Some(name) => deployments
            .iter()
            .position(|d| d.name == name)
            .with_context(|| {
                let names: Vec<&str> = deployments.iter().map(|d| d.name.as_str()).collect();
                format!("no deployment named {name:?} (have: {})", names.join(", "))
            })?,
    };
    std::fs::create_dir_all(output_dir)?;
    std::fs::write(
        output_dir.join("results.csv"),
        pareto::results_csv(&deployments),
    )?;
    plot::draw(&deployments, &output_dir.join("pareto_plot.png"))?;
    let mut out = String::new();
    for d in &deployments {
        let rows: Vec<Vec<String>> = d
            .points
            .iter()
            .map(|p| {
                vec![
                    p.concurrency.to_string(),
                    format!("{:.2}", p.x),
                    format!("{:.2}", p.y),
                    if d.frontier().contains(p) {
                        "*".into()
                    } else {
                        String::new()
                    },
                ]
            })
            .collect();
        out += &format!("{} ({} GPUs):\n", d.name, d.config.gpus());
        out += &table(
            &["concurrency", "tok/s/user", "tok/s/gpu", "frontier"],
            &rows,
        );
        out += "\n";
    }
    if deployments.len() > 1 {
        out += &gain_table(&deployments, baseline);
    }
    Ok(out)
}
