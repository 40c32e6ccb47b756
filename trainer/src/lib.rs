//! Training side of ember: the loss, the training loop, checkpoints, export and merge.

pub mod loss;
