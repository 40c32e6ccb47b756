//! Behaviour of freshly initialised adapters on a real (tiny) checkpoint.

mod common;

use burn::tensor::{Device, Int, Tensor, TensorData};
use ember_adapters::adaption::{AdaptionConfig, AdaptionPrompts};
use ember_adapters::Method;
use ember_adapters::dora::DoraConfig;
use ember_adapters::ia3::Ia3Config;
use ember_adapters::lora::{BiasTraining, LoraConfig, LoraSection, Target};
use ember_adapters::target::TargetModules;
use ember_adapters::prefix::PrefixConfig;
use ember_adapters::prompt_tuning::{PromptEmbedding, PromptTuningConfig};
use common::fixtures;
use ember_models::{BaseModel, Checkpoint, LoadDtype};


/// LLaMA-Adapter's zero-initialised gate: a new adapter must not change a single logit.
#[test]
fn fresh_gated_adapter_leaves_the_base_logits_unchanged() {
    let device = Device::flex();
    for name in ["tiny_llama", "tiny_qwen2", "tiny_qwen3", "tiny_mistral", "tiny_glm", "tiny_glm4", "tiny_chatglm"] {
        let model = BaseModel::load(&fixtures().join(name), LoadDtype::F32, &device).unwrap();
        let prompts = AdaptionPrompts::init(&model.config, 10, 2, 7, &device);
        let ids = || Tensor::<2, Int>::from_data(TensorData::new(vec![5i64, 17, 42, 99, 3, 8], [2, 3]), &device);
        let base = model.forward(ids(), None).into_data();
        let adapted = model.forward_with(ids(), None, &prompts.extras()).into_data();
        assert_eq!(base, adapted, "{name}");
    }
}

/// The shape-only count (`ember inspect --recipe`, no weights loaded) equals what a fresh adapter
/// really trains, for every method and family.
#[test]
fn trainable_counts_from_shapes_match_fresh_adapters() {
    let device = Device::flex();
    let methods = [
        Method::Lora(LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, use_rslora: false, target: Target::AllLinear, exclude: Default::default(), layers_to_transform: None, modules_to_save: Vec::new(), rank_pattern: Default::default(), alpha_pattern: Default::default(), bias: Default::default(), lora_bias: false, trainable_token_indices: None, init: Default::default() }),
        Method::Prefix(PrefixConfig { num_virtual_tokens: 5, prefix_projection: false, encoder_hidden_size: None }),
        Method::Prefix(PrefixConfig { num_virtual_tokens: 5, prefix_projection: true, encoder_hidden_size: Some(24) }),
        Method::Adaption(AdaptionConfig { adapter_len: 3, adapter_layers: 1 }),
        Method::Dora(DoraConfig(LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, use_rslora: false, target: Target::AllLinear, exclude: Default::default(), layers_to_transform: None, modules_to_save: Vec::new(), rank_pattern: Default::default(), alpha_pattern: Default::default(), bias: Default::default(), lora_bias: false, trainable_token_indices: None, init: Default::default() })),
        Method::Ia3(Ia3Config { target: Target::AllLinear, feedforward: Target::Suffixes(vec!["down_proj".into(), "dense_4h_to_h".into()]), exclude: Default::default() }),
        Method::PromptTuning(PromptTuningConfig { num_virtual_tokens: 4, init_text: None }),
    ];
    for name in ["tiny_llama", "tiny_qwen2", "tiny_qwen3", "tiny_mistral", "tiny_glm", "tiny_glm4", "tiny_chatglm"] {
        for method in &methods {
            let base = BaseModel::load(&fixtures().join(name), LoadDtype::F32, &device).unwrap();
            let expected = method.config().count_trainable(&base.config);
            let (trainable, _) = method.config().init(base, 0, &device).unwrap().parameter_counts();
            assert_eq!(trainable, expected, "{name}: {method}");
        }
    }
}

/// PEFT's `TEXT` init: ember's fresh prompt-tuning table equals the one PEFT initialised from the
/// same text (the fixture's adapter is saved untrained), bit for bit.
#[test]
fn prompt_tuning_text_init_equals_peft() {
    let device = Device::flex();
    let dir = fixtures().join("tiny_llama");
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let Some(text) = reference["methods"]["prompt_tuning_text"]["prompt_tuning_init"]["text"].as_str() else {
        eprintln!("SKIP: {} has no prompt_tuning_text fixture", dir.display());
        return;
    };
    let base = BaseModel::load(&dir, LoadDtype::F32, &device).unwrap();
    let config = PromptTuningConfig { num_virtual_tokens: 8, init_text: Some(text.to_owned()) };
    let model = Method::PromptTuning(config).config().init(base, 0, &device).unwrap();
    let ours = model.inputs_of::<PromptEmbedding>().unwrap().embedding.val().into_data().try_to_vec::<f32>().unwrap();
    let bytes = std::fs::read(dir.join("adapters/prompt_tuning_text/adapter_model.safetensors")).unwrap();
    let saved = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let peft: Vec<f32> = saved.tensor("prompt_embeddings").unwrap().data().chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    assert_eq!(ours, peft);
}

