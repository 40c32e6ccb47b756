//! `ember train <recipe>`: a progress bar on a terminal, plain log lines otherwise (CI), or one
//! JSON object per line with `--json` (machines).

use std::io::IsTerminal;
use std::path::Path;

use ember_models::hub::Fetch;
use ember_trainer::recipe::env_overrides;
use ember_trainer::{Event, Recipe, Start, Summary};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;


/// How `ember train` reports progress on stdout.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Progress bar on a terminal, log lines otherwise.
    Human,
    /// Only the final summary line.
    Quiet,
    /// `{"event": "info" | "step" | "summary", ...}`, one object per line.
    Json,
}

pub fn run(recipe_path: &Path, overrides: &[String], start: Start, output: Output) -> anyhow::Result<()> {
    let recipe = Recipe::load_with_env(recipe_path, &env_overrides(), overrides, Fetch::Download)?;
    let bar = (output == Output::Human && std::io::stdout().is_terminal()).then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}").expect("valid template"));
        bar
    });
    let mut on_event = |event: Event| match (output, &bar, event) {
        (Output::Quiet, _, _) => {}
        (Output::Json, _, Event::Info(message)) => println!("{}", json!({"event": "info", "message": message})),
        (Output::Json, _, Event::Step(s)) => {
            let mut line = serde_json::to_value(&s).expect("step serializes");
            line["event"] = json!("step");
            println!("{line}");
        }
        (Output::Human, Some(bar), Event::Info(line)) => bar.println(line),
        (Output::Human, Some(bar), Event::Step(s)) => {
            bar.set_length(s.total_steps as u64);
            bar.set_position(s.step as u64);
            bar.set_message(format!("loss {:.4} lr {:.2e} {:.0} tok/s eta {:.0}s", s.loss, s.lr, s.tokens_per_second, s.eta_seconds));
        }
        (Output::Human, None, Event::Info(line)) => println!("{line}"),
        (Output::Human, None, Event::Step(s)) if s.log_line => println!("{s}"),
        (Output::Human, None, Event::Step(_)) => {}
    };
    let result = ember_trainer::train(&recipe, start, &mut on_event);
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    match result {
        Ok(summary) if output == Output::Json => {
            let mut line = serde_json::to_value(&summary).expect("summary serializes");
            line["event"] = json!("summary");
            println!("{line}");
            Ok(())
        }
        Ok(summary) => {
            println!("{}", done_line(&summary));
            Ok(())
        }
        Err(error) => Err(error.into()),
    }
}

fn done_line(summary: &Summary) -> String {
    let plot = summary.plot.as_ref().map(|p| format!(", curves {}", p.display())).unwrap_or_default();
    format!(
        "done: {} steps, train loss {} -> {}, eval loss {} -> {}, {:.0} tok/s, adapter {}{plot}",
        summary.steps,
        fmt_loss(summary.first_train_loss),
        fmt_loss(summary.final_train_loss),
        fmt_loss(summary.first_eval_loss),
        fmt_loss(summary.final_eval_loss),
        summary.tokens_per_second,
        summary.adapter_dir.display()
    )
}

fn fmt_loss(loss: Option<f64>) -> String {
    loss.map_or_else(|| "-".into(), |l| format!("{l:.4}"))
}
