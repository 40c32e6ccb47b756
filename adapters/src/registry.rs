//! The one list of methods. Adding a method: its folder, one line in `methods!` below, and one
//! line in [`ProjectionAdapter`] (a method inside the projections) or [`ModelAdapter`] (a method
//! that feeds the decoder: attention extras or input embeddings) with its arm in the matching
//! `each_*` macro.

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use ember_models::layers::{Linear, output_surrogate};
use ember_models::{BaseModel, LayerExtras};

use crate::adaption::{AdaptionConfig, AdaptionPrompts};
use crate::dora::{DoraBranch, DoraConfig};
use crate::ia3::{Ia3Config, Ia3Vector};
use crate::lora::{LoraBranch, LoraConfig};
use crate::method::{AdapterFolder, MethodConfig, PeftMethod, WeightMerge};
use crate::prefix::{PrefixConfig, PrefixEncoder};
use crate::prompt_tuning::{PromptEmbedding, PromptTuningConfig};
use crate::{AdaptedModel, AdapterError};

macro_rules! methods {
    ($($variant:ident($config:ty)),* $(,)?) => {
        /// A method and its settings: one variant per registered method.
        #[derive(Debug, Clone)]
        pub enum Method {
            $($variant($config)),*
        }

        $(impl From<$config> for Method {
            fn from(config: $config) -> Self {
                Method::$variant(config)
            }
        })*

        impl Method {
            /// Every method's recipe name, in registration order.
            pub const NAMES: &[&str] = &[$(<$config as PeftMethod>::NAME),*];

            /// The settings behind the seam every method implements.
            pub fn config(&self) -> &dyn MethodConfig {
                match self {
                    $(Method::$variant(config) => config),*
                }
            }

            /// The method `name` with its `[adapter]` keys (`method` and `init_from` removed).
            pub fn from_recipe(name: &str, section: toml::Table) -> Result<Self, String> {
                $(if name == <$config as PeftMethod>::NAME {
                    return parse_section::<$config>(section).map(Method::$variant);
                })*
                Err(unknown_method(name))
            }

            /// The `[adapter]` keys method `name` reads.
            pub fn section_keys(name: &str) -> Result<Vec<String>, String> {
                $(if name == <$config as PeftMethod>::NAME {
                    return Ok(section_keys::<$config>());
                })*
                Err(unknown_method(name))
            }

            /// An adapter folder of any registered method, onto `base`.
            pub fn load(dir: &std::path::Path, base: BaseModel, device: &Device) -> Result<(AdaptedModel, Method), AdapterError> {
                let folder = AdapterFolder::read(dir)?;
                $(if <$config as PeftMethod>::recognises(&folder) {
                    let (model, config) = <$config as PeftMethod>::load(&folder, base, device)?;
                    return Ok((model, Method::$variant(config)));
                })*
                Err(unrecognised(&folder))
            }

            /// The method and settings of the adapter in `dir`, without reading its weights.
            pub fn read(dir: &std::path::Path) -> Result<Method, AdapterError> {
                let folder = AdapterFolder::read(dir)?;
                $(if <$config as PeftMethod>::recognises(&folder) {
                    return <$config as PeftMethod>::from_folder(&folder).map(Method::$variant);
                })*
                Err(unrecognised(&folder))
            }

            /// What `ember merge` folds into the base weights of a model of `model`'s config for
            /// the adapter in `dir`.
            pub fn weight_merge(dir: &std::path::Path, model: &ember_models::ModelConfig) -> Result<Box<dyn WeightMerge>, AdapterError> {
                let folder = AdapterFolder::read(dir)?;
                $(if <$config as PeftMethod>::recognises(&folder) {
                    return <$config as PeftMethod>::weight_merge(&folder, model).unwrap_or_else(|| Err(folder.invalid(format!(
                        "a {} adapter cannot be merged into the weights: its parameters are not a change of any weight; load it with --adapter instead",
                        <$config as PeftMethod>::NAME
                    ))));
                })*
                Err(unrecognised(&folder))
            }
        }
    };
}

methods! {
    Lora(LoraConfig),
    Dora(DoraConfig),
    Ia3(Ia3Config),
    Prefix(PrefixConfig),
    Adaption(AdaptionConfig),
    PromptTuning(PromptTuningConfig),
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self.config(), f)
    }
}

fn unknown_method(name: &str) -> String {
    format!("'adapter.method' is '{name}'; expected one of {}", Method::NAMES.join(", "))
}

fn unrecognised(folder: &AdapterFolder) -> AdapterError {
    folder.invalid(format!(
        "peft_type {:?} with these settings is not a format ember reads (methods: {})",
        folder.peft_type(),
        Method::NAMES.join(", ")
    ))
}

fn parse_section<M: PeftMethod>(section: toml::Table) -> Result<M, String> {
    let section: M::Section = toml::Value::Table(section).try_into().map_err(|e: toml::de::Error| e.message().to_owned())?;
    M::from_section(section)
}

