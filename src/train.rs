//! `ember train <recipe>`.

use std::path::Path;

use ember_trainer::{Recipe, TrainError};

use crate::bad_input;

pub fn run(recipe_path: &Path, overrides: &[String], quiet: bool) -> anyhow::Result<()> {
    let recipe = Recipe::load(recipe_path, overrides).map_err(bad_input)?;
    let mut log = |line: &str| {
        if !quiet {
            println!("{line}");
        }
    };
    match ember_trainer::train(&recipe, &mut log) {
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
