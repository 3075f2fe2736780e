//! The CPU reference backend on candle-core.
