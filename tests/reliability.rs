//! Reliability of `ember train`: a run killed at any point and resumed ends exactly like one
//! never interrupted; SIGTERM and Ctrl-C stop it after a step with a checkpoint; a full disk
//! loses nothing; NaN steps stop (or are skipped) without losing the last checkpoint; an output
//! folder never mixes two runs, nor serves two live processes; a bad record in a large file is
//! named before training.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{adapter_files, assert_bad_input, assert_error, ember, losses, read_json, recipe};

const METHODS: [&str; 11] = [
    "ci/tiny-lora.toml",
    "ci/tiny-ptuning-v2.toml",
    "ci/tiny-llama-adapter.toml",
    "ci/tiny-dora.toml",
    "ci/tiny-ia3.toml",
    "ci/tiny-prompt-tuning.toml",
    "ci/tiny-qlora.toml",
    "ci/tiny-qpissa.toml",
    "ci/tiny-vocab-chat.toml",
    "ci/tiny-lora-options.toml",
    "ci/tiny-pretrain.toml",
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

/// Starts a run of `steps` steps (a checkpoint every 3, two kept) and waits until
/// `metrics.jsonl` shows `after` finished steps.
fn start_run(recipe: &str, run: &Path, steps: usize, after: usize) -> Child {
    let args = train_args(recipe, run, &["--set", &format!("train.max_steps={steps}")]);
    let child = Command::new(env!("CARGO_BIN_EXE_ember")).args(&args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while step_lines(run) < after && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    child
}

fn send(child: &Child, signal: &str) {
    let status = Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
    assert!(status.success(), "kill {signal} failed");
}

/// Dot-named leftovers of unfinished writes in `dir`.
fn temporaries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir).map_or(Vec::new(), |d| {
        d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.contains(".tmp-") || n.contains(".old-")).collect()
    })
}

/// SIGTERM (Slurm, Kubernetes) or Ctrl-C: the run finishes its step, saves a checkpoint, names it
/// in one line and exits 143 / 130; `--resume` then ends exactly like a run never interrupted.
#[test]
fn a_signal_stops_after_the_step_with_a_checkpoint_and_resume_matches() {
    for (name, signal, code) in [("ci/tiny-lora.toml", "-TERM", 143), ("ci/tiny-ptuning-v2.toml", "-INT", 130)] {
        let recipe = recipe(name);
        let out = tempfile::tempdir().unwrap();
        let straight = out.path().join("straight");
        assert!(train(&recipe, &straight, &["--set", "train.max_steps=40"]).status.success());

        let run = out.path().join("interrupted");
        let child = start_run(&recipe, &run, 40, 4);
        send(&child, signal);
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(code), "{name}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{name}: {stderr}");
        let step: usize = stderr.split("after step ").nth(1).and_then(|s| s.split(':').next()).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{stderr}"));
        assert!(stderr.contains(&format!("checkpoint {}", run.join(format!("checkpoints/step-{step:08}")).display())), "{stderr}");
        assert!(stderr.contains("ember train --resume"), "{stderr}");
        assert!(run.join(format!("checkpoints/step-{step:08}/state.json")).is_file());
        assert!(!run.join("adapter").exists());

        let output = train(&recipe, &run, &["--set", "train.max_steps=40", "--resume"]);
        assert!(output.status.success(), "{name}: {}", String::from_utf8_lossy(&output.stderr));
        assert!(adapter_files(&straight) == adapter_files(&run), "{name}: interrupted at step {step}: resumed adapter differs");
        assert_eq!(losses(&straight), losses(&run), "{name}: interrupted at step {step}");
    }
}

