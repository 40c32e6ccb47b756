//! Text generation with a KV cache: greedy, or temperature + nucleus (top-p) sampling.

use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::KvCache;

#[derive(Debug, Clone)]
pub struct GenerationOptions {
    pub max_new_tokens: usize,
    /// 0: greedy.
    pub temperature: f64,
    /// Sample from the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f64,
    pub seed: u64,
    /// Generation stops after any of these.
    pub stop_ids: Vec<u32>,
}

/// New token ids after `prompt` (the stop token included when one was produced).
/// `forward_cached` is a model's cached forward: `[1, new]` ids -> `[1, new, vocab]` logits.
pub fn generate(
    forward_cached: impl Fn(Tensor<2, Int>, &mut KvCache) -> Tensor<3>,
    prompt: &[u32],
    options: &GenerationOptions,
    device: &Device,
) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(options.seed);
    let mut cache = KvCache::default();
    let mut next: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    let mut out = Vec::new();
    while out.len() < options.max_new_tokens {
        let len = next.len();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(next, [1, len]), device);
        let logits = forward_cached(ids, &mut cache).narrow(1, len - 1, 1).cast(DType::F32);
        let logits: Vec<f32> = logits.into_data().try_into_vec::<f32>().expect("f32 logits");
        let token = pick(&logits, options, &mut rng);
        out.push(token);
        if options.stop_ids.contains(&token) {
            break;
        }
        next = vec![token as i64];
    }
    out
}

fn pick(logits: &[f32], options: &GenerationOptions, rng: &mut StdRng) -> u32 {
    let argmax = || (0..logits.len()).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap_or(0) as u32;
    if options.temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(usize, f64)> = logits.iter().enumerate().map(|(i, &l)| (i, ((l as f64 - max) / options.temperature).exp())).collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = 0.0;
    let cut = probs.iter().position(|p| {
        kept += p.1;
        kept >= options.top_p
    });
    probs.truncate(cut.map_or(probs.len(), |i| i + 1));
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
