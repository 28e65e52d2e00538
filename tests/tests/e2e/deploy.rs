//! deploy/: the Grafana dashboard and the example systemd unit, checked against the real runner.
//!
//! The dashboard: its structure (a Prometheus data source variable and no fixed data source,
//! unique panel ids, panels on the 24-column grid), and every metric its PromQL uses, with the
//! labels and label values it selects, present in the `/metrics` of a runner running both
//! pipelines after traffic that makes the labelled series appear. The unit: its sections and
//! keys, its `ExecStart` command accepted by the real binary (as `config check` on
//! deploy/runner.toml), a stop timeout above the runner's shutdown deadline, and
//! `systemd-analyze verify` where that tool exists.

use e2e_tests::*;
use runner::app::RunOptions;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const DASHBOARD: &str = include_str!("../../../deploy/grafana/runner.json");
const UNIT: &str = include_str!("../../../deploy/systemd/runner.service");

/// SPEC.md's example campaign is active at this instant.
const SPEC_NOW: i64 = 1_659_304_828;
/// Event time of the sales: a multiple of the 30 s window.
const T0: i64 = 1_764_255_600;
const R0: &str = "123e4567-e89b-12d3-a456-426614174000";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf()
}

// ---------------------------------------------------------------------------------------------
// PromQL: the metrics, labels and label values an expression selects.

/// A label matcher: (label, operator, value).
type Matcher = (String, String, String);

/// One vector selector: `metric{label op "value", …}`.
#[derive(Debug, Clone, PartialEq)]
struct Selector {
    metric: String,
    matchers: Vec<Matcher>,
}

/// What one expression uses.
#[derive(Debug, Default, PartialEq)]
struct Uses {
    selectors: Vec<Selector>,
    /// Labels of `by (…)`, `without (…)`, `on (…)`, `ignoring (…)`, `group_left/right (…)`.
    grouping: Vec<String>,
}

const KEYWORDS: [&str; 8] = [
    "and", "or", "unless", "bool", "offset", "inf", "nan", "atan2",
];
const GROUPING: [&str; 6] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b':'
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b':'
}

/// Reads a quoted string starting at `s[i]` (", ' or `); returns its value and the index after it.
fn read_string(s: &[u8], i: usize) -> Result<(String, usize), String> {
    let quote = s[i];
    let mut out = Vec::new();
    let mut j = i + 1;
    while j < s.len() {
        match s[j] {
            b'\\' if quote != b'`' && j + 1 < s.len() => {
                out.push(match s[j + 1] {
                    b'n' => b'\n',
                    b't' => b'\t',
                    c => c,
                });
                j += 2;
            }
            c if c == quote => {
                return Ok((String::from_utf8_lossy(&out).into_owned(), j + 1));
            }
            c => {
                out.push(c);
                j += 1;
            }
        }
    }
    Err(format!("an unterminated string at {i}"))
}

