//! What each subcommand does.

use std::io::{BufReader, Seek};

use anyhow::Context;
use domain::commands::Commands;
use domain::connection::ConnectionKey;
use domain::keys::Vault;
use domain::store::Backend;

use crate::config::{
    Cli, Command, EventsCommand, ImportArgs, KeysCommand, LogCommand, LogFormat, ProjectionsCommand,
};
use crate::import::{Importer, JsonLines};
use crate::startup::{Application, import_body, open_storage};
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
            telemetry::init_tool();
            let (backend, _) = open_storage(&config).await?;
            let statuses = projections::Runner::new(&backend).status().await?;
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
            telemetry::init_tool();
            let (backend, _) = open_storage(&config).await?;
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
            let (_, vault) = open_storage(&config).await?;
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
            let (backend, _) = open_storage(&config).await?;
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
            let (backend, _) = open_storage(&config).await?;
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
            let (backend, _) = open_storage(&config).await?;
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
            Ok(())
        }
        Command::Import(args) => {
            let config = args.database.validate()?;
            telemetry::init_tool();
            let (backend, vault) = open_storage(&config).await?;
            import(&args, backend, vault).await
        }
    }
}

/// `grantline import`: checks every line, then writes them in batches and brings the read
/// models up to date.
async fn import(args: &ImportArgs, backend: Backend, vault: Vault) -> anyhow::Result<()> {
    let runner = projections::Runner::new(&backend);
    // The integrations as the log has them now.
    runner.catch_up().await?;
    let read_models = projections::ReadModels::open(&backend);
    let integrations = projections::queries::list_integrations(&read_models).await?;
    let instance = format!("grantline-import-{}", uuid::Uuid::new_v4().simple());
    let commands = Commands::new(backend.clone(), vault).with_instance(instance);
    let importer = Importer::new(commands, integrations, import_body);
    let mut source = if args.file.as_os_str() == "-" {
        // Read twice: standard input is kept in an unnamed temporary file.
        let mut spool = tempfile::tempfile().context("cannot create a temporary file")?;
        std::io::copy(&mut std::io::stdin().lock(), &mut spool)
            .context("cannot read standard input")?;
        spool
    } else {
        std::fs::File::open(&args.file)
            .with_context(|| format!("cannot open {}", args.file.display()))?
    };
    source.rewind()?;
    let bar = progress("lines checked".to_owned());
    let checked = importer
        .check(&mut JsonLines::new(BufReader::new(&source)), |n| {
            bar.set_position(n);
        })
        .await;
    bar.finish_and_clear();
    let checked = checked.context("cannot read the file")?;
    if checked.bad_lines > 0 {
        for error in &checked.errors {
            eprintln!("{error}");
        }
        let unlisted = checked.bad_lines - checked.errors.len() as u64;
        if unlisted > 0 {
            eprintln!("… and {unlisted} more bad lines");
        }
        anyhow::bail!(
            "{} lines cannot be imported; nothing was written",
            checked.bad_lines
        );
    }
    println!("{} connections checked", checked.connections);
    if args.dry_run {
        println!("dry run: nothing written");
        return Ok(());
    }
    source.rewind()?;
    let started = std::time::Instant::now();
    let bar = progress_bar(checked.connections, "connections imported");
    let batch = usize::try_from(args.batch).unwrap_or(1000);
    let report = importer
        .write(
            &mut JsonLines::new(BufReader::new(&source)),
            batch,
            args.replace,
            |r| {
                bar.set_position(r.total());
            },
        )
        .await;
    bar.finish_and_clear();
    let report = report.context(
        "the import stopped; what was written stays, and running it again adds the rest",
    )?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "imported {} connections in {seconds:.1}s ({:.0}/s): {} created, {} kept, {} replaced",
        report.total(),
        report.total() as f64 / seconds.max(1e-9),
        report.created,
        report.kept,
        report.replaced,
    );
    let started = std::time::Instant::now();
    let bar = progress("events projected".to_owned());
    let projected = project_through_head(&runner, |n| bar.set_position(n)).await;
    bar.finish_and_clear();
    projected.context(
        "the connections are imported; the read models will catch up when the service runs",
    )?;
    println!(
        "read models up to date in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A spinner on stderr with the running count and rate; indicatif draws nothing when stderr is
/// not a terminal, and the caller's summary line goes to stdout either way.
fn progress(message: String) -> indicatif::ProgressBar {
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

/// Runs the projections until each has applied the log up to its head as of the call, also
/// while a running service's runner shares the work (a batch it applied first is not applied
/// twice); reports the events this process applied.
async fn project_through_head(
    runner: &projections::Runner,
    mut progress: impl FnMut(u64),
) -> anyhow::Result<()> {
    let head = runner
        .status()
        .await?
        .iter()
        .map(|s| s.head_position)
        .max()
        .unwrap_or(0);
    let mut applied = 0u64;
    loop {
        let n = runner.run_once().await?;
        applied += n as u64;
        progress(applied);
        if n > 0 {
            continue;
        }
        if runner
            .status()
            .await?
            .iter()
            .all(|s| s.checkpoint_position >= head)
        {
            return Ok(());
        }
        // Another runner holds the batch, or the log's readers wait for an older transaction.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A bar of `total` on stderr with the rate and the time left.
fn progress_bar(total: u64, message: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:30} {human_pos}/{human_len} {msg} ({per_sec}, {eta} left)",
    ) {
        bar.set_style(style);
    }
    bar.set_message(message.to_owned());
    bar.enable_steady_tick(std::time::Duration::from_millis(100));
    bar
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
