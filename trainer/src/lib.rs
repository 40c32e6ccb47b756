//! Training side of ember: recipes, the loss, the training loop, export, merge and plots.

pub mod bench;
pub mod checkpoint;
pub mod error;
pub mod export;
pub mod fault;
pub mod imatrix;
pub mod interrupt;
pub mod loss;
pub mod memory;
pub mod merge;
pub mod optimizer;
pub mod plot;
pub mod recipe;
pub mod run_export;
pub mod run;
pub mod schedule;
pub mod step;
pub(crate) mod tensorboard;
pub mod train;

pub use recipe::Recipe;
pub use error::TrainError;
pub use run::{Event, StepReport, Summary};
pub use train::{Start, train};
