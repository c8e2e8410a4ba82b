//! One integration-test binary; each module tests one stage against real RocksDB in
//! temporary directories, and `crash` drives the real binary with SIGKILL.

mod util;

mod analyze;
mod architecture;
mod cli;
mod compat;
mod conversation;
mod crash;
mod curriculum;
mod documents;
mod filters;
mod formats;
mod hub;
mod index;
mod ingest;
mod memory;
mod model;
mod neardup;
mod reader;
mod reference;
mod registry;
mod step;
mod templates;
mod tokens;
mod train;
mod values;
