//! Model description and files: config, weights (safetensors, compressed-tensors FP8, dummy),
//! tokenizer and chat template.

pub mod config;
pub mod weights;
