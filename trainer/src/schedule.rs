//! Learning-rate schedules by transformers' names (`get_scheduler`), with their own arguments as
//! transformers' `lr_scheduler_kwargs` names them. Each gives the multiplier that transformers'
//! `LambdaLR` applies to the recipe's rate at an optimizer step.

use std::f64::consts::PI;

use serde::Deserialize;

use crate::recipe::finite_at_least_zero;

/// The learning-rate schedule, by transformers' names. Warmup (`train.warmup_steps` or
/// `warmup_ratio`) rises linearly from 0 for every schedule but `constant` (none) and
/// `warmup_stable_decay` (its own `warmup_type`, from `min_lr_ratio`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduler {
    /// No warmup (transformers' `constant` ignores it; a recipe giving both is refused).
    Constant,
    ConstantWithWarmup,
    Linear,
    /// `num_cycles` cosine periods over the decay (default 0.5: half a cosine down to 0).
    Cosine,
    /// `num_cycles` half cosines, each from the full rate down to 0 (default 1).
    CosineWithRestarts,
    /// As `cosine`, down to `min_lr` (or `min_lr_rate` × the rate) instead of 0.
    CosineWithMinLr,
    /// `(lr − lr_end)·(1 − progress)^power + lr_end` (defaults 1e-7 and 1).
    Polynomial,
    /// `1/√((step + timescale − warmup)/timescale)` after warmup; `timescale` defaults to the
    /// warmup steps, or 10,000 without warmup.
    InverseSqrt,
    /// Warmup, the full rate, then `num_decay_steps` of decay to `min_lr_ratio` × the rate.
    WarmupStableDecay,
}

/// The shape of `warmup_stable_decay`'s warmup and decay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Curve {
    #[serde(rename = "linear")]
    Linear,
    #[serde(rename = "cosine")]
    Cosine,
    #[serde(rename = "1-sqrt")]
    OneMinusSqrt,
}

/// `train.lr_scheduler_kwargs`: the schedule's own arguments (transformers'
/// `TrainingArguments.lr_scheduler_kwargs`). Each schedule takes only its own; unset, they
/// default as in transformers.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerKwargs {
    pub num_cycles: Option<f64>,
    pub min_lr: Option<f64>,
    pub min_lr_rate: Option<f64>,
    pub lr_end: Option<f64>,
    pub power: Option<f64>,
    pub timescale: Option<usize>,
    pub num_decay_steps: Option<usize>,
    pub num_stable_steps: Option<usize>,
    pub warmup_type: Option<Curve>,
    pub decay_type: Option<Curve>,
    pub min_lr_ratio: Option<f64>,
}

impl SchedulerKwargs {
    /// The names of the arguments given.
    fn given(&self) -> Vec<&'static str> {
        let set = [
            ("num_cycles", self.num_cycles.is_some()),
            ("min_lr", self.min_lr.is_some()),
            ("min_lr_rate", self.min_lr_rate.is_some()),
            ("lr_end", self.lr_end.is_some()),
            ("power", self.power.is_some()),
            ("timescale", self.timescale.is_some()),
            ("num_decay_steps", self.num_decay_steps.is_some()),
            ("num_stable_steps", self.num_stable_steps.is_some()),
            ("warmup_type", self.warmup_type.is_some()),
            ("decay_type", self.decay_type.is_some()),
            ("min_lr_ratio", self.min_lr_ratio.is_some()),
        ];
        set.into_iter().filter(|(_, given)| *given).map(|(name, _)| name).collect()
    }

    /// `cosine_with_min_lr`'s floor as a fraction of `lr`.
    fn min_lr_rate(&self, lr: f64) -> f64 {
        self.min_lr_rate.unwrap_or_else(|| self.min_lr.map_or(0.0, |min| min / lr))
    }
}

