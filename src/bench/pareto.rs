//! Pareto analysis of benchmark artifacts: per deployment, points (x = tokens/s/user, y =
//! tokens/s/gpu), the frontier, and the throughput gain over a baseline at matching tokens/s/user,
//! interpolated linearly along both frontiers.

use super::artifacts::{self, DeploymentConfig, JSON_FILE};
use anyhow::{bail, Context, Result};
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub concurrency: usize,
    /// output_token_throughput_per_user, avg (tokens/s/user).
    pub x: f64,
    /// output_token_throughput / GPUs (tokens/s/gpu).
    pub y: f64,
    pub output_token_throughput: f64,
    pub ttft_ms: f64,
    pub itl_ms: f64,
}

impl Point {
    pub fn new(concurrency: usize, x: f64, y: f64) -> Self {
        Self {
            concurrency,
            x,
            y,
            output_token_throughput: f64::NAN,
            ttft_ms: f64::NAN,
            itl_ms: f64::NAN,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Deployment {
    pub name: String,
    pub config: DeploymentConfig,
    /// Sorted by concurrency.
    pub points: Vec<Point>,
}

impl Deployment {
    /// Reads `deployment_config.json` and every run directory under `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let config = DeploymentConfig::read(dir)?;
        let gpus = config.gpus() as f64;
        let mut points = Vec::new();
        let entries =
            std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
        for entry in entries {
            let run = entry?.path();
            if !run.join(JSON_FILE).is_file() {
                continue;
            }
            let m = artifacts::read_level(&run)?;
            let throughput = m.avg("output_token_throughput");
            points.push(Point {
                concurrency: artifacts::concurrency_of(&run).unwrap_or(0),
                x: m.avg("output_token_throughput_per_user"),
                y: throughput / gpus,
                output_token_throughput: throughput,
                ttft_ms: m.avg("time_to_first_token"),
                itl_ms: m.avg("inter_token_latency"),
            });
        }
        if points.is_empty() {
            bail!("{}: no run directories with {JSON_FILE}", dir.display());
        }
        points.sort_by_key(|p| p.concurrency);
        let name = config.name.clone().unwrap_or_else(|| {
            let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        Ok(Self {
            name,
            config,
            points,
        })
    }

    pub fn frontier(&self) -> Vec<Point> {
        frontier(&self.points)
    }
}

/// The points no other point matches or beats on both axes (strictly on one), sorted by x.
pub fn frontier(points: &[Point]) -> Vec<Point> {
    let finite: Vec<&Point> = points
        .iter()
        .filter(|p| p.x.is_finite() && p.y.is_finite())
        .collect();
    let mut front: Vec<Point> = finite
        .iter()
        .filter(|p| {
            !finite
                .iter()
                .any(|q| q.x >= p.x && q.y >= p.y && (q.x > p.x || q.y > p.y))
        })
        .map(|p| (*p).clone())
        .collect();
    front.sort_by(|a, b| a.x.total_cmp(&b.x).then(b.y.total_cmp(&a.y)));
    front
}

/// y of a frontier (sorted by x) at `x`, linear between neighbours; `None` outside its x range.
pub fn interpolate(front: &[Point], x: f64) -> Option<f64> {
    let (first, last) = (front.first()?, front.last()?);
    if x < first.x || x > last.x {
        return None;
    }
    for w in front.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        if x >= a.x && x <= b.x {
            if b.x == a.x {
                return Some(a.y.max(b.y));
            }
            return Some(a.y + (b.y - a.y) * (x - a.x) / (b.x - a.x));
        }
    }
    Some(first.y) // a single-point frontier at exactly x
}

#[derive(Debug, Clone, PartialEq)]
pub struct Gain {
    /// tokens/s/user
    pub x: f64,
    pub baseline_y: f64,
    pub y: f64,
}

impl Gain {
    pub fn ratio(&self) -> f64 {
        self.y / self.baseline_y
    }
}

/// The other frontier's throughput against the baseline's at every frontier x of either one
/// inside the x range both cover.
pub fn gains(baseline: &[Point], other: &[Point]) -> Vec<Gain> {
    let (Some(b0), Some(b1), Some(o0), Some(o1)) = (
        baseline.first(),
        baseline.last(),
        other.first(),
        other.last(),
    ) else {
        return vec![];
    };
    let (lo, hi) = (b0.x.max(o0.x), b1.x.min(o1.x));
    let mut xs: Vec<f64> = baseline
        .iter()
        .chain(other)
        .map(|p| p.x)
        .filter(|x| *x >= lo && *x <= hi)
        .collect();
    xs.sort_by(|a, b| a.total_cmp(b));
    xs.dedup();
    xs.into_iter()
        .filter_map(|x| {
            Some(Gain {
                x,
                baseline_y: interpolate(baseline, x)?,
                y: interpolate(other, x)?,
            })
        })
        .collect()
}

/// Every point of every deployment, one row each.
pub fn results_csv(deployments: &[Deployment]) -> String {
    let mut out = String::from(
        "deployment,kind,mode,gpus,concurrency,tokens_per_s_per_user,tokens_per_s_per_gpu,\
         output_token_throughput,time_to_first_token_avg_ms,inter_token_latency_avg_ms,on_frontier\n",
    );
    for d in deployments {
        let front = d.frontier();
        for p in &d.points {
            out += &format!(
                "{},{},{},{},{},{:.4},{:.4},{:.4},{:.4},{:.4},{}\n",
                d.name.replace(',', "_"),
                d.config.kind,
                d.config.mode,
                d.config.gpus(),
                p.concurrency,
                p.x,
                p.y,
                p.output_token_throughput,
                p.ttft_ms,
                p.itl_ms,
                front.contains(p)
            );
        }
    }
    out
}
