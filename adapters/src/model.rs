//! The model a run trains or serves: the frozen base plus one method's parameters, either
//! inside the projections ([`AdaptedLinear`]) or feeding the decoder ([`ModelAdapter`]). This
//! file names no method: everything method-specific goes through the registry's seams.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::{Device, Int, Tensor, TensorData};
use ember_models::layers::Linear;
use ember_models::transformer::last_position;
use ember_models::{BaseModel, CausalLm, KvCache, LayerExtras, ModelConfig, Projection, TokenBatch, VocabModule};

use crate::registry::{ModelAdapter, ProjectionAdapter};
use crate::vocab::VocabBranches;

/// A base projection with an optional branch of a method. `name` is the HF module path, the
/// key under which PEFT saves the branch.
#[derive(Module, Debug)]
pub struct AdaptedLinear {
    pub base: Linear,
    pub branch: Option<ProjectionAdapter>,
    #[module(skip)]
    pub name: String,
    /// Whether the base's bias trains (PEFT's `bias`).
    #[module(skip)]
    pub bias_trains: bool,
}

impl AdaptedLinear {
    pub fn new(name: &str, base: Linear, branch: Option<ProjectionAdapter>) -> Self {
        Self { base, branch, name: name.to_owned(), bias_trains: false }
    }

    /// Makes the base's bias a trainable f32 parameter starting at `value`.
    pub fn train_bias(&mut self, value: Tensor<1>) {
        self.base.train_bias(value);
        self.bias_trains = true;
    }

    /// The trained bias, if the base's bias trains.
    pub fn trained_bias(&self) -> Option<&Param<Tensor<1>>> {
        self.base.bias.as_ref().filter(|_| self.bias_trains)
    }

    /// Whether the projection has a trainable part: a branch, or the base's bias.
    pub fn trains(&self) -> bool {
        self.branch.is_some() || self.bias_trains
    }

    /// The base with the branch folded in.
    pub fn merged(self) -> Linear {
        match self.branch {
            Some(branch) => branch.merged(self.base),
            None => self.base,
        }
    }
}

impl Projection for AdaptedLinear {
    /// # Shapes
    /// - x: `[batch, seq, in]`
    /// - output: `[batch, seq, out]`
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        match &self.branch {
            Some(branch) => branch.forward(&self.base, x),
            None => self.base.forward(x),
        }
    }

    fn surrogate(&self, x: Tensor<3>, grad: &Tensor<3>) -> Tensor<1> {
        match &self.branch {
            Some(branch) => branch.surrogate(&self.base, x, grad),
            None => self.base.surrogate(x, grad),
        }
    }
}

/// The decoder with adaptable projections.
pub type AdaptedDecoder = CausalLm<AdaptedLinear>;

#[derive(Module, Debug)]
pub struct AdaptedModel {
    /// The base; projections carry branches when the method adapts them.
    pub model: AdaptedDecoder,
    /// Parameters that feed the decoder (prefixes, prompts), when the method has them.
    pub inputs: Option<ModelAdapter>,
    /// Branches on the token embedding and the LM head (LoRA targeting them).
    pub vocab: Option<VocabBranches>,
}

impl AdaptedModel {
    /// The base alone, with no method's parameters.
    pub fn base_only(base: BaseModel) -> Self {
        Self::with_inputs(base, None)
    }

    /// The base with untouched projections and `inputs` feeding it.
    pub fn with_inputs(base: BaseModel, inputs: Option<ModelAdapter>) -> Self {
        Self { model: base.map_projections(|name, linear| AdaptedLinear::new(name, linear, None)), inputs, vocab: None }
    }

