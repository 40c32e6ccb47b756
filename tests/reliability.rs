//! Reliability of `ember train`: a run killed at any point and resumed ends exactly like one
//! never interrupted; NaN steps stop (or are skipped) without losing the last checkpoint; an
//! output folder never mixes two runs.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{adapter_files, assert_bad_input, assert_error, ember, losses, read_json, recipe};

const METHODS: [&str; 6] = [
    "ci/tiny-lora.toml",
    "ci/tiny-ptuning-v2.toml",
    "ci/tiny-llama-adapter.toml",
    "ci/tiny-dora.toml",
    "ci/tiny-ia3.toml",
    "ci/tiny-prompt-tuning.toml",
];

/// 12 steps with a checkpoint every 3, two kept.
fn train_args(recipe: &str, run: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["train", recipe, "--quiet", "--set", "train.max_steps=12", "--set", "train.save_steps=3", "--set", "train.keep_checkpoints=2"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["--set".into(), format!("output.dir=\"{}\"", run.display())]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn train(recipe: &str, run: &Path, extra: &[&str]) -> std::process::Output {
    let args = train_args(recipe, run, extra);
    ember(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn step_lines(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |m| m.lines().filter(|l| l.contains("\"loss\"")).count())
}

/// Starts a run and SIGKILLs it once `metrics.jsonl` shows `steps` finished steps. Returns
/// whether the kill landed before the run ended by itself.
fn kill_after_steps(recipe: &str, run: &Path, steps: usize) -> bool {
    let args = train_args(recipe, run, &[]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_ember")).args(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while step_lines(run) < steps && Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = child.kill(); // SIGKILL
    child.wait().unwrap().signal() == Some(9)
}

/// Resumes a killed run (from scratch when it died before its first checkpoint) until it ends.
fn finish(recipe: &str, run: &Path) {
    let has_checkpoint = run.join("checkpoints").read_dir().is_ok_and(|mut d| d.any(|e| e.unwrap().file_name().to_string_lossy().starts_with("step-")));
    let output = train(recipe, run, &[if has_checkpoint { "--resume" } else { "--overwrite" }]);
    assert!(output.status.success(), "{recipe}: {}", String::from_utf8_lossy(&output.stderr));
}

/// For every method: SIGKILL between checkpoints, right after one, and in the middle of writing
/// one; each resumed run ends with the adapter, bit for bit, and the losses of a run never
/// interrupted.
#[test]
fn killed_and_resumed_runs_match_an_uninterrupted_run() {
    for name in METHODS {
        let recipe = recipe(name);
        let out = tempfile::tempdir().unwrap();
        let straight = out.path().join("straight");
        let output = train(&recipe, &straight, &[]);
        assert!(output.status.success(), "{name}: {}", String::from_utf8_lossy(&output.stderr));

        let mut real_kills = 0;
        for steps in [4, 8] {
            let run = out.path().join(format!("killed-after-{steps}"));
            real_kills += usize::from(kill_after_steps(&recipe, &run, steps));
            finish(&recipe, &run);
            assert!(adapter_files(&straight) == adapter_files(&run), "{name}: killed after {steps} steps: resumed adapter differs");
            assert_eq!(losses(&straight), losses(&run), "{name}: killed after {steps} steps");
        }
        assert!(real_kills > 0, "{name}: every run ended before it could be killed");

        // Killed halfway through writing the step-6 checkpoint: step 3's stays the newest.
        let run = out.path().join("killed-in-checkpoint");
        let args = train_args(&recipe, &run, &[]);
        let status = Command::new(env!("CARGO_BIN_EXE_ember")).args(&args).env("EMBER_FAULT", "kill-in-checkpoint@6").output().unwrap().status;
        assert_eq!(status.signal(), Some(9), "{name}: not killed in the checkpoint write");
        let checkpoints: Vec<String> =
            std::fs::read_dir(run.join("checkpoints")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert!(checkpoints.contains(&"step-00000003".to_string()) && !checkpoints.contains(&"step-00000006".to_string()), "{checkpoints:?}");
        finish(&recipe, &run);
        assert!(adapter_files(&straight) == adapter_files(&run), "{name}: killed in a checkpoint write: resumed adapter differs");
        assert_eq!(losses(&straight), losses(&run), "{name}: killed in a checkpoint write");
        let leftovers: Vec<_> = std::fs::read_dir(run.join("checkpoints")).unwrap().map(|e| e.unwrap().file_name()).filter(|n| n.to_string_lossy().starts_with('.')).collect();
        assert!(leftovers.is_empty(), "{name}: half-written checkpoint left behind: {leftovers:?}");
    }
}

/// A NaN loss stops the run with exit code 1 and a message naming the step and the last good
/// checkpoint, which is kept; no adapter is written.
#[test]
fn nan_loss_stops_and_keeps_the_last_checkpoint() {
    let out = tempfile::tempdir().unwrap();
    let run = out.path().join("run");
    let args = train_args(&recipe("ci/tiny-lora.toml"), &run, &[]);
    let output = Command::new(env!("CARGO_BIN_EXE_ember")).args(&args).env("EMBER_FAULT", "nan-loss@5").output().unwrap();
    assert_error(&output, 1, &["step 5: loss is NaN", "step-00000003", "--resume"]);
    assert!(run.join("checkpoints/step-00000003/state.json").is_file());
    assert!(!run.join("adapter").exists() && !run.join("summary.json").exists());
}

/// With `train.on_nonfinite = "skip"`, the NaN step leaves the adapter untouched and is recorded.
#[test]
fn nan_loss_step_is_skipped_when_the_recipe_says_so() {
    let out = tempfile::tempdir().unwrap();
    let run = out.path().join("run");
    let args = train_args(&recipe("ci/tiny-lora.toml"), &run, &["--set", "train.on_nonfinite=skip"]);
    let output = Command::new(env!("CARGO_BIN_EXE_ember")).args(&args).env("EMBER_FAULT", "nan-loss@5").output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let summary = read_json(&run.join("summary.json"));
    assert_eq!(summary["skipped_nonfinite_steps"], serde_json::json!([5]));
    assert_eq!(summary["steps"], 12);
    assert!(summary["final_train_loss"].as_f64().unwrap().is_finite());
}

/// A second run into the same folder is refused unless it resumes or overwrites.
#[test]
fn output_folder_of_another_run_needs_resume_or_overwrite() {
    let out = tempfile::tempdir().unwrap();
    let run = out.path().join("run");
    let recipe = recipe("ci/tiny-lora.toml");
    let quick = ["--set", "train.max_steps=2", "--set", "train.save_steps=0"];
    assert!(train(&recipe, &run, &quick).status.success());
    let first = adapter_files(&run);
    assert_bad_input(&train(&recipe, &run, &quick), &["already holds a run", "metrics.jsonl", "--resume", "--overwrite"]);
    assert!(adapter_files(&run) == first, "a refused run changed the folder");
    let output = train(&recipe, &run, &[&quick[..], &["--overwrite", "--set", "train.seed=7"]].concat());
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(adapter_files(&run) != first, "--overwrite did not replace the run");
}
