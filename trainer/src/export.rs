//! `ember export gguf` and `ember export gguf-lora`: a model (merged with its adapter, if one is
//! given) or a LoRA adapter as llama.cpp's GGUF.
//!
//! Like `ember merge`, the model streams tensor by tensor from the memory-mapped base: each
//! tensor is merged, put in llama.cpp's q/k row order and encoded when the writer reaches it.

use std::path::Path;

use burn::tensor::{Device, Tensor};
use ember_adapters::lora::peft::PeftBranches;
use ember_adapters::{AdapterFolder, Method};
use ember_models::family::{KeyLayout, Role, check_checkpoint, expected_tensors};
use ember_models::gguf::GgufArch;
use ember_models::gguf::GgmlType;
use ember_models::gguf_write::{self, ExportType, MetaValue, QuantizeModel, TensorSpec};
use ember_models::imatrix::ImportanceMatrix;
use ember_models::{Checkpoint, LoadDtype, LoadError, ModelConfig};

use crate::merge::MergeError;

#[derive(Debug)]
pub struct ExportSummary {
    pub tensors: usize,
    pub bytes: u64,
}

fn folder_name(dir: &Path) -> String {
    std::fs::canonicalize(dir).ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())).unwrap_or_else(|| "model".into())
}

/// Rows of a q or k projection (weight or bias) are reordered for llama.cpp's interleaved RoPE,
/// by its head count, where `arch` uses it.
fn permute_heads(role: Option<Role>, config: &ModelConfig, arch: GgufArch) -> Option<usize> {
    match role {
        Some(Role::Q) if arch.permutes_qk() => Some(config.num_heads),
        Some(Role::K) if arch.permutes_qk() => Some(config.num_kv_heads),
        _ => None,
    }
}