    /// The base with `branch(name, linear)` in every projection it returns one for. Errors
    /// when no projection got one.
    pub fn with_branches<E>(
        base: BaseModel,
        mut branch: impl FnMut(&str, &Linear) -> Result<Option<ProjectionAdapter>, E>,
        no_match: impl FnOnce() -> E,
    ) -> Result<Self, E> {
        let (mut matched, mut first_error) = (0, None);
        let model = base.map_projections(|name, linear| {
            let made = if first_error.is_some() { Ok(None) } else { branch(name, &linear) };
            match made {
                Ok(Some(b)) => {
                    matched += 1;
                    AdaptedLinear::new(name, linear, Some(b))
                }
                Ok(None) => AdaptedLinear::new(name, linear, None),
                Err(e) => {
                    first_error = Some(e);
                    AdaptedLinear::new(name, linear, None)
                }
            }
        });
        if let Some(e) = first_error {
            return Err(e);
        }
        if matched == 0 {
            return Err(no_match());
        }
        Ok(Self { model, inputs: None, vocab: None })
    }

    /// The model with `vocab`'s branches on its embedding and LM head.
    pub fn with_vocab_branches(self, vocab: VocabBranches) -> Self {
        Self { vocab: Some(vocab), ..self }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    /// The decoder inputs of method type `T` (a prefix encoder, adaption prompts…), if the
    /// model has them.
    pub fn inputs_of<T: crate::registry::InputsOf>(&self) -> Option<&T> {
        self.inputs.as_ref().and_then(T::of)
    }

    /// [`Self::inputs_of`], for a method that cannot do without them (saving its adapter).
    pub fn required_inputs<T: crate::registry::InputsOf>(&self) -> Result<&T, crate::AdapterError> {
        self.inputs_of().ok_or_else(|| {
            let name = std::any::type_name::<T>().rsplit("::").next().unwrap_or("decoder inputs");
            crate::AdapterError::Config(format!("the model holds no {name}"))
        })
    }

    /// Every projection that carries a branch, with its HF module name.
    pub fn branches(&self) -> Vec<(String, &ProjectionAdapter)> {
        self.model.projections().into_iter().filter_map(|(name, p)| p.branch.as_ref().map(|b| (name, b))).collect()
    }

    /// Per-layer prefix keys/values or adaption prompts for a batch (empty otherwise).
    pub fn extras(&self, batch: usize) -> Vec<LayerExtras> {
        self.inputs.as_ref().map(|i| i.inputs().extras(batch)).unwrap_or_default()
    }

    /// Prefix tuning's keys and values of every layer, computed once.
    pub fn prefix_keys_values(&self) -> Option<Tensor<4>> {
        self.inputs.as_ref().and_then(|i| i.inputs().prefix_keys_values())
    }

    /// Layer `i`'s entry of [`extras`](Self::extras), prefix keys/values read from
    /// `prefix_keys_values`.
    pub fn layer_extras(&self, batch: usize, i: usize, prefix_keys_values: Option<&Tensor<4>>) -> Option<LayerExtras> {
        self.inputs.as_ref().and_then(|inputs| inputs.inputs().layer_extras(batch, i, prefix_keys_values))
    }

    /// Keys every query sees before its own sequence's (prefix tuning).
    pub fn prefix_keys(&self) -> usize {
        self.inputs.as_ref().map_or(0, |i| i.inputs().prefix_keys())
    }

    /// Positions prepended to every sequence (prompt tuning).
    pub fn virtual_tokens(&self) -> usize {
        self.virtual_embeddings().map_or(0, |p| p.dims()[0])
    }

    fn virtual_embeddings(&self) -> Option<Tensor<2>> {
        self.inputs.as_ref().and_then(|i| i.inputs().virtual_embeddings())
    }

    /// The lowest decoder layer holding or receiving a trainable parameter: backward never
    /// needs to go below it.
    pub fn first_trainable_layer(&self) -> usize {
        if self.trains_embedding() {
            return 0;
        }
        match &self.inputs {
            Some(inputs) => inputs.inputs().first_trainable_layer(),
            None => self.model.layers.iter().position(|layer| layer.projections().iter().any(|p| p.trains())).unwrap_or(0),
        }
    }

    /// Token embeddings of a batch whose sequences each start with [`virtual_tokens`]
    /// placeholder positions: those take the prompt-tuning embeddings.
    ///
    /// # Shapes
    /// - output: `[batch, seq, hidden]` (padded) or `[1, Σ len, hidden]` (packed)
    pub fn embed(&self, tokens: &TokenBatch, device: &Device) -> Tensor<3> {
        let x = self.embed_ids(tokens.input_ids(device));
        let Some(prompt) = self.virtual_embeddings() else { return x };
        let [n, hidden] = prompt.dims();
        let prompt = prompt.cast(x.dtype()).unsqueeze_dim::<3>(0);
        let [rows, _, _] = x.dims();
        match tokens {
            TokenBatch::Padded { shape: [_, seq], .. } => {
                Tensor::cat(vec![prompt.expand([rows, n, hidden]), x.narrow(1, n, seq - n)], 1)
            }
            TokenBatch::Packed { lengths, .. } => {
                let (mut parts, mut offset) = (Vec::new(), 0);
                for &len in lengths {
                    parts.push(prompt.clone());
                    parts.push(x.clone().narrow(1, offset + n, len - n));
                    offset += len;
                }
                Tensor::cat(parts, 1)
            }
        }
    }

    /// `input_ids` and `attention_mask` with the virtual positions of prompt tuning prepended
    /// (placeholder id 0, mask 1), as PEFT extends them.
    fn with_virtual_positions(&self, input_ids: Tensor<2, Int>, attention_mask: Option<Tensor<2, Int>>) -> (TokenBatch, Option<Tensor<2, Int>>) {
        let [b, s] = input_ids.dims();
        let n = self.virtual_tokens();
        let ints = |t: Tensor<2, Int>| t.into_data().convert::<i64>().try_into_vec::<i64>().expect("integer ids and mask");
        let extend = |values: &[i64], fill: i64| ember_data::sft::prepend_to_rows(values, s, n, fill);
        let ids = extend(&ints(input_ids), 0);
        let mask = attention_mask.map(|m| extend(&ints(m), 1));
        let shape = [b, s + n];
        let device = self.model.embed_tokens.weight.device();
        let mask_tensor = mask.as_ref().map(|m| Tensor::from_data(TensorData::new(m.clone(), shape), &device));
        let attention_mask = mask.unwrap_or_else(|| vec![1; b * (s + n)]);
        (TokenBatch::Padded { shape, input_ids: ids, attention_mask }, mask_tensor)
    }

    /// Final-norm hidden states of every position, virtual ones (prompt tuning) first.
    ///
    /// # Shapes
    /// - input_ids, attention_mask: `[batch, seq]`
    /// - output: `[batch, virtual + seq, hidden]`
    pub fn hidden_states(&self, input_ids: Tensor<2, Int>, attention_mask: Option<Tensor<2, Int>>) -> Tensor<3> {
        let rows = input_ids.dims()[0];
        let device = input_ids.device();
        let (tokens, mask) = self.with_virtual_positions(input_ids, attention_mask);
        let x = self.embed(&tokens, &device);
        self.model.hidden_states_from(x, mask.as_ref(), None, &self.extras(rows))
    }

    /// Token embeddings, with the embedding's branch if it has one.
    ///
    /// # Shapes
    /// - ids: `[batch, seq]`
    /// - output: `[batch, seq, hidden]`
    fn embed_ids(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let x = self.model.embed(ids.clone());
        match &self.vocab {
            Some(vocab) => vocab.embed(x, ids, &self.model.embed_tokens.weight.val()),
            None => x,
        }
    }

    /// Logits of every position, virtual ones first, as PEFT returns them.
    ///
    /// # Shapes
    /// - input_ids, attention_mask: `[batch, seq]`
    /// - output: `[batch, virtual + seq, vocab]`
    pub fn forward(&self, input_ids: Tensor<2, Int>, attention_mask: Option<Tensor<2, Int>>) -> Tensor<3> {
        self.logits(self.hidden_states(input_ids, attention_mask))
    }

    /// The LM head, with its branch if it has one: `[batch, seq, hidden] -> [batch, seq, vocab]`.
    pub fn logits(&self, hidden: Tensor<3>) -> Tensor<3> {
        match &self.vocab {
            Some(vocab) => vocab.logits(self.model.logits(hidden.clone()), hidden, &self.model.embed_tokens.weight.val()),
            None => self.model.logits(hidden),
        }
    }

    /// Logits of the last of the new tokens, reading and extending `cache` (generation;
    /// [`CausalLm::next_token_logits`]). The virtual positions of prompt tuning go in front of
    /// the first call's tokens.
    pub fn next_token_logits(&self, input_ids: Tensor<2, Int>, cache: &mut KvCache) -> Tensor<3> {
        let rows = input_ids.dims()[0];
        let device = input_ids.device();
        let x = if cache.is_empty() {
            let (tokens, _) = self.with_virtual_positions(input_ids, None);
            self.embed(&tokens, &device)
        } else {
            self.embed_ids(input_ids)
        };
        let hidden = self.model.hidden_states_from(x, None, Some(cache), &self.extras(rows));
        self.logits(last_position(hidden))
    }

    /// Branches folded into the base weights (faster generation); other methods are kept, and so
    /// are the branches on the embedding and LM head: on a tied head, merging would change the
    /// embedding too.
    pub fn into_inference(self) -> Self {
        if self.branches().is_empty() {
            return self;
        }
        let base = self.model.map_projections(|_, p| p.merged());
        Self { vocab: self.vocab, ..Self::with_inputs(base, self.inputs) }
    }

    /// Whether the token embedding trains (in full, as PEFT's `modules_to_save`, through a
    /// branch, or some of its rows).
    pub fn trains_embedding(&self) -> bool {
        self.vocab.as_ref().is_some_and(|v| v.embedding.is_some() || v.tokens.is_some()) || self.model.vocab_weight(VocabModule::Embedding).is_some_and(|w| w.is_require_grad())
    }

    /// Parameters of the embedding and LM head when they train in full.
    fn whole_module_params(&self) -> usize {
        [VocabModule::Embedding, VocabModule::LmHead]
            .into_iter()
            .filter_map(|m| self.model.vocab_weight(m).filter(|w| w.is_require_grad()))
            .map(|w| w.shape().num_elements())
            .sum()
    }

    /// (trainable parameters, all parameters). Branches and decoder inputs hold only trainable
    /// parameters; the base only frozen ones, but for an embedding or LM head trained in full.
    /// The base counts from its config, so quantized weights (stored as bytes) count as values.
    pub fn parameter_counts(&self) -> (usize, usize) {
        let branches = self.branches().iter().map(|(_, b)| b.num_params()).sum::<usize>() + self.vocab.as_ref().map_or(0, Module::num_params);
        let inputs = self.inputs.as_ref().map_or(0, Module::num_params);
        let biases: usize = self.model.projections().iter().filter_map(|(_, p)| p.trained_bias()).map(Module::num_params).sum();
        (branches + inputs + biases + self.whole_module_params(), self.config().num_params() + branches + inputs)
    }

    /// Why saving would be pointless: the parameters still leave the base unchanged (every
    /// LoRA B or every gate zero — the known PEFT failure of saving an untrained adapter).
    pub fn unchanged_reason(&self) -> Option<&'static str> {
        if self.whole_module_params() > 0 {
            return None;
        }
        if let Some(inputs) = &self.inputs {
            return inputs.inputs().unchanged_reason();
        }
        let branches = self.branches();
        let vocab_unchanged = self.vocab.as_ref().is_none_or(VocabBranches::leaves_base_unchanged);
        (!(branches.is_empty() && self.vocab.is_none()) && vocab_unchanged && branches.iter().all(|(_, b)| b.leaves_base_unchanged()))
            .then_some("every branch still leaves its projection unchanged (LoRA B all zero, (IA)³ vectors all one)")
    }

    /// Ids of the parameters that take gradients (autodiff device).
    pub fn trainable_ids(&self) -> Vec<ParamId> {
        struct Trainable(Vec<ParamId>);
        impl ModuleVisitor for Trainable {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if param.val().is_require_grad() {
                    self.0.push(param.id);
                }
            }
        }
        let mut visitor = Trainable(Vec::new());
        self.visit(&mut visitor);
        visitor.0
    }
}
