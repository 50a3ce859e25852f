//! What each subcommand does.

use anyhow::Context;

use crate::config::{Cli, Command, KeysCommand, LogFormat, ProjectionsCommand};
use crate::startup::{Application, open_storage};
use crate::telemetry;

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let config = args.validate()?;
            telemetry::init(config.log_format);
            let shutdown = shutdown_signal();
            let application = Application::build(config).await?;
            application.run_until_stopped(shutdown).await
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
        Command::Projections(ProjectionsCommand::Status(args)) => {
            let config = args.validate()?;
            telemetry::init(LogFormat::Text);
            let (backend, _) = open_storage(&config).await?;
            let statuses = projections::Runner::new(backend).status().await?;
            println!(
                "{:<14} {:>22} {:>12} {:>10}  last error",
                "projection", "checkpoint", "head", "lag"
            );
            for s in statuses {
                println!(
                    "{:<14} {:>22} {:>12} {:>10}  {}",
                    s.name,
                    s.checkpoint,
                    s.head_position,
                    s.lag,
                    s.last_error.unwrap_or_else(|| "-".into())
                );
            }
            Ok(())
        }
        Command::Projections(ProjectionsCommand::Rebuild { name, database }) => {
            let config = database.validate()?;
            telemetry::init(LogFormat::Text);
            let (backend, _) = open_storage(&config).await?;
            let started = std::time::Instant::now();
            let mut last_report = std::time::Instant::now();
            let replayed = projections::Runner::new(backend)
                .rebuild(&name, |n| {
                    if last_report.elapsed().as_secs() >= 1 {
                        last_report = std::time::Instant::now();
                        let rate = n as f64 / started.elapsed().as_secs_f64().max(0.001);
                        eprintln!("{name}: {n} events replayed ({rate:.0}/s)");
                    }
                })
                .await?;
            println!(
                "rebuilt {name} from {replayed} events in {:.1}s",
                started.elapsed().as_secs_f64()
            );
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

/// Completes on ctrl-c or SIGTERM. The handlers are installed when this is called, not when the
/// future is first polled, so a signal that arrives during start-up is not lost.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let ctrl_c = tokio::signal::ctrl_c();
    async move {
        #[cfg(unix)]
        let terminate = async move {
            match terminate {
                Some(mut signal) => {
                    signal.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let terminate = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => {},
            () = terminate => {},
        }
        tracing::info!("shutting down");
    }
}
