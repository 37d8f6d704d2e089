//! The `sendbox` command: parses arguments, loads config, wires the crates
//! together and chooses the exit code. It holds no logic of its own beyond
//! that; each subcommand is a struct in [`commands`] with a `run` method.
//!
//! It must not grow protocol or sandbox code: that lives in
//! `sendbox-runtime` (plugins) and the crates after it in the data flow.

pub mod cli;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod exit;
pub mod metrics;

use std::process::ExitCode;

/// The daemon allocates and frees many small buffers per event (request,
/// instance, outcome, commit) on several threads; mimalloc's per-thread
/// heaps do that with less work and less contention than glibc's malloc
/// (built without transparent huge pages, which tripled idle memory).
/// Declared here so the binary, its benchmarks and its tests all measure
/// the same allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    cli::init_logging(&cli.global);
    match cli.command.run() {
        Ok(code) => code,
        Err(err) => {
            let code = exit::code_for(&err);
            if exit::is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            code
        }
    }
}
