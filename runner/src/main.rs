//! The `runner` binary: command line, logging, configuration, and signals. Everything else is
//! in the library; errors are reported here with their whole chain.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use runner::config::{Config, Sources, DEFAULTS};
use runner::produce::sales::{parse_item, parse_price, Item};
use runner::produce::{Limit, ProduceOptions, Progress};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
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
#[allow(
    clippy::large_enum_variant,
    reason = "parsed once per process; the generators' options are many"
)]
enum Command {
    /// Run the enabled pipelines until SIGINT or SIGTERM (then drain, commit and exit 0).
    Run {
        /// Pipeline configuration (TOML). Without it: defaults plus environment overrides.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run both pipelines once on embedded defaults: librdkafka's in-process mock cluster and
    /// a database of its own on the local PostgreSQL; print what reached every sink.
    Demo {
        /// The campaign rules component to use.
        #[arg(long, default_value = "build/wasm/campaign-rules.wasm")]
        rules: PathBuf,
        /// The sales rules component to use.
        #[arg(long, default_value = "build/wasm/sales-rules.wasm")]
        sales_rules: PathBuf,
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
    /// Generate input traffic for demos, tests and load runs, sent with the runner's own Kafka
    /// settings ([kafka] of the configuration: brokers, SASL, TLS, client properties).
    Produce {
        #[command(subcommand)]
        command: ProduceCommand,
    },
    /// Dead-letter helpers.
    DeadLetters {
        #[command(subcommand)]
        command: DeadLettersCommand,
    },
    /// Compare, per campaign, the drafts in the output topic with the rows of
    /// subscribers_feedback; print every difference and exit non-zero on any.
    Reconcile(runner::tools::reconcile::ReconcileArgs),
}

#[derive(Debug, Subcommand)]
enum DeadLettersCommand {
    /// Re-drive dead-lettered messages (their raw bytes) through the pipeline, exactly once.
    Replay(runner::tools::replay::ReplayArgs),
}

#[derive(Debug, Subcommand)]
enum ProduceCommand {
    /// Sales for the store-revenue pipeline (docs/SPEC.md, "Pipeline 2").
    ///
    /// Sends {"store": "store-17", "item": "coffee", "price": 3.50, "ts": 1764255600} to the
    /// pipeline's input topic, keyed by store: by default one sale per second per store for 10
    /// stores during 60 s, as the reference generator did. Sale n goes to store n mod N at the
    /// nominal event time start + n / (N × rate); its ts is that minus a random jitter. Options
    /// add what demos and tests need: late sales (dead-lettered as `late`), malformed ones
    /// (dead-lettered with the rules' code), simulated event time running faster than the
    /// clock, unkeyed sends, and a seed for reproducible runs.
    ///
    /// A progress line goes to stderr about once a second; the summary (sales per kind,
    /// event-time range, wall time, rate, seed) to stdout at the end, or on SIGINT/SIGTERM
    /// after what was sent is acknowledged. Exits non-zero if the brokers cannot be reached or a
    /// sale cannot be delivered within --delivery-timeout.
    ///
    /// Example, a demo covering 10 minutes of event time in 20 s, with some dead letters:
    ///
    ///   runner produce sales --simulated-start 2025-09-02T10:30:00Z --speedup 30 \
    ///     --duration 20s --late-fraction 0.02 --malformed-fraction 0.02 --seed 1
    #[command(verbatim_doc_comment)]
    Sales(SalesArgs),
    /// Campaigns for the campaign pipeline (docs/SPEC.md, "Pipeline 1"), and optionally the
    /// subscribers they fan out to.
    ///
    /// Sends SPEC.md's campaign values (UUID ids, unix-second times) across --restaurants
    /// restaurants (campaign n to restaurant n mod R), keyed by restaurant id, at --rate per
    /// second or as fast as possible. Each campaign is active at the moment it is sent, or, with
    /// the given fractions, expired, future, or malformed in one of seven ways the rules refuse
    /// (each dead-lettered with its own reason code). With --seed-subscribers, R × M
    /// subscriptions are first written into subscribers_restaurants ([postgres] url of the
    /// configuration or --postgres-url; the table is created as SPEC.md gives it when absent;
    /// rows of the same restaurants are replaced). Restaurant and client ids derive from
    /// --seed: seed and produce with the same seed and the campaigns fan out to the subscribers
    /// seeded.
    ///
    /// A progress line goes to stderr about once a second; the summary (campaigns per kind,
    /// the drafts, skips and dead letters the pipeline must make of them, rows seeded, wall
    /// time, rate, seed) to stdout at the end, or on SIGINT/SIGTERM after what was sent is
    /// acknowledged. Exits non-zero if PostgreSQL or the brokers cannot be reached, the topic
    /// does not exist, or a campaign cannot be delivered within --delivery-timeout.
    ///
    /// Example, 1,000 restaurants × 50 subscribers, then 10 campaigns a second for a minute,
    /// a tenth of them expired and a tenth malformed:
    ///
    ///   runner produce campaigns --config runner.toml --seed 1 --seed-subscribers \
    ///     --restaurants 1000 --subscribers-per-restaurant 50 \
    ///     --expired-fraction 0.1 --malformed-fraction 0.1
    #[command(verbatim_doc_comment)]
    Campaigns(CampaignsArgs),
}

/// What every generator takes: where to send, how much, how fast, how to report.
#[derive(Debug, Args)]
#[command(next_help_heading = "Kafka and run")]
struct ProduceArgs {
    /// Runner configuration (TOML) whose [kafka] section the producer uses; without it the
    /// defaults. Environment variables RUNNER__KAFKA__… apply on top, as for `runner run`.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers, in place of kafka.brokers of the configuration.
    #[arg(long)]
    brokers: Option<String>,
    /// Topic to send to [default: the pipeline's input topic in the configuration].
    #[arg(long)]
    topic: Option<String>,
    /// How long to send, wall-clock time (e.g. 90s, 5m): a paced run sends the number of
    /// events this holds at its rate [default: 60s, unless --count is given].
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "count")]
    duration: Option<Duration>,
    /// Number of events to send in all, in place of --duration.
    #[arg(long)]
    count: Option<u64>,
    /// Send without pacing, as fast as the producer takes them (load runs). Event times are
    /// still those of the rate.
    #[arg(long)]
    as_fast_as_possible: bool,
    /// Seed of the random choices: the same seed and options give the same events (with
    /// --simulated-start, the same bytes) [default: a random seed, printed in the summary].
    #[arg(long)]
    seed: Option<u64>,
    /// An event the brokers have not acknowledged within this time fails the run
    /// (message.timeout.ms); the brokers must also answer within it (at most 15 s) at the start.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    delivery_timeout: Duration,
    /// Events sent but not yet acknowledged, at most.
    #[arg(long, default_value_t = runner::produce::DEFAULT_MAX_IN_FLIGHT)]
    max_in_flight: usize,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// No progress line on stderr.
    #[arg(long, short)]
    quiet: bool,
}

