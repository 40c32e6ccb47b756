//! Writing GGUF files for llama.cpp: the container (version 3), the encodings (F32, F16, BF16
//! and ggml's quantized blocks, [`crate::ggml_encode`]) with llama-quantize's choice of type per
//! tensor, llama.cpp's tensor names (q/k rows in its order where its architecture wants them), and
//! the metadata and tokenizer its loader reads.
//!
//! Tensors are produced one at a time by the caller and streamed into a temporary file that is
//! renamed into place at the end: a GGUF never exists half-written, and memory holds one tensor.

use std::io::Write;
use std::path::Path;

use ember_data::sentencepiece::{ModelProto, PieceType};
use ember_data::Tokenizer;
use ember_data::tokenizer::Flavour;
use serde_json::Value;
use sha2::Digest;

use crate::LoadError;
use crate::ggml_encode;
use crate::config::{MlpActivation, ModelConfig, RopeScaling};
use crate::family::{KeyLayout, Role};
use crate::gguf::{GgmlType, GgufArch};
use crate::imatrix::ImportanceMatrix;

const ALIGNMENT: usize = 32;

/// A metadata value, as GGUF types it.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    F32s(Vec<f32>),
    I32s(Vec<i32>),
}

/// What the writer needs of a type: the names `gguf-lora --type` takes, and the fallbacks of
/// rows that are not whole blocks.
impl GgmlType {
    /// The types a LoRA adapter's tensors may take (`export gguf-lora --type`), as llama.cpp's
    /// `convert_lora_to_gguf.py` writes them.
    pub fn parse_lora(name: &str) -> Option<Self> {
        Some(match name {
            "f32" => Self::F32,
            "f16" => Self::F16,
            "bf16" => Self::BF16,
            "q8_0" => Self::Q8_0,
            _ => return None,
        })
    }

    /// The type a tensor of `shape` gets when the file's type is `self`: vectors stay F32 (as
    /// llama.cpp's converter keeps them); rows that do not fill whole blocks fall back as
    /// llama-quantize does (Q2_K, Q3_K, Q2_0 and the ternary types to Q4_0, Q4_K to Q5_0, Q5_K to
    /// Q5_1, Q6_K to Q8_0, IQ4_XS and the lattice types to IQ4_NL, then to F16; Q1_0 has none, see
    /// [`ExportType::fitted_tensor_type`]).
    pub fn for_shape(self, shape: &[usize]) -> Self {
        if shape.len() < 2 {
            return Self::F32;
        }
        let cols = shape.last().copied().unwrap_or(0);
        let fits = |ty: Self| cols % ty.block().0 as usize == 0;
        let fallback = match self {
            Self::Q2_K | Self::Q3_K | Self::Q2_0 | Self::TQ1_0 | Self::TQ2_0 => Self::Q4_0,
            Self::Q4_K => Self::Q5_0,
            Self::Q5_K => Self::Q5_1,
            Self::Q6_K => Self::Q8_0,
            Self::IQ4_XS | Self::IQ2_XXS | Self::IQ2_XS | Self::IQ2_S | Self::IQ3_XXS | Self::IQ3_S | Self::IQ1_S | Self::IQ1_M => Self::IQ4_NL,
            other => other,
        };
        match [self, fallback].into_iter().find(|&ty| fits(ty)) {
            Some(ty) => ty,
            None => Self::F16,
        }
    }

    fn bytes(self, values: usize) -> usize {
        let (per_block, bytes) = self.block();
        values / per_block as usize * bytes as usize
    }
}

/// What `ember export gguf --type` asks for: one of llama.cpp's file types. A quantized one gets
/// the types llama-quantize gives each tensor without an importance matrix: its main type, Q6_K
/// for the output (the tied embedding too; Q8_0 where its rows are not whole blocks of the main
/// type), and for attn_v, ffn_down and attn_output what each mixture gives them (Q4_K_M, Q5_K_M:
/// Q6_K in the layers llama.cpp's `use_more_bits` picks, the first and last eighth and every
/// third between; Q4_K_S: Q5_K in the first layers; Q3_K_M: Q5_K in the first layers, Q4_K
/// elsewhere, and Q4_K for attn_output; Q3_K_L: Q5_K for all three; Q2_K: Q3_K for them, Q4_K
/// for attn_v with 4 or more query heads per KV head; Q2_K_S: Q4_K for that attn_v and the first
/// eighth's ffn_down; IQ4_NL, IQ4_XS: Q5_K for them), with Q5_K for a 70B's other attn_v (8 heads
/// share each). Q4_1, Q5_0 and Q5_1 are their type throughout; TQ1_0, TQ2_0 and Q2_0 take a Q4_K
/// embedding.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportType {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q5_1,
    Q5_0,
    Q4_1,
    Q4_0,
    Q6_K,
    Q5_K_M,
    Q5_K_S,
    Q4_K_M,
    Q4_K_S,
    Q3_K_L,
    Q3_K_M,
    Q3_K_S,
    Q2_K,
    Q2_K_S,
    IQ4_XS,
    IQ4_NL,
    IQ3_M,
    IQ3_S,
    IQ3_XS,
    IQ3_XXS,
    IQ2_M,
    IQ2_S,
    IQ2_XS,
    IQ2_XXS,
    IQ1_M,
    IQ1_S,
    TQ2_0,
    TQ1_0,
    Q2_0,
    Q1_0,
}

/// What llama-quantize's choice of types reads from the model beyond a tensor's name and shape.
#[derive(Debug, Clone, Copy)]
pub struct QuantizeModel {
    pub layers: usize,
    /// No `output.weight`: the token embedding is the output.
    pub tied: bool,
    /// llama.cpp's 70B type: 80 layers, of `llama` with grouped KV heads or of `qwen2`.
    pub seventy_b: bool,
    /// Query heads per KV head (llama.cpp's `n_gqa`).
    pub gqa: usize,
    /// Quantized with an importance matrix, which changes a few of llama-quantize's choices.
    pub importance: bool,
}

impl QuantizeModel {
    pub fn of(config: &ModelConfig, arch: GgufArch, tied: bool, importance: bool) -> Self {
        let seventy_b = config.num_layers == 80
            && match arch {
                GgufArch::Llama => config.num_heads != config.num_kv_heads,
                GgufArch::Qwen2 => true,
                GgufArch::Qwen3 | GgufArch::ChatGlm | GgufArch::Glm4 => false,
            };
        Self { layers: config.num_layers, tied, seventy_b, gqa: config.num_heads / config.num_kv_heads.max(1), importance }
    }
}

impl ExportType {
    /// Every type by its `--type` name.
    const BY_NAME: [(&str, Self); 34] = [
        ("f32", Self::F32), ("f16", Self::F16), ("bf16", Self::Bf16), ("q8_0", Self::Q8_0), ("q5_1", Self::Q5_1),
        ("q5_0", Self::Q5_0), ("q4_1", Self::Q4_1), ("q4_0", Self::Q4_0),
        ("q6_k", Self::Q6_K), ("q5_k_m", Self::Q5_K_M), ("q5_k_s", Self::Q5_K_S), ("q4_k_m", Self::Q4_K_M),
        ("q4_k_s", Self::Q4_K_S), ("q3_k_l", Self::Q3_K_L), ("q3_k_m", Self::Q3_K_M), ("q3_k_s", Self::Q3_K_S),
        ("q2_k", Self::Q2_K), ("q2_k_s", Self::Q2_K_S), ("iq4_xs", Self::IQ4_XS), ("iq4_nl", Self::IQ4_NL),
        ("iq3_m", Self::IQ3_M), ("iq3_s", Self::IQ3_S), ("iq3_xs", Self::IQ3_XS), ("iq3_xxs", Self::IQ3_XXS),
        ("iq2_m", Self::IQ2_M), ("iq2_s", Self::IQ2_S), ("iq2_xs", Self::IQ2_XS), ("iq2_xxs", Self::IQ2_XXS),
        ("iq1_m", Self::IQ1_M), ("iq1_s", Self::IQ1_S), ("tq2_0", Self::TQ2_0), ("tq1_0", Self::TQ1_0), ("q2_0", Self::Q2_0),
        ("q1_0", Self::Q1_0),
    ];

    pub fn parse(name: &str) -> Option<Self> {
        Self::BY_NAME.iter().find(|(known, _)| *known == name).map(|&(_, ty)| ty)
    }

