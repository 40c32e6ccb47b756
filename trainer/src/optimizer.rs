//! AdamW over all trainable parameters at once, as torch's `foreach` AdamW does on a GPU.
//!
//! burn's `AdamW` updates one parameter at a time: some fifteen tensor operations each, so 6,700
//! kernel launches a step for a 7B model with LoRA on every linear layer (448 tensors), where the
//! forward and backward passes issue about as many. Here the gradients are gathered into one flat
//! vector (one `cat`), the update runs once over it, and each parameter becomes a view of the
//! result. The arithmetic is burn's (and torch's) AdamW, operation for operation, so the updated
//! values are bit-identical to burn's per-tensor `AdamW`.

use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{DType, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

/// AdamW's hyperparameters and moments, the moments flat in the order the trainable parameters
/// are visited.
#[derive(Clone)]
pub struct AdamW {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
    /// Parameters the weight decay leaves alone.
    undecayed: Vec<ParamId>,
    /// Parameters whose learning rate is a multiple of the schedule's (LoRA+).
    lr_scales: Vec<(ParamId, f64)>,
    /// `lr_scales` laid out as the moments, made at the first update.
    lr_scale_vector: Option<Tensor<1>>,
    moments: Option<Moments>,
}

#[derive(Clone)]
struct Moments {
    /// Completed updates (torch's `step`), for the bias corrections.
    time: i32,
    first: Tensor<1>,
    second: Tensor<1>,
    /// Each trainable parameter's id and length, in order: the moments' layout.
    layout: Vec<(ParamId, usize)>,
}

/// Every trainable parameter's gradient in one vector, in the moments' order; a parameter
/// without a gradient (not reached by the loss) contributes zeros.
pub struct FlatGradients(Tensor<1>);

impl FlatGradients {
    /// Global L2 norm: one read from the device.
    pub fn norm(&self) -> f64 {
        self.0.clone().square().sum().cast(DType::F64).into_scalar::<f64>().sqrt()
    }

    /// Scales every gradient by `factor` (clipping).
    pub fn scale(self, factor: f64) -> Self {
        Self(self.0.mul_scalar(factor))
    }
}

/// The trainable parameters' ids and values (inner backend, no autodiff, flattened), in visit
/// order: the moments' layout and what the update reads.
fn trainable<M: Module>(model: &M) -> Vec<(ParamId, Tensor<1>)> {
    struct Trainable(Vec<(ParamId, Tensor<1>)>);
    impl ModuleVisitor for Trainable {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let value = param.val();
            if value.is_require_grad() {
                let n = value.shape().num_elements();
                self.0.push((param.id, value.inner().reshape([n])));
            }
        }
    }
    let mut visitor = Trainable(Vec::new());
    model.visit(&mut visitor);
    visitor.0
}

/// Each trainable parameter's id and length.
fn layout(trainable: &[(ParamId, Tensor<1>)]) -> Vec<(ParamId, usize)> {
    trainable.iter().map(|(id, value)| (*id, value.dims()[0])).collect()
}

impl AdamW {
    pub fn new(beta_1: f32, beta_2: f32, epsilon: f32, weight_decay: f32) -> Self {
        Self { beta_1, beta_2, epsilon, weight_decay, undecayed: Vec::new(), lr_scales: Vec::new(), lr_scale_vector: None, moments: None }
    }

    /// The optimizer with `undecayed` left out of the weight decay (transformers' `Trainer`
    /// leaves out every parameter named `bias`).
    pub fn without_decay(self, undecayed: Vec<ParamId>) -> Self {
        Self { undecayed, ..self }
    }

    /// The optimizer with each parameter of `lr_scales` at that multiple of the learning rate,
    /// in its update and its weight decay (torch's parameter groups of other `lr`).
    pub fn with_lr_scales(self, lr_scales: Vec<(ParamId, f64)>) -> Self {
        Self { lr_scales, lr_scale_vector: None, ..self }
    }

    fn lr_scale(&self, id: &ParamId) -> f64 {
        self.lr_scales.iter().find(|(p, _)| p == id).map_or(1.0, |(_, scale)| *scale)
    }

    /// torch's `AdamW` defaults: betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
    pub fn torch_defaults() -> Self {
        Self::new(0.9, 0.999, 1e-8, 0.01)
    }

