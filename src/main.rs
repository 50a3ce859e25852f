use std::process::ExitCode;

use clap::Parser;
use grantline::config::Cli;

#[tokio::main]
async fn main() -> ExitCode {
    match grantline::cli::run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("grantline: {error:#}");
            ExitCode::FAILURE
        }
    }
}
