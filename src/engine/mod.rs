//! The engine: sequences, scheduler, sampling, the step loop and its metrics.

pub mod types;
