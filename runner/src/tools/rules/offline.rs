//! `runner rules test`: runs a component offline over sample messages, as its pipeline would
//! call it, and prints each input line's outcome; with `--against`, the lines whose outcome
//! (or, for a valid campaign, its delivery window) differs between two versions. Rejections are
//! outcomes; a trap, timeout or memory overrun of the rules is the outcome of its line too
//! (`error CODE DETAIL`), never the end of the run: a fresh instance serves the next line.

use super::load::{load, Loaded};
use super::{Kind, TestArgs};
use crate::pipelines::campaigns::cache::Snapshot;
use crate::pipelines::campaigns::contract::{
    Activity, CampaignInstance, LoadedRules as CampaignRules,
};
use crate::pipelines::store_revenue::contract::{
    LoadedRules as SalesRules, PackedPayloads, SalesInstance,
};
use crate::sandbox::CallError;
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

/// A valid campaign's delivery window, as its rules give it (unix seconds): active from `opens`,
/// expired from `closes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Window {
    pub opens: i64,
    pub closes: i64,
}

impl Window {
    fn json(&self) -> serde_json::Value {
        json!({"opens": self.opens, "closes": self.closes})
    }
}

/// What the rules made of one input line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Outcome {
    /// An active campaign's drafts: (client id, the exact value for the drafts topic).
    Drafts {
        window: Window,
        drafts: Vec<(String, String)>,
    },
    Rejected {
        code: &'static str,
        field: Option<String>,
        detail: String,
    },
    /// A valid campaign whose window has not opened: the pipeline keeps it and delivers it to
    /// the restaurant's subscribers at `opens` (the pipeline's skip reason `scheduled`).
    Scheduled(Window),
    /// A valid campaign that makes no drafts: `expired` or `no_subscribers`.
    Skipped {
        reason: &'static str,
        window: Window,
    },
    Sale {
        store: String,
        amount_minor: i64,
        event_time: i64,
    },
    /// The rules trapped, timed out, ran out of memory or broke the contract on this line.
    Error { code: &'static str, detail: String },
}

impl Outcome {
    fn from_call(e: CallError) -> Outcome {
        Outcome::Error {
            code: e.code(),
            detail: e.to_string(),
        }
    }

    /// A valid campaign's window.
    fn window(&self) -> Option<Window> {
        match self {
            Outcome::Drafts { window, .. }
            | Outcome::Scheduled(window)
            | Outcome::Skipped { window, .. } => Some(*window),
            _ => None,
        }
    }

    /// The outcome as text lines (an active campaign has one line per draft).
    pub(super) fn text(&self) -> Vec<String> {
        match self {
            Outcome::Drafts { drafts, .. } => {
                drafts.iter().map(|(_, d)| format!("draft {d}")).collect()
            }
            Outcome::Rejected {
                code,
                field,
                detail,
            } => vec![format!(
                "rejected {code} {} {detail}",
                field.as_deref().unwrap_or("-")
            )],
            Outcome::Scheduled(w) => vec![format!("scheduled {} {}", w.opens, w.closes)],
            Outcome::Skipped { reason, .. } => vec![format!("skipped {reason}")],
            Outcome::Sale {
                store,
                amount_minor,
                event_time,
            } => vec![format!(
                "sale store={store:?} amount_minor={amount_minor} event_time={event_time}"
            )],
            // A trap's detail spans lines (a backtrace): one line per outcome here.
            Outcome::Error { code, detail } => vec![format!(
                "error {code} {}",
                detail.split_whitespace().collect::<Vec<_>>().join(" ")
            )],
        }
    }

    /// Whether two versions did the same with a line, a valid campaign's window included.
    /// Errors compare by code: a trap's detail carries code offsets that differ between any
    /// two builds.
    pub(super) fn same(&self, other: &Outcome) -> bool {
        match (self, other) {
            (Outcome::Error { code: a, .. }, Outcome::Error { code: b, .. }) => a == b,
            _ => self == other,
        }
    }