    /// `grads` gathered into one vector on the parameters' (inner) device.
    pub fn gather<M: Module>(model: &M, mut grads: GradientsParams) -> FlatGradients {
        struct Gather<'a>(&'a mut GradientsParams, Vec<Tensor<1>>);
        impl ModuleVisitor for Gather<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let value = param.val();
                if !value.is_require_grad() {
                    return;
                }
                let n = value.shape().num_elements();
                let grad = match self.0.remove::<D>(param.id) {
                    Some(grad) => grad.reshape([n]),
                    None => Tensor::zeros([n], &value.inner().device()),
                };
                self.1.push(grad);
            }
        }
        let mut gather = Gather(&mut grads, Vec::new());
        model.visit(&mut gather);
        FlatGradients(Tensor::cat(gather.1, 0))
    }

    /// One AdamW update of every trainable parameter of `model` with learning rate `lr`.
    pub fn step<M: Module>(&mut self, lr: f64, model: M, grads: FlatGradients) -> M {
        let grad = grads.0;
        let (b1, b2) = (self.beta_1, self.beta_2);
        let (ids_and_lengths, values): (Vec<_>, Vec<_>) = {
            let trainable = trainable(&model);
            (layout(&trainable), trainable.into_iter().map(|(_, value)| value).collect())
        };
        let moments = match self.moments.take() {
            Some(m) => {
                debug_assert!(m.layout == ids_and_lengths, "the trainable parameters changed between steps");
                Moments {
                    time: m.time + 1,
                    first: m.first.mul_scalar(b1).add(grad.clone().mul_scalar(1.0 - b1)),
                    second: m.second.mul_scalar(b2).add(grad.square().mul_scalar(1.0 - b2)),
                    layout: m.layout,
                }
            }
            None => Moments {
                time: 1,
                first: grad.clone().mul_scalar(1.0 - b1),
                second: grad.square().mul_scalar(1.0 - b2),
                layout: ids_and_lengths,
            },
        };
        // burn's AdaptiveMomentumW and AdamW::step, in their order (bit-identical results).
        let first = moments.first.clone().div_scalar(1f32 - b1.powi(moments.time));
        let second = moments.second.clone().div_scalar(1f32 - b2.powi(moments.time));
        let delta = first.div(second.sqrt().add_scalar(self.epsilon));
        let decay = lr * self.weight_decay as f64;
        let params = if decay == 0.0 {
            Tensor::cat(values, 0)
        } else if self.undecayed.is_empty() && self.lr_scales.is_empty() {
            Tensor::cat(values, 0).mul_scalar(1.0 - decay)
        } else {
            let decayed = |(value, (id, _)): (Tensor<1>, &(ParamId, usize))| match self.undecayed.contains(id) {
                true => value,
                false => value.mul_scalar(1.0 - decay * self.lr_scale(id)),
            };
            Tensor::cat(values.into_iter().zip(&moments.layout).map(decayed).collect(), 0)
        };
        let updated = if self.lr_scales.is_empty() {
            params - delta.mul_scalar(lr)
        } else {
            let scales = match &self.lr_scale_vector {
                Some(scales) => scales.clone(),
                None => {
                    let values: Vec<f32> = moments.layout.iter().flat_map(|(id, n)| std::iter::repeat_n(self.lr_scale(id) as f32, *n)).collect();
                    let len = values.len();
                    let scales = Tensor::<1>::from_data(TensorData::new(values, [len]), &delta.device());
                    self.lr_scale_vector = Some(scales.clone());
                    scales
                }
            };
            params - delta.mul(scales).mul_scalar(lr)
        };
        self.moments = Some(moments);
        model.map(&mut Scatter { flat: updated, offset: 0 })
    }

    /// The moments as safetensors (`exp_avg`, `exp_avg_sq`, f32, flat) with the step count and
    /// the parameter layout in the metadata.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let Some(m) = &self.moments else {
            return ember_models::write_safetensors_with(path, Vec::<(&str, TensorView)>::new(), metadata(0, &[]));
        };
        let bytes = |t: &Tensor<1>| t.clone().into_data().as_bytes().to_vec();
        let (first, second) = (bytes(&m.first), bytes(&m.second));
        let len = first.len() / 4;
        let views = [
            ("exp_avg", TensorView::new(Dtype::F32, vec![len], &first).expect("f32 bytes match shape")),
            ("exp_avg_sq", TensorView::new(Dtype::F32, vec![len], &second).expect("f32 bytes match shape")),
        ];
        ember_models::write_safetensors_with(path, views, metadata(m.time, &m.layout))
    }

    /// Puts the moments `save` wrote into this optimizer, on the device of `model`'s trainable
    /// parameters, checked against them (ids and lengths, as restored from the same checkpoint).
    pub fn load<M: Module>(&mut self, path: &Path, model: &M) -> Result<(), String> {
        let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| e.to_string())?;
        let meta = header.metadata().clone().unwrap_or_default();
        let field = |key: &str| meta.get(key).ok_or_else(|| format!("no `{key}` in the metadata"));
        let time: i32 = field("step")?.parse().map_err(|e| format!("`step`: {e}"))?;
        if time == 0 {
            self.moments = None;
            return Ok(());
        }
        let trainable = trainable(model);
        let expected = layout(&trainable);
        if *field("params")? != layout_text(&expected) {
            return Err("the optimizer state does not fit the recipe's adapter (other parameters or shapes)".into());
        }
        let Some((_, first)) = trainable.first() else { return Err("the recipe's adapter has no trainable parameters".into()) };
        let device = first.device();
        let file = SafeTensors::deserialize(&bytes).map_err(|e| e.to_string())?;
        let len: usize = expected.iter().map(|(_, n)| n).sum();
        let moment = |name: &str| -> Result<Tensor<1>, String> {
            let view = file.tensor(name).map_err(|e| format!("`{name}`: {e}"))?;
            if view.dtype() != Dtype::F32 || view.shape() != [len] {
                return Err(format!("`{name}` is {:?} {:?}, expected F32 [{len}]", view.dtype(), view.shape()));
            }
            let values = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect::<Vec<_>>();
            Ok(Tensor::from_data(TensorData::new(values, [len]), &device))
        };
        self.moments = Some(Moments { time, first: moment("exp_avg")?, second: moment("exp_avg_sq")?, layout: expected });
        Ok(())
    }
}