fn skip_spaces(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && s[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

fn read_ident(s: &[u8], i: usize) -> (String, usize) {
    let mut j = i;
    while j < s.len() && is_ident(s[j]) {
        j += 1;
    }
    (String::from_utf8_lossy(&s[i..j]).into_owned(), j)
}

/// Parses the label matchers of `{…}` starting at `s[i] == '{'`; returns them and the index
/// after the closing brace.
fn read_matchers(s: &[u8], i: usize) -> Result<(Vec<Matcher>, usize), String> {
    let mut out = Vec::new();
    let mut j = skip_spaces(s, i + 1);
    loop {
        if j >= s.len() {
            return Err("an unterminated label matcher list".into());
        }
        if s[j] == b'}' {
            return Ok((out, j + 1));
        }
        if !is_ident_start(s[j]) {
            return Err(format!("a label name expected at {j}"));
        }
        let (label, k) = read_ident(s, j);
        let k = skip_spaces(s, k);
        let op = ["=~", "!~", "!=", "="]
            .into_iter()
            .find(|op| s[k..].starts_with(op.as_bytes()))
            .ok_or_else(|| format!("a matcher operator expected after label {label}"))?;
        let k = skip_spaces(s, k + op.len());
        if k >= s.len() || !matches!(s[k], b'"' | b'\'' | b'`') {
            return Err(format!("a quoted value expected for label {label}"));
        }
        let (value, k) = read_string(s, k)?;
        out.push((label, op.to_string(), value));
        j = skip_spaces(s, k);
        if j < s.len() && s[j] == b',' {
            j = skip_spaces(s, j + 1);
        }
    }
}

/// The metrics (with their matchers) and grouping labels a PromQL expression uses. Identifiers
/// followed by `(` or by `by`/`without` are functions and aggregations; keywords, numbers and
/// durations, strings outside selectors, range and subquery brackets and Grafana variables
/// (`$x`, `${x}`) are skipped.
fn promql_uses(expr: &str) -> Result<Uses, String> {
    let s = expr.as_bytes();
    let mut uses = Uses::default();
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        if matches!(c, b'"' | b'\'' | b'`') {
            i = read_string(s, i)?.1;
        } else if c == b'$' {
            i += 1;
            if i < s.len() && s[i] == b'{' {
                while i < s.len() && s[i] != b'}' {
                    i += 1;
                }
                i += 1;
            } else {
                while i < s.len() && is_ident(s[i]) {
                    i += 1;
                }
            }
        } else if c == b'[' {
            while i < s.len() && s[i] != b']' {
                i += 1;
            }
            i += 1;
        } else if c == b'{' {
            // A selector without a metric name before it: only `{__name__="…"}` names one.
            let (matchers, next) = read_matchers(s, i)?;
            let name = matchers
                .iter()
                .find(|(l, op, _)| l == "__name__" && op == "=")
                .map(|(_, _, v)| v.clone())
                .ok_or_else(|| format!("a selector without a metric name in {expr}"))?;
            uses.selectors.push(Selector {
                metric: name,
                matchers: matchers.into_iter().filter(|m| m.0 != "__name__").collect(),
            });
            i = next;
        } else if c.is_ascii_digit() || c == b'.' {
            // Numbers and durations (0.99, 5m, 1e3).
            while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == b'.') {
                i += 1;
            }
        } else if is_ident_start(c) {
            let (ident, next) = read_ident(s, i);
            let after = skip_spaces(s, next);
            let follows = |word: &str| {
                s[after..].starts_with(word.as_bytes())
                    && !s.get(after + word.len()).is_some_and(|c| is_ident(*c))
            };
            if GROUPING.contains(&ident.as_str()) {
                i = after;
                if i < s.len() && s[i] == b'(' {
                    let close = s[i..]
                        .iter()
                        .position(|c| *c == b')')
                        .ok_or("an unterminated label list")?;
                    for l in String::from_utf8_lossy(&s[i + 1..i + close]).split(',') {
                        let l = l.trim();
                        if !l.is_empty() {
                            uses.grouping.push(l.to_string());
                        }
                    }
                    i += close + 1;
                }
            } else if KEYWORDS.contains(&ident.as_str())
                || (after < s.len() && s[after] == b'(')
                || follows("by")
                || follows("without")
            {
                i = next;
            } else {
                let mut sel = Selector {
                    metric: ident,
                    matchers: Vec::new(),
                };
                i = next;
                if after < s.len() && s[after] == b'{' {
                    let (matchers, n) = read_matchers(s, after)?;
                    sel.matchers = matchers;
                    i = n;
                }
                uses.selectors.push(sel);
            }
        } else {
            i += 1;
        }
    }
    Ok(uses)
}

