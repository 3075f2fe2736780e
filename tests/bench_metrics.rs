//! Metric computations, artifacts and Pareto analysis on hand-computed examples.

use tandem::bench::artifacts::{self, DeploymentConfig};
use tandem::bench::metrics::{percentile_sorted, LevelMetrics, RequestRecord, Stats};
use tandem::bench::pareto::{self, Deployment, Point};
use tandem::bench::report;

fn close(a: f64, b: f64) {
    assert!((a - b).abs() < 1e-9 * b.abs().max(1.0), "{a} != {b}");
}

#[test]
fn percentiles_match_numpy_linear() {
    // numpy.percentile([1, 2, 3, 4], q): 25 → 1.75, 50 → 2.5, 99 → 3.97
    let v = [1.0, 2.0, 3.0, 4.0];
    close(percentile_sorted(&v, 25.0), 1.75);
    close(percentile_sorted(&v, 50.0), 2.5);
    close(percentile_sorted(&v, 99.0), 3.97);
    // numpy.percentile([10, 20, 30, 40, 50], 90) = 46
    close(
        percentile_sorted(&[10.0, 20.0, 30.0, 40.0, 50.0], 90.0),
        46.0,
    );
    close(percentile_sorted(&[7.0], 95.0), 7.0);
}

#[test]
fn stats_use_population_std() {
    let s = Stats::of("ms", &[4.0, 1.0, 3.0, 2.0]).unwrap();
    close(s.avg, 2.5);
    close(s.std.unwrap(), 1.25f64.sqrt()); // numpy.std default ddof=0
    close(s.min.unwrap(), 1.0);
    close(s.max.unwrap(), 4.0);
    close(s.p75.unwrap(), 3.25);
    assert!(Stats::of("ms", &[]).is_none());
}

fn two_requests() -> Vec<RequestRecord> {
    vec![
        // TTFT 100 ms, latency 1000 ms, 10 tokens: ITL 900/9 = 100 ms, 10 tokens/s/user
        RequestRecord {
            start_s: 0.0,
            first_token_s: 0.1,
            end_s: 1.0,
            input_tokens: 30,
            output_tokens: 10,
        },
        // TTFT 200 ms, latency 2000 ms, 11 tokens: ITL 1800/10 = 180 ms, 5.5556 tokens/s/user
        RequestRecord {
            start_s: 0.5,
            first_token_s: 0.7,
            end_s: 2.5,
            input_tokens: 30,
            output_tokens: 11,
        },
    ]
}

#[test]
fn level_metrics_follow_genai_perf_definitions() {
    let m = LevelMetrics::from_records(&two_requests()).unwrap();
    close(m.avg("time_to_first_token"), 150.0);
    close(m.avg("request_latency"), 1500.0);
    close(m.avg("inter_token_latency"), 140.0);
    close(m.get("inter_token_latency", "max").unwrap(), 180.0);
    close(
        m.avg("output_token_throughput_per_user"),
        (10.0 + 1000.0 / 180.0) / 2.0,
    );
    close(m.avg("output_sequence_length"), 10.5);
    close(m.avg("input_sequence_length"), 30.0);
    // duration = last response (2.5 s) − first request (0 s)
    close(m.avg("output_token_throughput"), 21.0 / 2.5);
    close(m.avg("request_throughput"), 2.0 / 2.5);
    close(m.avg("request_count"), 2.0);
    assert_eq!(
        m.metrics["output_token_throughput"].p99, None,
        "system metrics carry avg only"
    );
    assert_eq!(m.metrics["time_to_first_token"].unit, "ms");
    assert_eq!(
        m.metrics["output_token_throughput_per_user"].unit,
        "tokens/sec/user"
    );
}

#[test]
fn single_token_outputs_have_no_itl() {
    let r = RequestRecord {
        start_s: 0.0,
        first_token_s: 0.1,
        end_s: 0.1,
        input_tokens: 1,
        output_tokens: 1,
    };
    assert_eq!(r.itl_ms(), None);
    let m = LevelMetrics::from_records(&[r]).unwrap();
    assert!(!m.metrics.contains_key("inter_token_latency"));
    close(m.avg("time_to_first_token"), 100.0);
    assert!(LevelMetrics::from_records(&[]).is_err());
}