impl LrScheduler {
    fn name(self) -> &'static str {
        match self {
            Self::Constant => "constant",
            Self::ConstantWithWarmup => "constant_with_warmup",
            Self::Linear => "linear",
            Self::Cosine => "cosine",
            Self::CosineWithRestarts => "cosine_with_restarts",
            Self::CosineWithMinLr => "cosine_with_min_lr",
            Self::Polynomial => "polynomial",
            Self::InverseSqrt => "inverse_sqrt",
            Self::WarmupStableDecay => "warmup_stable_decay",
        }
    }

    /// The `lr_scheduler_kwargs` this schedule takes.
    fn arguments(self) -> &'static [&'static str] {
        match self {
            Self::Constant | Self::ConstantWithWarmup | Self::Linear => &[],
            Self::Cosine | Self::CosineWithRestarts => &["num_cycles"],
            Self::CosineWithMinLr => &["num_cycles", "min_lr", "min_lr_rate"],
            Self::Polynomial => &["lr_end", "power"],
            Self::InverseSqrt => &["timescale"],
            Self::WarmupStableDecay => &["num_decay_steps", "num_stable_steps", "warmup_type", "decay_type", "min_lr_ratio", "num_cycles"],
        }
    }

    /// Checks `kwargs` for this schedule at rate `lr`, as transformers' constructors do, and
    /// refuses what they would ignore or fail on later (an argument of another schedule, a NaN).
    pub fn check(self, kwargs: &SchedulerKwargs, lr: f64) -> Result<(), String> {
        let key = |name: &str| format!("'train.lr_scheduler_kwargs.{name}'");
        if let Some(other) = kwargs.given().into_iter().find(|k| !self.arguments().contains(k)) {
            let takes = match self.arguments() {
                [] => "no arguments".to_string(),
                names => names.join(", "),
            };
            return Err(format!("{}: lr_scheduler \"{}\" takes {takes}", key(other), self.name()));
        }
        let at_least_zero = [("num_cycles", kwargs.num_cycles), ("min_lr", kwargs.min_lr), ("min_lr_rate", kwargs.min_lr_rate), ("lr_end", kwargs.lr_end)];
        for (name, value) in at_least_zero {
            if let Some(value) = value {
                finite_at_least_zero(&format!("train.lr_scheduler_kwargs.{name}"), value)?;
            }
        }
        if let Some(v) = kwargs.min_lr_ratio.filter(|v| !(0.0..=1.0).contains(v)) {
            return Err(format!("{} is {v}; expected 0 to 1", key("min_lr_ratio")));
        }
        if let Some(power) = kwargs.power.filter(|p| !p.is_finite()) {
            return Err(format!("{} is {power}; expected a finite number", key("power")));
        }
        if kwargs.timescale == Some(0) {
            return Err(format!("{} must be at least 1", key("timescale")));
        }
        match self {
            Self::CosineWithMinLr => match (kwargs.min_lr, kwargs.min_lr_rate) {
                (Some(_), Some(_)) => Err(format!("{} and {}: give one", key("min_lr"), key("min_lr_rate"))),
                (None, None) => Err(format!("lr_scheduler \"cosine_with_min_lr\" needs {} or {}", key("min_lr"), key("min_lr_rate"))),
                (Some(_), None) if lr <= 0.0 => Err(format!("{} is a fraction of train.lr, which is 0: give {}", key("min_lr"), key("min_lr_rate"))),
                _ => Ok(()),
            },
            Self::Polynomial => {
                let end = kwargs.lr_end.unwrap_or(POLYNOMIAL_LR_END);
                if lr > end { Ok(()) } else { Err(format!("{} ({end}) must be below train.lr ({lr})", key("lr_end"))) }
            }
            Self::WarmupStableDecay if kwargs.num_decay_steps.is_none() => {
                Err(format!("lr_scheduler \"warmup_stable_decay\" needs {}", key("num_decay_steps")))
            }
            _ => Ok(()),
        }
    }

    /// The multiplier of the rate `lr` at optimizer step `step` (0-based) of `total`, the first
    /// `warmup` of them warmup; `kwargs` passed [`Self::check`].
    pub fn factor(self, kwargs: &SchedulerKwargs, lr: f64, step: usize, warmup: usize, total: usize) -> f64 {
        // `constant` has no warmup, `warmup_stable_decay` its own.
        if step < warmup && !matches!(self, Self::Constant | Self::WarmupStableDecay) {
            return step as f64 / warmup as f64;
        }
        let progress = step.saturating_sub(warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
        let cosine = |cycles: f64, progress: f64| 0.5 * (1.0 + (PI * cycles * 2.0 * progress).cos());
        match self {
            Self::Constant | Self::ConstantWithWarmup => 1.0,
            Self::WarmupStableDecay => warmup_stable_decay(kwargs, step, warmup, total),
            Self::Linear => (1.0 - progress).max(0.0),
            Self::Cosine => cosine(kwargs.num_cycles.unwrap_or(0.5), progress).max(0.0),
            Self::CosineWithMinLr => {
                let floor = kwargs.min_lr_rate(lr);
                (cosine(kwargs.num_cycles.unwrap_or(0.5), progress) * (1.0 - floor) + floor).max(0.0)
            }
            Self::CosineWithRestarts if progress >= 1.0 => 0.0,
            // Each cycle a half cosine: `cos(π·x)` over x in [0, 1).
            Self::CosineWithRestarts => cosine(0.5, (kwargs.num_cycles.unwrap_or(1.0) * progress) % 1.0).max(0.0),
            Self::Polynomial => {
                let (end, power) = (kwargs.lr_end.unwrap_or(POLYNOMIAL_LR_END), kwargs.power.unwrap_or(1.0));
                if step > total { end / lr } else { ((lr - end) * (1.0 - progress).powf(power) + end) / lr }
            }
            Self::InverseSqrt => {
                let timescale = kwargs.timescale.unwrap_or(if warmup > 0 { warmup } else { 10_000 }) as f64;
                1.0 / ((step as f64 + timescale - warmup as f64) / timescale).sqrt()
            }
        }
    }
}