#[test]
fn the_promql_extractor_finds_metrics_and_skips_functions_keywords_and_variables() {
    let u = promql_uses(
        r#"histogram_quantile(0.99, sum by (pipeline, le) (rate(runner_stage_seconds_bucket{instance=~"$instance", stage="fetch"}[$__rate_interval]))) / on(pipeline) group_left count without (x) (up offset 5m) and time() - max(runner_topic_watermark_seconds) > bool 1e3 or {__name__="other_metric", a!="}"}"#,
    )
    .unwrap();
    let names: Vec<&str> = u.selectors.iter().map(|s| s.metric.as_str()).collect();
    assert_eq!(
        names,
        [
            "runner_stage_seconds_bucket",
            "up",
            "runner_topic_watermark_seconds",
            "other_metric"
        ]
    );
    assert_eq!(
        u.selectors[0].matchers,
        [
            ("instance".into(), "=~".into(), "$instance".into()),
            ("stage".into(), "=".into(), "fetch".into())
        ]
    );
    assert_eq!(
        u.selectors[3].matchers,
        [("a".into(), "!=".into(), "}".into())]
    );
    assert_eq!(u.grouping, ["pipeline", "le", "pipeline", "x"]);
    assert!(promql_uses(r#"rate(x{a="unterminated}[5m])"#).is_err());
    assert!(promql_uses(r#"sum({a="no name"})"#).is_err());
}

// ---------------------------------------------------------------------------------------------
// The Prometheus text exposition.

#[derive(Debug, Default)]
struct Exposition {
    /// Metric family → its TYPE.
    types: BTreeMap<String, String>,
    /// Sample name → each series' labels.
    series: BTreeMap<String, Vec<BTreeMap<String, String>>>,
}

impl Exposition {
    fn parse(text: &str) -> Result<Exposition, String> {
        let mut e = Exposition::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split_whitespace();
                let (Some(name), Some(kind)) = (it.next(), it.next()) else {
                    return Err(format!("a TYPE line without a type: {line}"));
                };
                e.types.insert(name.to_string(), kind.to_string());
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let s = line.as_bytes();
            let (name, mut i) = read_ident(s, 0);
            if name.is_empty() {
                return Err(format!("a sample line without a name: {line}"));
            }
            let mut labels = BTreeMap::new();
            if i < s.len() && s[i] == b'{' {
                let (matchers, next) = read_matchers(s, i).map_err(|e| format!("{e}: {line}"))?;
                for (l, _, v) in matchers {
                    labels.insert(l, v);
                }
                i = next;
            }
            if line[i..].trim().parse::<f64>().is_err() {
                return Err(format!("a sample without a value: {line}"));
            }
            e.series.entry(name).or_default().push(labels);
        }
        Ok(e)
    }

    /// A sample name's series: the metric itself, or a histogram's `_bucket`, `_sum`, `_count`.
    /// A histogram named bare, or a name nobody exposes, is an error.
    fn series_of(&self, name: &str) -> Result<&[BTreeMap<String, String>], String> {
        match self.types.get(name).map(String::as_str) {
            Some("histogram") => {
                return Err(format!(
                    "{name} is a histogram: query {name}_bucket, _sum or _count"
                ))
            }
            Some(_) => {}
            None => {
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .filter(|base| self.types.get(*base).map(String::as_str) == Some("histogram"));
                if family.is_none() {
                    return Err(format!("{name} is not exposed by the runner"));
                }
            }
        }
        self.series
            .get(name)
            .map(Vec::as_slice)
            .ok_or_else(|| format!("{name} has a TYPE line but no series"))
    }

    fn merge(&mut self, other: Exposition) {
        self.types.extend(other.types);
        for (name, series) in other.series {
            self.series.entry(name).or_default().extend(series);
        }
    }

    fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.series.get(name).is_some_and(|all| {
            all.iter().any(|s| {
                labels
                    .iter()
                    .all(|(l, v)| s.get(*l).map(String::as_str) == Some(*v))
            })
        })
    }
}

/// Labels Prometheus adds at scrape time, not the runner.
const SCRAPE_LABELS: [&str; 2] = ["instance", "job"];

/// Every problem with what `uses` needs from `exposed`.
fn check_uses(what: &str, uses: &Uses, exposed: &Exposition) -> Vec<String> {
    let mut problems = Vec::new();
    let mut labels_seen: BTreeSet<&str> = BTreeSet::new();
    for sel in &uses.selectors {
        let series = match exposed.series_of(&sel.metric) {
            Ok(s) => s,
            Err(e) => {
                problems.push(format!("{what}: {e}"));
                continue;
            }
        };
        labels_seen.extend(series.iter().flat_map(|s| s.keys().map(String::as_str)));
        for (label, op, value) in &sel.matchers {
            if SCRAPE_LABELS.contains(&label.as_str()) {
                continue;
            }
            if !series.iter().any(|s| s.contains_key(label)) {
                problems.push(format!("{what}: {} has no label {label}", sel.metric));
            } else if op == "="
                && !value.contains('$')
                && !exposed.has(&sel.metric, &[(label, value)])
            {
                problems.push(format!(
                    "{what}: {} has no series with {label}=\"{value}\"",
                    sel.metric
                ));
            }
        }
    }
    for label in &uses.grouping {
        if !SCRAPE_LABELS.contains(&label.as_str()) && !labels_seen.contains(label.as_str()) {
            problems.push(format!(
                "{what}: grouped by {label}, which none of its metrics carries"
            ));
        }
    }
    problems
}

// ---------------------------------------------------------------------------------------------
// The dashboard.

fn dashboard() -> serde_json::Value {
    serde_json::from_str(DASHBOARD).expect("deploy/grafana/runner.json is JSON")
}

/// Every panel, rows' nested panels included.
fn panels(d: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        out.push(p);
        if let Some(nested) = p["panels"].as_array() {
            out.extend(nested);
        }
    }
    out
}

/// (panel title, refId, expr) of every query.
fn exprs(d: &serde_json::Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for p in panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                out.push((
                    p["title"].as_str().unwrap_or("?").to_string(),
                    t["refId"].as_str().unwrap_or("?").to_string(),
                    e.to_string(),
                ));
            }
        }
    }
    out
}

