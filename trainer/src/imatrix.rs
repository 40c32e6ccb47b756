//! `ember imatrix`: llama.cpp's importance matrix computed by ember, on the model it trained.
//!
//! As `llama-imatrix` does: calibration tokens are cut into chunks of `chunk_size` (the first
//! token of each replaced by BOS when the tokenizer adds one), each chunk runs through the model
//! on its own, and every decoder projection adds the squares of its inputs, per column, to its
//! weight's entry. Entries are keyed by the GGUF names `ember export gguf` writes, so its
//! `--imatrix` (and `llama-quantize --imatrix`) read the file as they read llama-imatrix's.
//!
//! With `output`, the LM head's input is recorded too (llama-imatrix's `--process-output`), when
//! the head is its own weight; a head tied to the embedding has no entry, as in llama-imatrix.
//!
//! With an adapter that merges into the weights (LoRA, DoRA, (IA)³), the projections see the
//! inputs the merged model's weights will: the matrix describes the model `export gguf --adapter`
//! writes.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use burn::module::Module;
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use ember_adapters::{AdaptedLinear, AdaptedModel, Method};
use ember_models::family::KeyLayout;
use ember_models::gguf_write::tensor_name;
use ember_models::imatrix::ColumnSquares;
use ember_models::nf4::Quantization;
use ember_models::{BaseModel, CausalLm, LoadDtype, LoadError, Projection};

use crate::merge::MergeError;

/// A projection that adds the squares of its inputs, per column, to `squares` before applying
/// itself.
#[derive(Module, Debug)]
struct Recorded {
    inner: AdaptedLinear,
    #[module(skip)]
    squares: Arc<Mutex<ColumnSquares>>,
}

impl Projection for Recorded {
    /// # Shapes
    /// - x: `[batch, seq, in]`
    /// - output: `[batch, seq, out]`
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let (squares, tokens) = column_squares(&x);
        self.squares.lock().expect("a recording panicked").add(&squares, tokens);
        self.inner.forward(x)
    }
}

/// The sum over tokens of each column's square, and the tokens.
///
/// # Shapes
/// - x: `[batch, seq, columns]`
/// - output: `columns` sums
fn column_squares(x: &Tensor<3>) -> (Vec<f32>, usize) {
    let [b, s, n] = x.dims();
    // b,s,n -> 1,n: in f32 as llama.cpp's activations are.
    let squares = x.clone().cast(DType::F32).reshape([b * s, n]).square().sum_dim(0);
    (squares.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 column sums"), b * s)
}

/// The calibration text as token ids, and how llama-imatrix would run it.
pub struct Calibration<'a> {
    pub tokens: &'a [u32],
    /// Tokens per chunk (llama-imatrix's `--ctx-size`).
    pub chunk_size: usize,
    /// Replaces the first token of every chunk, when the tokenizer adds BOS.
    pub bos: Option<u32>,
    /// At most this many chunks (llama-imatrix's `--chunks`); all whole chunks when `None`.
    pub max_chunks: Option<usize>,
    /// Also the LM head's input, under `output.weight` (llama-imatrix's `--process-output`).
    pub output: bool,
}

impl Calibration<'_> {
    pub fn chunks(&self) -> usize {
        let whole = self.tokens.len() / self.chunk_size.max(1);
        self.max_chunks.map_or(whole, |limit| whole.min(limit))
    }
}

/// The sums of squares of every decoder projection's inputs, by GGUF weight name, over
/// `calibration`'s chunks.
pub struct Collected {
    pub entries: BTreeMap<String, ColumnSquares>,
    pub chunks: usize,
}

/// Runs `calibration` through `base_dir` (a model folder or GGUF file) loaded in `dtype` (its
/// projections quantized as `quantization` says, as a QLoRA run trains them), merged with
/// `adapter` when given, calling `progress(chunk, chunks)` after each chunk.
pub fn collect(
    base_dir: &Path,
    adapter: Option<&Path>,
    dtype: LoadDtype,
    quantization: Option<Quantization>,
    calibration: &Calibration,
    device: &Device,
    mut progress: impl FnMut(usize, usize),
) -> Result<Collected, MergeError> {
    if let Some(dir) = adapter {
        // Only what export can merge: the matrix is for the weights it writes.
        Method::weight_merge(dir, &ember_models::ModelConfig::from_dir(base_dir)?)?;
    }
    let base = BaseModel::load_quantized(base_dir, dtype, quantization, device)?;
    let model = match adapter {
        Some(dir) => Method::load(dir, base, device)?.0,
        None => AdaptedModel::base_only(base),
    };
    let (model, recorders) = recorded(model.model, base_dir)?;
    // The final norm's output is the head's input.
    let mut output = (calibration.output && model.lm_head.is_some()).then(ColumnSquares::default);
    let chunks = calibration.chunks();
    for (chunk, tokens) in calibration.tokens.chunks_exact(calibration.chunk_size).take(chunks).enumerate() {
        let mut ids: Vec<i64> = tokens.iter().map(|&id| i64::from(id)).collect();
        if let Some(bos) = calibration.bos {
            ids[0] = i64::from(bos);
        }
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, calibration.chunk_size]), device);
        // The projections record as they run.
        let hidden = model.hidden_states(ids, None, None, &[]);
        if let Some(output) = &mut output {
            let (squares, tokens) = column_squares(&hidden);
            output.add(&squares, tokens);
        }
        progress(chunk + 1, chunks);
    }
    let mut entries: BTreeMap<String, ColumnSquares> = recorders
        .into_iter()
        .map(|(name, squares)| (name, std::mem::take(&mut *squares.lock().expect("a recording panicked"))))
        .collect();
    entries.extend(output.map(|squares| ("output.weight".to_string(), squares)));
    Ok(Collected { entries, chunks })
}