    /// The `--type` name.
    pub fn name(self) -> &'static str {
        Self::BY_NAME.iter().find(|(_, ty)| *ty == self).map(|(name, _)| *name).expect("every type has a name")
    }

    /// The `--type` names, for an error message: "f32, f16, … or iq2_xxs".
    pub fn names() -> String {
        let names: Vec<&str> = Self::BY_NAME.iter().map(|(name, _)| *name).collect();
        let (last, rest) = names.split_last().expect("types");
        format!("{} or {last}", rest.join(", "))
    }

    /// llama.cpp's `general.file_type` (its `LLAMA_FTYPE_*`).
    pub fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 7,
            Self::Q5_0 => 8,
            Self::Q5_1 => 9,
            Self::Q2_K => 10,
            Self::Q3_K_S => 11,
            Self::Q3_K_M => 12,
            Self::Q3_K_L => 13,
            Self::Q4_K_S => 14,
            Self::Q4_K_M => 15,
            Self::Q5_K_S => 16,
            Self::Q5_K_M => 17,
            Self::Q6_K => 18,
            Self::Q2_K_S => 21,
            Self::IQ2_XXS => 19,
            Self::IQ2_XS => 20,
            Self::IQ3_XS => 22,
            Self::IQ3_XXS => 23,
            Self::IQ1_S => 24,
            Self::IQ4_NL => 25,
            Self::IQ3_S => 26,
            Self::IQ3_M => 27,
            Self::IQ2_S => 28,
            Self::IQ2_M => 29,
            Self::IQ4_XS => 30,
            Self::IQ1_M => 31,
            Self::Bf16 => 32,
            Self::TQ1_0 => 36,
            Self::TQ2_0 => 37,
            Self::Q1_0 => 40,
            Self::Q2_0 => 41,
        }
    }

    /// The type most matrices get.
    fn main_type(self) -> GgmlType {
        match self {
            Self::F32 => GgmlType::F32,
            Self::F16 => GgmlType::F16,
            Self::Bf16 => GgmlType::BF16,
            Self::Q8_0 => GgmlType::Q8_0,
            Self::Q5_1 => GgmlType::Q5_1,
            Self::Q5_0 => GgmlType::Q5_0,
            Self::Q4_1 => GgmlType::Q4_1,
            Self::Q4_0 => GgmlType::Q4_0,
            Self::Q6_K => GgmlType::Q6_K,
            Self::Q5_K_M | Self::Q5_K_S => GgmlType::Q5_K,
            Self::Q4_K_M | Self::Q4_K_S => GgmlType::Q4_K,
            Self::Q3_K_L | Self::Q3_K_M | Self::Q3_K_S => GgmlType::Q3_K,
            Self::Q2_K | Self::Q2_K_S => GgmlType::Q2_K,
            Self::IQ4_XS => GgmlType::IQ4_XS,
            Self::IQ4_NL => GgmlType::IQ4_NL,
            Self::IQ3_M | Self::IQ3_S | Self::IQ3_XS => GgmlType::IQ3_S,
            Self::IQ3_XXS => GgmlType::IQ3_XXS,
            Self::IQ2_M => GgmlType::IQ2_S,
            Self::IQ2_S | Self::IQ2_XS => GgmlType::IQ2_XS,
            Self::IQ2_XXS => GgmlType::IQ2_XXS,
            Self::IQ1_M => GgmlType::IQ1_M,
            Self::IQ1_S => GgmlType::IQ1_S,
            Self::TQ2_0 => GgmlType::TQ2_0,
            Self::TQ1_0 => GgmlType::TQ1_0,
            Self::Q2_0 => GgmlType::Q2_0,
            Self::Q1_0 => GgmlType::Q1_0,
        }
    }

    pub fn quantized(self) -> bool {
        self.main_type().quantized()
    }

    /// Whether the tensor `name` of type `ty` must be quantized with an importance matrix, as
    /// llama-quantize requires: the 1- and 2-bit lattice types, IQ3_XXS and Q2_K_S's Q2_K tensors,
    /// but not the embedding and the output.
    pub fn needs_importance(self, name: &str, ty: GgmlType) -> bool {
        let needs = match ty {
            GgmlType::IQ1_S | GgmlType::IQ1_M | GgmlType::IQ2_XXS | GgmlType::IQ2_XS | GgmlType::IQ2_S | GgmlType::IQ3_XXS => true,
            GgmlType::Q2_K => self == Self::Q2_K_S,
            _ => false,
        };
        needs && name != "token_embd.weight" && name != "output.weight"
    }

    /// Whether llama-quantize writes this type only with an importance matrix: some of its
    /// tensors need one.
    pub fn requires_importance(self) -> bool {
        matches!(self, Self::Q2_K_S | Self::IQ3_XS | Self::IQ3_XXS) || self.below_three_bits()
    }

    /// llama.cpp's 1- and 2-bit lattice mixtures, whose attn_v, ffn_down and attn_output follow
    /// rules of their own.
    fn below_three_bits(self) -> bool {
        matches!(self, Self::IQ2_M | Self::IQ2_S | Self::IQ2_XS | Self::IQ2_XXS | Self::IQ1_M | Self::IQ1_S)
    }

    /// The type of the GGUF tensor `name` of `shape` in `model`.
    pub fn tensor_type(self, name: &str, shape: &[usize], model: QuantizeModel) -> GgmlType {
        self.chosen_type(name, shape, model).for_shape(shape)
    }

    /// The type llama-quantize chooses for the tensor before falling back where its rows are not
    /// whole blocks.
    fn chosen_type(self, name: &str, shape: &[usize], model: QuantizeModel) -> GgmlType {
        let main = self.main_type();
        if !main.quantized() || shape.len() < 2 {
            return main;
        }
        // Tensors come in layer order, so a layer's attn_v and ffn_down are its index's.
        let layer = name.strip_prefix("blk.").and_then(|rest| rest.split_once('.')).and_then(|(i, _)| i.parse::<usize>().ok());
        let more_bits = layer.is_some_and(|i| more_bits(i, model.layers));
        let early = |below: usize| layer.is_some_and(|i| i < below);
        let grouped = model.gqa >= 4;
        let middle = layer.is_some_and(|i| i >= model.layers / 8 && i < 7 * model.layers / 8);
        let two_bit_wider = if matches!(self, Self::IQ2_S | Self::IQ2_M) { GgmlType::IQ3_S } else { GgmlType::Q2_K };
        let ty = if name == "output.weight" || (model.tied && name == "token_embd.weight") {
            let whole_blocks = shape.last().is_some_and(|cols| cols % main.block().0 as usize == 0);
            if !whole_blocks || main == GgmlType::Q8_0 {
                GgmlType::Q8_0
            } else if self.below_three_bits() || self == Self::IQ3_XXS {
                GgmlType::Q5_K
            } else {
                GgmlType::Q6_K
            }
        } else if name == "token_embd.weight" {
            match self {
                Self::IQ2_XXS | Self::IQ2_XS | Self::IQ1_S | Self::IQ1_M => GgmlType::Q2_K,
                Self::IQ2_S | Self::IQ2_M | Self::IQ3_XXS => GgmlType::IQ3_S,
                Self::TQ1_0 | Self::TQ2_0 | Self::Q2_0 => GgmlType::Q4_K,
                _ => main,
            }
        } else if self.below_three_bits() {
            if name.ends_with("attn_v.weight") || name.ends_with("attn_qkv.weight") {
                if grouped { GgmlType::Q4_K } else { two_bit_wider }
            } else if name.ends_with("ffn_down.weight") && early(model.layers / 8) {
                two_bit_wider
            } else if name.ends_with("attn_output.weight") && matches!(self, Self::IQ2_S | Self::IQ2_M) {
                GgmlType::IQ3_S
            } else if name.ends_with("attn_output.weight") && matches!(self, Self::IQ1_S | Self::IQ1_M) {
                GgmlType::IQ2_XXS
            } else {
                main
            }
        } else if name.ends_with("attn_v.weight") || name.ends_with("attn_qkv.weight") {
            let ty = match self {
                Self::Q4_K_M | Self::Q5_K_M if more_bits => GgmlType::Q6_K,
                Self::Q4_K_S if early(4) => GgmlType::Q5_K,
                Self::Q3_K_M if early(2) => GgmlType::Q5_K,
                Self::Q3_K_M => GgmlType::Q4_K,
                Self::Q3_K_L => GgmlType::Q5_K,
                Self::Q2_K | Self::Q2_K_S if grouped => GgmlType::Q4_K,
                Self::Q2_K => GgmlType::Q3_K,
                Self::IQ4_XS | Self::IQ4_NL if grouped => GgmlType::Q5_K,
                Self::IQ3_XXS | Self::IQ3_XS | Self::IQ3_S if grouped => GgmlType::Q4_K,
                Self::IQ3_XXS if !model.importance => GgmlType::IQ3_S,
                Self::IQ3_M => GgmlType::Q4_K,
                _ => main,
            };
            if model.seventy_b && matches!(ty, GgmlType::Q3_K | GgmlType::Q4_K) { GgmlType::Q5_K } else { ty }
        } else if name.ends_with("attn_q.weight") || name.ends_with("attn_k.weight") {
            match self {
                Self::IQ3_XS => GgmlType::IQ3_XXS,
                Self::IQ3_XXS => GgmlType::IQ2_S,
                _ => main,
            }
        } else if name.ends_with("ffn_down.weight") {
            match self {
                Self::Q4_K_M | Self::Q5_K_M if more_bits => GgmlType::Q6_K,
                Self::Q4_K_S if early(model.layers / 8) => GgmlType::Q5_K,
                Self::Q3_K_M if early(model.layers / 16) => GgmlType::Q5_K,
                Self::Q3_K_M => GgmlType::Q4_K,
                Self::Q3_K_L => GgmlType::Q5_K,
                Self::Q2_K => GgmlType::Q3_K,
                Self::Q2_K_S if early(model.layers / 8) => GgmlType::Q4_K,
                Self::IQ4_XS | Self::IQ4_NL if early(model.layers / 8) && !model.importance => GgmlType::Q5_K,
                Self::IQ3_XXS if !model.importance => if early(model.layers / 8) { GgmlType::Q4_K } else { GgmlType::Q3_K },
                Self::IQ3_M if early(model.layers / 8) => GgmlType::Q4_K,
                // With an importance matrix, llama.cpp's guard for the first ffn_down.
                Self::Q4_0 if early(model.layers / 8) && model.importance => GgmlType::Q4_1,
                Self::Q5_0 if early(model.layers / 8) && model.importance => GgmlType::Q5_1,
                _ => main,
            }
        } else if name.ends_with("attn_output.weight") {
            match self {
                Self::Q3_K_M | Self::IQ3_M => GgmlType::Q4_K,
                Self::Q3_K_L => GgmlType::Q5_K,
                Self::Q2_K => GgmlType::Q3_K,
                Self::IQ3_XXS => GgmlType::IQ3_S,
                _ => main,
            }
        } else if name.ends_with("ffn_gate.weight") || name.ends_with("ffn_up.weight") {
            if self == Self::IQ3_XS && middle { GgmlType::IQ3_XXS } else { main }
        } else {
            main
        };
        ty
    }

    /// [`Self::tensor_type`], or why llama-quantize refuses the tensor: Q1_0 has no type to fall
    /// back to for rows that are not whole blocks of 128.
    pub fn fitted_tensor_type(self, name: &str, shape: &[usize], model: QuantizeModel) -> Result<GgmlType, String> {
        let chosen = self.chosen_type(name, shape, model);
        let cols = shape.last().copied().unwrap_or(0);
        if chosen == GgmlType::Q1_0 && shape.len() >= 2 && cols % 128 != 0 {
            return Err(format!("tensor '{name}' has rows of {cols} values, not whole Q1_0 blocks of 128, and Q1_0 has no type to fall back to (llama-quantize stops there too)"));
        }
        Ok(chosen.for_shape(shape))
    }
}