/// `label_values(selector, label)` of a query variable: the selector and the label.
fn label_values(query: &str) -> Option<(&str, &str)> {
    let inner = query
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    let (sel, label) = inner.rsplit_once(',')?;
    Some((sel.trim(), label.trim()))
}

fn is_datasource_variable(ds: &serde_json::Value, var: &str) -> bool {
    ds["type"] == "prometheus"
        && [format!("${var}"), format!("${{{var}}}")]
            .iter()
            .any(|v| ds["uid"].as_str() == Some(v.as_str()))
}

#[test]
fn the_dashboard_is_well_formed() {
    let d = dashboard();
    let mut problems = Vec::new();
    assert!(
        d["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion {}",
        d["schemaVersion"]
    );
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let ds_var = vars
        .iter()
        .find(|v| v["type"] == "datasource" && v["query"] == "prometheus")
        .and_then(|v| v["name"].as_str())
        .expect("a Prometheus data source variable");
    let var_names: BTreeSet<&str> = vars.iter().filter_map(|v| v["name"].as_str()).collect();
    for v in vars.iter().filter(|v| v["type"] == "query") {
        if !is_datasource_variable(&v["datasource"], ds_var) {
            problems.push(format!(
                "variable {}: data source {} is not ${ds_var}",
                v["name"], v["datasource"]
            ));
        }
    }

    let mut ids = BTreeSet::new();
    let mut cells: BTreeMap<(u64, u64), String> = BTreeMap::new();
    let all = panels(&d);
    assert!(all.len() >= 10, "{} panels", all.len());
    for p in &all {
        let title = p["title"].as_str().unwrap_or("?").to_string();
        match p["id"].as_u64() {
            Some(id) if !ids.insert(id) => problems.push(format!("{title}: id {id} used twice")),
            Some(_) => {}
            None => problems.push(format!("{title}: no id")),
        }
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64(),
            g["y"].as_u64(),
            g["w"].as_u64(),
            g["h"].as_u64(),
        );
        let (Some(x), Some(y), Some(w), Some(h)) = (x, y, w, h) else {
            problems.push(format!("{title}: gridPos {g}"));
            continue;
        };
        if w == 0 || h == 0 || x + w > 24 {
            problems.push(format!(
                "{title}: gridPos x {x} w {w} h {h} is off the 24-column grid"
            ));
        }
        // Panels must not overlap.
        for cx in x..(x + w).min(24) {
            for cy in y..y + h {
                if let Some(other) = cells.insert((cx, cy), title.clone()) {
                    problems.push(format!("{title} overlaps {other} at ({cx}, {cy})"));
                }
            }
        }
        if p["type"] == "row" {
            continue;
        }
        if !is_datasource_variable(&p["datasource"], ds_var) {
            problems.push(format!(
                "{title}: data source {} is not ${ds_var}",
                p["datasource"]
            ));
        }
        let targets = p["targets"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        if targets.is_empty() {
            problems.push(format!("{title}: no query"));
        }
        for t in targets {
            if !t["datasource"].is_null() && !is_datasource_variable(&t["datasource"], ds_var) {
                problems.push(format!(
                    "{title}: a query's data source {} is not ${ds_var}",
                    t["datasource"]
                ));
            }
            match t["expr"].as_str() {
                None | Some("") => problems.push(format!("{title}: a query without expr")),
                Some(e) => {
                    // Every variable it uses exists (Grafana's own start with $__).
                    let mut rest = e;
                    while let Some(at) = rest.find('$') {
                        let after = rest[at + 1..].trim_start_matches('{');
                        let name: String = after
                            .chars()
                            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                            .collect();
                        if !name.starts_with("__") && !var_names.contains(name.as_str()) {
                            problems.push(format!("{title}: unknown variable ${name} in {e}"));
                        }
                        rest = &rest[at + 1..];
                    }
                    if let Err(err) = promql_uses(e) {
                        problems.push(format!("{title}: {err}"));
                    }
                }
            }
        }
    }
    // No data source is pinned anywhere by uid (only Grafana's built-in annotations).
    fn pinned(v: &serde_json::Value, path: &str, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(uid) = m.get("datasource").and_then(|ds| ds.get("uid")) {
                    let uid = uid.as_str().unwrap_or("");
                    if !uid.starts_with('$') && uid != "-- Grafana --" {
                        out.push(format!("{path}: data source uid {uid} is fixed"));
                    }
                }
                for (k, v) in m {
                    pinned(v, &format!("{path}.{k}"), out);
                }
            }
            serde_json::Value::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    pinned(v, &format!("{path}[{i}]"), out);
                }
            }
            _ => {}
        }
    }
    pinned(&d, "$", &mut problems);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// A runner with both pipelines and the status endpoint, on one mock cluster and a database
