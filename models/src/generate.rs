//! Text generation with a KV cache: greedy, or sampled with temperature, top-k, top-p and
//! min-p, with transformers' repetition penalty on either.

use std::collections::HashSet;

use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::KvCache;

/// How tokens are picked, as transformers' `generate` arguments of the same names (applied in
/// its order: repetition penalty, temperature, top-k, top-p, min-p).
#[derive(Debug, Clone)]
pub struct GenerationOptions {
    pub max_new_tokens: usize,
    /// 0: greedy.
    pub temperature: f64,
    /// Sample from the `top_k` most likely tokens (ties with the last one kept; 0: all).
    pub top_k: usize,
    /// Sample from the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f64,
    /// Drop the tokens less likely than `min_p` times the most likely one (0: none).
    pub min_p: f64,
    /// Every token already in the sequence (prompt and answer) has its logit divided by this
    /// when positive, multiplied when negative, greedy or sampled (1: off).
    pub repetition_penalty: f64,
    pub seed: u64,
    /// Generation stops after any of these.
    pub stop_ids: Vec<u32>,
}

impl GenerationOptions {
    /// Greedy decoding of at most `max_new_tokens`, stopping after any of `stop_ids`.
    pub fn greedy(max_new_tokens: usize, stop_ids: Vec<u32>) -> Self {
        Self { max_new_tokens, temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, repetition_penalty: 1.0, seed: 0, stop_ids }
    }
}

/// New token ids after `prompt` (the stop token included when one was produced).
/// `next_token_logits` is a model's cached forward: `[1, new]` ids -> `[1, 1, vocab]` logits
/// of the last new token.
pub fn generate(
    next_token_logits: impl Fn(Tensor<2, Int>, &mut KvCache) -> Tensor<3>,
    prompt: &[u32],
    options: &GenerationOptions,
    device: &Device,
) -> Vec<u32> {
    Session::default().generate(next_token_logits, prompt, options, device, |_| {})
}

/// Generation across the turns of a conversation: the KV cache and the tokens it holds are
/// kept, so that a prompt that starts as they do (the history with the answer, then a new
/// message) runs only the tokens past what they share, as llama.cpp's conversation mode does.
#[derive(Default)]
pub struct Session {
    cache: KvCache,
    /// The tokens run so far, in order: what `cache` holds (virtual positions aside).
    tokens: Vec<u32>,
    /// Tokens of the last prompt that the cache already held.
    reused: usize,
}

impl Session {
    /// As [`generate`], each new token handed to `on_token` as it comes; the cache keeps the
    /// tokens already run that `prompt` starts with (an answer's text can tokenize differently
    /// in the next prompt), and starts again where it shares none.
    pub fn generate(
        &mut self,
        next_token_logits: impl Fn(Tensor<2, Int>, &mut KvCache) -> Tensor<3>,
        prompt: &[u32],
        options: &GenerationOptions,
        device: &Device,
        mut on_token: impl FnMut(u32),
    ) -> Vec<u32> {
        // At least one prompt token must run: its logits give the first new token.
        let shared = self.tokens.iter().zip(prompt).take_while(|(run, wanted)| run == wanted).count().min(prompt.len().saturating_sub(1));
        match shared {
            0 => *self = Self::default(),
            _ => {
                self.cache.drop_last(self.tokens.len() - shared);
                self.tokens.truncate(shared);
            }
        }
        self.reused = shared;
        let mut rng = StdRng::seed_from_u64(options.seed);
        let mut next = prompt[self.reused..].to_vec();
        let mut out = Vec::new();
        // The tokens a repetition penalty applies to, when there is one.
        let mut seen: Option<HashSet<u32>> = (options.repetition_penalty != 1.0).then(|| prompt.iter().copied().collect());
        while out.len() < options.max_new_tokens {
            let ids = TensorData::new(next.iter().map(|&t| t as i64).collect(), [1, next.len()]);
            let logits = next_token_logits(Tensor::<2, Int>::from_data(ids, device), &mut self.cache).cast(DType::F32);
            self.tokens.append(&mut next);
            let mut logits: Vec<f32> = logits.into_data().try_into_vec::<f32>().expect("f32 logits");
            if let Some(seen) = &seen {
                penalize_repetition(&mut logits, seen, options.repetition_penalty as f32);
            }
            let token = pick(&logits, options, &mut rng);
            if let Some(seen) = &mut seen {
                seen.insert(token);
            }
            out.push(token);
            on_token(token);
            if options.stop_ids.contains(&token) {
                break;
            }
            next.push(token);
        }
        out
    }