#[test]
fn artifacts_round_trip_in_genai_perf_layout() {
    let dir = tempfile::tempdir().unwrap();
    let run = artifacts::level_dir(dir.path(), "org/model-70b", "chat", 16);
    assert!(run.ends_with("org_model-70b-openai-chat-concurrency16"));
    assert_eq!(artifacts::concurrency_of(&run), Some(16));
    let m = LevelMetrics::from_records(&two_requests()).unwrap();
    artifacts::write_level(&run, &m, serde_json::json!({"model": "org/model-70b"})).unwrap();
    let back = artifacts::read_level(&run).unwrap();
    assert_eq!(
        back.metrics.keys().collect::<Vec<_>>(),
        m.metrics.keys().collect::<Vec<_>>()
    );
    for (name, stats) in &m.metrics {
        assert_eq!(back.metrics[name].unit, stats.unit);
        for key in [
            "avg", "min", "max", "std", "p25", "p50", "p75", "p90", "p95", "p99",
        ] {
            match (back.get(name, key), stats.get(key)) {
                (Some(a), Some(b)) => close(a, b),
                (a, b) => assert_eq!(a, b, "{name}.{key}"),
            }
        }
    }

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join(artifacts::JSON_FILE)).unwrap())
            .unwrap();
    assert_eq!(json["time_to_first_token"]["unit"], "ms");
    assert_eq!(json["inter_token_latency"]["p50"], 140.0);
    assert_eq!(json["input_config"]["model"], "org/model-70b");

    let csv = std::fs::read_to_string(run.join(artifacts::CSV_FILE)).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "Metric,avg,min,max,p99,p95,p90,p75,p50,p25");
    assert!(
        lines[1].starts_with("Time To First Token (ms),150.00,100.00,200.00,"),
        "{}",
        lines[1]
    );
    assert!(
        csv.contains("\nRequest Latency (ms),\"1,500.00\",\"1,000.00\",\"2,000.00\","),
        "{csv}"
    );
    assert!(
        csv.contains("\nOutput Sequence Length,10.50,"),
        "token counts carry no unit"
    );
    assert!(
        csv.contains("\n\nMetric,Value\nOutput Token Throughput (tokens/sec),8.40\n"),
        "{csv}"
    );
    assert!(csv.contains("Request Count (count),2.00"));
}

#[test]
fn deployment_gpu_counts() {
    let mut c = DeploymentConfig {
        kind: "tandem".into(),
        mode: "disaggregated".into(),
        tp: 1,
        dp: 1,
        prefill_tp: 1,
        prefill_dp: 4,
        decode_tp: 4,
        decode_dp: 1,
        model: "m".into(),
        isl: 3000,
        osl: 150,
        name: None,
    };
    assert_eq!(c.gpus(), 8);
    c.mode = "aggregated".into();
    (c.tp, c.dp) = (4, 2);
    assert_eq!(c.gpus(), 8);
    let dir = tempfile::tempdir().unwrap();
    c.write(dir.path()).unwrap();
    assert_eq!(DeploymentConfig::read(dir.path()).unwrap(), c);
}

fn pts(v: &[(f64, f64)]) -> Vec<Point> {
    v.iter()
        .enumerate()
        .map(|(i, &(x, y))| Point::new(1 << i, x, y))
        .collect()
}

#[test]
fn frontier_keeps_undominated_points() {
    let p = pts(&[(1.0, 10.0), (2.0, 8.0), (1.5, 7.0), (3.0, 3.0), (2.0, 8.5)]);
    let f: Vec<(f64, f64)> = pareto::frontier(&p).iter().map(|p| (p.x, p.y)).collect();
    assert_eq!(f, vec![(1.0, 10.0), (2.0, 8.5), (3.0, 3.0)]);
}

