//! Model description and files: config, weights (safetensors, compressed-tensors FP8, dummy),
//! tokenizer and chat template.

pub mod chat_template;
pub mod config;
pub mod dummy;
pub mod loader;
pub mod source;
pub mod tokenizer;
pub mod weights;

pub use chat_template::ChatMessage;
pub use config::LlamaConfig;
pub use dummy::{tensor_specs, DummyInit, TensorSpec};
pub use loader::{load_weights, LoadFormat};
pub use source::ModelFiles;
pub use tokenizer::Tokenizer;
pub use weights::{LayerWeights, Linear, LlamaWeights};