fn section_keys<M: PeftMethod>() -> Vec<String> {
    let defaults = serde_json::to_value(M::Section::default()).expect("a recipe section serializes");
    defaults.as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default()
}

/// What a method puts inside a projection: `forward` replaces the projection's output.
pub trait ProjectionBranch {
    /// # Shapes
    /// - x: `[batch, seq, in]`
    /// - output: `[batch, seq, out]`
    fn forward(&self, base: &Linear, x: Tensor<3>) -> Tensor<3>;

    /// [`ember_models::Projection::surrogate`] of [`Self::forward`]. A branch that adds to the base's output
    /// (or scales its input) overrides it to leave the frozen product to the base's surrogate,
    /// which skips that product's forward.
    fn surrogate(&self, base: &Linear, x: Tensor<3>, grad: &Tensor<3>) -> Tensor<1> {
        output_surrogate(self.forward(base, x), grad)
    }

    /// The base with the branch folded into its weight (and bias).
    fn merged(self, base: Linear) -> Linear;

    /// True while the branch cannot change the output (an untrained LoRA B of zeros).
    fn leaves_base_unchanged(&self) -> bool;
}

/// A branch inside one projection, of any method that adapts projections.
#[derive(Module, Debug)]
pub enum ProjectionAdapter {
    Lora(LoraBranch),
    Dora(DoraBranch),
    Ia3(Ia3Vector),
}

macro_rules! each_branch {
    ($value:expr, $branch:ident => $body:expr) => {
        match $value {
            ProjectionAdapter::Lora($branch) => $body,
            ProjectionAdapter::Dora($branch) => $body,
            ProjectionAdapter::Ia3($branch) => $body,
        }
    };
}

impl ProjectionAdapter {
    pub fn forward(&self, base: &Linear, x: Tensor<3>) -> Tensor<3> {
        each_branch!(self, branch => branch.forward(base, x))
    }

    pub fn surrogate(&self, base: &Linear, x: Tensor<3>, grad: &Tensor<3>) -> Tensor<1> {
        each_branch!(self, branch => branch.surrogate(base, x, grad))
    }

    pub fn merged(self, base: Linear) -> Linear {
        each_branch!(self, branch => branch.merged(base))
    }

    pub fn leaves_base_unchanged(&self) -> bool {
        each_branch!(self, branch => branch.leaves_base_unchanged())
    }
}

/// What a method that does not touch the projections gives the decoder.
pub trait DecoderInputs {
    /// Per-layer prefix keys/values or adaption prompts for a batch of `batch` rows (empty: none).
    fn extras(&self, _batch: usize) -> Vec<LayerExtras> {
        Vec::new()
    }

    /// Every layer's prefix keys and values at once (prefix tuning), for the training step.
    fn prefix_keys_values(&self) -> Option<Tensor<4>> {
        None
    }

    /// Layer `i`'s extras, prefix keys/values read from `prefix_keys_values`.
    fn layer_extras(&self, _batch: usize, _i: usize, _prefix_keys_values: Option<&Tensor<4>>) -> Option<LayerExtras> {
        None
    }

    /// Keys placed before every sequence's own in each layer.
    fn prefix_keys(&self) -> usize {
        0
    }

    /// Embeddings `[n, hidden]` that take the first `n` positions of every sequence.
    fn virtual_embeddings(&self) -> Option<Tensor<2>> {
        None
    }

    fn first_trainable_layer(&self) -> usize {
        0
    }

    /// Why saving would be pointless (every gate still zero), if so.
    fn unchanged_reason(&self) -> Option<&'static str> {
        None
    }
}

/// Declares [`ModelAdapter`] from its variants, with [`ModelAdapter::inputs`] and each
/// variant's [`InputsOf`].
macro_rules! model_adapters {
    ($($variant:ident($inputs:ty)),* $(,)?) => {
        /// The parameters of a method that feeds the decoder rather than a projection.
        #[derive(Module, Debug)]
        #[allow(clippy::large_enum_variant)]
        pub enum ModelAdapter {
            $($variant($inputs)),*
        }

        impl ModelAdapter {
            pub fn inputs(&self) -> &dyn DecoderInputs {
                match self {
                    $(ModelAdapter::$variant(inputs) => inputs),*
                }
            }
        }

        $(
            impl InputsOf for $inputs {
                fn of(adapter: &ModelAdapter) -> Option<&Self> {
                    match adapter {
                        ModelAdapter::$variant(inputs) => Some(inputs),
                        #[allow(unreachable_patterns)]
                        _ => None,
                    }
                }
            }
        )*
    };
}

model_adapters!(Prefix(PrefixEncoder), Adaption(AdaptionPrompts), PromptTuning(PromptEmbedding));

/// A method's own decoder inputs, found in a model's [`ModelAdapter`] (see
/// [`crate::AdaptedModel::inputs_of`]).
pub trait InputsOf {
    fn of(adapter: &ModelAdapter) -> Option<&Self>;
}