/// `base_dir` (merged with `adapter`, if given) as a GGUF file of `ty` at `out`; `pre` names
/// llama.cpp's pre-tokenizer when it does not recognise a byte-level BPE's; `importance_path`, a
/// llama.cpp importance matrix to quantize with (llama-quantize's `--imatrix`); `chat_template`,
/// the Jinja template the adapter was trained with, instead of the base's.
pub fn export_gguf(
    base_dir: &Path,
    adapter: Option<&Path>,
    out: &Path,
    ty: ExportType,
    pre: Option<&str>,
    importance_path: Option<&Path>,
    chat_template: Option<&str>,
) -> Result<ExportSummary, MergeError> {
    if ember_models::gguf::GgufFile::is_gguf(base_dir) {
        // Merging into quantized blocks would quantize the merged weights a second time.
        return Err(LoadError::Invalid {
            path: base_dir.to_path_buf(),
            reason: "the base is a GGUF file already: give llama.cpp the adapter with `ember export gguf-lora` (it applies it to these blocks), \
                     or merge from the full-precision folder".into(),
        }
        .into());
    }
    if let Some(path) = importance_path.filter(|_| !ty.quantized()) {
        return Err(LoadError::Invalid { path: path.to_path_buf(), reason: "--imatrix applies to the quantized types (q4_k_m, iq4_xs, …), not to float ones".into() }.into());
    }
    let importance = importance_path.map(ImportanceMatrix::read).transpose()?;
    let device = Device::flex();
    let mut config = ModelConfig::from_dir(base_dir)?;
    exportable(&config, base_dir)?;
    let arch = GgufArch::of(&config);
    let base = Checkpoint::open_dir(base_dir)?;
    check_checkpoint(&config, &base)?;
    let merge = adapter.map(|dir| Method::weight_merge(dir, &config)).transpose()?;
    if let Some(merge) = &merge {
        merge.check(&base)?;
        config.vocab_size = merge.vocab_size().unwrap_or(config.vocab_size).max(config.vocab_size);
    }
    let changed: std::collections::HashSet<String> = merge.as_ref().map(|m| m.keys().into_iter().collect()).unwrap_or_default();

    let mut metadata = gguf_write::hyperparameters(&config, arch, &folder_name(base_dir), ty);
    metadata.extend(gguf_write::tokenizer_metadata(base_dir, arch, config.vocab_size, pre, chat_template)?);
    if let Some(matrix) = &importance {
        metadata.extend(gguf_write::importance_metadata(matrix));
    }

    // (HF key, GGUF tensor, q/k heads to permute by); no key: llama3 RoPE scaling's divisors.
    let mut plan: Vec<(Option<String>, TensorSpec, Option<usize>)> = Vec::new();
    let rope_divisors = config.rope.scaling.as_ref().and_then(|s| s.llama3_divisors(config.rope.theta, config.rope.rotary_dim));
    if let Some(divisors) = &rope_divisors {
        plan.push((None, TensorSpec { name: "rope_freqs.weight".into(), shape: vec![divisors.len()], ty: GgmlType::F32 }, None));
    }
    // Every tensor but RoPE's inverse frequencies (ChatGLM's `rotary_pos_emb.inv_freq`, old
    // LLaMA checkpoints'), which ember and llama.cpp compute from the config.
    let keys = KeyLayout::of(config.architecture);
    for key in base.keys().filter(|key| !key.ends_with(".inv_freq")) {
        let Some((name, role)) = gguf_write::tensor_name(keys, key, config.num_layers) else {
            return Err(LoadError::Invalid { path: base_dir.to_path_buf(), reason: format!("tensor '{key}' has no place in llama.cpp's {} architecture", arch.name()) }.into());
        };
        let (shape, _) = base.info(key).expect("listed");
        let shape = match (&merge, changed.contains(key)) {
            (Some(merge), true) => merge.output_shape(key, shape),
            _ => shape.to_vec(),
        };
        plan.push((Some(key.to_string()), TensorSpec { ty: GgmlType::F32, name, shape }, permute_heads(role, &config, arch)));
    }
    // Types once every name is known: Q4_K_M treats a tied embedding as the output.
    let model = QuantizeModel::of(&config, arch, !plan.iter().any(|(_, spec, _)| spec.name == "output.weight"), importance.is_some());
    for (_, spec, _) in &mut plan {
        spec.ty = ty.fitted_tensor_type(&spec.name, &spec.shape, model).map_err(|reason| LoadError::Invalid { path: base_dir.to_path_buf(), reason })?;
        // As llama-quantize: without importance, a 2-bit file's blocks would be garbage.
        if ty.needs_importance(&spec.name, spec.ty) {
            let columns = spec.shape.last().copied().unwrap_or(1);
            let has = match &importance {
                Some(matrix) => matrix.for_tensor(&spec.name, columns)?.is_some(),
                None => false,
            };
            if !has {
                let (path, reason) = match &importance {
                    Some(matrix) => (matrix.path(), format!("the importance matrix has no entry for '{}', which {} quantizes to {:?}", spec.name, ty.name(), spec.ty)),
                    None => (base_dir, format!("{} needs an importance matrix (--imatrix, from `ember imatrix` or llama.cpp's llama-imatrix), as llama-quantize does", ty.name())),
                };
                return Err(LoadError::Invalid { path: path.to_path_buf(), reason }.into());
            }
        }
    }
    plan.sort_by_key(|(_, spec, _)| gguf_order(&spec.name));
    let specs: Vec<TensorSpec> = plan.iter().map(|(_, spec, _)| spec.clone()).collect();
    gguf_write::write(out, &metadata, &specs, importance.as_ref(), |i| {
        let (key, spec, heads) = &plan[i];
        let Some(key) = key else { return Ok(rope_divisors.clone().expect("planned with the divisors")) };
        let (base_shape, _) = base.info(key).expect("listed");
        let values: Tensor<2> = match base_shape {
            [rows, cols] => base.float::<2>(key, [*rows, *cols], LoadDtype::F32, &device)?,
            other => base.float::<1>(key, [other.iter().product()], LoadDtype::F32, &device)?.unsqueeze_dim(0),
        };
        let values = match (&merge, changed.contains(key)) {
            (Some(merge), true) => merge.apply(key, values, &device),
            _ => values,
        };
        Ok(gguf_values(values, spec, *heads))
    })?;
    Ok(ExportSummary { tensors: specs.len(), bytes: std::fs::metadata(out).map(|m| m.len()).unwrap_or(0) })
}