/// llama.cpp's `use_more_bits`: the layers a K-quant mixture gives more bits.
fn more_bits(layer: usize, layers: usize) -> bool {
    let (i, n) = (layer as i64, layers as i64);
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// `values` in `ty`'s encoding: ggml's quantizers as llama-quantize runs them, with the
/// `importance` of each column (the rows' length) when an importance matrix has it.
pub fn encode(ty: GgmlType, values: &[f32], importance: Option<&[f32]>) -> Vec<u8> {
    use ggml_encode::importance as weighted;
    use ggml_encode::lattice;
    use ggml_encode::low_bit;
    if let Some(importance) = importance {
        match ty {
            GgmlType::Q4_0 => return weighted::encode_q4_0(values, importance),
            GgmlType::Q4_1 => return weighted::encode_q4_1(values, importance),
            GgmlType::Q5_0 => return weighted::encode_q5_0(values, importance),
            GgmlType::Q5_1 => return weighted::encode_q5_1(values, importance),
            GgmlType::Q2_K => return weighted::encode_q2_k(values, importance),
            GgmlType::Q3_K => return weighted::encode_q3_k(values, importance),
            GgmlType::Q4_K => return weighted::encode_q4_k(values, importance),
            GgmlType::Q5_K => return weighted::encode_q5_k(values, importance),
            GgmlType::Q6_K => return weighted::encode_q6_k(values, importance),
            GgmlType::IQ4_NL => return weighted::encode_iq4_nl(values, importance),
            GgmlType::IQ4_XS => return weighted::encode_iq4_xs(values, importance),
            GgmlType::IQ2_XXS => return lattice::encode_iq2_xxs(values, importance),
            GgmlType::IQ2_XS => return lattice::encode_iq2_xs(values, importance),
            GgmlType::IQ2_S => return lattice::encode_iq2_s(values, Some(importance)),
            GgmlType::IQ3_XXS => return lattice::encode_iq3_xxs(values, Some(importance)),
            GgmlType::IQ3_S => return lattice::encode_iq3_s(values, Some(importance)),
            GgmlType::IQ1_S => return lattice::encode_iq1_s(values, importance),
            GgmlType::IQ1_M => return lattice::encode_iq1_m(values, Some(importance)),
            // Q8_0, the 1- and 2-bit round-to-nearest types and the float types have no use for
            // it, as in llama.cpp.
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0 => {}
            GgmlType::Q1_0 | GgmlType::Q2_0 | GgmlType::TQ1_0 | GgmlType::TQ2_0 => {}
            GgmlType::MXFP4 | GgmlType::NVFP4 => {}
        }
    }
    match ty {
        GgmlType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
        GgmlType::BF16 => values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
        GgmlType::Q8_0 => ggml_encode::encode_q8_0(values),
        GgmlType::Q4_0 => ggml_encode::encode_q4_0(values),
        GgmlType::Q4_1 => ggml_encode::encode_q4_1(values),
        GgmlType::Q5_0 => ggml_encode::encode_q5_0(values),
        GgmlType::Q5_1 => ggml_encode::encode_q5_1(values),
        GgmlType::Q2_K => ggml_encode::encode_q2_k(values),
        GgmlType::Q3_K => ggml_encode::encode_q3_k(values),
        GgmlType::Q4_K => ggml_encode::encode_q4_k(values),
        GgmlType::Q5_K => ggml_encode::encode_q5_k(values),
        GgmlType::Q6_K => ggml_encode::encode_q6_k(values),
        GgmlType::IQ4_NL => ggml_encode::encode_iq4_nl(values),
        GgmlType::IQ4_XS => ggml_encode::encode_iq4_xs(values),
        GgmlType::IQ2_S => lattice::encode_iq2_s(values, None),
        GgmlType::IQ3_XXS => lattice::encode_iq3_xxs(values, None),
        GgmlType::IQ3_S => lattice::encode_iq3_s(values, None),
        GgmlType::IQ1_M => lattice::encode_iq1_m(values, None),
        GgmlType::Q1_0 => low_bit::encode_q1_0(values),
        GgmlType::Q2_0 => low_bit::encode_q2_0(values),
        GgmlType::TQ1_0 => low_bit::encode_tq1_0(values),
        GgmlType::TQ2_0 => low_bit::encode_tq2_0(values),
        // ggml has no quantizer for them without importance; `needs_importance` sees to it.
        GgmlType::IQ2_XXS | GgmlType::IQ2_XS | GgmlType::IQ1_S => unreachable!("{ty:?} is written only with an importance matrix"),
        // Read, not written: llama-quantize gives MXFP4 only to MoE experts, and NVFP4 comes
        // from ModelOpt checkpoints; no `ExportType` asks for them.
        GgmlType::MXFP4 | GgmlType::NVFP4 => unreachable!("{ty:?} is not a type ember writes"),
    }
}

/// The keys llama-quantize writes for an importance matrix: its file name, entries, and the
/// dataset and chunks where the file says.
pub fn importance_metadata(matrix: &ImportanceMatrix) -> Vec<(String, MetaValue)> {
    let name = matrix.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut keys = vec![("quantize.imatrix.file".to_string(), MetaValue::Str(name))];
    if let Some(dataset) = matrix.datasets.first() {
        keys.push(("quantize.imatrix.dataset".into(), MetaValue::Str(dataset.clone())));
    }
    keys.push(("quantize.imatrix.entries_count".into(), MetaValue::I32(matrix.len() as i32)));
    if let Some(chunks) = matrix.chunks.filter(|&n| n > 0) {
        keys.push(("quantize.imatrix.chunks_count".into(), MetaValue::I32(chunks as i32)));
    }
    keys
}

/// A tensor of the file: its GGUF name, shape in PyTorch order (outermost first) and type.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: GgmlType,
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, value: &MetaValue) {
    let array = |out: &mut Vec<u8>, kind: u32, len: usize| {
        out.extend_from_slice(&9u32.to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&(len as u64).to_le_bytes());
    };
    match value {
        MetaValue::U32(v) => {
            out.extend_from_slice(&4u32.to_le_bytes());
            out.extend_from_slice(&v.to_le_bytes());
        }
        MetaValue::I32(v) => {
            out.extend_from_slice(&5u32.to_le_bytes());
            out.extend_from_slice(&v.to_le_bytes());
        }
        MetaValue::F32(v) => {
            out.extend_from_slice(&6u32.to_le_bytes());
            out.extend_from_slice(&v.to_le_bytes());
        }
        MetaValue::Bool(v) => {
            out.extend_from_slice(&7u32.to_le_bytes());
            out.push(u8::from(*v));
        }
        MetaValue::Str(s) => {
            out.extend_from_slice(&8u32.to_le_bytes());
            put_string(out, s);
        }
        MetaValue::Strs(items) => {
            array(out, 8, items.len());
            items.iter().for_each(|s| put_string(out, s));
        }
        MetaValue::F32s(items) => {
            array(out, 6, items.len());
            items.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        }
        MetaValue::I32s(items) => {
            array(out, 5, items.len());
            items.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        }
    }
}

