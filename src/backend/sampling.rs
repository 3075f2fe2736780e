//! Sampling math shared by the engine and the backends' device-side fast path.
