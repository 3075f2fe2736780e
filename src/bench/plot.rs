//! `pareto_plot.png`: every deployment's points and frontier, tokens/s/gpu against tokens/s/user.
//! Text uses DejaVu Sans, shipped in `assets/fonts` (Bitstream Vera license beside it).

use super::pareto::Deployment;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use std::path::Path;
use std::sync::Once;

static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn register() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if register_font("sans-serif", FontStyle::Normal, FONT).is_err() {
            tracing::warn!("the bundled font did not load; plot text may be missing");
        }
    });
}

/// Draws the plot into `path` (PNG, 1200×800).
pub fn draw(deployments: &[Deployment], path: &Path) -> Result<()> {
    register();
    let all = || {
        deployments
            .iter()
            .flat_map(|d| d.points.iter())
            .filter(|p| p.x.is_finite() && p.y.is_finite())
    };
    let x_max = all().map(|p| p.x).fold(0.0f64, f64::max).max(1e-9) * 1.1;
    let y_max = all().map(|p| p.y).fold(0.0f64, f64::max).max(1e-9) * 1.1;
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());

    let root = BitMapBackend::new(path, (1200, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Pareto frontier: throughput per GPU vs. speed per user",
            ("sans-serif", 28),
        )
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("tokens/s/user")
        .y_desc("tokens/s/gpu")
        .axis_desc_style(("sans-serif", 20))
        .label_style(("sans-serif", 16))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|e| err(&e))?;

    for (i, d) in deployments.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let front: Vec<(f64, f64)> = d.frontier().iter().map(|p| (p.x, p.y)).collect();
        chart
            .draw_series(LineSeries::new(front, color.stroke_width(3)))
            .map_err(|e| err(&e))?
            .label(format!("{} ({} GPUs)", d.name, d.config.gpus()))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
        let points = d
            .points
            .iter()
            .filter(|p| p.x.is_finite() && p.y.is_finite());
        chart
            .draw_series(points.map(|p| {
                EmptyElement::at((p.x, p.y))
                    + Circle::new((0, 0), 5, color.filled())
                    + Text::new(format!("c{}", p.concurrency), (6, -16), ("sans-serif", 13))
            }))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerLeft)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