impl ProduceArgs {
    fn limit(&self) -> Limit {
        match (self.count, self.duration) {
            (Some(n), _) => Limit::Count(n),
            (None, Some(d)) => Limit::Duration(d),
            (None, None) => Limit::Duration(Duration::from_secs(60)),
        }
    }
}

#[derive(Debug, Args)]
struct SalesArgs {
    #[command(flatten)]
    common: ProduceArgs,
    /// Number of stores: store-1 … store-N.
    #[arg(long, default_value_t = 10, help_heading = "Sales")]
    stores: u32,
    /// Sales per second per store, in event time (with --speedup K, K times as many per
    /// wall-clock second).
    #[arg(long, default_value_t = 1.0, help_heading = "Sales")]
    rate: f64,
    /// Event time of the first sale: unix seconds or RFC 3339 (2025-09-02T10:30:00Z)
    /// [default: now].
    #[arg(long, value_parser = runner::produce::parse_event_time, help_heading = "Sales")]
    simulated_start: Option<i64>,
    /// Event time runs K times faster than the wall clock: `--rate 1 --speedup 30` sends 30
    /// sales per wall-clock second per store, each store's 1 s of event time apart.
    #[arg(long, default_value_t = 1.0, help_heading = "Sales")]
    speedup: f64,
    /// Items sold, comma-separated: NAME=PRICE (at most two decimals) or the NAME of a built-in
    /// item; one is drawn at random per sale [default: the built-in catalogue, coffee=3.50,
    /// tea=2.80, croissant=2.20, bagel=3.10, muffin=2.95, cookie=1.75, sandwich=6.90,
    /// salad=8.40, soup=5.25, juice=4.15, water=1.20, pizza-slice=4.60].
    #[arg(long, value_delimiter = ',', value_parser = parse_item, help_heading = "Sales")]
    items: Vec<Item>,
    /// Prices drawn uniformly between --price-min and --price-max (whole cents), in place of
    /// the items' own.
    #[arg(long, value_parser = parse_price, requires = "price_max", help_heading = "Sales")]
    price_min: Option<i64>,
    /// Upper bound of the prices drawn (see --price-min).
    #[arg(long, value_parser = parse_price, requires = "price_min", help_heading = "Sales")]
    price_max: Option<i64>,
    /// Event-time disorder: each sale's ts is its nominal event time minus a uniform random
    /// 0..D. Up to the allowed lateness, every such sale is counted by the pipeline.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, help_heading = "Sales")]
    jitter: Duration,
    /// Fraction of sales sent late: ts --late-by behind, so that the pipeline dead-letters them
    /// as `late` (a sale is made late only when its partition's watermark is sure to have
    /// passed it, so the share can fall a little short).
    #[arg(long, default_value_t = 0.0, help_heading = "Sales")]
    late_fraction: f64,
    /// How far behind its nominal event time a late sale's ts is
    /// [default: 2 × (window + allowed lateness), 120s].
    #[arg(long, value_parser = humantime::parse_duration, help_heading = "Sales")]
    late_by: Option<Duration>,
    /// The pipeline's window [default: pipelines.store_revenue.window of the configuration].
    #[arg(long, value_parser = humantime::parse_duration, help_heading = "Sales")]
    window: Option<Duration>,
    /// The pipeline's allowed lateness
    /// [default: pipelines.store_revenue.allowed_lateness of the configuration].
    #[arg(long, value_parser = humantime::parse_duration, help_heading = "Sales")]
    allowed_lateness: Option<Duration>,
    /// Fraction of sales broken in one way chosen at random: not JSON, a negative price, the
    /// price as a string, no ts, a price with three decimals (each dead-lettered by the rules).
    #[arg(long, default_value_t = 0.0, help_heading = "Sales")]
    malformed_fraction: f64,
    /// Send without a key: the producer spreads sales over partitions, not by store (for the
    /// pipeline's handling of a producer that does not key by store). A sale sent late is then
    /// late only if its partition has already carried newer sales.
    #[arg(long, help_heading = "Sales")]
    unkeyed: bool,
    /// Add to the summary the expected total of the on-time sales per (store, window) in cents
    /// and the list of late sales (kept in memory: for small runs; best with --json).
    #[arg(long, help_heading = "Sales")]
    totals: bool,
}