    pub(super) fn json(&self) -> serde_json::Value {
        match self {
            Outcome::Drafts { drafts, .. } => json!({
                "outcome": "drafts",
                "drafts": drafts
                    .iter()
                    .map(|(c, d)| json!({"client_id": c, "value": d}))
                    .collect::<Vec<_>>(),
            }),
            Outcome::Rejected {
                code,
                field,
                detail,
            } => json!({"outcome": "rejected", "code": code, "field": field, "detail": detail}),
            Outcome::Scheduled(w) => {
                json!({"outcome": "scheduled", "opens": w.opens, "closes": w.closes})
            }
            Outcome::Skipped { reason, .. } => json!({"outcome": "skipped", "reason": reason}),
            Outcome::Sale {
                store,
                amount_minor,
                event_time,
            } => json!({
                "outcome": "sale",
                "store": store,
                "amount_minor": amount_minor,
                "event_time": event_time,
            }),
            Outcome::Error { code, detail } => {
                json!({"outcome": "error", "code": code, "detail": detail})
            }
        }
    }
}

/// One input line: its number in the file (1-based) and its bytes.
pub(super) struct Sample {
    pub line: usize,
    pub payload: Vec<u8>,
}

/// One message value per line; blank lines are skipped, a trailing `\r` is not part of it.
pub(super) fn read_samples(path: &Path) -> Result<Vec<Sample>> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read the input file {}", path.display()))?;
    let samples: Vec<Sample> = bytes
        .split(|b| *b == b'\n')
        .enumerate()
        .map(|(i, l)| Sample {
            line: i + 1,
            payload: l.strip_suffix(b"\r").unwrap_or(l).to_vec(),
        })
        .filter(|s| !s.payload.iter().all(u8::is_ascii_whitespace))
        .collect();
    if samples.is_empty() {
        bail!(
            "the input file {} has no messages: it takes one message value per line",
            path.display()
        );
    }
    Ok(samples)
}

/// `client_id,restaurant_id` lines (the columns of subscribers_restaurants); a header line
/// naming them, blank lines and `#` comments are skipped. Returns (restaurant, client) pairs.
pub(super) fn read_subscribers(path: &Path) -> Result<Vec<(String, String)>> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read the subscribers file {}", path.display()))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| anyhow::anyhow!("the subscribers file {} is not UTF-8", path.display()))?;
    let mut rows = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        match fields.as_slice() {
            ["client_id", "restaurant_id"] => {}
            [client, restaurant] if !client.is_empty() && !restaurant.is_empty() => {
                rows.push((restaurant.to_string(), client.to_string()))
            }
            _ => bail!(
                "the subscribers file {} line {}: expected `client_id,restaurant_id`, found {raw:?}",
                path.display(),
                i + 1
            ),
        }
    }
    Ok(rows)
}

/// Campaign rules over samples: validate at `now`, then shape for the restaurant's subscribers
/// when active, as the pipeline does when a campaign is published.
struct CampaignRun<'a> {
    rules: &'a CampaignRules,
    instance: Option<CampaignInstance>,
    subscribers: &'a Snapshot,
    now: i64,
    clients: Vec<String>,
}