/// LoRA on the embedding and the LM head (PEFT's `lora_embedding_A/B`, and a branch on
/// `lm_head`): fresh, the model is the base; with both branches changed, saved in PEFT's format
/// and loaded back, the same logits; the trainable count from shapes equals the model's. On a
/// model whose head is tied to its embedding they start at the base as well; a module both a
/// target and in modules_to_save is one clear error.
#[test]
fn lora_on_the_embedding_and_head_round_trips_through_peft_format() {
    let device = Device::flex();
    let config = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora: false,
        target: Target::Suffixes(vec!["q_proj".into(), "embed_tokens".into(), "lm_head".into()]),
        exclude: Default::default(),
        layers_to_transform: None,
        modules_to_save: Vec::new(),
        rank_pattern: Default::default(),
        alpha_pattern: Default::default(),
        bias: Default::default(),
        lora_bias: false,
        trainable_token_indices: None,
        init: Default::default(),
    };
    let dir = fixtures().join("tiny_mistral");
    let base = || BaseModel::load(&dir, LoadDtype::F32, &device).unwrap();
    let ids = || Tensor::<2, Int>::from_data(TensorData::new(vec![5i64, 17, 42, 99, 3, 8, 600, 2], [2, 4]), &device);
    let logits = |t: Tensor<3>| t.into_data().try_to_vec::<f32>().unwrap();
    let expected = logits(base().forward(ids(), None));
    let method = Method::Lora(config.clone());
    let mut model = method.config().init(base(), 0, &device).unwrap();
    assert_eq!(logits(model.forward(ids(), None)), expected, "a fresh adapter is the base");
    assert_eq!(model.parameter_counts().0, method.config().count_trainable(&base().config));

    let vocab = model.vocab.as_mut().unwrap();
    let embedding = vocab.embedding.as_mut().unwrap();
    embedding.lora_a = burn::module::Param::from_tensor(Tensor::random(embedding.lora_a.shape(), burn::tensor::Distribution::Normal(0.0, 0.1), &device));
    let head = vocab.head.as_mut().unwrap();
    head.lora_b = burn::module::Param::from_tensor(Tensor::random(head.lora_b.shape(), burn::tensor::Distribution::Normal(0.0, 0.1), &device));
    let changed = logits(model.forward(ids(), None));
    assert!(changed.iter().zip(&expected).any(|(a, b)| (a - b).abs() > 1e-3), "the branches change the logits");
    let saved = tempfile::tempdir().unwrap();
    method.config().save(&model, "tiny_mistral", saved.path()).unwrap();
    let (loaded, _) = Method::load(saved.path(), base(), &device).unwrap();
    assert_eq!(logits(loaded.forward(ids(), None)), changed);

    let tied = || BaseModel::load(&fixtures().join("tiny_qwen3"), LoadDtype::F32, &device).unwrap();
    let expected = logits(tied().forward(ids(), None));
    assert_eq!(logits(method.config().init(tied(), 0, &device).unwrap().forward(ids(), None)), expected);
    let both = Method::Lora(LoraConfig { modules_to_save: vec!["embed_tokens".into()], ..config });
    let error = both.config().init(base(), 0, &device).unwrap_err().to_string();
    assert!(error.contains("modules_to_save") && error.contains("embed_tokens"), "{error}");
}

/// PEFT's `bias = "all"` and `lora_bias` on Qwen2 (biases on q, k, v; none on o): a fresh
/// adapter is the base, the estimator counts what trains, the biases go out under PEFT's keys and
/// read back, and merging B's bias into o_proj, which has none, is refused as PEFT refuses it.
#[test]
fn trained_biases_use_peft_keys_and_a_bias_free_projection_refuses_the_merge() {
    let device = Device::flex();
    let dir = fixtures().join("tiny_qwen2");
    let base = || BaseModel::load(&dir, LoadDtype::F32, &device).unwrap();
    let ids = || Tensor::<2, Int>::from_data(TensorData::new(vec![5i64, 17, 42, 99, 3, 8], [2, 3]), &device);
    let logits = |t: Tensor<3>| t.into_data().try_to_vec::<f32>().unwrap();
    let section = LoraSection {
        r: 4,
        target_modules: TargetModules::List(vec!["q_proj".into(), "o_proj".into()]),
        layers_to_transform: Some(vec![1]),
        bias: BiasTraining::All,
        lora_bias: true,
        ..LoraSection::default()
    };
    let method = Method::Lora(LoraConfig::try_from(section).unwrap());
    let model = method.config().init(base(), 0, &device).unwrap();
    assert_eq!(logits(model.forward(ids(), None)), logits(base().forward(ids(), None)), "a fresh adapter is the base");
    assert_eq!(model.parameter_counts().0, method.config().count_trainable(&base().config));
    let names: Vec<String> = method.config().parameter_names(&model).into_iter().map(|(_, name)| name).collect();
    for name in [
        "base_model.model.model.layers.0.self_attn.q_proj.bias",
        "base_model.model.model.layers.1.self_attn.q_proj.base_layer.bias",
        "base_model.model.model.layers.1.self_attn.k_proj.bias",
        "base_model.model.model.layers.1.self_attn.o_proj.lora_B.bias",
    ] {
        assert!(names.iter().any(|n| n == name), "{name} not in {names:?}");
    }
    assert_eq!(model.first_trainable_layer(), 0, "layer 0's biases train");

    let saved = tempfile::tempdir().unwrap();
    method.config().save(&model, "tiny_qwen2", saved.path()).unwrap();
    let (loaded, _) = Method::load(saved.path(), base(), &device).unwrap();
    assert_eq!(logits(loaded.forward(ids(), None)), logits(model.forward(ids(), None)));
    let merge = Method::weight_merge(saved.path(), &base().config).unwrap();
    let error = merge.check(&Checkpoint::open_dir(&dir).unwrap()).unwrap_err().to_string();
    assert!(error.contains("o_proj.lora_B.bias") && error.contains("has no"), "{error}");
}
