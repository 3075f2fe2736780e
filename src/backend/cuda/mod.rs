//! The CUDA backend (cudarc, loaded at run time).
