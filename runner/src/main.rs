//! The `runner` binary: command line, logging, configuration, and signals. Everything else is
//! in the library; errors are reported here with their whole chain.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use runner::config::{Config, Sources, DEFAULTS};
use std::path::PathBuf;
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

/// WebAssembly-sandboxed stream transform runner.
///
/// Hosts pipelines that read Kafka, run their business rules in a WASM component (see wit/)
/// and write their results exactly once to Kafka and PostgreSQL. The campaign pipeline consumes
/// promo campaigns, joins each with the restaurant's subscribers (kept in memory from
/// PostgreSQL), and writes one notification draft per subscriber to an output Kafka topic and
/// to the PostgreSQL table subscribers_feedback.
///
/// Configuration: built-in defaults (`runner config defaults` prints them, documented), then
/// the file given with --config, then environment variables RUNNER__SECTION__KEY, for example
/// RUNNER__KAFKA__BROKERS, RUNNER__POSTGRES__URL, RUNNER__KAFKA__SASL_PASSWORD,
/// RUNNER__PIPELINES__CAMPAIGNS__INPUT_TOPIC.
#[derive(Debug, Parser)]
#[command(name = "runner", version, verbatim_doc_comment)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax, e.g. "info" or "runner=debug"); RUST_LOG also works.
    #[arg(long, global = true, default_value = "info", env = "RUNNER_LOG")]
    log: String,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the enabled pipelines until SIGINT or SIGTERM (then drain, commit and exit 0).
    Run {
        /// Pipeline configuration (TOML). Without it: defaults plus environment overrides.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run the campaign pipeline once on embedded defaults: librdkafka's in-process mock
    /// cluster and a database of its own on the local PostgreSQL; print what reached every sink.
    Demo {
        /// The rules component to use.
        #[arg(long, default_value = "build/wasm/campaign-rules.wasm")]
        rules: PathBuf,
        /// Connection string of a PostgreSQL database where the demo may create its own.
        #[arg(
            long,
            env = "DEMO_ADMIN_URL",
            default_value = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
        )]
        admin_url: String,
        /// Name of the demo database (created; dropped and created anew on the next run only
        /// if the demo created it).
        #[arg(long, default_value = "campaign_demo")]
        database: String,
    },
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Rules component helpers.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the built-in defaults, with comments.
    Defaults,
    /// Load and validate a configuration; print the result or every problem found.
    Check {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum RulesCommand {
    /// Load a campaign rules component as the runner would (compile, link against the
    /// campaign-rules world, smoke-test with SPEC.md's example); exit non-zero with the reason
    /// if it would be refused.
    Check {
        /// The component (.wasm).
        file: PathBuf,
    },
}

fn init_logging(filter: &str, format: LogFormat) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .unwrap_or_else(|| filter.to_string());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Listens for SIGTERM and SIGINT from now on (registered before start-up, so a signal during
/// start-up is a clean stop too); the future resolves at the first one.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => tracing::info!("SIGINT received; draining."),
            _ = term.recv() => tracing::info!("SIGTERM received; draining."),
        }
    })
}

fn load_config(path: Option<&PathBuf>) -> Result<Config> {
    let sources = Sources {
        file: path.map(|p| p.as_path()),
        overlay: None,
        env: true,
    };
    Ok(Config::load(&sources)?)
}

async fn real_main(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run { config } => {
            let signal = shutdown_signal()?;
            let config = load_config(config.as_ref())?;
            for stats in runner::app::run(config, signal).await? {
                tracing::info!(
                    pipeline = stats.pipeline,
                    received = stats.received,
                    delivered = stats.delivered,
                    records = stats.records_delivered,
                    "Exiting."
                );
            }
            Ok(())
        }
        Command::Demo {
            rules,
            admin_url,
            database,
        } => {
            runner::demo::run(runner::demo::DemoOptions {
                rules,
                admin_url,
                database,
            })
            .await
        }
        Command::Config {
            command: ConfigCommand::Defaults,
        } => {
            print!("{DEFAULTS}");
            Ok(())
        }
        Command::Config {
            command: ConfigCommand::Check { config },
        } => {
            let config = load_config(config.as_ref())?;
            println!("{config:#?}");
            Ok(())
        }
        Command::Rules {
            command: RulesCommand::Check { file },
        } => {
            let config = load_config(None)?;
            let limits = config
                .campaigns
                .map(|c| c.rules.limits)
                .context("the campaign pipeline is disabled; its limits are needed")?;
            let engine = runner::pipelines::campaigns::contract::RulesEngine::new(limits)?;
            let loaded = engine
                .load_file(&file)
                .with_context(|| format!("{} would be refused", file.display()))?;
            println!("{} is accepted: {}", file.display(), loaded.identity());
            Ok(())
        }
    }
}

/// jemalloc, and in place of the C library's malloc for the whole process: librdkafka allocates
/// each record's headers on the thread that produces it and frees them on the thread that
/// handles its delivery report, a pattern glibc's malloc handles poorly (seen in a profile of
/// the fan-out: a fifth of the runner's CPU in `_int_free`, `malloc_consolidate`, `malloc`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log, cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("runner: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(real_main(cli));
    // A blocking call stuck inside librdkafka (a transactional call on a coordinator that is
    // gone, given up by the producer's watchdog) must not hold the exit up: the drain is done.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("runner: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