fn layout_text(layout: &[(ParamId, usize)]) -> String {
    serde_json::to_string(&layout.iter().map(|(id, n)| (id.to_string(), *n)).collect::<Vec<_>>()).expect("strings and numbers")
}

fn metadata(time: i32, layout: &[(ParamId, usize)]) -> std::collections::HashMap<String, String> {
    [("step".to_string(), time.to_string()), ("params".to_string(), layout_text(layout))].into()
}

/// Replaces each trainable parameter with its slice of `flat`, keeping its id and autodiff
/// settings (as burn's optimizers do).
struct Scatter {
    flat: Tensor<1>,
    offset: usize,
}

impl ModuleMapper for Scatter {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, value, mapper) = param.consume();
        if !value.is_require_grad() {
            return Param::from_mapped_value(id, value, mapper);
        }
        let shape = value.shape();
        let n = shape.num_elements();
        let updated = self.flat.clone().slice(self.offset..self.offset + n).reshape(shape);
        self.offset += n;
        let mut updated = Tensor::from_inner(updated);
        if let Some(strategy) = value.gradient_checkpointing_strategy() {
            updated = updated.with_gradient_checkpointing_strategy(strategy);
        }
        Param::from_mapped_value(id, updated.require_grad(), mapper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Module;
    use burn::nn::{Linear, LinearConfig};
    use burn::optim::{AdamWConfig, GradientsParams};
    use burn::tensor::Device;

    #[derive(Module, Debug)]
    struct Two {
        first: Linear,
        second: Linear,
        frozen: Linear,
    }

    fn model(device: &Device) -> Two {
        Two {
            first: LinearConfig::new(5, 3).init(device),
            second: LinearConfig::new(3, 4).with_bias(false).init(device),
            frozen: LinearConfig::new(4, 2).init(device).no_grad(),
        }
    }

    fn grads(model: &Two, step: usize, device: &Device) -> GradientsParams {
        let x = Tensor::<2>::from_data(TensorData::new((0..10).map(|i| ((i * 7 + step * 3) % 11) as f32 / 5.0 - 1.0).collect(), [2, 5]), device);
        let y = model.frozen.forward(model.second.forward(model.first.forward(x).tanh()));
        GradientsParams::from_grads(y.powi_scalar(2).sum().backward(), model)
    }

    fn values(model: &Two) -> Vec<Vec<f32>> {
        let mut all = vec![model.first.weight.val(), model.second.weight.val(), model.frozen.weight.val()];
        all.push(model.first.bias.as_ref().unwrap().val().unsqueeze());
        all.into_iter().map(|t| t.into_data().try_into_vec::<f32>().unwrap()).collect()
    }

    /// Five steps equal burn's per-tensor AdamW bit for bit, frozen weights untouched; a second
    /// optimizer loaded from the first's file continues identically.
    #[test]
    fn equals_burns_adamw_and_resumes() {
        let device = Device::default().autodiff();
        // Params are initialized lazily: read them before cloning so that both copies hold the same.
        let mut ours = model(&device);
        let frozen = values(&ours)[2].clone();
        let mut theirs = ours.clone();
        let mut flat = AdamW::new(0.9, 0.95, 1e-6, 0.1);
        let mut reference = AdamWConfig::new().with_beta_2(0.95).with_epsilon(1e-6).with_weight_decay(0.1).init();
        let dir = std::env::temp_dir().join(format!("ember-adamw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("optimizer.safetensors");
        let mut resumed = None;
        for step in 0..5 {
            let lr = 1e-2 / (step + 1) as f64;
            ours = flat.step(lr, ours.clone(), AdamW::gather(&ours, grads(&ours, step, &device)));
            theirs = reference.step(lr, theirs.clone(), grads(&theirs, step, &device));
            assert_eq!(values(&ours), values(&theirs), "step {step}");
            if step == 2 {
                flat.save(&file).unwrap();
                let mut loaded = AdamW::new(0.9, 0.95, 1e-6, 0.1);
                loaded.load(&file, &ours).unwrap();
                resumed = Some((loaded, ours.clone()));
            }
        }
        assert_eq!(values(&ours)[2], frozen);
        let (mut loaded, mut again) = resumed.unwrap();
        for step in 3..5 {
            again = loaded.step(1e-2 / (step + 1) as f64, again.clone(), AdamW::gather(&again, grads(&again, step, &device)));
        }
        assert_eq!(values(&again), values(&ours));
        // Another adapter's parameters: refused.
        let other = model(&device);
        let err = AdamW::torch_defaults().load(&file, &other).unwrap_err();
        assert!(err.contains("does not fit"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A parameter left out of the weight decay steps as with no decay; the others as with it.
    #[test]
    fn undecayed_parameters_step_without_the_decay() {
        let device = Device::default().autodiff();
        let start = model(&device);
        let _ = values(&start);
        let step = |optimizer: &mut AdamW| {
            let m = start.clone();
            let g = AdamW::gather(&m, grads(&m, 0, &device));
            values(&optimizer.step(1e-2, m, g))
        };
        let bias = start.first.bias.as_ref().unwrap().id;
        let mixed = step(&mut AdamW::new(0.9, 0.95, 1e-6, 0.1).without_decay(vec![bias]));
        let decayed = step(&mut AdamW::new(0.9, 0.95, 1e-6, 0.1));
        let undecayed = step(&mut AdamW::new(0.9, 0.95, 1e-6, 0.0));
        assert_eq!(mixed[..3], decayed[..3]);
        assert_eq!(mixed[3], undecayed[3]);
        assert_ne!(decayed[3], undecayed[3]);
    }

    /// A parameter at a multiple of the learning rate steps as with that rate, its decay too;
    /// the others exactly as without multiples.
    #[test]
    fn scaled_parameters_step_at_their_own_rate() {
        let device = Device::default().autodiff();
        let start = model(&device);
        let _ = values(&start);
        let step = |optimizer: &mut AdamW, lr: f64| {
            let m = start.clone();
            let g = AdamW::gather(&m, grads(&m, 0, &device));
            values(&optimizer.step(lr, m, g))
        };
        let bias = start.first.bias.as_ref().unwrap().id;
        let scaled = step(&mut AdamW::new(0.9, 0.95, 1e-6, 0.1).with_lr_scales(vec![(bias, 4.0)]), 1e-2);
        let plain = step(&mut AdamW::new(0.9, 0.95, 1e-6, 0.1), 1e-2);
        let faster = step(&mut AdamW::new(0.9, 0.95, 1e-6, 0.1), 4e-2);
        assert_eq!(scaled[..3], plain[..3]);
        assert!(scaled[3].iter().zip(&faster[3]).all(|(a, b)| (a - b).abs() <= 1e-6 * b.abs().max(1e-3)), "{:?} vs {:?}", scaled[3], faster[3]);
        assert_ne!(scaled[3], plain[3]);
    }

    /// Norm and scaling of the gathered gradients.
    #[test]
    fn norm_of_the_gathered_gradients() {
        let device = Device::default().autodiff();
        let m = model(&device);
        let g = grads(&m, 0, &device);
        let vec = |t: Tensor<2>| t.into_data().try_into_vec::<f32>().unwrap();
        let mut all = vec(g.get::<2>(m.first.weight.id).unwrap());
        all.extend(g.get::<1>(m.first.bias.as_ref().unwrap().id).unwrap().into_data().try_into_vec::<f32>().unwrap());
        all.extend(vec(g.get::<2>(m.second.weight.id).unwrap()));
        let separate = all.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        let flat = AdamW::gather(&m, g);
        assert!((flat.norm() - separate).abs() < 1e-6 * separate, "{} vs {separate}", flat.norm());
        assert!((flat.scale(0.5).norm() - separate / 2.0).abs() < 1e-6 * separate);
    }
}