/// Writes a GGUF file: `metadata`, then each tensor of `tensors` with the f32 values `data(i)`
/// returns for it (row-major, PyTorch order), encoded in its type.
pub fn write(
    path: &Path,
    metadata: &[(String, MetaValue)],
    tensors: &[TensorSpec],
    importance: Option<&ImportanceMatrix>,
    mut data: impl FnMut(usize) -> Result<Vec<f32>, LoadError>,
) -> Result<(), LoadError> {
    let mut header = Vec::new();
    header.extend_from_slice(b"GGUF");
    header.extend_from_slice(&3u32.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut header, key);
        put_value(&mut header, value);
    }
    let padded = |n: usize| n.div_ceil(ALIGNMENT) * ALIGNMENT;
    let mut offset = 0;
    for t in tensors {
        put_string(&mut header, &t.name);
        header.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        // ggml lists dimensions innermost first.
        t.shape.iter().rev().for_each(|&d| header.extend_from_slice(&(d as u64).to_le_bytes()));
        header.extend_from_slice(&t.ty.id().to_le_bytes());
        header.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += padded(t.ty.bytes(t.shape.iter().product()));
    }
    header.resize(padded(header.len()), 0);
    crate::files::write_file_streaming(
        path,
        |file| {
            file.write_all(&header).map_err(|e| LoadError::write(path, e))?;
            for (i, t) in tensors.iter().enumerate() {
                let values = data(i)?;
                debug_assert_eq!(values.len(), t.shape.iter().product::<usize>(), "{}", t.name);
                let columns = t.shape.last().copied().unwrap_or(1);
                let importance = match importance {
                    Some(matrix) if t.ty.quantized() && t.shape.len() > 1 => matrix.for_tensor(&t.name, columns)?,
                    _ => None,
                };
                let mut bytes = encode(t.ty, &values, importance);
                bytes.resize(padded(bytes.len()), 0);
                file.write_all(&bytes).map_err(|e| LoadError::write(path, e))?;
            }
            Ok(())
        },
        LoadError::write,
    )
}