/// A second signal does not wait for the step: the process exits at once with 128 + signal,
/// removing what it was half-way through writing; the last complete checkpoint resumes.
#[test]
fn a_second_signal_aborts_at_once_and_keeps_the_last_checkpoint() {
    let recipe = recipe("ci/tiny-lora.toml");
    let out = tempfile::tempdir().unwrap();
    let run = out.path().join("run");
    let child = start_run(&recipe, &run, 400, 4);
    send(&child, "-INT");
    send(&child, "-INT");
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(130), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(temporaries(&run.join("checkpoints")).is_empty(), "{:?}", temporaries(&run.join("checkpoints")));
    let output = train(&recipe, &run, &["--set", "train.max_steps=12", "--resume"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

/// A signal while `ember merge` writes the merged model leaves neither the output folder nor a
/// temporary behind.
#[test]
fn a_signal_during_merge_leaves_no_output() {
    let base = common::fixtures().join("tiny_llama");
    let out = tempfile::tempdir().unwrap();
    let merged = out.path().join("merged");
    let output = Command::new(env!("CARGO_BIN_EXE_ember"))
        .args(["merge", "--base", base.to_str().unwrap(), "--adapter", base.join("adapters/lora").to_str().unwrap(), "--out", merged.to_str().unwrap()])
        .env("EMBER_FAULT", "signal-in-merge@1")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(143), "{}", String::from_utf8_lossy(&output.stderr));
    let left: Vec<_> = std::fs::read_dir(out.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "merge left {left:?}");
}

/// A signal while a run's `[export]` writes the merged folder stops the run at once (no training
/// step is left to finish): exit 143, the adapter saved, neither the folder nor a temporary left.
#[test]
fn a_signal_during_a_runs_export_stops_it_at_once() {
    let out = tempfile::tempdir().unwrap();
    let run = out.path().join("run");
    let args = train_args(&recipe("ci/tiny-lora.toml"), &run, &["--set", "train.max_steps=3", "--set", "export.merged=f32"]);
    let output = Command::new(env!("CARGO_BIN_EXE_ember")).args(&args).env("EMBER_FAULT", "signal-in-merge@1").output().unwrap();
    assert_eq!(output.status.code(), Some(143), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(run.join("adapter/adapter_model.safetensors").is_file());
    assert!(!run.join("merged").exists());
    assert!(temporaries(&run).is_empty(), "{:?}", temporaries(&run));
}

/// A full disk while writing a checkpoint: exit 1 with one line naming the file and the OS
/// error; the previous checkpoint stays, no temporary is left, and `--resume` ends like a run
/// that never failed.
#[test]
fn a_full_disk_in_a_checkpoint_write_keeps_the_previous_one() {
    let recipe = recipe("ci/tiny-lora.toml");
    let out = tempfile::tempdir().unwrap();
    let straight = out.path().join("straight");
    assert!(train(&recipe, &straight, &[]).status.success());
    let run = out.path().join("run");
    let args = train_args(&recipe, &run, &[]);
    let output = Command::new(env!("CARGO_BIN_EXE_ember")).args(&args).env("EMBER_FAULT", "disk-full-in-checkpoint@6").output().unwrap();
    assert_error(&output, 1, &["checkpoints/step-00000006/optimizer.safetensors", "No space left on device"]);
    // The error names the checkpoint it was writing, not the temporary it wrote into.
    assert!(!String::from_utf8_lossy(&output.stderr).contains(".tmp-"), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(run.join("checkpoints/step-00000003/state.json").is_file());
    assert!(!run.join("checkpoints/step-00000006").exists() && !run.join("adapter").exists());
    assert!(temporaries(&run.join("checkpoints")).is_empty(), "{:?}", temporaries(&run.join("checkpoints")));
    finish(&recipe, &run);
    assert!(adapter_files(&straight) == adapter_files(&run), "resumed adapter differs");
    assert_eq!(losses(&straight), losses(&run));
}

/// A tmpfs mounted for the test; unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// `None`, with the reason printed, where this machine does not let the test mount one.
    fn mount(dir: &Path, bytes: usize) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        let output = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs", dir.to_str().unwrap()]).output();
        match output {
            Ok(o) if o.status.success() => Some(Tmpfs(dir.to_path_buf())),
            Ok(o) => {
                eprintln!("SKIP real full disk: mount -t tmpfs is not permitted here: {}", String::from_utf8_lossy(&o.stderr).trim());
                None
            }
            Err(e) => {
                eprintln!("SKIP real full disk: no mount command: {e}");
                None
            }
        }
    }

    fn resize(&self, bytes: usize) {
        let status = Command::new("mount").args(["-o", &format!("remount,size={bytes}"), self.0.to_str().unwrap()]).status().unwrap();
        assert!(status.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Bytes `dir` takes on a tmpfs: every file rounded up to whole 4 KiB pages.
fn pages(dir: &Path) -> usize {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).map(|p| if p.is_dir() { pages(&p) } else { std::fs::metadata(&p).unwrap().len().div_ceil(4096) as usize * 4096 }).sum()
}

/// The same on a real filesystem that fills up: a tmpfs with room for the step-3 checkpoint and
/// half of the next.
#[test]
fn a_real_full_disk_keeps_the_previous_checkpoint() {
    let recipe = recipe("ci/tiny-lora.toml");
    let out = tempfile::tempdir().unwrap();
    let straight = out.path().join("straight");
    assert!(train(&recipe, &straight, &["--set", "train.keep_checkpoints=0"]).status.success());
    let checkpoint = pages(&straight.join("checkpoints/step-00000003"));
    let size = pages(&straight).min(checkpoint * 3 / 2 + 3 * 4096 + std::fs::metadata(straight.join("metrics.jsonl")).unwrap().len() as usize);
    let Some(disk) = Tmpfs::mount(&out.path().join("disk"), size.div_ceil(4096) * 4096) else { return };
    let run = disk.0.join("run");
    let output = train(&recipe, &run, &["--set", "train.keep_checkpoints=0"]);
    assert_error(&output, 1, &["No space left on device", run.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains(".tmp-"), "the error names a temporary: {stderr}");
    assert!(run.join("checkpoints/step-00000003/state.json").is_file(), "{stderr}");
    assert!(temporaries(&run.join("checkpoints")).is_empty() && temporaries(&run).is_empty(), "temporaries left behind");
    disk.resize(64 << 20);
    let output = train(&recipe, &run, &["--set", "train.keep_checkpoints=0", "--resume"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(adapter_files(&straight) == adapter_files(&run), "resumed adapter differs");
    assert_eq!(losses(&straight), losses(&run));
}

/// Two processes never write one folder: a second run is refused (exit 2, naming the PID) while
/// the first lives, and the kernel releases the lock when it dies, even by SIGKILL.
#[test]
fn a_live_run_locks_its_output_folder() {
    let recipe = recipe("ci/tiny-lora.toml");
    let out = tempfile::tempdir().unwrap();
    let run = out.path().join("run");
    let mut first = start_run(&recipe, &run, 4000, 1);
    let second = train(&recipe, &run, &["--resume"]);
    assert_bad_input(&second, &["in use by another ember run", &format!("pid {}", first.id())]);
    first.kill().unwrap();
    first.wait().unwrap();
    let third = train(&recipe, &run, &["--overwrite", "--set", "train.max_steps=2"]);
    assert!(third.status.success(), "stale lock: {}", String::from_utf8_lossy(&third.stderr));
}

/// A malformed record in the middle of a 52,002-record file (the size of Stanford Alpaca) is
/// reported with its index before any training starts.
#[test]
fn a_bad_record_in_a_large_file_is_named_before_training() {
    let out = tempfile::tempdir().unwrap();
    let data = out.path().join("alpaca_52k.json");
    let records: Vec<serde_json::Value> = (0..52_002)
        .map(|i| match i {
            26_001 => serde_json::json!({"instruction": "Say hi.", "input": "", "output": 7}),
            _ => serde_json::json!({"instruction": format!("Count to {i}."), "input": "", "output": "1, 2, 3."}),
        })
        .collect();
    std::fs::write(&data, serde_json::to_vec(&records).unwrap()).unwrap();
    let run = out.path().join("run");
    let output = train(&recipe("ci/tiny-lora.toml"), &run, &["--set", &format!("data.path=\"{}\"", data.display())]);
    assert_bad_input(&output, &["alpaca_52k.json", "record 26001", "output"]);
    assert!(!run.join("metrics.jsonl").exists(), "training started");
}
