//! Behaviour of freshly initialised adapters on a real (tiny) checkpoint.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use ember_adapters::adaption::{AdaptionConfig, AdaptionPrompts};
use ember_adapters::Method;
use ember_adapters::dora::DoraConfig;
use ember_adapters::ia3::Ia3Config;
use ember_adapters::lora::{LoraConfig, Target};
use ember_adapters::prefix::PrefixConfig;
use ember_adapters::prompt_tuning::PromptTuningConfig;
use ember_models::{BaseModel, LoadDtype};

fn fixtures() -> PathBuf {
    std::env::var_os("EMBER_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"))
}

/// LLaMA-Adapter's zero-initialised gate: a new adapter must not change a single logit.
#[test]
fn fresh_gated_adapter_leaves_the_base_logits_unchanged() {
    let device = Device::flex();
    for name in ["tiny_llama", "tiny_glm", "tiny_chatglm"] {
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
        Method::Lora(LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, use_rslora: false, target: Target::AllLinear, layers_to_transform: None }),
        Method::Prefix(PrefixConfig { num_virtual_tokens: 5, prefix_projection: false, encoder_hidden_size: None }),
        Method::Prefix(PrefixConfig { num_virtual_tokens: 5, prefix_projection: true, encoder_hidden_size: Some(24) }),
        Method::Adaption(AdaptionConfig { adapter_len: 3, adapter_layers: 1 }),
        Method::Dora(DoraConfig(LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, use_rslora: false, target: Target::AllLinear, layers_to_transform: None })),
        Method::Ia3(Ia3Config { target: Target::AllLinear, feedforward: Target::Suffixes(vec!["down_proj".into(), "dense_4h_to_h".into()]) }),
        Method::PromptTuning(PromptTuningConfig { num_virtual_tokens: 4 }),
    ];
    for name in ["tiny_llama", "tiny_glm", "tiny_chatglm"] {
        for method in &methods {
            let base = BaseModel::load(&fixtures().join(name), LoadDtype::F32, &device).unwrap();
            let expected = method.config().count_trainable(&base.config);
            let (trainable, _) = method.config().init(base, 0, &device).unwrap().parameter_counts();
            assert_eq!(trainable, expected, "{name}: {method}");
        }
    }
}