/// with SPEC.md's subscribers, after traffic that makes every labelled series appear: a
/// campaign delivered, one expired (skipped), one malformed (dead-lettered), sales counted into
/// a final window and a late one, a rules file refused, the PostgreSQL sink held by a schema
/// change and released. Every metric of the dashboard must then be in its `/metrics` (plus the
/// series of a lost producer, see [`lost_producer_series`]), with the labels and label values
/// its queries select, and every metric family the runner exposes must be on a panel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_uses_is_exposed_by_a_running_runner() -> anyhow::Result<()> {
    let kafka = MockKafka::new(1)?;
    let (sales, revenue, sales_dlq) = (unique("sales"), unique("revenue"), unique("sales_dlq"));
    for t in [&sales, &revenue, &sales_dlq] {
        kafka.cluster.create_topic(t, 1, 1)?;
    }
    let db = TestDb::with_spec_subscribers().await?;
    let dir = tempfile::tempdir()?;
    let live = dir.path().join("campaign-rules.wasm");
    std::fs::copy(rules_wasm(), &live)?;
    let extra = format!(
        "[status]\nlisten = \"127.0.0.1:0\"\n\
         [pipelines.campaigns.rules]\npath = \"{}\"\nsettle = \"100ms\"\n\
         [pipelines.store_revenue]\nenabled = true\ninput_topic = \"{sales}\"\n\
         output_topic = \"{revenue}\"\ndead_letter_topic = \"{sales_dlq}\"\ngroup_id = \"{}\"\n\
         trigger = \"200ms\"\nidle_after = \"1s\"\n\
         [pipelines.store_revenue.rules]\npath = \"{}\"\n",
        live.display(),
        unique("group"),
        sales_wasm().display()
    );
    let running = start(
        config(&kafka, &db, &extra),
        RunOptions {
            clock: Arc::new(FixedClock(SPEC_NOW)),
            ..RunOptions::default()
        },
    )
    .await?;
    let addr = running.status_addr.expect("the status endpoint");
    let scrape = move || async move {
        let (code, body) = http_get(addr, "/metrics").await?;
        anyhow::ensure!(code == 200, "/metrics answered {code}");
        Exposition::parse(&body).map_err(anyhow::Error::msg)
    };
    let wait = |what: &'static str, cond: fn(&Exposition) -> bool| async move {
        let ok = wait_for_async(Duration::from_secs(30), move || async move {
            scrape().await.is_ok_and(|e| cond(&e))
        })
        .await;
        anyhow::ensure!(ok, "{what} did not appear in /metrics within 30 s");
        anyhow::Ok(())
    };

    // Campaigns: SPEC.md's example (8 drafts), an expired one, a malformed message.
    let expired = campaign(
        R0,
        "123e4567-e89b-12d3-a456-426614170101",
        1_600_000_000,
        1_600_000_100,
    );
    kafka
        .produce(&[
            (Some("first_message"), SPEC_CAMPAIGN.as_bytes()),
            (Some("k"), expired.as_bytes()),
            (Some("k"), b"not json"),
        ])
        .await?;
    // Sales: [T0, T0+30) made final by a sale 200 s later, then a late sale for it.
    let s: Vec<String> = [
        ("0.10", T0),
        ("0.20", T0 + 29),
        ("1.00", T0 + 200),
        ("9.99", T0 + 10),
    ]
    .iter()
    .map(|(price, ts)| sale("s1", price, *ts))
    .collect();
    let batch: Vec<(Option<&str>, &[u8])> = s.iter().map(|v| (Some("s1"), v.as_bytes())).collect();
    produce(&kafka.brokers, &sales, &batch).await?;
    wait("the campaign's drafts, skip and dead letter", |e| {
        e.has(
            "runner_skipped_total",
            &[("pipeline", "campaigns"), ("reason", "expired")],
        ) && e.has(
            "runner_dead_lettered_total",
            &[("pipeline", "campaigns"), ("reason", "malformed_json")],
        ) && e.has(
            "runner_end_to_end_latency_seconds_count",
            &[("pipeline", "campaigns")],
        )
    })
    .await?;
    wait("a final window and a late sale", |e| {
        e.has(
            "runner_dead_lettered_total",
            &[("pipeline", "store_revenue"), ("reason", "late")],
        ) && e.has(
            "runner_windows_final_total",
            &[("pipeline", "store_revenue")],
        ) && e.has(
            "runner_topic_watermark_seconds",
            &[("pipeline", "store_revenue")],
        )
    })
    .await?;

    // A rules file that is not a component: refused, the running version stays.
    replace_atomically(&fixture("garbage.wasm"), &live)?;
    wait("a rules refusal", |e| {
        e.has("runner_rules_refused_total", &[("pipeline", "campaigns")])
    })
    .await?;

    // The PostgreSQL sink held by a schema change, then released.
    let admin = db.client().await?;
    admin
        .batch_execute(
            "ALTER TABLE subscribers_feedback RENAME COLUMN adv_campaign_content TO content_moved",
        )
        .await?;
    let mut second: serde_json::Value = serde_json::from_str(SPEC_CAMPAIGN)?;
    second["adv_campaign_id"] = "123e4567-e89b-12d3-a456-426614170102".into();
    kafka
        .produce(&[(Some("k"), second.to_string().as_bytes())])
        .await?;
    wait("the PostgreSQL sink failing", |e| {
        e.has(
            "runner_sink_failing",
            &[("pipeline", "campaigns"), ("sink", "postgres")],
        ) && e.has("runner_sink_retries_total", &[("sink", "postgres")])
    })
    .await?;
    admin
        .batch_execute(
            "ALTER TABLE subscribers_feedback RENAME COLUMN content_moved TO adv_campaign_content",
        )
        .await?;
    assert!(
        db.wait_count(
            "SELECT count(*) FROM subscribers_feedback",
            16,
            Duration::from_secs(30)
        )
        .await,
        "both campaigns' drafts in PostgreSQL"
    );

    let mut exposed = scrape().await?;
    running.stop().await?;
    // A lost producer (a transactional call that never returns) cannot be brought about on the
    // mock cluster: its series are the ones `Events::producer_lost`, which the delivery stage
    // calls, adds to a registry.
    exposed.merge(lost_producer_series());

    let d = dashboard();
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for (title, ref_id, expr) in exprs(&d) {
        let uses = promql_uses(&expr).map_err(anyhow::Error::msg)?;
        used.extend(uses.selectors.iter().map(|s| s.metric.clone()));
        problems.extend(check_uses(
            &format!("panel {title:?} query {ref_id}"),
            &uses,
            &exposed,
        ));
    }
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        let Some(q) = v["query"]["query"].as_str().or(v["query"].as_str()) else {
            continue;
        };
        if v["type"] != "query" {
            continue;
        }
        let (sel, label) = label_values(q)
            .ok_or_else(|| anyhow::anyhow!("variable {}: not label_values(…): {q}", v["name"]))?;
        let mut uses = promql_uses(sel).map_err(anyhow::Error::msg)?;
        uses.grouping.push(label.to_string());
        problems.extend(check_uses(
            &format!("variable {}", v["name"]),
            &uses,
            &exposed,
        ));
    }
    // Every family the runner exposes is on the dashboard, bar none.
    for family in exposed.types.keys() {
        let on_dashboard = used.contains(family)
            || ["_bucket", "_sum", "_count"]
                .iter()
                .any(|s| used.contains(&format!("{family}{s}")));
        if !on_dashboard {
            problems.push(format!("{family} is exposed but on no panel"));
        }
    }
    assert!(
        problems.is_empty(),
        "{}\n(the dashboard uses {used:?})",
        problems.join("\n")
    );
    Ok(())
}

