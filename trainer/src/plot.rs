//! `training_curves.png`: train loss (eval loss as markers) and learning rate against the
//! optimizer step, drawn from a run's `metrics.jsonl`. Text uses DejaVu Sans compiled into the
//! binary, so plotting works on a machine without fontconfig or system fonts.

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

/// File name of the plot inside a run's output folder.
pub const PLOT_FILE: &str = "training_curves.png";

/// The points of a run's `metrics.jsonl`, as (step, value).
#[derive(Debug, Default, PartialEq)]
pub struct Curves {
    pub loss: Vec<(f64, f64)>,
    pub lr: Vec<(f64, f64)>,
    pub eval_loss: Vec<(f64, f64)>,
}

impl Curves {
    /// Reads `metrics.jsonl`: step lines carry `loss` and `lr`, evaluation lines `eval_loss`.
    pub fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut curves = Curves::default();
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let value: serde_json::Value =
                serde_json::from_str(line).map_err(|e| format!("{}: line {}: malformed JSON: {e}", path.display(), n + 1))?;
            let Some(step) = value["step"].as_f64() else { continue };
            let push = |key: &str, into: &mut Vec<(f64, f64)>| {
                // Non-finite values (a NaN loss) cannot be drawn; the gap shows where they were.
                if let Some(v) = value[key].as_f64().filter(|v| v.is_finite()) {
                    into.push((step, v));
                }
            };
            push("loss", &mut curves.loss);
            push("lr", &mut curves.lr);
            push("eval_loss", &mut curves.eval_loss);
        }
        if curves.loss.is_empty() && curves.eval_loss.is_empty() {
            return Err(format!("{}: no training step or evaluation to plot", path.display()));
        }
        Ok(curves)
    }
}

/// Draws `run_dir/metrics.jsonl` into `run_dir/training_curves.png` (written to a temporary
/// file, synced and renamed) with `title` above it; returns the PNG's path.
pub fn plot_run(run_dir: &Path, title: &str) -> Result<PathBuf, String> {
    let curves = Curves::read(&run_dir.join("metrics.jsonl"))?;
    let out = run_dir.join(PLOT_FILE);
    // The bitmap backend picks the encoder by extension, so the temporary name ends in .png too.
    let tmp = run_dir.join(format!(".{PLOT_FILE}.tmp-{}.png", std::process::id()));
    let result = draw(&curves, title, &tmp)
        .and_then(|()| Ok(std::fs::File::open(&tmp)?.sync_all()?))
        .and_then(|()| Ok(std::fs::rename(&tmp, &out)?))
        .map_err(|e| format!("{}: {e}", out.display()));
    match result {
        Ok(()) => Ok(out),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn register_embedded_font() {
    static REGISTER: Once = Once::new();
    // Cannot fail for the embedded font; if it did, drawing text would report FontUnavailable.
    REGISTER.call_once(|| {
        let _ = register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

/// `(min, max)` of `values` widened so that a flat or single-point curve still gets an axis.
fn range(values: impl Iterator<Item = f64>, pad_fraction: f64) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = if hi > lo { (hi - lo) * pad_fraction } else { hi.abs().max(1e-12) * 0.05 };
    (lo - pad, hi + pad)
}

fn step_label(step: &f64) -> String {
    format!("{step:.0}")
}

/// A chart with a caption and the margins and label areas both panels share.
fn chart_on<'a, 'b>(area: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>, caption: &str) -> ChartBuilder<'a, 'b, BitMapBackend<'b>> {
    let mut builder = ChartBuilder::on(area);
    builder.caption(caption, ("sans-serif", 20)).margin(12).margin_right(30).x_label_area_size(40).y_label_area_size(70);
    builder
}

fn draw(curves: &Curves, title: &str, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    register_embedded_font();
    let root = BitMapBackend::new(path, (1000, 760)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(&format!("{title}: loss and learning rate"), ("sans-serif", 26))?;
    let (top, bottom) = root.split_vertically(400);
    let last_step = curves.loss.iter().chain(&curves.lr).chain(&curves.eval_loss).map(|p| p.0).fold(1.0, f64::max);
    let steps = 0.0..last_step;
    // Whole steps only: never more tick labels than steps.
    let step_ticks = (last_step as usize + 1).min(11);

    let (lo, hi) = range(curves.loss.iter().chain(&curves.eval_loss).map(|p| p.1), 0.05);
    let mut chart = chart_on(&top, "loss").build_cartesian_2d(steps.clone(), lo..hi)?;
    chart.configure_mesh().x_desc("step").y_desc("loss").x_labels(step_ticks).x_label_formatter(&step_label).label_style(("sans-serif", 15)).draw()?;
    chart.draw_series(LineSeries::new(curves.loss.iter().copied(), BLUE.stroke_width(2)))?
        .label("train loss")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart.draw_series(curves.eval_loss.iter().map(|&p| Circle::new(p, 5, RED.filled())))?
        .label("eval loss")
        .legend(|(x, y)| Circle::new((x + 10, y), 5, RED.filled()));
    chart.configure_series_labels().position(SeriesLabelPosition::UpperRight).background_style(WHITE.mix(0.8)).border_style(BLACK).label_font(("sans-serif", 15)).draw()?;

    let (_, lr_hi) = range(curves.lr.iter().map(|p| p.1), 0.05);
    let mut chart = chart_on(&bottom, "learning rate").build_cartesian_2d(steps, 0.0..lr_hi)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("lr")
        .x_labels(step_ticks)
        .x_label_formatter(&step_label)
        .y_label_formatter(&|v| format!("{v:.1e}"))
        .label_style(("sans-serif", 15))
        .draw()?;
    chart.draw_series(LineSeries::new(curves.lr.iter().copied(), RGBColor(0, 140, 0).stroke_width(2)))?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_steps_and_evaluations_and_draws_a_png() {
        let dir = std::env::temp_dir().join(format!("ember-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lines = [
            r#"{"step": 0, "eval_loss": 3.0}"#,
            r#"{"step": 1, "loss": 3.2, "lr": 0.001}"#,
            r#"{"step": 2, "loss": 2.5, "lr": 0.0005}"#,
            r#"{"step": 2, "eval_loss": 2.4}"#,
        ];
        std::fs::write(dir.join("metrics.jsonl"), lines.join("\n")).unwrap();
        let curves = Curves::read(&dir.join("metrics.jsonl")).unwrap();
        assert_eq!(curves.loss, vec![(1.0, 3.2), (2.0, 2.5)]);
        assert_eq!(curves.lr, vec![(1.0, 0.001), (2.0, 0.0005)]);
        assert_eq!(curves.eval_loss, vec![(0.0, 3.0), (2.0, 2.4)]);
        let png = plot_run(&dir, "test run").unwrap();
        assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG\r\n\x1a\n"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn empty_metrics_are_an_error() {
        let dir = std::env::temp_dir().join(format!("ember-plot-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("metrics.jsonl"), "").unwrap();
        let e = plot_run(&dir, "empty").unwrap_err();
        assert!(e.contains("no training step or evaluation"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