/// A tensor's f32 values as the GGUF stores them: q/k rows (`heads` given) in llama.cpp's order.
fn gguf_values(values: Tensor<2>, spec: &TensorSpec, heads: Option<usize>) -> Vec<f32> {
    let values = values.into_data().convert::<f32>().try_into_vec::<f32>().expect("f32 values");
    match heads {
        // A bias is a column of rows.
        Some(heads) => gguf_write::permute_rows(&values, spec.shape[0], spec.shape.get(1).copied().unwrap_or(1), heads),
        None => values,
    }
}

/// [`gguf_write::check_exportable`] as an error naming the base's config.json.
fn exportable(config: &ModelConfig, base_dir: &Path) -> Result<(), LoadError> {
    gguf_write::check_exportable(config)
        .map_err(|(key, reason)| LoadError::Unsupported { path: base_dir.join("config.json"), key: key.into(), reason })
}

/// llama.cpp's converter order: the embedding, the blocks in order, the final norm, the head.
fn gguf_order(name: &str) -> (usize, usize, String) {
    match name.strip_prefix("blk.").and_then(|rest| rest.split_once('.')) {
        Some((layer, rest)) => (1, layer.parse().unwrap_or(usize::MAX), rest.to_string()),
        None if name.starts_with("token_embd") => (0, 0, name.to_string()),
        None => (2, 0, name.to_string()),
    }
}