/// The series a lost producer adds: `runner_producers_lost_total` appears only when a
/// transactional call never returns, which the mock cluster cannot be made to do; the delivery
/// stages report it through `Events::producer_lost`.
fn lost_producer_series() -> Exposition {
    let metrics = runner::metrics::Metrics::new();
    let events = runner::events::Events::new(&metrics, "campaigns");
    events.producer_lost("drafts", 0, &"a transactional call did not return");
    Exposition::parse(&metrics.render()).expect("the exposition parses")
}

/// `Events::producer_lost` produces the series the dashboard's "Producers lost" panel queries.
#[test]
fn a_lost_producer_produces_the_series_the_dashboard_queries() {
    let exposed = lost_producer_series();
    assert!(exposed.has("runner_producers_lost_total", &[("pipeline", "campaigns")]));
    assert!(exposed.has(
        "runner_sink_failing",
        &[("pipeline", "campaigns"), ("sink", "kafka")]
    ));
    let queried = exprs(&dashboard())
        .iter()
        .filter_map(|(_, _, e)| promql_uses(e).ok())
        .flat_map(|u| u.selectors)
        .any(|s| s.metric == "runner_producers_lost_total");
    assert!(queried, "the dashboard shows producers lost");
}

// ---------------------------------------------------------------------------------------------
// The systemd unit.

