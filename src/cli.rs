//! What each subcommand does.

use anyhow::Context;
use domain::connection::ConnectionKey;

use crate::config::{
    Cli, Command, EventsCommand, KeysCommand, LogCommand, LogFormat, ProjectionsCommand,
};
use crate::startup::{Application, WhileDown, open_storage, sole_server};
use crate::telemetry;

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let config = args.validate()?;
            telemetry::init(config.log_format);
            let mut shutdown = Box::pin(shutdown_signal());
            let _sole = tokio::select! {
                held = sole_server(&config.database.url) => held?,
                () = &mut shutdown => return Ok(()),
            };
            let application = tokio::select! {
                built = Application::build(config) => built?,
                () = &mut shutdown => return Ok(()),
            };
            application.run_until_stopped(shutdown).await
        }
        Command::Migrate(args) => {
            let config = args.validate()?;
            telemetry::init(LogFormat::Text);
            tokio::select! {
                opened = open_storage(&config, WhileDown::Wait) => opened?,
                () = shutdown_signal() => anyhow::bail!("stopped before the migrations finished"),
            };
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
            telemetry::init_tool();
            let (backend, _) = open_storage(&config, WhileDown::Fail).await?;
            let statuses = projections::Runner::new(&backend).status().await?;
            println!(
                "{:<14} {:>22} {:>12} {:>10}  last error",
                "projection", "checkpoint", "head", "lag"
            );
            for s in statuses {
                // The lag is counted up to a cap: past it, the true lag is larger.
                let lag = if usize::try_from(s.lag).is_ok_and(|lag| lag >= projections::LAG_CAP) {
                    format!("{}+", s.lag)
                } else {
                    s.lag.to_string()
                };
                println!(
                    "{:<14} {:>22} {:>12} {:>10}  {}",
                    s.name,
                    s.checkpoint,
                    s.head_position,
                    lag,
                    s.last_error.unwrap_or_else(|| "-".into())
                );
            }
            Ok(())
        }
        Command::Projections(ProjectionsCommand::Rebuild { name, database }) => {
            let config = database.validate()?;
            telemetry::init_tool();
            let (backend, _) = open_storage(&config, WhileDown::Fail).await?;
            let started = std::time::Instant::now();
            let bar = progress(format!("events replayed into {name}"));
            let replayed = projections::Runner::new(&backend)
                .rebuild(&name, |n| bar.set_position(n))
                .await;
            bar.finish_and_clear();
            let replayed = replayed?;
            println!(
                "rebuilt {name} from {replayed} events in {:.1}s",
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Keys(KeysCommand::Rotate(args)) => {
            let config = args.validate()?;
            telemetry::init_tool();
            let (_, vault) = open_storage(&config, WhileDown::Fail).await?;
            let bar = progress("data keys re-wrapped".to_owned());
            let report = vault.rotate(500, |n| bar.set_position(n)).await;
            bar.finish_and_clear();
            let report = report.context("key rotation stopped; run it again to resume")?;
            println!(
                "re-wrapped {} data keys under master key {}",
                report.rewrapped,
                vault.active_key_id()
            );
            Ok(())
        }
        Command::History(args) => {
            let config = args.database.validate()?;
            telemetry::init_tool();
            let (backend, _) = open_storage(&config, WhileDown::Fail).await?;
            let key = ConnectionKey::new(&args.provider_config_key, &args.connection_id);
            let entries = crate::history::load(&backend, &key).await?;
            let compaction = crate::history::compaction(&backend, &key).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
                if let Some(record) = &compaction {
                    eprintln!("{}", crate::history::compaction_line(record));
                }
            } else {
                if let Some(record) = &compaction {
                    println!("{}", crate::history::compaction_line(record));
                }
                print!("{}", crate::history::table(&entries));
            }
            Ok(())
        }
        Command::Events(EventsCommand::Tail {
            from_start,
            json,
            database,
        }) => {
            let config = database.validate()?;
            telemetry::init_tool();
            let shutdown = shutdown_signal();
            let (backend, _) = open_storage(&config, WhileDown::Fail).await?;
            let mut out = std::io::stdout();
            crate::history::follow(&backend, from_start, json, &mut out, shutdown).await
        }
        Command::Log(LogCommand::Compact {
            retention,
            database,
        }) => {
            let retention = retention.validate()?;
            let config = database.validate()?;
            telemetry::init_tool();
            let (backend, _) = open_storage(&config, WhileDown::Fail).await?;
            let compactor = workers::compactor::Compactor::new(backend, retention);
            let bar = progress("events past retention looked at".to_owned());
            let report = compactor
                .pass(chrono::Utc::now(), |r| bar.set_position(r.events_read))
                .await;
            bar.finish_and_clear();
            let report = report.context("the pass stopped; what it removed so far stays")?;
            println!(
                "looked at {} events past retention; removed {} events from {} connections: \
                 {} routine refresh cycles and {} lifecycle events",
                report.events_read,
                report.events_removed,
                report.streams,
                report.routine_cycles,
                report.lifecycle_events
            );
            if report.held_back {
                println!(
                    "stopped at the checkpoint of a webhook target that is behind (named above): \
                     the rest stays until it has delivered it"
                );
            }
            Ok(())
        }
        Command::Import(args) => {
            let config = args.database.validate()?;
            telemetry::init_tool();
            let (backend, vault) = open_storage(&config, WhileDown::Fail).await?;
            crate::import::run(&args, backend, vault).await
        }
    }
}

/// A spinner on stderr with the running count and rate; indicatif draws nothing when stderr is
/// not a terminal, and the caller's summary line goes to stdout either way.
pub(crate) fn progress(message: String) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{spinner} {human_pos} {msg} ({rate}, {elapsed})")
    {
        bar.set_style(style.with_key(
            "rate",
            |state: &indicatif::ProgressState, out: &mut dyn std::fmt::Write| {
                let _ = write!(out, "{:.0}/s", state.per_sec());
            },
        ));
    }
    bar.set_message(message);
    bar.enable_steady_tick(std::time::Duration::from_millis(100));
    bar
}

/// Completes on ctrl-c or SIGTERM. The handlers are installed when this is called, not when the
/// future is first polled, so a signal that arrives during start-up is not lost: start-up
/// (opening and migrating the database, which may wait on a database that never answers) is
/// raced against it.
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
