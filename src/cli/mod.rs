//! One file per subcommand of the `tandem` binary; `common` holds the flags they share.

pub mod bench;
pub mod bench_gemm;
pub mod bench_step;
pub mod common;
pub mod demo;
pub mod frontend;
pub mod generate;
pub mod kernels;
pub mod mock_server;
pub mod pareto;
pub mod serve;
pub mod worker;