/// A unit file: section → (key, value) in order; keys may repeat.
fn parse_unit(text: &str) -> Result<BTreeMap<String, Vec<(String, String)>>, String> {
    let mut out: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let mut section: Option<String> = None;
    let mut pending = String::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with(';'))
        {
            continue;
        }
        // A line ending in a backslash continues on the next.
        if let Some(head) = line.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        let line = std::mem::take(&mut pending) + line;
        if line.starts_with('[') {
            let name = line
                .strip_prefix('[')
                .and_then(|l| l.strip_suffix(']'))
                .ok_or_else(|| format!("line {}: a malformed section header", n + 1))?;
            out.entry(name.to_string()).or_default();
            section = Some(name.to_string());
            continue;
        }
        let Some(sec) = &section else {
            return Err(format!("line {}: a key outside any section", n + 1));
        };
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("line {}: not KEY=VALUE: {line}", n + 1))?;
        let k = k.trim();
        if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(format!("line {}: a malformed key {k:?}", n + 1));
        }
        out.get_mut(sec)
            .expect("the section")
            .push((k.to_string(), v.trim().to_string()));
    }
    Ok(out)
}

fn unit_value<'a>(
    unit: &'a BTreeMap<String, Vec<(String, String)>>,
    section: &str,
    key: &str,
) -> Option<&'a str> {
    unit.get(section)?
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// A systemd time span: plain seconds, or units such as "1min 30s".
fn systemd_seconds(v: &str) -> Option<u64> {
    if let Ok(s) = v.parse::<u64>() {
        return Some(s);
    }
    humantime::parse_duration(v).ok().map(|d| d.as_secs())
}