impl CampaignRun<'_> {
    fn outcome(&mut self, payload: &[u8]) -> Outcome {
        let mut instance = match self.instance.take() {
            Some(i) => i,
            None => match self.rules.instantiate() {
                Ok(i) => i,
                Err(e) => return Outcome::from_call(e),
            },
        };
        let outcome = match instance.validate(payload, self.now) {
            // A failed instance is never reused.
            Err(e) => return Outcome::from_call(e),
            Ok(Err(r)) => Outcome::Rejected {
                code: r.code.as_str(),
                field: r.field,
                detail: r.detail,
            },
            Ok(Ok(v)) => {
                let window = Window {
                    opens: v.window.opens,
                    closes: v.window.closes,
                };
                match v.activity {
                    Activity::NotStarted => Outcome::Scheduled(window),
                    Activity::Expired => Outcome::Skipped {
                        reason: "expired",
                        window,
                    },
                    Activity::Active => {
                        self.subscribers
                            .clients_into(&v.campaign.restaurant_id, &mut self.clients);
                        if self.clients.is_empty() {
                            Outcome::Skipped {
                                reason: "no_subscribers",
                                window,
                            }
                        } else {
                            match instance.shape(&v.campaign, &self.clients, self.now) {
                                Err(e) => return Outcome::from_call(e),
                                Ok(drafts) => Outcome::Drafts {
                                    window,
                                    drafts: drafts
                                        .iter()
                                        .map(|d| {
                                            (
                                                d.client_id.to_string(),
                                                String::from_utf8_lossy(d.payload).into_owned(),
                                            )
                                        })
                                        .collect(),
                                },
                            }
                        }
                    }
                }
            }
        };
        self.instance = Some(instance);
        outcome
    }
}

/// Sales rules over samples: one message per `validate` call, so that a trap is one line's.
struct SalesRun<'a> {
    rules: &'a SalesRules,
    instance: Option<SalesInstance>,
    minor_digits: u8,
}

impl SalesRun<'_> {
    fn outcome(&mut self, payload: &[u8]) -> Outcome {
        let mut instance = match self.instance.take() {
            Some(i) => i,
            None => match self.rules.instantiate() {
                Ok(i) => i,
                Err(e) => return Outcome::from_call(e),
            },
        };
        let mut packed = PackedPayloads::new();
        packed.push(payload);
        let result = match instance.validate(packed.bytes(), packed.ends(), self.minor_digits) {
            Err(e) => return Outcome::from_call(e),
            Ok(r) => r,
        };
        self.instance = Some(instance);
        // check_batch (in validate) guarantees exactly one of the two.
        match (result.sales.first(), result.rejections.first()) {
            (Some(s), _) => Outcome::Sale {
                store: s.store.clone(),
                amount_minor: s.amount_minor,
                event_time: s.event_time,
            },
            (None, Some(r)) => Outcome::Rejected {
                code: r.rejection.code.as_str(),
                field: r.rejection.field.clone(),
                detail: r.rejection.detail.clone(),
            },
            (None, None) => Outcome::Error {
                code: CallError::BadOutput(String::new()).code(),
                detail: "the rules returned neither a sale nor a rejection".into(),
            },
        }
    }
}

/// Every sample's outcome under `loaded`.
fn outcomes(loaded: &Loaded, samples: &[Sample], subscribers: &Snapshot, now: i64) -> Vec<Outcome> {
    match loaded {
        Loaded::Campaign(rules) => {
            let mut run = CampaignRun {
                rules,
                instance: None,
                subscribers,
                now,
                clients: Vec::new(),
            };
            samples.iter().map(|s| run.outcome(&s.payload)).collect()
        }
        Loaded::Sales(rules, minor_digits) => {
            let mut run = SalesRun {
                rules,
                instance: None,
                minor_digits: *minor_digits,
            };
            samples.iter().map(|s| run.outcome(&s.payload)).collect()
        }
    }
}

fn unix_now() -> Result<i64> {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the system clock is before 1970")?;
    Ok(i64::try_from(d.as_secs())?)
}

/// Counts for the summary line.
fn summary(kind: Kind, outcomes: &[Outcome]) -> String {
    let (mut drafts, mut campaigns, mut sales, mut rejected) = (0, 0, 0, 0);
    let (mut scheduled, mut skipped, mut errors) = (0, 0, 0);
    for o in outcomes {
        match o {
            Outcome::Drafts { drafts: d, .. } => {
                campaigns += 1;
                drafts += d.len();
            }
            Outcome::Sale { .. } => sales += 1,
            Outcome::Rejected { .. } => rejected += 1,
            Outcome::Scheduled(_) => scheduled += 1,
            Outcome::Skipped { .. } => skipped += 1,
            Outcome::Error { .. } => errors += 1,
        }
    }
    let n = outcomes.len();
    match kind {
        Kind::Campaign => format!(
            "{n} messages: {drafts} drafts from {campaigns} campaigns, {rejected} rejected, \
             {scheduled} scheduled, {skipped} skipped, {errors} errors"
        ),
        Kind::Sales => format!("{n} messages: {sales} sales, {rejected} rejected, {errors} errors"),
    }
}