/// transformers' default `lr_end` of the polynomial schedule.
const POLYNOMIAL_LR_END: f64 = 1e-7;

/// `warmup_stable_decay` (transformers' `get_wsd_schedule`): warmup from `min_lr_ratio`, the full
/// rate for `num_stable_steps` (default: what warmup and decay leave of `total`), then decay to
/// `min_lr_ratio` over `num_decay_steps`, and that floor after.
fn warmup_stable_decay(kwargs: &SchedulerKwargs, step: usize, warmup: usize, total: usize) -> f64 {
    let floor = kwargs.min_lr_ratio.unwrap_or(0.0);
    let decay = kwargs.num_decay_steps.unwrap_or(0) as i64;
    let (step, warmup_steps) = (step as i64, warmup as i64);
    let stable = kwargs.num_stable_steps.map_or(total as i64 - warmup_steps - decay, |s| s as i64);
    let shaped = |f: f64| (f * (1.0 - floor) + floor).max(0.0);
    if step < warmup_steps {
        let p = step as f64 / warmup_steps as f64;
        return shaped(match kwargs.warmup_type.unwrap_or(Curve::Linear) {
            Curve::Linear => p,
            Curve::Cosine => 0.5 * (1.0 - (PI * p).cos()),
            Curve::OneMinusSqrt => 1.0 - (1.0 - p).sqrt(),
        });
    }
    if step < warmup_steps + stable {
        return 1.0;
    }
    if step < warmup_steps + stable + decay {
        let p = (step - warmup_steps - stable) as f64 / decay.max(1) as f64;
        return shaped(match kwargs.decay_type.unwrap_or(Curve::Cosine) {
            Curve::Linear => 1.0 - p,
            Curve::Cosine => 0.5 * (1.0 + (PI * kwargs.num_cycles.unwrap_or(0.5) * 2.0 * p).cos()),
            Curve::OneMinusSqrt => 1.0 - p.sqrt(),
        });
    }
    floor
}
