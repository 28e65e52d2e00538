//! `runner rules new`, `runner rules build`, `runner rules test`: the rules workflow of an
//! operator. `new` writes a transform crate from the shipped guests' own sources, `build` turns
//! it into a component and loads it as `runner rules check` does, `test` runs a component
//! offline over sample messages (and compares two versions). See docs/rules-workflow.md.

mod build;
mod load;
mod offline;
mod scaffold;

use clap::{Args, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

/// Which pipeline a rules component is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// The campaign pipeline's rules (wit/campaign/campaign-rules.wit).
    Campaign,
    /// The store-revenue pipeline's rules (wit/sales/sales-rules.wit).
    Sales,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Campaign => "campaign",
            Kind::Sales => "sales",
        }
    }
}

/// `runner rules new NAME --kind campaign|sales`.
#[derive(Debug, Args)]
pub struct NewArgs {
    /// Name of the transform crate (letters, digits, `-` and `_`, starting with a letter); also
    /// the version prefix the component reports.
    pub name: String,
    /// The pipeline the rules are for: the generated crate starts from its shipped rules.
    #[arg(long, value_enum)]
    pub kind: Kind,
    /// Where to write the crate (default: ./NAME). Must not exist or be empty.
    #[arg(long)]
    pub path: Option<PathBuf>,
}

/// `runner rules build DIR`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The transform crate's directory.
    pub dir: PathBuf,
    /// Where to write the component (default: DIR/NAME.wasm, NAME the crate's name).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

/// `runner rules test FILE.wasm --input samples.jsonl`.
///
/// Campaign rules: each input line is a campaign message's value; the output says, per line,
/// the drafts made for the restaurant's subscribers, `rejected CODE FIELD DETAIL`, `scheduled
/// OPENS CLOSES` (not started: delivered when its window opens), `skipped
/// expired|no_subscribers`, or `error CODE DETAIL` when the rules trap or time out.
/// Sales rules: each input line is a sale's value; the output says, per line, the typed sale or
/// the rejection. Blank lines are skipped (line numbers count them). With --against, only the
/// lines whose outcome (a valid campaign's window included) differs between the two components
/// are printed, and the exit status is 1 when any line differs.
#[derive(Debug, Args)]
pub struct TestArgs {
    /// The component (.wasm).
    pub file: PathBuf,
    /// Sample messages, one message value per line (JSON Lines, as an operator would produce).
    #[arg(long)]
    pub input: PathBuf,
    /// The time the campaign rules run at, unix seconds (default: now).
    #[arg(long)]
    pub now: Option<i64>,
    /// Subscriptions for the campaign rules: a CSV of `client_id,restaurant_id` lines (the
    /// columns of subscribers_restaurants; a header line of those names, blank lines and lines
    /// starting with `#` are skipped). Without it every active campaign has no subscribers.
    #[arg(long)]
    pub subscribers: Option<PathBuf>,
    /// The pipeline the component is for (default: the component's world says).
    #[arg(long, value_enum)]
    pub kind: Option<Kind>,
    /// Print one JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
    /// Another version of the rules: print only the lines whose outcome differs (old, then
    /// new) and a count; exit status 1 when any line differs.
    #[arg(long, value_name = "OLD.wasm")]
    pub against: Option<PathBuf>,
}

pub async fn new(args: NewArgs) -> anyhow::Result<ExitCode> {
    scaffold::run(args)
}

pub async fn build(args: BuildArgs) -> anyhow::Result<ExitCode> {
    tokio::task::spawn_blocking(move || build::run(args)).await?
}

/// With --against the exit status is 0 (same outcomes), 1 (some differ) or 2 (trouble), as
/// `diff`'s.
pub async fn test(args: TestArgs) -> anyhow::Result<ExitCode> {
    let against = args.against.is_some();
    match tokio::task::spawn_blocking(move || offline::run(args)).await? {
        Err(e) if against => {
            eprintln!("runner: error: {e:#}");
            Ok(ExitCode::from(2))
        }
        r => r,
    }
}
