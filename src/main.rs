use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use grantline::config::Cli;

/// mimalloc in place of glibc's allocator: with glibc, a buffer freed on another worker thread than
/// the one that allocated it waited for that arena's lock (`_int_free`), which lengthened the
/// slowest proxied calls (README, "Benchmarks").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let outcome = grantline::cli::run(Cli::parse()).await;
    // The database sessions of the stores dropped on the way out end with a goodbye, not
    // with the runtime.
    domain::store::sessions_ended(Duration::from_secs(3)).await;
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("grantline: {error:#}");
            ExitCode::FAILURE
        }
    }
}
