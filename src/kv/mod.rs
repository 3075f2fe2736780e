//! (filled in by its issue)

pub mod transfer;
