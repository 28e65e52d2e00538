//! `make bench`: each workload sets up its own data on the local PostgreSQL (and Kafka where it
//! needs one), runs a few times, and prints medians with min–max; results also go to
//! `bench-results/` as JSON and Markdown. Figures are measured, never asserted.

mod broker;
mod cache;
mod cpu;
mod fanout;
mod latency;
mod report;
mod rules;
mod schedule;
mod windows;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "Benchmarks of the campaign runner")]
struct Cli {
    /// A PostgreSQL database where the benchmarks may create their own.
    #[arg(
        long,
        env = "BENCH_PG_ADMIN_URL",
        default_value = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
    )]
    admin_url: String,
    /// Where results are written.
    #[arg(long, default_value = "bench-results")]
    out: std::path::PathBuf,
    #[command(subcommand)]
    workload: Workload,
}

#[derive(Debug, Subcommand)]
enum Workload {
    /// The subscriber cache: load time, rows/s, bytes per subscription, lookups during a reload.
    Cache {
        #[arg(long, default_value_t = 10_000_000)]
        subscriptions: u64,
        #[arg(long, default_value_t = 100_000)]
        restaurants: u64,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Sink ceilings (PostgreSQL COPY with and without the protocol, Kafka produce) and the
    /// fan-out end to end, with its ratio to the slower ceiling.
    Fanout {
        #[arg(long, default_value = "build/wasm/campaign-rules.wasm")]
        rules: std::path::PathBuf,
        #[arg(long, default_value_t = 1000)]
        campaigns: usize,
        #[arg(long, default_value_t = 1000)]
        subscribers: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Latency at a steady rate, in slices that alternate quiet and swapping the rules.
    Latency {
        #[arg(long, default_value = "build/wasm/campaign-rules.wasm")]
        rules: std::path::PathBuf,
        #[arg(long, default_value = "build/wasm/fixtures/campaign-rules-v2.wasm")]
        v2: std::path::PathBuf,
        #[arg(long, default_value_t = 100)]
        rate: u64,
        #[arg(long, default_value_t = 100)]
        subscribers: usize,
        #[arg(long, default_value_t = 30)]
        secs: u64,
        /// Quiet and swapping slices alternate, each this long (`secs` of each in all).
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        slice: std::time::Duration,
        #[arg(long, default_value_t = 2)]
        swaps_per_slice: u32,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Scheduled starts: campaigns (one per restaurant) all starting at the same second, from
    /// that second until all their drafts are committed in both sinks.
    Schedule {
        #[arg(long, default_value = "build/wasm/campaign-rules.wasm")]
        rules: std::path::PathBuf,
        #[arg(long, default_value_t = 10_000)]
        campaigns: usize,
        /// Subscribers per restaurant.
        #[arg(long, default_value_t = 100)]
        subscribers: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// Store revenue end to end (rules in WASM, windows, state committed to PostgreSQL) against
    /// the broker's consume ceiling in the same run, and the sales rules WASM vs native.
    Windows {
        #[arg(long, default_value = "build/wasm/sales-rules.wasm")]
        rules: std::path::PathBuf,
        /// Sales preloaded, and read end to end, each run.
        #[arg(long, default_value_t = 2_000_000)]
        events: usize,
        #[arg(long, default_value_t = 1000)]
        stores: u32,
        /// Sales validated each way in the rules phase (at most `events`).
        #[arg(long, default_value_t = 1_000_000)]
        rules_events: usize,
        /// The sales generator's seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// The rules as WASM against the same rules compiled natively, per draft.
    Rules {
        #[arg(long, default_value = "build/wasm/campaign-rules.wasm")]
        component: std::path::PathBuf,
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
}

/// The runner's allocator (runner/src/main.rs): the runner under test runs in this process.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let report = match cli.workload {
        Workload::Rules { component, runs } => rules::run(&component, runs)?,
        Workload::Latency {
            rules,
            v2,
            rate,
            subscribers,
            secs,
            slice,
            swaps_per_slice,
            runs,
        } => {
            latency::run(
                &cli.admin_url,
                &rules,
                &v2,
                rate,
                subscribers,
                secs,
                slice,
                swaps_per_slice,
                runs,
            )
            .await?
        }
        Workload::Fanout {
            rules,
            campaigns,
            subscribers,
            runs,
        } => fanout::run(&cli.admin_url, &rules, campaigns, subscribers, runs).await?,
        Workload::Schedule {
            rules,
            campaigns,
            subscribers,
            runs,
        } => schedule::run(&cli.admin_url, &rules, campaigns, subscribers, runs).await?,
        Workload::Windows {
            rules,
            events,
            stores,
            rules_events,
            seed,
            runs,
        } => {
            windows::run(
                &cli.admin_url,
                &rules,
                events,
                stores,
                rules_events,
                seed,
                runs,
            )
            .await?
        }
        Workload::Cache {
            subscriptions,
            restaurants,
            runs,
        } => cache::run(&cli.admin_url, subscriptions, restaurants, runs).await?,
    };
    report.print();
    report.save(&cli.out)?;
    Ok(())
}