/// A PEFT LoRA adapter of `base_dir` as llama.cpp's LoRA GGUF (`llama-cli --lora`): per adapted
/// weight `<tensor>.lora_a` `[r, in]` and `<tensor>.lora_b` `[out, r]` (q/k rows of B in
/// llama.cpp's order; the embedding's `lora_a` is `[vocab, r]`), and `adapter.lora.alpha`, from
/// which llama.cpp scales by alpha / r.
pub fn export_gguf_lora(base_dir: &Path, adapter: &Path, out: &Path, ty: GgmlType) -> Result<ExportSummary, MergeError> {
    let device = Device::flex();
    let config = ModelConfig::from_dir(base_dir)?;
    exportable(&config, base_dir)?;
    let arch = GgufArch::of(&config);
    let invalid = |reason: String| ember_adapters::AdapterError::Invalid { path: adapter.to_path_buf(), reason };
    let method = Method::read(adapter)?;
    let Method::Lora(lora) = &method else {
        return Err(invalid(format!("a {} adapter: llama.cpp's LoRA GGUF holds LoRA only (merge it instead: ember export gguf --adapter)", method.config().name())).into());
    };
    if !lora.modules_to_save.is_empty() {
        return Err(invalid("modules_to_save: llama.cpp's LoRA format has no whole modules; merge it instead: ember export gguf --adapter".into()).into());
    }
    let branches = PeftBranches::read(&AdapterFolder::read(adapter)?, &[])?;
    if !branches.biases.is_empty() || !branches.lora_biases.is_empty() || branches.tokens.is_some() {
        return Err(invalid(
            "trained biases or tokens (PEFT's bias, lora_bias, trainable_token_indices): llama.cpp's LoRA format holds A and B only; merge it instead: ember export gguf --adapter".into(),
        )
        .into());
    }
    if config.tie_word_embeddings
        && let Some(module) = ember_adapters::lora::peft::any_vocab_module(lora)
    {
        return Err(invalid(format!(
            "LoRA on '{module}' of a model whose LM head is its embedding: llama.cpp holds one tensor for both and would apply the branch to both; merge it instead: ember export gguf --adapter"
        ))
        .into());
    }
    // Only the shapes are needed (from the config, so a GGUF base serves as well as a folder).
    let shapes: std::collections::HashMap<String, Vec<usize>> = expected_tensors(&config).into_iter().collect();
    branches.check_shapes(|key| shapes.get(key).cloned())?;
    // llama.cpp scales every tensor by one alpha over that tensor's own rank. rsLoRA's alpha / √r
    // needs alpha · √r in its place; a module whose scale differs from that (rank_pattern with
    // rsLoRA, alpha_pattern) has the ratio folded into its B.
    let alpha = if lora.use_rslora { lora.alpha * (lora.r as f64).sqrt() } else { lora.alpha };
    let b_factor = |module: &str| lora.scale_of(module) / (alpha / lora.rank_of(module) as f64);
    let metadata = vec![
        ("general.architecture".to_string(), MetaValue::Str(arch.name().into())),
        ("general.type".into(), MetaValue::Str("adapter".into())),
        ("general.name".into(), MetaValue::Str(folder_name(adapter))),
        ("adapter.type".into(), MetaValue::Str("lora".into())),
        ("adapter.lora.alpha".into(), MetaValue::F32(alpha as f32)),
    ];
    let keys = KeyLayout::of(config.architecture);
    // (adapter key, the tensor written, heads its rows are permuted over, factor, transposed)
    let mut plan: Vec<(String, TensorSpec, Option<usize>, f64, bool)> = Vec::new();
    // An embedding's branch goes out as llama.cpp's converter writes it: `lora_a` is PEFT's
    // `lora_embedding_A` transposed, `[vocab, r]`, whose rows llama.cpp picks by token id;
    // `lora_b` is `lora_embedding_B`, `[hidden, r]`.
    for (weight_key, module) in &branches.embeddings {
        let (name, _) = gguf_write::tensor_name(keys, weight_key, config.num_layers)
            .ok_or_else(|| invalid(format!("'{module}' has no place in llama.cpp's {} architecture", arch.name())))?;
        for (part, suffix) in [("A", "lora_a"), ("B", "lora_b")] {
            let key = ember_adapters::lora::peft::embedding_key(module, part);
            let (shape, _) = branches.weights.info(&key).expect("checked");
            let (shape, factor, transposed) = if part == "A" { (vec![shape[1], shape[0]], 1.0, true) } else { (shape.to_vec(), b_factor(module), false) };
            plan.push((key, TensorSpec { name: format!("{name}.{suffix}"), ty: ty.for_shape(&shape), shape }, None, factor, transposed));
        }
    }
    for (weight_key, module) in &branches.modules {
        let (name, role) = gguf_write::tensor_name(keys, weight_key, config.num_layers)
            .ok_or_else(|| invalid(format!("'{module}' has no place in llama.cpp's {} architecture", arch.name())))?;
        for (part, suffix) in [("lora_A", "lora_a"), ("lora_B", "lora_b")] {
            let key = ember_adapters::lora::peft::key(module, part);
            let (shape, _) = branches.weights.info(&key).expect("checked");
            let (heads, factor) = if part == "lora_B" { (permute_heads(role, &config, arch), b_factor(module)) } else { (None, 1.0) };
            plan.push((key, TensorSpec { name: format!("{name}.{suffix}"), shape: shape.to_vec(), ty: ty.for_shape(shape) }, heads, factor, false));
        }
    }
    plan.sort_by_key(|(_, spec, _, _, _)| gguf_order(&spec.name));
    let specs: Vec<TensorSpec> = plan.iter().map(|(_, spec, _, _, _)| spec.clone()).collect();
    gguf_write::write(out, &metadata, &specs, None, |i| {
        let (key, spec, heads, factor, transposed) = &plan[i];
        let values = match transposed {
            true => branches.weights.float::<2>(key, [spec.shape[1], spec.shape[0]], LoadDtype::F32, &device)?.transpose(),
            false => branches.weights.float::<2>(key, [spec.shape[0], spec.shape[1]], LoadDtype::F32, &device)?,
        };
        let values = if *factor == 1.0 { values } else { values.mul_scalar(*factor) };
        Ok(gguf_values(values, spec, *heads))
    })?;
    Ok(ExportSummary { tensors: specs.len(), bytes: std::fs::metadata(out).map(|m| m.len()).unwrap_or(0) })
}