#[test]
fn the_systemd_unit_runs_the_real_binary_and_outlasts_its_shutdown() -> anyhow::Result<()> {
    let unit = parse_unit(UNIT).map_err(anyhow::Error::msg)?;
    for s in ["Unit", "Service", "Install"] {
        assert!(unit.contains_key(s), "section [{s}]");
    }
    let get = |k: &str| unit_value(&unit, "Service", k);
    let user = get("User").expect("User=");
    assert!(
        !user.is_empty() && user != "root",
        "a dedicated user, not {user}"
    );
    assert_eq!(get("Restart"), Some("on-failure"));
    assert_eq!(get("KillSignal"), Some("SIGTERM"));
    assert!(
        get("EnvironmentFile").is_some(),
        "secrets from an EnvironmentFile"
    );
    assert_ne!(
        get("MemoryDenyWriteExecute"),
        Some("yes"),
        "wasmtime needs executable memory for the compiled rules"
    );
    assert_eq!(
        unit_value(&unit, "Install", "WantedBy"),
        Some("multi-user.target")
    );

    // ExecStart: the binary, then global flags, `run`, `--config FILE`.
    let exec = get("ExecStart").expect("ExecStart=");
    let argv: Vec<&str> = exec.split_whitespace().collect();
    assert!(argv[0].starts_with('/'), "an absolute binary path: {exec}");
    let run_at = argv
        .iter()
        .position(|a| *a == "run")
        .expect("the run command");
    let config_flag = argv[run_at + 1..]
        .iter()
        .position(|a| *a == "--config" || *a == "-c")
        .map(|i| run_at + 1 + i)
        .expect("run --config FILE");
    assert_eq!(argv.get(config_flag + 1), Some(&"/etc/runner/runner.toml"));

    // The same command line, with `config check` in place of `run` and the example
    // configuration in place of /etc/runner/runner.toml, accepted by the real binary; the
    // secret the EnvironmentFile provides is not printed.
    let example = repo_root().join("deploy/runner.toml");
    let mut args: Vec<String> = argv[1..run_at].iter().map(|s| s.to_string()).collect();
    args.extend(["config".into(), "check".into()]);
    for (i, a) in argv.iter().enumerate().skip(run_at + 1) {
        if i == config_flag + 1 {
            args.push(example.display().to_string());
        } else {
            args.push(a.to_string());
        }
    }
    let secret = "s3cret-from-the-environment-file";
    let out = std::process::Command::new(runner_binary())
        .args(&args)
        .env("RUNNER__KAFKA__SASL_PASSWORD", secret)
        .env_remove("RUNNER__KAFKA__BROKERS")
        .env_remove("RUNNER__POSTGRES__URL")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "runner {args:?} failed: {}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("store_revenue"),
        "both pipelines configured:\n{stdout}"
    );
    assert!(
        !stdout.contains(secret) && !stderr.contains(secret),
        "the secret is printed"
    );

    // systemd's stop timeout outlasts the runner's: the longest shutdown_timeout, then up to
    // 10 s per pipeline to abandon what is in hand (app::Running::stop).
    // The password comes from the EnvironmentFile in service: here, from an overlay.
    let config = runner::config::Config::load(&runner::config::Sources {
        file: Some(&example),
        overlay: Some(&format!("[kafka]\nsasl_password = \"{secret}\"\n")),
        env: false,
    })?;
    let mut deadlines = Vec::new();
    if let Some(c) = &config.campaigns {
        deadlines.push(c.shutdown_timeout);
    }
    if let Some(s) = &config.store_revenue {
        deadlines.push(s.shutdown_timeout);
    }
    assert_eq!(
        deadlines.len(),
        2,
        "both pipelines enabled in deploy/runner.toml"
    );
    let runner_needs =
        deadlines.iter().max().expect("a deadline").as_secs() + 10 * deadlines.len() as u64;
    let stop = systemd_seconds(get("TimeoutStopSec").expect("TimeoutStopSec="))
        .expect("TimeoutStopSec is a time span");
    assert!(
        stop > runner_needs,
        "TimeoutStopSec {stop} s does not exceed the runner's {runner_needs} s"
    );

    // The compile cache is writable under ProtectSystem=strict: a CacheDirectory= (or
    // ReadWritePaths=) holds it.
    let writable: Vec<PathBuf> = get("CacheDirectory")
        .into_iter()
        .flat_map(|v| v.split_whitespace())
        .map(|d| Path::new("/var/cache").join(d))
        .chain(
            get("ReadWritePaths")
                .into_iter()
                .flat_map(|v| v.split_whitespace())
                .map(PathBuf::from),
        )
        .collect();
    let caches = [
        config
            .campaigns
            .as_ref()
            .map(|c| c.rules.limits.compile_cache_dir.clone()),
        config
            .store_revenue
            .as_ref()
            .map(|s| s.rules.limits.compile_cache_dir.clone()),
    ];
    for cache in caches.into_iter().flatten().flatten() {
        assert!(
            writable.iter().any(|w| cache.starts_with(w)),
            "compile cache {} is not writable by the unit ({writable:?})",
            cache.display()
        );
    }

    // systemd's own check, where systemd is installed: the unit as written, with the binary
    // path pointing at the built runner (verify requires an executable there). Any output is a
    // problem (verify exits 0 on unknown keys and bad values, and says so).
    let verify = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output();
    if verify.is_err() {
        println!("systemd-analyze is not installed: the unit was not checked by systemd");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let copy = dir.path().join("runner.service");
    std::fs::write(
        &copy,
        UNIT.replace(argv[0], &runner_binary().display().to_string()),
    )?;
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {}\n{said}",
        out.status
    );
    Ok(())
}
