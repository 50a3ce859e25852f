use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use grantline::config::Cli;

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