pub(super) fn run(args: TestArgs) -> Result<ExitCode> {
    let samples = read_samples(&args.input)?;
    let new = load(&args.file, args.kind)?;
    let kind = new.kind();
    if kind == Kind::Sales && (args.subscribers.is_some() || args.now.is_some()) {
        bail!(
            "--subscribers and --now apply to campaign rules; {} holds sales rules",
            args.file.display()
        );
    }
    let rows = match &args.subscribers {
        Some(path) => read_subscribers(path)?,
        None => Vec::new(),
    };
    let subscribers = Snapshot::from_rows(0, rows.iter().map(|(r, c)| (r.as_str(), c.as_str())));
    let now = match args.now {
        Some(t) => t,
        None => unix_now()?,
    };
    eprintln!(
        "{}: {} rules {}",
        args.file.display(),
        kind.as_str(),
        new.identity()
    );
    let new_outcomes = outcomes(&new, &samples, &subscribers, now);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());

    let Some(old_path) = &args.against else {
        for (s, o) in samples.iter().zip(&new_outcomes) {
            if args.json {
                let mut v = o.json();
                v["line"] = s.line.into();
                writeln!(out, "{v}")?;
            } else {
                for l in o.text() {
                    writeln!(out, "line {}: {l}", s.line)?;
                }
            }
        }
        let summary = summary(kind, &new_outcomes);
        if args.json {
            eprintln!("{summary}");
        } else {
            writeln!(out, "{summary}")?;
        }
        out.flush()?;
        return Ok(ExitCode::SUCCESS);
    };

    let old = load(old_path, Some(kind)).with_context(|| {
        format!(
            "{} is not {} rules like {}",
            old_path.display(),
            kind.as_str(),
            args.file.display()
        )
    })?;
    eprintln!(
        "{}: {} rules {}",
        old_path.display(),
        kind.as_str(),
        old.identity()
    );
    let old_outcomes = outcomes(&old, &samples, &subscribers, now);
    let mut differ = 0;
    for ((s, o), n) in samples.iter().zip(&old_outcomes).zip(&new_outcomes) {
        if o.same(n) {
            continue;
        }
        differ += 1;
        // A window that differs is shown with each side's outcome (a scheduled one shows it
        // anyway).
        let windows_differ = o.window() != n.window();
        let window = |x: &Outcome| match x.window() {
            Some(w) if windows_differ && !matches!(x, Outcome::Scheduled(_)) => Some(w),
            _ => None,
        };
        if args.json {
            let (mut old, mut new) = (o.json(), n.json());
            for (v, x) in [(&mut old, o), (&mut new, n)] {
                if let Some(w) = window(x) {
                    v["window"] = w.json();
                }
            }
            writeln!(out, "{}", json!({"line": s.line, "old": old, "new": new}))?;
        } else {
            for (sign, x) in [("-", o), ("+", n)] {
                if let Some(w) = window(x) {
                    writeln!(
                        out,
                        "line {}: {sign} window {} {}",
                        s.line, w.opens, w.closes
                    )?;
                }
                for l in x.text() {
                    writeln!(out, "line {}: {sign} {l}", s.line)?;
                }
            }
        }
    }
    let summary = format!(
        "{differ} of {} messages differ (- {}, + {})",
        samples.len(),
        old_path.display(),
        args.file.display()
    );
    if args.json {
        eprintln!("{summary}");
    } else {
        writeln!(out, "{summary}")?;
    }
    out.flush()?;
    Ok(if differ == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &[u8]) -> tempfile_path::TempFile {
        tempfile_path::TempFile::new(text)
    }

    /// A file removed on drop (the runner has no tempfile dependency).
    mod tempfile_path {
        pub struct TempFile(pub std::path::PathBuf);

        impl TempFile {
            pub fn new(text: &[u8]) -> TempFile {
                static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p = std::env::temp_dir()
                    .join(format!("runner-rules-test-{}-{n}", std::process::id()));
                std::fs::write(&p, text).unwrap();
                TempFile(p)
            }
        }

        impl Drop for TempFile {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn samples_keep_their_line_numbers_and_lose_crlf() {
        let f = file(b"{\"a\":1}\r\n\n  \n[2]\nlast");
        let samples = read_samples(&f.0).unwrap();
        let got: Vec<(usize, &[u8])> = samples
            .iter()
            .map(|s| (s.line, s.payload.as_slice()))
            .collect();
        assert_eq!(
            got,
            [(1, &b"{\"a\":1}"[..]), (4, &b"[2]"[..]), (5, &b"last"[..])]
        );
    }

    #[test]
    fn subscribers_skip_the_header_comments_and_blanks() {
        let f = file(b"client_id,restaurant_id\n# a comment\n\n c1 , r1\nc2,r1\r\n");
        assert_eq!(
            read_subscribers(&f.0).unwrap(),
            [
                ("r1".to_string(), "c1".to_string()),
                ("r1".to_string(), "c2".to_string())
            ]
        );
        let f = file(b"c1,r1\nc2;r1\n");
        let e = read_subscribers(&f.0).unwrap_err().to_string();
        assert!(
            e.contains("line 2: expected `client_id,restaurant_id`"),
            "{e}"
        );
        let f = file(b"c1,r1,extra\n");
        assert!(read_subscribers(&f.0).is_err());
    }

    const WINDOW: Window = Window {
        opens: 1001,
        closes: 2000,
    };

    fn skipped(reason: &'static str, window: Window) -> Outcome {
        Outcome::Skipped { reason, window }
    }

    #[test]
    fn errors_compare_by_code_only() {
        let trap = |d: &str| Outcome::Error {
            code: "rules_trap",
            detail: d.into(),
        };
        assert!(trap("at 0x10").same(&trap("at 0x20")));
        assert!(!trap("x").same(&skipped("expired", WINDOW)));
        assert!(!skipped("expired", WINDOW).same(&skipped("no_subscribers", WINDOW)));
    }

    #[test]
    fn a_valid_campaign_compares_with_its_window() {
        let later = Window {
            opens: 1002,
            ..WINDOW
        };
        assert!(Outcome::Scheduled(WINDOW).same(&Outcome::Scheduled(WINDOW)));
        assert!(!Outcome::Scheduled(WINDOW).same(&Outcome::Scheduled(later)));
        assert!(!skipped("expired", WINDOW).same(&skipped("expired", later)));
        let drafts = |window| Outcome::Drafts {
            window,
            drafts: vec![("c".into(), "{}".into())],
        };
        assert!(drafts(WINDOW).same(&drafts(WINDOW)));
        assert!(!drafts(WINDOW).same(&drafts(later)));
        // What an active campaign prints does not change with its window.
        assert_eq!(drafts(WINDOW).text(), drafts(later).text());
        assert_eq!(drafts(WINDOW).json(), drafts(later).json());
    }

    #[test]
    fn a_campaign_not_yet_open_is_scheduled_with_its_window() {
        let o = Outcome::Scheduled(WINDOW);
        assert_eq!(o.text(), ["scheduled 1001 2000"]);
        assert_eq!(
            o.json(),
            json!({"outcome": "scheduled", "opens": 1001, "closes": 2000})
        );
        assert_eq!(
            summary(Kind::Campaign, &[o, skipped("expired", WINDOW)]),
            "2 messages: 0 drafts from 0 campaigns, 0 rejected, 1 scheduled, 1 skipped, 0 errors"
        );
    }
}
