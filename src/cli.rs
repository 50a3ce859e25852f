//! What each subcommand does.

use anyhow::Context;

use crate::config::{Cli, Command, KeysCommand, LogFormat};
use crate::startup::{Application, open_storage};
use crate::telemetry;

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let config = args.validate()?;
            telemetry::init(config.log_format);
            let application = Application::build(config).await?;
            application.run_until_stopped(shutdown_signal()).await
        }
        Command::Migrate(args) => {
            let config = args.validate()?;
            telemetry::init(LogFormat::Text);
            open_storage(&config).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Keys(KeysCommand::Generate) => {
            let (_, encoded) = domain::keys::MasterKey::generate();
            println!("{}", encoded.as_str());
            Ok(())
        }
        Command::Keys(KeysCommand::Rotate(args)) => {
            let config = args.validate()?;
            telemetry::init(LogFormat::Text);
            let (_, vault) = open_storage(&config).await?;
            let report = vault
                .rotate(500, |n| {
                    if n % 1000 == 0 {
                        eprintln!("re-wrapped {n} data keys");
                    }
                })
                .await
                .context("key rotation stopped; run it again to resume")?;
            println!(
                "re-wrapped {} data keys under master key {}",
                report.rewrapped,
                vault.active_key_id()
            );
            Ok(())
        }
    }
}

/// Completes on ctrl-c or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down");
}