#[test]
fn interpolation_and_gains_along_frontiers() {
    let f = pareto::frontier(&pts(&[(1.0, 10.0), (2.0, 8.5), (3.0, 3.0)]));
    close(pareto::interpolate(&f, 1.5).unwrap(), 9.25);
    close(pareto::interpolate(&f, 2.5).unwrap(), 5.75);
    close(pareto::interpolate(&f, 3.0).unwrap(), 3.0);
    assert_eq!(pareto::interpolate(&f, 0.5), None);
    assert_eq!(pareto::interpolate(&f, 3.5), None);

    let base = pareto::frontier(&pts(&[(1.0, 10.0), (3.0, 2.0)]));
    let other = pareto::frontier(&pts(&[(2.0, 12.0), (4.0, 4.0)]));
    let g = pareto::gains(&base, &other);
    assert_eq!(g.len(), 2, "{g:?}");
    for (gain, (x, base_y, y, ratio)) in g.iter().zip([(2.0, 6.0, 12.0, 2.0), (3.0, 2.0, 8.0, 4.0)])
    {
        close(gain.x, x);
        close(gain.baseline_y, base_y);
        close(gain.y, y);
        close(gain.ratio(), ratio);
    }
    assert!(pareto::gains(&base, &pareto::frontier(&pts(&[(5.0, 1.0)]))).is_empty());
}

/// Writes a deployment whose level c has `x(c)` tokens/s/user and `y(c)` total tokens/s.
fn fake_deployment(
    dir: &std::path::Path,
    name: &str,
    gpus_tp: usize,
    levels: &[(usize, f64, f64)],
) {
    let cfg = DeploymentConfig {
        kind: "mock".into(),
        mode: "aggregated".into(),
        tp: gpus_tp,
        dp: 1,
        prefill_tp: 1,
        prefill_dp: 1,
        decode_tp: 1,
        decode_dp: 1,
        model: "m".into(),
        isl: 10,
        osl: 10,
        name: Some(name.into()),
    };
    cfg.write(dir).unwrap();
    for &(c, x, y) in levels {
        let mut m = LevelMetrics::default();
        m.metrics.insert(
            "output_token_throughput_per_user".into(),
            Stats::avg_only("tokens/sec/user", x),
        );
        m.metrics.insert(
            "output_token_throughput".into(),
            Stats::avg_only("tokens/sec", y),
        );
        artifacts::write_level(
            &artifacts::level_dir(dir, "m", "chat", c),
            &m,
            serde_json::json!({}),
        )
        .unwrap();
    }
}

#[test]
fn pareto_report_writes_plot_csv_and_gain_table() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("base"), tmp.path().join("disagg"));
    fake_deployment(
        &a,
        "base",
        2,
        &[(1, 100.0, 200.0), (2, 80.0, 320.0), (4, 40.0, 400.0)],
    );
    fake_deployment(
        &b,
        "disagg",
        2,
        &[(1, 90.0, 240.0), (2, 80.0, 480.0), (4, 50.0, 800.0)],
    );

    let d = Deployment::load(&a).unwrap();
    assert_eq!(
        d.points.iter().map(|p| p.concurrency).collect::<Vec<_>>(),
        vec![1, 2, 4]
    );
    close(d.points[1].y, 160.0); // 320 tokens/s over 2 GPUs

    let out = tmp.path().join("out");
    let table = report::analyze(&[a.clone(), b.clone()], &out, Some("base")).unwrap();
    // At 80 tokens/s/user: 240 vs 160 tokens/s/gpu.
    assert!(table.contains("1.50x"), "{table}");
    let png = std::fs::read(out.join("pareto_plot.png")).unwrap();
    assert_eq!(&png[..4], b"\x89PNG");
    assert!(
        png.len() > 10_000,
        "the plot has content ({} bytes)",
        png.len()
    );
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 7);
    assert!(
        csv.contains("disagg,mock,aggregated,2,4,50.0000,400.0000,800.0000"),
        "{csv}"
    );

    let err = report::analyze(&[a, b], &out, Some("nope")).unwrap_err();
    assert!(
        format!("{err:#}").contains("no deployment named"),
        "{err:#}"
    );
    let err = Deployment::load(tmp.path()).unwrap_err();
    assert!(
        format!("{err:#}").contains("deployment_config.json"),
        "{err:#}"
    );
}