/// `decoder` with every projection recording its inputs, and the recordings by GGUF weight name.
fn recorded(
    decoder: CausalLm<AdaptedLinear>,
    base_dir: &Path,
) -> Result<(CausalLm<Recorded>, BTreeMap<String, Arc<Mutex<ColumnSquares>>>), LoadError> {
    let keys = KeyLayout::of(decoder.config.architecture);
    let layers = decoder.config.num_layers;
    let mut recorders = BTreeMap::new();
    let mut unnamed = None;
    let decoder = decoder.map_projections(|name, inner| {
        let squares = Arc::new(Mutex::new(ColumnSquares::default()));
        match tensor_name(keys, &format!("{name}.weight"), layers) {
            Some((gguf, _)) => drop(recorders.insert(gguf, squares.clone())),
            None => unnamed = unnamed.take().or(Some(name.to_string())),
        }
        Recorded { inner, squares }
    });
    if let Some(name) = unnamed {
        return Err(LoadError::Invalid { path: base_dir.to_path_buf(), reason: format!("projection '{name}' has no llama.cpp tensor name") });
    }
    Ok((decoder, recorders))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn fixture(path: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(path)
    }

    /// 40 ids below tiny_llama's vocabulary: two chunks of 16 and 8 tokens left over.
    fn tokens() -> Vec<u32> {
        (0..40u32).map(|i| (i * 37 + 5) % 1000).collect()
    }

    fn calibration(tokens: &[u32]) -> Calibration<'_> {
        Calibration { tokens, chunk_size: 16, bos: Some(1), max_chunks: None, output: false }
    }

    fn values(t: Tensor<2>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
    }

    /// Every projection of tiny_llama has an entry under its GGUF name, counting the tokens of
    /// whole chunks only; q, k and v share their input; layer 0's is the normed embedding of the
    /// chunks with BOS first, squared and summed per column.
    #[test]
    fn entries_sum_the_squares_each_projection_sees() {
        let device = Device::flex();
        let base = fixture("tiny_llama");
        let tokens = tokens();
        let collected = collect(&base, None, LoadDtype::F32, None, &calibration(&tokens), &device, |_, _| {}).unwrap();
        assert_eq!(collected.chunks, 2);
        assert_eq!(collected.entries.len(), 2 * 7);
        assert!(collected.entries.values().all(|e| e.tokens == 32));
        let entry = |name: &str| collected.entries[name].sums.clone();
        assert_eq!(entry("blk.1.attn_q.weight"), entry("blk.1.attn_k.weight"));
        assert_eq!(entry("blk.1.attn_q.weight"), entry("blk.1.attn_v.weight"));
        assert_eq!(entry("blk.0.ffn_down.weight").len(), 176);

        let model = BaseModel::load(&base, LoadDtype::F32, &device).unwrap();
        let mut want = vec![0f64; 64];
        for chunk in tokens.chunks_exact(16).take(2) {
            let mut ids: Vec<i64> = chunk.iter().map(|&id| i64::from(id)).collect();
            ids[0] = 1;
            let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, 16]), &device);
            let normed = model.layers[0].input_norm.forward(model.embed(ids)).reshape([16, 64]);
            for (sum, square) in want.iter_mut().zip(values(normed.square().sum_dim(0))) {
                *sum += f64::from(square);
            }
        }
        for (got, want) in entry("blk.0.attn_q.weight").iter().zip(&want) {
            assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "{got} vs {want}");
        }

        // With the output: tiny_llama's own head sees the final hidden states.
        let with_output = collect(&base, None, LoadDtype::F32, None, &Calibration { output: true, ..calibration(&tokens) }, &device, |_, _| {}).unwrap();
        assert_eq!(with_output.entries.len(), 2 * 7 + 1);
        let head = &with_output.entries["output.weight"];
        assert_eq!((head.sums.len(), head.tokens), (64, 32));
        assert_eq!(with_output.entries["blk.0.attn_q.weight"].sums, entry("blk.0.attn_q.weight"));
    }

    /// With a LoRA on q and v merged, layer 0's q input is the base's, and what follows
    /// attention (its output projection's input) is not; a prefix cannot be merged, so it is
    /// refused.
    #[test]
    fn an_adapter_changes_the_inputs_after_its_branches() {
        let device = Device::flex();
        let base = fixture("tiny_llama");
        let tokens = tokens();
        let plain = collect(&base, None, LoadDtype::F32, None, &calibration(&tokens), &device, |_, _| {}).unwrap();
        let adapted = collect(&base, Some(&fixture("tiny_llama/adapters/lora")), LoadDtype::F32, None, &calibration(&tokens), &device, |_, _| {}).unwrap();
        let sums = |c: &Collected, name: &str| c.entries[name].sums.clone();
        assert_eq!(sums(&plain, "blk.0.attn_q.weight"), sums(&adapted, "blk.0.attn_q.weight"));
        assert_ne!(sums(&plain, "blk.0.attn_output.weight"), sums(&adapted, "blk.0.attn_output.weight"));
        let error = collect(&base, Some(&fixture("tiny_llama/adapters/prefix")), LoadDtype::F32, None, &calibration(&tokens), &device, |_, _| {}).err().unwrap().to_string();
        assert!(error.contains("cannot be merged"), "{error}");
    }
}
