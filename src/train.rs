//! `ember train <recipe>`: a progress bar on a terminal, plain log lines otherwise (CI).

use std::io::IsTerminal;
use std::path::Path;

use ember_trainer::{Event, Recipe, Start, TrainError};
use indicatif::{ProgressBar, ProgressStyle};

use crate::bad_input;

pub fn run(recipe_path: &Path, overrides: &[String], start: Start, quiet: bool) -> anyhow::Result<()> {
    let recipe = Recipe::load(recipe_path, overrides).map_err(bad_input)?;
    let bar = (!quiet && std::io::stdout().is_terminal()).then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}").expect("valid template"));
        bar
    });
    let mut on_event = |event: Event| match (&bar, event) {
        (_, _) if quiet => {}
        (Some(bar), Event::Info(line)) => bar.println(line),
        (Some(bar), Event::Step(s)) => {
            bar.set_length(s.total_steps as u64);
            bar.set_position(s.step as u64);
            bar.set_message(format!("loss {:.4} lr {:.2e} {:.0} tok/s eta {:.0}s", s.loss, s.lr, s.tokens_per_second, s.eta_seconds));
        }
        (None, Event::Info(line)) => println!("{line}"),
        (None, Event::Step(s)) if s.log_line => println!("{s}"),
        (None, Event::Step(_)) => {}
    };
    let result = ember_trainer::train(&recipe, start, &mut on_event);
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    match result {
        Ok(summary) => {
            println!(
                "done: {} steps, train loss {} -> {}, eval loss {} -> {}, {:.0} tok/s, adapter {}",
                summary.steps,
                fmt_loss(summary.first_train_loss),
                fmt_loss(summary.final_train_loss),
                fmt_loss(summary.first_eval_loss),
                fmt_loss(summary.final_eval_loss),
                summary.tokens_per_second,
                summary.adapter_dir.display()
            );
            Ok(())
        }
        Err(TrainError::Input(message)) => Err(bad_input(anyhow::anyhow!(message))),
        Err(TrainError::Run(message)) => Err(anyhow::anyhow!(message)),
    }
}

fn fmt_loss(loss: Option<f64>) -> String {
    loss.map_or_else(|| "-".into(), |l| format!("{l:.4}"))
}