#[derive(Debug, Args)]
struct CampaignsArgs {
    #[command(flatten)]
    common: ProduceArgs,
    /// Number of restaurants; their ids derive from --seed.
    #[arg(long, default_value_t = 100, help_heading = "Campaigns")]
    restaurants: u32,
    /// Sequence number of the first campaign: with the same --seed, a run from --first N
    /// continues one that sent N campaigns (new campaign ids, the same restaurants; a campaign
    /// id sent again makes no drafts). The summary says where to continue.
    #[arg(long, default_value_t = 0, help_heading = "Campaigns")]
    first: u64,
    /// Campaigns per second (wall clock), unless --as-fast-as-possible.
    #[arg(long, default_value_t = 10.0, help_heading = "Campaigns")]
    rate: f64,
    /// Fraction of campaigns that ended before they are sent (skipped as `expired`).
    #[arg(long, default_value_t = 0.0, help_heading = "Campaigns")]
    expired_fraction: f64,
    /// Fraction of campaigns that start well after they are sent (kept as `scheduled` and
    /// delivered at their start).
    #[arg(long, default_value_t = 0.0, help_heading = "Campaigns")]
    future_fraction: f64,
    /// Fraction of campaigns broken in one way chosen at random: not JSON, not UTF-8, not an
    /// object, a missing field, a wrong type, an id that is not a hyphenated UUID, start not
    /// before end (each dead-lettered by the rules with its own reason code).
    #[arg(long, default_value_t = 0.0, help_heading = "Campaigns")]
    malformed_fraction: f64,
    /// The "now" campaigns are active, expired or future at: unix seconds or RFC 3339, for a
    /// runner whose clock is fixed too [default: the clock when each campaign is sent].
    #[arg(long, value_parser = runner::produce::parse_event_time, help_heading = "Campaigns")]
    now: Option<i64>,
    /// From start to end of a campaign: an active one stays active for at least half of it
    /// after it is sent.
    #[arg(long, default_value = "2h", value_parser = humantime::parse_duration, help_heading = "Campaigns")]
    campaign_length: Duration,
    /// The key of each campaign: `restaurant` (its id), `campaign` (its id), `none`, or any
    /// other text sent as the key of every campaign (e.g. first_message).
    #[arg(long, default_value = "restaurant", value_parser = runner::produce::campaigns::KeyMode::parse, help_heading = "Campaigns")]
    key: runner::produce::campaigns::KeyMode,
    /// Subscribers per restaurant (M): seeded with --seed-subscribers; the summary predicts
    /// active × M drafts.
    #[arg(long, help_heading = "Subscribers")]
    subscribers_per_restaurant: Option<u32>,
    /// Before sending, write restaurants × M subscriptions into subscribers_restaurants
    /// (replacing the rows of the same restaurants).
    #[arg(
        long,
        requires = "subscribers_per_restaurant",
        help_heading = "Subscribers"
    )]
    seed_subscribers: bool,
    /// Seed the subscribers and send nothing (no Kafka needed).
    #[arg(long, requires = "seed_subscribers", help_heading = "Subscribers")]
    seed_only: bool,
    /// PostgreSQL connection string, in place of postgres.url of the configuration.
    #[arg(long, help_heading = "Subscribers")]
    postgres_url: Option<String>,
    /// Rows per COPY statement when seeding.
    #[arg(long, default_value_t = runner::produce::campaigns::DEFAULT_SEED_BATCH, help_heading = "Subscribers")]
    seed_batch: usize,
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
    /// Load a rules component as the runner would (compile, link against its pipeline's
    /// world, smoke-test it on a known input); exit non-zero with the reason if it would be
    /// refused. Without --kind, the component's world says which pipeline it is for.
    Check {
        /// The component (.wasm).
        file: PathBuf,
        /// The pipeline the component is for.
        #[arg(long, value_enum)]
        kind: Option<RulesKind>,
    },
    /// Write a ready-to-build transform crate from a template.
    New(runner::tools::rules::NewArgs),
    /// Build a transform crate into a component.
    Build(runner::tools::rules::BuildArgs),
    /// Run a component offline over sample messages and print what it would produce.
    Test(runner::tools::rules::TestArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RulesKind {
    /// The campaign pipeline's rules (wit/campaign/campaign-rules.wit).
    Campaign,
    /// The store-revenue pipeline's rules (wit/sales/sales-rules.wit).
    Sales,
}

/// Loads `file` as a rules component of `kind`, with the limits the configuration gives that
/// pipeline: its identity, or why it would be refused.
fn check_rules(file: &std::path::Path, kind: RulesKind, config: &Config) -> Result<String> {
    use runner::pipelines::{campaigns, store_revenue};
    // A pipeline switched off still has its section's limits in the defaults.
    let limits = |c: Option<runner::sandbox::SandboxLimits>, section: &str| {
        c.unwrap_or_else(|| {
            let overlay = format!("[pipelines.{section}]\nenabled = true\n");
            let enabled = runner::config::Config::load(&runner::config::Sources {
                file: None,
                overlay: Some(&overlay),
                env: false,
            })
            .expect("the defaults are valid");
            match section {
                "campaigns" => enabled.campaigns.map(|c| c.rules.limits),
                _ => enabled.store_revenue.map(|c| c.rules.limits),
            }
            .expect("enabled above")
        })
    };
    match kind {
        RulesKind::Campaign => {
            let l = limits(
                config.campaigns.as_ref().map(|c| c.rules.limits.clone()),
                "campaigns",
            );
            let engine = campaigns::contract::RulesEngine::new(l)?;
            Ok(engine.load_file(file)?.identity().to_string())
        }
        RulesKind::Sales => {
            let l = limits(
                config
                    .store_revenue
                    .as_ref()
                    .map(|c| c.rules.limits.clone()),
                "store_revenue",
            );
            let engine = store_revenue::contract::RulesEngine::new(l)?;
            Ok(engine.load_file(file)?.identity().to_string())
        }
    }
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

async fn real_main(cli: Cli) -> Result<ExitCode> {
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
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            rules,
            sales_rules,
            admin_url,
            database,
        } => {
            runner::demo::run(runner::demo::DemoOptions {
                rules,
                sales_rules,
                admin_url,
                database,
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Config {
            command: ConfigCommand::Defaults,
        } => {
            print!("{DEFAULTS}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Config {
            command: ConfigCommand::Check { config },
        } => {
            let config = load_config(config.as_ref())?;
            println!("{config:#?}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Rules {
            command: RulesCommand::Check { file, kind },
        } => {
            let config = load_config(None)?;
            let kinds = match kind {
                Some(k) => vec![k],
                None => vec![RulesKind::Campaign, RulesKind::Sales],
            };
            let mut refusals = Vec::new();
            for k in kinds {
                match check_rules(&file, k, &config) {
                    Ok(identity) => {
                        println!(
                            "{} is accepted as {} rules: {identity}",
                            file.display(),
                            format!("{k:?}").to_lowercase()
                        );
                        return Ok(ExitCode::SUCCESS);
                    }
                    // Another pipeline's world: try the next kind.
                    Err(e)
                        if kind.is_none()
                            && e.downcast_ref::<runner::sandbox::LoadError>().is_some_and(
                                |l| {
                                    // Refusals that another pipeline's world explains.
                                    matches!(
                                        l.code(),
                                        "wrong_world" | "forbidden_import" | "incompatible_version"
                                    )
                                },
                            ) =>
                    {
                        refusals.push(e)
                    }
                    Err(e) => return Err(e.context(format!("{} would be refused", file.display()))),
                }
            }
            let why: Vec<String> = refusals.iter().map(|e| e.to_string()).collect();
            anyhow::bail!(
                "{} would be refused: it fits no pipeline's rules ({})",
                file.display(),
                why.join("; ")
            )
        }
        Command::Rules {
            command: RulesCommand::New(args),
        } => runner::tools::rules::new(args).await,
        Command::Rules {
            command: RulesCommand::Build(args),
        } => runner::tools::rules::build(args).await,
        Command::Rules {
            command: RulesCommand::Test(args),
        } => runner::tools::rules::test(args).await,
        Command::DeadLetters {
            command: DeadLettersCommand::Replay(args),
        } => runner::tools::replay::run(args).await,
        Command::Reconcile(args) => runner::tools::reconcile::run(args).await,
        Command::Produce {
            command: ProduceCommand::Sales(args),
        } => produce_sales(args).await.map(|()| ExitCode::SUCCESS),
        Command::Produce {
            command: ProduceCommand::Campaigns(args),
        } => produce_campaigns(args).await.map(|()| ExitCode::SUCCESS),
    }
}

/// A stop signal for a generator: true at SIGINT or SIGTERM.
fn produce_stop() -> Result<tokio::sync::watch::Receiver<bool>> {
    let signal = shutdown_signal()?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        signal.await;
        let _ = tx.send(true);
    });
    Ok(rx)
}

async fn produce_sales(args: SalesArgs) -> Result<()> {
    let common = &args.common;
    let (raw, kafka) =
        runner::produce::load_config(common.config.as_deref(), common.brokers.as_deref())?;
    let pipeline = &raw.pipelines.store_revenue;
    let window = args.window.unwrap_or(pipeline.window);
    let allowed_lateness = args.allowed_lateness.unwrap_or(pipeline.allowed_lateness);
    let opts = runner::produce::SalesOptions {
        produce: ProduceOptions {
            topic: common
                .topic
                .clone()
                .unwrap_or_else(|| pipeline.input_topic.clone()),
            limit: common.limit(),
            as_fast_as_possible: common.as_fast_as_possible,
            max_in_flight: common.max_in_flight,
            stop: Some(produce_stop()?),
        },
        stores: args.stores,
        rate: args.rate,
        speedup: args.speedup,
        simulated_start: args.simulated_start,
        items: if args.items.is_empty() {
            runner::produce::sales::catalogue()
        } else {
            args.items
        },
        price_range: args.price_min.zip(args.price_max),
        jitter: args.jitter,
        late_fraction: args.late_fraction,
        late_by: args.late_by.unwrap_or(2 * (window + allowed_lateness)),
        window,
        allowed_lateness,
        malformed_fraction: args.malformed_fraction,
        keyed: !args.unkeyed,
        seed: common.seed,
        record_totals: args.totals,
    };
    let progress = if common.quiet {
        Progress::Hidden
    } else {
        Progress::Stderr
    };
    let producer = runner::produce::client_config(&kafka, common.delivery_timeout);
    let summary = runner::produce::sales(producer, opts, progress).await?;
    if common.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{summary}");
    }
    Ok(())
}

async fn produce_campaigns(args: CampaignsArgs) -> Result<()> {
    use runner::produce::campaigns::{seed_subscribers, CampaignsOptions, SeedTarget};
    let common = &args.common;
    let (raw, kafka) =
        runner::produce::load_config(common.config.as_deref(), common.brokers.as_deref())?;
    let progress = if common.quiet {
        Progress::Hidden
    } else {
        Progress::Stderr
    };
    let postgres_url = args
        .postgres_url
        .clone()
        .unwrap_or_else(|| raw.postgres.url.clone());
    if args.seed_only {
        let seed = common
            .seed
            .unwrap_or_else(runner::produce::campaigns::random_seed);
        let m = args
            .subscribers_per_restaurant
            .context("--seed-only needs --subscribers-per-restaurant")?;
        let report = seed_subscribers(
            &postgres_url,
            args.restaurants,
            m,
            seed,
            args.seed_batch,
            progress,
        )
        .await?;
        if common.json {
            let mut v = serde_json::to_value(&report)?;
            v["seed"] = seed.into();
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            println!("Seeding: {report}, seed {seed}");
        }
        return Ok(());
    }
    let opts = CampaignsOptions {
        produce: ProduceOptions {
            topic: common
                .topic
                .clone()
                .unwrap_or_else(|| raw.pipelines.campaigns.input_topic.clone()),
            limit: common.limit(),
            as_fast_as_possible: common.as_fast_as_possible,
            max_in_flight: common.max_in_flight,
            stop: Some(produce_stop()?),
        },
        restaurants: args.restaurants,
        first: args.first,
        rate: args.rate,
        expired_fraction: args.expired_fraction,
        future_fraction: args.future_fraction,
        malformed_fraction: args.malformed_fraction,
        now: args.now,
        length: args.campaign_length,
        key: args.key,
        seed: common.seed,
        subscribers_per_restaurant: args.subscribers_per_restaurant,
        seed_into: args.seed_subscribers.then_some(SeedTarget {
            url: postgres_url,
            batch_rows: args.seed_batch,
        }),
    };
    let producer = runner::produce::client_config(&kafka, common.delivery_timeout);
    let summary = runner::produce::campaigns(producer, opts, progress).await?;
    if common.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{summary}");
    }
    Ok(())
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
        Ok(code) => code,
        Err(e) => {
            eprintln!("runner: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
