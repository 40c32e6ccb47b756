//! Behaviour of freshly initialised adapters on a real (tiny) checkpoint.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use ember_adapters::adaption::AdaptionPrompts;
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