/// The GGUF name of an HF tensor of a checkpoint laid out as `keys`
/// (`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`) and its projection role;
/// `None` for a tensor llama.cpp does not have.
pub fn tensor_name(keys: &KeyLayout, hf: &str, layers: usize) -> Option<(String, Option<Role>)> {
    // Only the layer the HF name's first number names is searched, so a name costs the same at
    // any depth.
    let layer = hf.split('.').find_map(|part| part.parse::<usize>().ok()).filter(|&i| i < layers);
    let candidates = ["token_embd.weight", "output_norm.weight", "output.weight"].into_iter().map(str::to_string).chain(layer.into_iter().flat_map(|i| {
        ["attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm", "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
            .into_iter()
            .flat_map(move |m| ["weight", "bias"].into_iter().map(move |s| format!("blk.{i}.{m}.{s}")))
    }));
    candidates.into_iter().find_map(|gguf| {
        let (name, role) = crate::gguf::hf_name(keys, &gguf)?;
        (name == hf).then_some((gguf, role))
    })
}

/// HF's `rotate_half` q/k rows in llama.cpp's interleaved order (the inverse of import's
/// un-permute): HF row `h·2d + j·d + i` goes to GGUF row `h·2d + 2i + j`.
pub fn permute_rows(values: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let half = rows / heads / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = h * 2 * half + j * half + i;
                let dst = h * 2 * half + 2 * i + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&values[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Whether ember writes `config` as a GGUF llama.cpp runs as transformers does: only the YaRN
/// llama.cpp computes (it truncates the correction range and takes the default betas 32 and 1,
/// whatever the file says). The error names the config key.
pub fn check_exportable(config: &ModelConfig) -> Result<(), (&'static str, String)> {
    if config.hidden_act != MlpActivation::Silu {
        return Err(("hidden_act", "an MLP with GELU: llama.cpp's llama, qwen2 and GLM architectures compute SiLU there".into()));
    }
    check_rope(config).map_err(|reason| ("rope_scaling", reason))
}

fn check_rope(config: &ModelConfig) -> Result<(), String> {
    if let Some(RopeScaling::Dynamic { .. } | RopeScaling::LongRope { .. }) = config.rope.scaling {
        return Err("dynamic NTK or LongRoPE: llama.cpp's llama architecture has neither, so the exported model would not run as this one".into());
    }
    if let Some(RopeScaling::Yarn { beta_fast, beta_slow, truncate, .. }) = config.rope.scaling {
        let default = |beta: Option<f64>, value: f64| beta.is_none_or(|b| b == 0.0 || b == value);
        if !truncate || !default(beta_fast, 32.0) || !default(beta_slow, 1.0) {
            return Err("YaRN with truncate false or betas other than 32 and 1: llama.cpp computes its YaRN with those defaults, so the exported model would not run as this one".into());
        }
    }
    Ok(())
}

/// The context the GGUF declares. llama.cpp's llama and qwen2 have no sliding window: up to the
/// window's length they attend as transformers does, beyond it to keys the window would drop, so
/// a windowed model declares the window as its context (Mistral-7B-v0.1: 4,096, not 32,768).
fn context_length(config: &ModelConfig) -> usize {
    config.sliding_window.as_ref().map_or(config.max_position_embeddings, |window| window.size.min(config.max_position_embeddings))
}

/// llama.cpp's hyperparameters of a model of `arch`.
pub fn hyperparameters(config: &ModelConfig, arch: GgufArch, name: &str, file_type: ExportType) -> Vec<(String, MetaValue)> {
    let key = |k: &str| format!("{}.{k}", arch.name());
    let mut meta = vec![
        ("general.architecture".into(), MetaValue::Str(arch.name().into())),
        ("general.name".into(), MetaValue::Str(name.into())),
        ("general.file_type".into(), MetaValue::U32(file_type.file_type())),
        (key("vocab_size"), MetaValue::U32(config.vocab_size as u32)),
        (key("context_length"), MetaValue::U32(context_length(config) as u32)),
        (key("embedding_length"), MetaValue::U32(config.hidden_size as u32)),
        (key("feed_forward_length"), MetaValue::U32(config.intermediate_size as u32)),
        (key("block_count"), MetaValue::U32(config.num_layers as u32)),
        (key("attention.head_count"), MetaValue::U32(config.num_heads as u32)),
        (key("attention.head_count_kv"), MetaValue::U32(config.num_kv_heads as u32)),
        (key("attention.key_length"), MetaValue::U32(config.head_dim as u32)),
        (key("attention.value_length"), MetaValue::U32(config.head_dim as u32)),
        (key("attention.layer_norm_rms_epsilon"), MetaValue::F32(config.rms_norm_eps as f32)),
        (key("rope.freq_base"), MetaValue::F32(config.rope.theta as f32)),
        (key("rope.dimension_count"), MetaValue::U32(config.rope.rotary_dim as u32)),
    ];
    // llama3 scaling goes out as the `rope_freqs` tensor ([`RopeScaling::llama3_divisors`]), as
    // llama.cpp's converter writes it.
    match config.rope.scaling {
        Some(RopeScaling::Linear { factor }) => {
            meta.push((key("rope.scaling.type"), MetaValue::Str("linear".into())));
            meta.push((key("rope.scaling.factor"), MetaValue::F32(factor as f32)));
        }
        Some(ref yarn @ RopeScaling::Yarn { factor, original_max_position_embeddings, .. }) => {
            meta.push((key("rope.scaling.type"), MetaValue::Str("yarn".into())));
            meta.push((key("rope.scaling.factor"), MetaValue::F32(factor as f32)));
            meta.push((key("rope.scaling.original_context_length"), MetaValue::U32(original_max_position_embeddings as u32)));
            // llama.cpp scales cos/sin by 0.1·ln(factor) + 1 itself, then by `attn_factor`.
            let extra = yarn.attention_scaling() / RopeScaling::yarn_default_attention(factor);
            if extra != 1.0 {
                meta.push((key("rope.scaling.attn_factor"), MetaValue::F32(extra as f32)));
            }
        }
        _ => {}
    }
    if file_type.quantized() {
        meta.push(("general.quantization_version".into(), MetaValue::U32(2)));
    }
    meta
}

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// The tokenizer of the model folder `dir` as llama.cpp's `tokenizer.*` keys, padded to
/// `vocab_size` ids: SentencePiece from `tokenizer.model` (`llama`, pieces, scores and types as
/// the file has them), byte-level BPE from `tokenizer.json` (`gpt2`, with merges and the
/// pre-tokenizer llama.cpp recognises), or a SentencePiece-style `tokenizer.json` (`llama`,
/// scores from the merge ranks, which order merges as HF's BPE does).
///
/// `pre` names llama.cpp's pre-tokenizer for a byte-level BPE whose check hash it does not know.
/// A GLM-family model (`arch` `chatglm`, `glm4`) ends a turn at `<|user|>`, llama.cpp's end of turn.
/// `chat_template` replaces the folder's own (the template an adapter was trained with).
pub fn tokenizer_metadata(dir: &Path, arch: GgufArch, vocab_size: usize, pre: Option<&str>, chat_template: Option<&str>) -> Result<Vec<(String, MetaValue)>, LoadError> {
    let invalid = |path: &Path, reason: String| LoadError::Invalid { path: path.to_path_buf(), reason };
    let json_path = dir.join("tokenizer.json");
    let model_path = dir.join("tokenizer.model");
    // Without tokenizer.json, tokenizer.model converted once: the tokenizer, and the
    // tokenizer.json it stands for (THUDM's ChatGLM specials after the SentencePiece pieces, or
    // GLM-4's tiktoken ranks as byte-level BPE).
    let (tokenizer, converted) = if !json_path.exists() && model_path.is_file() {
        let (tokenizer, json, flavour) = Tokenizer::from_model(dir).map_err(|e| invalid(dir, e.to_string()))?;
        (tokenizer, Some((json, flavour)))
    } else {
        (Tokenizer::from_dir(dir).map_err(|e| invalid(dir, e.to_string()))?, None)
    };
    // GLM-4's tiktoken file named tokenizer.model is not a SentencePiece model.
    let proto = std::fs::read(&model_path).ok().and_then(|bytes| ModelProto::parse(&bytes).ok());
    let flavour = converted.as_ref().map(|(_, flavour)| *flavour);
    let json: Option<Value> = match converted {
        Some((json, _)) => Some(json),
        None => match std::fs::read_to_string(&json_path) {
            Ok(text) => Some(serde_json::from_str(&text).map_err(|e| LoadError::json(&json_path, e))?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(LoadError::io(&json_path, e)),
        },
    };
    let (model, mut tokens, mut scores, mut types, merges, pre): (&str, Vec<String>, Vec<f32>, Vec<i32>, Option<Vec<String>>, Option<String>) =
        // A SentencePiece model (as llama.cpp's converter, preferred to tokenizer.json: its scores
        // are the real ones).
        if let Some(proto) = &proto {
            let kind = |k: PieceType| match k {
                PieceType::Normal => NORMAL,
                PieceType::Unknown => UNKNOWN,
                PieceType::Control => CONTROL,
                PieceType::UserDefined => USER_DEFINED,
                PieceType::Unused => UNUSED,
                PieceType::Byte => BYTE,
            };
            let tokens = proto.pieces.iter().map(|p| p.text.clone()).collect();
            ("llama", tokens, proto.pieces.iter().map(|p| p.score).collect(), proto.pieces.iter().map(|p| kind(p.kind)).collect(), None, None)
        } else {
            let Some(json) = &json else {
                return Err(invalid(dir, "no tokenizer.json, and no SentencePiece tokenizer.model: llama.cpp's GGUF takes BPE or SentencePiece".into()));
            };
            let bpe = &json["model"];
            if bpe["type"] != "BPE" {
                return Err(invalid(&json_path, format!("a {} tokenizer; llama.cpp's GGUF takes BPE or SentencePiece", bpe["type"])));
            }
            let vocab = bpe["vocab"].as_object().ok_or_else(|| invalid(&json_path, "no model.vocab".into()))?;
            let mut tokens = vec![String::new(); vocab.len()];
            for (token, id) in vocab {
                let id = id.as_u64().map(|i| i as usize).filter(|&i| i < tokens.len()).ok_or_else(|| invalid(&json_path, format!("token {token:?} has an id outside the vocabulary")))?;
                tokens[id] = token.clone();
            }
            let merges: Vec<String> = bpe["merges"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| m.as_str().map(str::to_string).or_else(|| Some(format!("{} {}", m[0].as_str()?, m[1].as_str()?))))
                .collect();
            let byte_level = json["pre_tokenizer"].to_string().contains("ByteLevel") || json["decoder"].to_string().contains("ByteLevel");
            if byte_level {
                let types = vec![NORMAL; tokens.len()];
                let pre = match pre {
                    Some(name) => name.to_string(),
                    None => pre_tokenizer(&tokenizer).map_err(|e| invalid(&json_path, format!("{e}; name one with --pre (default, gpt-2, llama-bpe, …)")))?,
                };
                ("gpt2", tokens, Vec::new(), types, Some(merges), Some(pre))
            } else {
                // SentencePiece-style BPE: a merged piece scores minus the rank of its merge.
                let mut scores = vec![0f32; tokens.len()];
                let ids: std::collections::HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
                for (rank, merge) in merges.iter().enumerate() {
                    if let Some(&id) = ids.get(merge.replacen(' ', "", 1).as_str())
                        && scores[id] == 0.0
                    {
                        scores[id] = -(rank as f32) - 1.0;
                    }
                }
                let types = tokens
                    .iter()
                    .map(|t| if t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') { BYTE } else { NORMAL })
                    .collect();
                ("llama", tokens, scores, types, None, None)
            }
        };
    // Added tokens beyond the model's vocabulary, and the types of those within it.
    if let Some(json) = &json {
        for added in json["added_tokens"].as_array().into_iter().flatten() {
            let (Some(id), Some(content)) = (added["id"].as_u64().map(|i| i as usize), added["content"].as_str()) else { continue };
            // A converted tokenizer.model's pieces keep the types the model gives them.
            if flavour.is_some() && id < tokens.len() {
                continue;
            }
            if id >= tokens.len() {
                tokens.resize(id + 1, String::new());
                types.resize(id + 1, UNUSED);
                if !scores.is_empty() {
                    scores.resize(id + 1, 0.0);
                }
            }
            tokens[id] = content.to_string();
            types[id] = if added["special"] == Value::Bool(true) { CONTROL } else { USER_DEFINED };
        }
    }
    if tokens.len() > vocab_size {
        return Err(invalid(dir, format!("the tokenizer has {} ids, the model's embedding {vocab_size} rows", tokens.len())));
    }
    // The embedding may have more rows than the tokenizer has ids: llama.cpp wants one token each.
    for id in tokens.len()..vocab_size {
        tokens.push(format!("[PAD{id}]"));
        types.push(UNUSED);
        if !scores.is_empty() {
            scores.push(0.0);
        }
    }
    // What llama.cpp's converter writes for THUDM's tokenizers (`conversion/chatglm.py`).
    let mut pre = pre;
    if matches!(flavour, Some(Flavour::ChatGlm2 | Flavour::ChatGlm3)) {
        for (id, name) in ["<unk>", "<bos>", "<eos>"].into_iter().enumerate() {
            tokens[id] = name.into();
        }
        pre = Some("chatglm-spm".into());
    }
    let mut meta = vec![("tokenizer.ggml.model".to_string(), MetaValue::Str(model.into()))];
    if let Some(pre) = pre {
        meta.push(("tokenizer.ggml.pre".into(), MetaValue::Str(pre)));
    }
    meta.push(("tokenizer.ggml.tokens".into(), MetaValue::Strs(tokens)));
    if !scores.is_empty() {
        meta.push(("tokenizer.ggml.scores".into(), MetaValue::F32s(scores)));
    }
    meta.push(("tokenizer.ggml.token_type".into(), MetaValue::I32s(types)));
    if let Some(merges) = merges {
        meta.push(("tokenizer.ggml.merges".into(), MetaValue::Strs(merges)));
    }
    for (key, id) in [("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id), ("padding", tokenizer.pad_id)] {
        if let Some(id) = id {
            meta.push((format!("tokenizer.ggml.{key}_token_id"), MetaValue::U32(id)));
        }
    }
    if matches!(arch, GgufArch::ChatGlm | GgufArch::Glm4)
        && let Some(user) = tokenizer.token_to_id("<|user|>")
    {
        meta.push(("tokenizer.ggml.eot_token_id".into(), MetaValue::U32(user)));
    }
    // GLM-4's tiktoken ranks have no unknown token: llama.cpp's converter names its end of text.
    let unknown = if flavour == Some(Flavour::Glm4) { "<|endoftext|>" } else { "<unk>" };
    if let Some(unk) = tokenizer.token_to_id(unknown) {
        meta.push(("tokenizer.ggml.unknown_token_id".into(), MetaValue::U32(unk)));
    }
    meta.push(("tokenizer.ggml.add_bos_token".into(), MetaValue::Bool(tokenizer.adds_bos())));
    meta.push(("tokenizer.ggml.add_eos_token".into(), MetaValue::Bool(false)));
    let config = std::fs::read_to_string(dir.join("tokenizer_config.json")).ok().and_then(|t| serde_json::from_str::<Value>(&t).ok());
    if let Some(template) = chat_template.or_else(|| config.as_ref().and_then(|c| c["chat_template"].as_str())) {
        meta.push(("tokenizer.chat_template".into(), MetaValue::Str(template.into())));
    }
    Ok(meta)
}

/// llama.cpp's name for the tokenizer's pre-tokenizer, found as its converter does: by the
/// hash of the ids of a check text.
fn pre_tokenizer(tokenizer: &Tokenizer) -> Result<String, String> {
    let ids = tokenizer.encode(crate::gguf_pre::CHECK_TEXT, true).map_err(|e| e.to_string())?;
    let listed = format!("[{}]", ids.iter().map(u32::to_string).collect::<Vec<_>>().join(", "));
    let hash: String = sha2::Sha256::digest(listed.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    crate::gguf_pre::PRE_TOKENIZERS
        .iter()
        .find(|(h, _)| *h == hash)
        .map(|(_, name)| name.to_string())
        .ok_or_else(|| format!("llama.cpp does not know this byte-level pre-tokenizer (check hash {hash}); it would fall back to GPT-2's"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_inverts_the_import() {
        let (rows, cols, heads) = (8, 3, 2);
        let values: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let permuted = permute_rows(&values, rows, cols, heads);
        assert_ne!(permuted, values);
        assert_eq!(crate::gguf::unpermute_rows(&permuted, rows, cols, heads), values);
    }

    #[test]
    fn vectors_stay_f32_and_odd_rows_f16() {
        assert_eq!(GgmlType::Q4_0.for_shape(&[64]), GgmlType::F32);
        assert_eq!(GgmlType::Q4_0.for_shape(&[64, 48]), GgmlType::F16);
        assert_eq!(GgmlType::Q8_0.for_shape(&[64, 64]), GgmlType::Q8_0);
        // K-quants fall back as llama-quantize does: Q4_K to Q5_0, Q6_K to Q8_0, then F16.
        assert_eq!(GgmlType::Q4_K.for_shape(&[64, 576]), GgmlType::Q5_0);
        assert_eq!(GgmlType::Q6_K.for_shape(&[64, 576]), GgmlType::Q8_0);
        assert_eq!(GgmlType::Q4_K.for_shape(&[64, 176]), GgmlType::F16);
        assert_eq!(GgmlType::Q4_K.for_shape(&[64, 1536]), GgmlType::Q4_K);
    }

    #[test]
    fn q4_k_m_gives_the_output_and_llama_cpps_layers_more_bits() {
        let model = |tied| QuantizeModel { layers: 32, tied, seventy_b: false, gqa: 1, importance: false };
        let ty = |name: &str, cols: usize, tied: bool| ExportType::Q4_K_M.tensor_type(name, &[1024, cols], model(tied));
        // 32 layers: the first 4, the last 4 and every third from layer 6 (4 + 2).
        let more: Vec<usize> = (0..32).filter(|&i| ty(&format!("blk.{i}.attn_v.weight"), 4096, false) == GgmlType::Q6_K).collect();
        assert_eq!(more, [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]);
        assert_eq!(ty("blk.6.ffn_down.weight", 2880, false), GgmlType::Q8_0, "rows of 2,880: Q6_K falls back");
        assert_eq!(ty("blk.6.ffn_down.weight", 14336, false), GgmlType::Q6_K);
        assert_eq!(ty("blk.7.ffn_down.weight", 14336, false), GgmlType::Q4_K);
        assert_eq!(ty("blk.6.attn_q.weight", 4096, false), GgmlType::Q4_K);
        assert_eq!(ty("output.weight", 4096, false), GgmlType::Q6_K);
        assert_eq!(ty("token_embd.weight", 4096, false), GgmlType::Q4_K);
        assert_eq!(ty("token_embd.weight", 4096, true), GgmlType::Q6_K, "a tied embedding is the output");
        assert_eq!(ty("token_embd.weight", 576, true), GgmlType::Q8_0);
        assert_eq!(ExportType::Q4_K_M.tensor_type("blk.0.attn_norm.weight", &[4096], model(false)), GgmlType::F32);
        assert_eq!(ExportType::parse("q4_k_m").unwrap().file_type(), 15);
        assert_eq!(ExportType::parse("q6_k").unwrap().file_type(), 18);
    }

    #[test]
    fn other_file_types_follow_llama_quantize_too() {
        let model = QuantizeModel { layers: 32, tied: false, seventy_b: false, gqa: 1, importance: false };
        let ty = |file: &str, name: &str, cols: usize| ExportType::parse(file).unwrap().tensor_type(name, &[1024, cols], model);
        // Q5_K_M: Q4_K_M's layers at Q6_K, Q5_K elsewhere, Q5_1 where rows are not whole blocks.
        assert_eq!(ty("q5_k_m", "blk.0.ffn_down.weight", 4096), GgmlType::Q6_K);
        assert_eq!(ty("q5_k_m", "blk.7.ffn_down.weight", 4096), GgmlType::Q5_K);
        assert_eq!(ty("q5_k_m", "blk.7.attn_q.weight", 576), GgmlType::Q5_1);
        // Q4_0 and Q8_0: no layer gets more bits; Q4_0's output is Q6_K, Q8_0's stays Q8_0.
        assert_eq!(ty("q4_0", "blk.0.attn_v.weight", 4096), GgmlType::Q4_0);
        assert_eq!(ty("q4_0", "output.weight", 4096), GgmlType::Q6_K);
        assert_eq!(ty("q4_0", "output.weight", 576), GgmlType::Q8_0);
        assert_eq!(ty("q8_0", "output.weight", 4096), GgmlType::Q8_0);
        assert_eq!(ty("f16", "output.weight", 4096), GgmlType::F16);
        assert_eq!(ty("q4_0", "output.weight", 48), GgmlType::F16);
        // Q4_K_S: Q5_K for attn_v in the first 4 layers and ffn_down in the first eighth.
        assert_eq!(ty("q4_k_s", "blk.3.attn_v.weight", 4096), GgmlType::Q5_K);
        assert_eq!(ty("q4_k_s", "blk.4.attn_v.weight", 4096), GgmlType::Q4_K);
        assert_eq!(ty("q4_k_s", "blk.3.ffn_down.weight", 11008), GgmlType::Q5_K);
        assert_eq!(ty("q4_k_s", "blk.4.ffn_down.weight", 11008), GgmlType::Q4_K);
        assert_eq!(ty("q5_k_s", "blk.0.attn_v.weight", 4096), GgmlType::Q5_K);
        assert_eq!(ty("q5_k_s", "output.weight", 4096), GgmlType::Q6_K);
        // Q3_K_M: Q3_K for q, k, gate, up; Q4_K for attn_output and most attn_v and ffn_down.
        assert_eq!(ty("q3_k_m", "blk.9.attn_q.weight", 4096), GgmlType::Q3_K);
        assert_eq!(ty("q3_k_m", "blk.9.attn_output.weight", 4096), GgmlType::Q4_K);
        assert_eq!(ty("q3_k_m", "blk.1.attn_v.weight", 4096), GgmlType::Q5_K);
        assert_eq!(ty("q3_k_m", "blk.2.attn_v.weight", 4096), GgmlType::Q4_K);
        assert_eq!(ty("q3_k_m", "blk.1.ffn_down.weight", 11008), GgmlType::Q5_K);
        assert_eq!(ty("q3_k_m", "blk.2.ffn_down.weight", 11008), GgmlType::Q4_K);
        assert_eq!(ty("q3_k_m", "blk.9.ffn_up.weight", 576), GgmlType::Q4_0);
        // Q4_1, Q5_0, Q5_1: their type throughout, Q6_K for the output; with an importance matrix
        // the first eighth's ffn_down goes from Q5_0 to Q5_1 (as from Q4_0 to Q4_1).
        assert_eq!(ty("q5_1", "blk.0.ffn_down.weight", 11008), GgmlType::Q5_1);
        assert_eq!(ty("q4_1", "output.weight", 4096), GgmlType::Q6_K);
        assert_eq!(ty("q5_0", "blk.0.ffn_down.weight", 11008), GgmlType::Q5_0);
        let weighted = QuantizeModel { importance: true, ..model };
        assert_eq!(ExportType::Q5_0.tensor_type("blk.3.ffn_down.weight", &[4096, 11008], weighted), GgmlType::Q5_1);
        assert_eq!(ExportType::Q5_0.tensor_type("blk.4.ffn_down.weight", &[4096, 11008], weighted), GgmlType::Q5_0);
        // The ternary types and Q2_0: Q4_K for the embedding, Q4_0 where rows are not whole blocks;
        // Q1_0 has no type to fall back to, and the export stops, as llama-quantize does.
        assert_eq!(ty("tq1_0", "token_embd.weight", 4096), GgmlType::Q4_K);
        assert_eq!(ty("tq2_0", "blk.0.attn_v.weight", 4096), GgmlType::TQ2_0);
        assert_eq!(ty("q2_0", "blk.0.attn_q.weight", 96), GgmlType::Q4_0);
        assert_eq!(ty("q2_0", "output.weight", 4096), GgmlType::Q6_K);
        assert_eq!(ty("q1_0", "token_embd.weight", 4096), GgmlType::Q1_0);
        let refused = ExportType::Q1_0.fitted_tensor_type("blk.0.attn_q.weight", &[576, 576], model).unwrap_err();
        assert!(refused.contains("blk.0.attn_q.weight") && refused.contains("576"), "{refused}");
        assert_eq!(ExportType::Q1_0.fitted_tensor_type("output.weight", &[1000, 576], model), Ok(GgmlType::Q8_0));
        // An output whose rows fit neither Q1_0 nor Q8_0 is F16 in llama-quantize, not an error.
        assert_eq!(ExportType::Q1_0.fitted_tensor_type("output.weight", &[1000, 48], model), Ok(GgmlType::F16));
        // A 70B's attn_v: Q5_K where the mixture would give it Q4_K.
        let seventy = QuantizeModel { layers: 80, tied: false, seventy_b: true, gqa: 8, importance: false };
        assert_eq!(ExportType::Q4_K_M.tensor_type("blk.11.attn_v.weight", &[1024, 8192], seventy), GgmlType::Q5_K);
        assert_eq!(ExportType::Q4_K_M.tensor_type("blk.12.attn_v.weight", &[1024, 8192], seventy), GgmlType::Q6_K);
        assert_eq!(ExportType::Q4_K_M.tensor_type("blk.11.attn_q.weight", &[8192, 8192], seventy), GgmlType::Q4_K);
        assert_eq!(ExportType::Q2_K.tensor_type("blk.11.attn_v.weight", &[1024, 8192], seventy), GgmlType::Q5_K);
    }

    #[test]
    fn two_and_three_bit_and_iq4_mixtures_follow_llama_quantize() {
        let grouped = |gqa| QuantizeModel { layers: 32, tied: false, seventy_b: false, gqa, importance: false };
        let ty = |file: &str, name: &str, cols: usize, gqa: usize| ExportType::parse(file).unwrap().tensor_type(name, &[1024, cols], grouped(gqa));
        // Q3_K_S: Q3_K everywhere but the output. Q3_K_L: Q5_K for attn_v, ffn_down, attn_output.
        for name in ["blk.0.attn_v.weight", "blk.0.ffn_down.weight", "blk.9.attn_output.weight", "blk.9.attn_q.weight"] {
            assert_eq!(ty("q3_k_s", name, 4096, 1), GgmlType::Q3_K, "{name}");
            let large = if name.contains("attn_q") { GgmlType::Q3_K } else { GgmlType::Q5_K };
            assert_eq!(ty("q3_k_l", name, 4096, 1), large, "{name}");
        }
        assert_eq!(ty("q3_k_s", "output.weight", 4096, 1), GgmlType::Q6_K);
        // Q2_K: Q3_K for ffn_down and attn_output, attn_v Q3_K or (4+ heads a KV head) Q4_K.
        assert_eq!(ty("q2_k", "blk.9.attn_q.weight", 4096, 1), GgmlType::Q2_K);
        assert_eq!(ty("q2_k", "blk.9.ffn_down.weight", 2880, 1), GgmlType::Q4_0, "Q3_K falls back");
        assert_eq!(ty("q2_k", "blk.9.ffn_down.weight", 14336, 1), GgmlType::Q3_K);
        assert_eq!(ty("q2_k", "blk.9.attn_output.weight", 4096, 1), GgmlType::Q3_K);
        assert_eq!(ty("q2_k", "blk.9.attn_v.weight", 4096, 3), GgmlType::Q3_K);
        assert_eq!(ty("q2_k", "blk.9.attn_v.weight", 4096, 4), GgmlType::Q4_K);
        assert_eq!(ty("q2_k", "blk.9.attn_q.weight", 576, 1), GgmlType::Q4_0);
        // IQ4_XS and IQ4_NL: Q5_K for ffn_down in the first eighth and for a grouped attn_v.
        for file in ["iq4_xs", "iq4_nl"] {
            assert_eq!(ty(file, "blk.3.ffn_down.weight", 14336, 1), GgmlType::Q5_K);
            assert_eq!(ty(file, "blk.9.attn_v.weight", 4096, 8), GgmlType::Q5_K);
            assert_eq!(ty(file, "output.weight", 4096, 1), GgmlType::Q6_K);
            assert_eq!(ty(file, "token_embd.weight", 4096, 1), ExportType::parse(file).unwrap().main_type());
        }
        assert_eq!(ty("iq4_xs", "blk.4.ffn_down.weight", 2880, 1), GgmlType::IQ4_NL, "rows of 2,880: not whole 256s");
        assert_eq!(ty("iq4_xs", "blk.9.attn_v.weight", 4096, 3), GgmlType::IQ4_XS);
        assert_eq!(ty("iq4_xs", "blk.9.attn_q.weight", 576, 1), GgmlType::IQ4_NL);
        assert_eq!(ty("iq4_nl", "blk.9.attn_q.weight", 48, 1), GgmlType::F16);
        assert_eq!(ty("iq4_nl", "output.weight", 576, 1), GgmlType::Q8_0);
        // With an importance matrix: no Q5_K for IQ4's first ffn_down; Q4_1 for Q4_0's.
        let with_importance = QuantizeModel { importance: true, ..grouped(1) };
        assert_eq!(ExportType::IQ4_XS.tensor_type("blk.3.ffn_down.weight", &[1024, 14336], with_importance), GgmlType::IQ4_XS);
        assert_eq!(ExportType::Q4_0.tensor_type("blk.3.ffn_down.weight", &[1024, 14336], with_importance), GgmlType::Q4_1);
        assert_eq!(ExportType::Q4_0.tensor_type("blk.4.ffn_down.weight", &[1024, 14336], with_importance), GgmlType::Q4_0);
        assert_eq!(ExportType::Q4_0.tensor_type("blk.3.ffn_down.weight", &[1024, 14336], grouped(1)), GgmlType::Q4_0);
        // Q2_K_S: Q2_K but Q4_K for a grouped attn_v and the first eighth's ffn_down.
        assert_eq!(ty("q2_k_s", "blk.9.attn_v.weight", 4096, 3), GgmlType::Q2_K);
        assert_eq!(ty("q2_k_s", "blk.9.attn_v.weight", 4096, 4), GgmlType::Q4_K);
        assert_eq!(ty("q2_k_s", "blk.3.ffn_down.weight", 14336, 1), GgmlType::Q4_K);
        assert_eq!(ty("q2_k_s", "blk.4.ffn_down.weight", 14336, 1), GgmlType::Q2_K);
        assert_eq!(ty("q2_k_s", "blk.4.attn_output.weight", 4096, 1), GgmlType::Q2_K);
        assert!(ExportType::Q2_K_S.needs_importance("blk.4.attn_q.weight", GgmlType::Q2_K));
        assert!(!ExportType::Q2_K_S.needs_importance("token_embd.weight", GgmlType::Q2_K));
        assert!(!ExportType::Q2_K_S.needs_importance("blk.4.attn_q.weight", GgmlType::Q4_0));
        assert!(!ExportType::Q2_K.needs_importance("blk.4.attn_q.weight", GgmlType::Q2_K));
        let file_types: Vec<u32> = ["q2_k", "q3_k_s", "q3_k_l", "iq4_nl", "iq4_xs", "q2_k_s"].iter().map(|t| ExportType::parse(t).unwrap().file_type()).collect();
        assert_eq!(file_types, [10, 11, 13, 25, 30, 21]);
    }

    /// The IQ3 and IQ2 mixtures, as llama-quantize's `llama_tensor_get_type` (32 layers).
    #[test]
    fn lattice_mixtures_follow_llama_quantize() {
        let model = |gqa, importance, tied| QuantizeModel { layers: 32, tied, seventy_b: false, gqa, importance };
        let ty = |file: &str, name: &str, cols: usize, gqa: usize| ExportType::parse(file).unwrap().tensor_type(name, &[1024, cols], model(gqa, true, false));
        // Main types: IQ3_S for iq3_s/iq3_m/iq3_xs, IQ2_XS for iq2_s, IQ2_S for iq2_m.
        for (file, main) in [("iq3_s", GgmlType::IQ3_S), ("iq3_m", GgmlType::IQ3_S), ("iq3_xs", GgmlType::IQ3_S), ("iq3_xxs", GgmlType::IQ3_XXS),
            ("iq2_m", GgmlType::IQ2_S), ("iq2_s", GgmlType::IQ2_XS), ("iq2_xs", GgmlType::IQ2_XS), ("iq2_xxs", GgmlType::IQ2_XXS)] {
            assert_eq!(ty(file, "blk.1.ffn_gate.weight", 4096, 1), main, "{file}");
            assert_eq!(ty(file, "blk.9.attn_q.weight", 576, 1), GgmlType::IQ4_NL, "{file}: rows of 576 are not whole 256s");
        }
        // The output: Q5_K for the 2-bit types and iq3_xxs, Q6_K for the others.
        for (file, output) in [("iq3_s", GgmlType::Q6_K), ("iq3_m", GgmlType::Q6_K), ("iq3_xxs", GgmlType::Q5_K), ("iq2_xxs", GgmlType::Q5_K), ("iq2_m", GgmlType::Q5_K)] {
            assert_eq!(ty(file, "output.weight", 4096, 1), output, "{file}");
            let tied = ExportType::parse(file).unwrap().tensor_type("token_embd.weight", &[1024, 4096], model(1, true, true));
            assert_eq!(tied, output, "{file}: a tied embedding is the output");
        }
        // An untied embedding: Q2_K (iq2_xxs, iq2_xs), IQ3_S (iq2_s, iq2_m, iq3_xxs), else the main type.
        for (file, embedding) in [("iq2_xxs", GgmlType::Q2_K), ("iq2_xs", GgmlType::Q2_K), ("iq2_s", GgmlType::IQ3_S), ("iq2_m", GgmlType::IQ3_S), ("iq3_xxs", GgmlType::IQ3_S), ("iq3_m", GgmlType::IQ3_S)] {
            assert_eq!(ty(file, "token_embd.weight", 4096, 1), embedding, "{file}");
        }
        // 2-bit: attn_v Q4_K when grouped, else IQ3_S (iq2_s, iq2_m) or Q2_K; the first eighth's
        // ffn_down likewise; attn_output IQ3_S for iq2_s and iq2_m.
        assert_eq!(ty("iq2_xxs", "blk.9.attn_v.weight", 4096, 4), GgmlType::Q4_K);
        assert_eq!(ty("iq2_xxs", "blk.9.attn_v.weight", 4096, 1), GgmlType::Q2_K);
        assert_eq!(ty("iq2_m", "blk.9.attn_v.weight", 4096, 1), GgmlType::IQ3_S);
        assert_eq!(ty("iq2_xs", "blk.3.ffn_down.weight", 4096, 1), GgmlType::Q2_K);
        assert_eq!(ty("iq2_s", "blk.3.ffn_down.weight", 4096, 1), GgmlType::IQ3_S);
        assert_eq!(ty("iq2_s", "blk.4.ffn_down.weight", 4096, 1), GgmlType::IQ2_XS);
        assert_eq!(ty("iq2_s", "blk.9.attn_output.weight", 4096, 1), GgmlType::IQ3_S);
        assert_eq!(ty("iq2_xxs", "blk.9.attn_output.weight", 4096, 1), GgmlType::IQ2_XXS);
        assert_eq!(ty("iq2_xxs", "blk.9.attn_k.weight", 4096, 1), GgmlType::IQ2_XXS);
        // iq3_xxs: IQ2_S for attn_q/attn_k, IQ3_S for attn_output; attn_v IQ3_XXS with a matrix,
        // IQ3_S without, Q4_K when grouped; without a matrix ffn_down Q4_K/Q3_K.
        assert_eq!(ty("iq3_xxs", "blk.9.attn_q.weight", 4096, 1), GgmlType::IQ2_S);
        assert_eq!(ty("iq3_xxs", "blk.9.attn_k.weight", 4096, 1), GgmlType::IQ2_S);
        assert_eq!(ty("iq3_xxs", "blk.9.attn_output.weight", 4096, 1), GgmlType::IQ3_S);
        assert_eq!(ty("iq3_xxs", "blk.9.attn_v.weight", 4096, 1), GgmlType::IQ3_XXS);
        assert_eq!(ty("iq3_xxs", "blk.9.attn_v.weight", 4096, 4), GgmlType::Q4_K);
        let plain = |name: &str| ExportType::IQ3_XXS.tensor_type(name, &[1024, 4096], model(1, false, false));
        assert_eq!(plain("blk.9.attn_v.weight"), GgmlType::IQ3_S);
        assert_eq!(plain("blk.3.ffn_down.weight"), GgmlType::Q4_K);
        assert_eq!(plain("blk.4.ffn_down.weight"), GgmlType::Q3_K);
        assert_eq!(ty("iq3_xxs", "blk.4.ffn_down.weight", 4096, 1), GgmlType::IQ3_XXS);
        // iq3_xs: IQ3_XXS for attn_q/attn_k and the middle layers' ffn_gate/ffn_up.
        assert_eq!(ty("iq3_xs", "blk.9.attn_k.weight", 4096, 1), GgmlType::IQ3_XXS);
        assert_eq!(ty("iq3_xs", "blk.4.ffn_up.weight", 4096, 1), GgmlType::IQ3_XXS);
        assert_eq!(ty("iq3_xs", "blk.3.ffn_up.weight", 4096, 1), GgmlType::IQ3_S);
        assert_eq!(ty("iq3_xs", "blk.28.ffn_gate.weight", 4096, 1), GgmlType::IQ3_S);
        assert_eq!(ty("iq3_xs", "blk.9.attn_v.weight", 4096, 4), GgmlType::Q4_K);
        // iq3_m: Q4_K for attn_v, attn_output and the first eighth's ffn_down.
        assert_eq!(ty("iq3_m", "blk.9.attn_v.weight", 4096, 1), GgmlType::Q4_K);
        assert_eq!(ty("iq3_m", "blk.9.attn_output.weight", 4096, 1), GgmlType::Q4_K);
        assert_eq!(ty("iq3_m", "blk.3.ffn_down.weight", 4096, 1), GgmlType::Q4_K);
        assert_eq!(ty("iq3_m", "blk.4.ffn_down.weight", 4096, 1), GgmlType::IQ3_S);
        // What needs a matrix: the 2-bit lattice tensors and IQ3_XXS, not the embedding or output.
        assert!(ExportType::IQ3_M.needs_importance("blk.4.attn_q.weight", GgmlType::IQ2_S));
        assert!(!ExportType::IQ3_M.needs_importance("blk.4.attn_q.weight", GgmlType::IQ3_S));
        assert!(!ExportType::IQ2_XXS.needs_importance("output.weight", GgmlType::IQ2_XXS));
        let required: Vec<&str> = ExportType::BY_NAME.iter().filter(|(_, t)| t.requires_importance()).map(|(name, _)| *name).collect();
        assert_eq!(required, ["q2_k_s", "iq3_xs", "iq3_xxs", "iq2_m", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s"]);
        let file_types: Vec<u32> = ["iq3_m", "iq3_s", "iq3_xs", "iq3_xxs", "iq2_m", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s"].iter().map(|t| ExportType::parse(t).unwrap().file_type()).collect();
        assert_eq!(file_types, [27, 26, 22, 23, 29, 28, 20, 19, 31, 24]);
        // 1-bit: as the 2-bit types, with IQ2_XXS for attn_output.
        assert_eq!(ty("iq1_s", "blk.9.attn_output.weight", 4096, 1), GgmlType::IQ2_XXS);
        assert_eq!(ty("iq1_m", "blk.9.attn_q.weight", 4096, 1), GgmlType::IQ1_M);
        assert_eq!(ty("iq1_m", "blk.3.ffn_down.weight", 4096, 1), GgmlType::Q2_K);
        assert_eq!(ty("iq1_s", "token_embd.weight", 4096, 1), GgmlType::Q2_K);
        assert_eq!(ty("iq1_s", "output.weight", 4096, 1), GgmlType::Q5_K);
    }
}