    /// Tokens of the last prompt that the cache already held (0: it ran whole).
    pub fn reused(&self) -> usize {
        self.reused
    }
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: each token of `seen` once, in f32.
fn penalize_repetition(logits: &mut [f32], seen: &HashSet<u32>, penalty: f32) {
    for &id in seen {
        if let Some(logit) = logits.get_mut(id as usize) {
            *logit = if *logit < 0.0 { *logit * penalty } else { *logit / penalty };
        }
    }
}

fn pick(logits: &[f32], options: &GenerationOptions, rng: &mut StdRng) -> u32 {
    let argmax = || (0..logits.len()).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap_or(0) as u32;
    if options.temperature <= 0.0 {
        return argmax();
    }
    // Unnormalised probabilities, most likely first.
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(usize, f64)> = logits.iter().enumerate().map(|(i, &l)| (i, ((l as f64 - max) / options.temperature).exp())).collect();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    if options.top_k > 0 && options.top_k < probs.len() {
        let kth = probs[options.top_k - 1].1;
        probs.truncate(probs.partition_point(|p| p.1 >= kth));
    }
    // Top-p over what top-k left: a token stays while the tokens before it hold less than top_p.
    let total: f64 = probs.iter().map(|p| p.1).sum();
    let mut before = 0.0;
    let nucleus = probs
        .iter()
        .take_while(|p| {
            let keep = before < options.top_p * total;
            before += p.1;
            keep
        })
        .count();
    probs.truncate(nucleus.max(1));
    if options.min_p > 0.0 {
        let floor = options.min_p * probs[0].1;
        probs.truncate(probs.partition_point(|p| p.1 >= floor));
    }
    let mass: f64 = probs.iter().map(|p| p.1).sum();
    let mut draw = rng.random::<f64>() * mass;
    for (id, p) in &probs {
        draw -= p;
        if draw <= 0.0 {
            return *id as u32;
        }
    }
    probs.last().map_or_else(argmax, |p| p.0 as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Sampling keeps what top-k, top-p and min-p leave, in that order; a repetition penalty
    /// divides positive and multiplies negative logits of tokens seen, each once.
    #[test]
    fn samplers_keep_what_their_settings_leave() {
        // At temperature 1, id 2 has probability 0.5, id 0 0.25, ids 1 and 3 0.125 each.
        let logits = [0.25f32, 0.125, 0.5, 0.125].map(f32::ln);
        let sampled = |options: &GenerationOptions| -> Vec<u32> {
            let mut rng = StdRng::seed_from_u64(0);
            let mut ids: Vec<u32> = (0..400).map(|_| pick(&logits, options, &mut rng)).collect();
            ids.sort_unstable();
            ids.dedup();
            ids
        };
        let base = GenerationOptions { temperature: 1.0, ..GenerationOptions::greedy(1, Vec::new()) };
        assert_eq!(sampled(&base), [0, 1, 2, 3]);
        assert_eq!(sampled(&GenerationOptions { top_k: 1, ..base.clone() }), [2]);
        // Ids 1 and 3 tie for third: top-k keeps both.
        assert_eq!(sampled(&GenerationOptions { top_k: 3, ..base.clone() }), [0, 1, 2, 3]);
        assert_eq!(sampled(&GenerationOptions { top_k: 2, ..base.clone() }), [0, 2]);
        // 0.5 alone does not reach 0.6; 0.5 + 0.25 does.
        assert_eq!(sampled(&GenerationOptions { top_p: 0.6, ..base.clone() }), [0, 2]);
        assert_eq!(sampled(&GenerationOptions { min_p: 0.3, ..base.clone() }), [0, 2]);
        assert_eq!(sampled(&GenerationOptions { min_p: 0.6, ..base.clone() }), [2]);

        let mut penalized = vec![2.0f32, -2.0, 1.0];
        penalize_repetition(&mut penalized, &HashSet::from([0, 1, 7]), 2.0);
        assert_eq!(penalized, [1.0, -4.0, 1.0]);
    }

    /// A session runs only what its cache lacks: the next prompt's tokens past those already run
    /// (the last answer token was picked, never run) or past the ones it shares with them, and
    /// the whole prompt where it shares none.
    #[test]
    fn a_session_runs_only_the_tokens_its_cache_lacks() {
        let device = Device::flex();
        let runs = RefCell::new(Vec::new());
        // The last position's logits, which pick its id + 1.
        let forward = |ids: Tensor<2, Int>, _: &mut KvCache| {
            let ids: Vec<i64> = ids.into_data().convert::<i64>().try_to_vec::<i64>().unwrap();
            let mut logits = vec![0f32; 16];
            logits[(*ids.last().unwrap() as usize + 1) % 16] = 1.0;
            runs.borrow_mut().push(ids);
            Tensor::<3>::from_data(TensorData::new(logits, [1, 1, 16]), &device)
        };
        let options = GenerationOptions::greedy(2, vec![15]);
        let mut session = Session::default();
        let mut streamed = Vec::new();
        assert_eq!(session.generate(forward, &[1, 2, 3], &options, &device, |t| streamed.push(t)), [4, 5]);
        assert_eq!((streamed, session.reused()), (vec![4, 5], 0));
        assert_eq!(session.generate(forward, &[1, 2, 3, 4, 5, 9], &options, &device, |_| {}), [10, 11]);
        assert_eq!(session.reused(), 4);
        assert_eq!(session.generate(forward, &[1, 2, 7], &options, &device, |_| {}), [8, 9]);
        assert_eq!(session.reused(), 2);
        assert_eq!(session.generate(forward, &[1, 2], &options, &device, |_| {}), [3, 4]);
        assert_eq!(session.reused(), 1);
        assert_eq!(session.generate(forward, &[13, 14], &options, &device, |_| {}), [15]);
        assert_eq!(session.reused(), 0);
        assert_eq!(runs.into_inner(), [vec![1, 2, 3], vec![4], vec![5, 9], vec![10], vec![7], vec![8], vec![2], vec![3], vec![13, 14]]);
    }
}
