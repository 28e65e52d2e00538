//! Start-up as an operator meets it, with the runner binary as a process: each thing the runner
//! needs from outside missing in turn (the brokers, the input topic, the PostgreSQL host, the
//! PostgreSQL role) is named on one line, within the start-up deadline, and the runner exits
//! non-zero; configured to wait, it answers `/health/ready` with the cause meanwhile and
//! becomes ready once the cause is gone.

use e2e_tests::*;
use rdkafka::mocking::MockCluster;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    l.local_addr().expect("bound").port()
}

/// The runner's configuration for one of these tests, in a file of its own.
struct Setup {
    dir: tempfile::TempDir,
    brokers: String,
    postgres: String,
    input: String,
    extra: String,
}

impl Setup {
    fn new(brokers: &str, postgres: &str, input: &str) -> Setup {
        Setup {
            dir: tempfile::tempdir().expect("a temporary directory"),
            brokers: brokers.into(),
            postgres: postgres.into(),
            input: input.into(),
            extra: String::new(),
        }
    }

    fn extra(mut self, toml: &str) -> Setup {
        self.extra.push_str(toml);
        self
    }

    fn write(&self) -> PathBuf {
        let path = self.dir.path().join("runner.toml");
        let text = format!(
            "[kafka]\nbrokers = \"{}\"\n[postgres]\nurl = \"{}\"\n[pipelines.campaigns]\n\
             input_topic = \"{}\"\noutput_topic = \"{}\"\ndead_letter_topic = \"{}\"\n\
             group_id = \"{}\"\n[pipelines.campaigns.rules]\npath = \"{}\"\n{}",
            self.brokers,
            self.postgres,
            self.input,
            unique("drafts"),
            unique("dlq"),
            unique("group"),
            rules_wasm().display(),
            self.extra
        );
        std::fs::write(&path, text).expect("the configuration is written");
        path
    }

    /// Starts `runner run` on the configuration, its log in a file of the directory.
    fn spawn(&self) -> ChildGuard {
        let config = self.write();
        let log = std::fs::File::create(self.log_path()).expect("a log file");
        let child = Command::new(runner_binary())
            .args(["run", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the runner starts");
        ChildGuard(child)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("runner.log")
    }

    fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(self.log_path()).unwrap_or_default())
    }
}

/// The text without terminal colour codes.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Waits for the runner to exit by itself, `limit` at most: its status and how long it ran.
fn exit_within(
    child: &mut ChildGuard,
    started: Instant,
    limit: Duration,
) -> (ExitStatus, Duration) {
    loop {
        if let Some(status) = child.try_wait().expect("the runner's status") {
            return (status, started.elapsed());
        }
        assert!(
            started.elapsed() < limit,
            "the runner did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the runner until it exits by itself, which it must within the start-up deadline
/// `timeout` plus `slack`: asserts that it fails, and returns its log.
fn fails_within(setup: Setup, timeout: Duration, slack: Duration) -> String {
    let setup = setup.extra(&format!(
        "[startup]\ntimeout = \"{}\"\non_timeout = \"exit\"\n",
        humantime::format_duration(timeout)
    ));
    let started = Instant::now();
    let mut child = setup.spawn();
    let (status, took) = exit_within(&mut child, started, timeout + Duration::from_secs(30));
    let log = setup.log();
    eprintln!("--- the runner's output ({took:?}, {status}) ---\n{log}---");
    assert!(!status.success(), "the runner must fail: {log}");
    assert!(
        took <= timeout + slack,
        "the runner took {took:?} to give up, the deadline being {timeout:?}: {log}"
    );
    assert!(
        !log.contains("Pipeline consuming."),
        "it never consumes: {log}"
    );
    log
}

/// The line of `log` that says why the runner exits.
fn error_line(log: &str) -> &str {
    log.lines()
        .find(|l| l.starts_with("runner: error:"))
        .unwrap_or_else(|| panic!("no error line: {log}"))
}

/// How many lines of `log` contain `text`.
fn lines_with(log: &str, text: &str) -> usize {
    log.lines().filter(|l| l.contains(text)).count()
}

const DEADLINE: Duration = Duration::from_secs(3);
/// The last check may end half a second past the deadline; the process then exits.
const SLACK: Duration = Duration::from_secs(3);

#[test]
fn an_unreachable_broker_is_named_within_the_deadline() {
    let brokers = format!("127.0.0.1:{}", closed_port());
    let log = fails_within(
        Setup::new(&brokers, &pg_admin_url(), &unique("campaigns")),
        DEADLINE,
        SLACK,
    );
    let line = error_line(&log);
    assert!(
        line.contains(&format!("Kafka brokers {brokers} cannot be reached"))
            && line.contains("kafka_unreachable")
            && line.contains("campaign pipeline"),
        "{line}"
    );
    // Said when first seen and when giving up; not once per attempt.
    assert!(lines_with(&log, &brokers) <= 2, "{log}");
}

#[test]
fn a_missing_input_topic_is_named() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    let input = unique("campaigns");
    let log = fails_within(
        Setup::new(&cluster.bootstrap_servers(), &pg_admin_url(), &input),
        DEADLINE,
        SLACK,
    );
    let line = error_line(&log);
    assert!(
        line.contains(&format!("input topic {input} does not exist"))
            && line.contains("input_topic_missing"),
        "{line}"
    );
    assert!(lines_with(&log, &input) <= 2, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_postgres_host_is_named() -> anyhow::Result<()> {
    let kafka = MockKafka::new(1)?;
    let port = closed_port();
    let setup = Setup::new(
        &kafka.brokers,
        &format!("host=127.0.0.1 port={port} user=postgres dbname=postgres"),
        &kafka.input,
    );
    let log = tokio::task::spawn_blocking(move || fails_within(setup, DEADLINE, SLACK)).await?;
    let line = error_line(&log);
    assert!(
        line.contains(&format!("PostgreSQL at 127.0.0.1:{port} cannot be reached"))
            && line.contains("postgres_unreachable"),
        "{line}"
    );
    assert!(lines_with(&log, &format!("127.0.0.1:{port}")) <= 2, "{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_role_that_does_not_exist_is_named() -> anyhow::Result<()> {
    let kafka = MockKafka::new(1)?;
    let role = unique("nobody");
    let mut url: tokio_postgres::Config = pg_admin_url().parse()?;
    url.user(&role);
    let setup = Setup::new(
        &kafka.brokers,
        &runner::demo::config_to_url(&url),
        &kafka.input,
    );
    let log = tokio::task::spawn_blocking(move || fails_within(setup, DEADLINE, SLACK)).await?;
    let line = error_line(&log);
    assert!(
        line.contains(&format!("refused user \"{role}\" (authentication failed)"))
            && line.contains(&format!("role \"{role}\" does not exist"))
            && line.contains("postgres_auth_failed"),
        "{line}"
    );
    Ok(())
}

/// A server that takes connections and never answers: the connect timeout ends the attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_a_server_that_never_answers_times_out() -> anyhow::Result<()> {
    // Listening, never accepting: the kernel completes the handshakes, nothing ever answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = silent.local_addr()?.port();
    let started = Instant::now();
    let e = runner::db::connect(&format!(
        "host=127.0.0.1 port={port} user=runner dbname=x connect_timeout=1"
    ))
    .await
    .expect_err("nothing answers");
    let took = started.elapsed();
    assert!(matches!(e, runner::db::DbError::ConnectTimeout(_)), "{e}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(e.to_string().contains("did not answer within 1s"), "{e}");
    Ok(())
}

/// `GET path` on the runner's status endpoint: (code, body), or None while it does not answer.
async fn get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    http_get(addr, path).await.ok()
}

/// Asks `path` until its answer satisfies `want`, `timeout` at most: the last answer, and
/// whether it did.
async fn answer_until(
    addr: std::net::SocketAddr,
    path: &str,
    timeout: Duration,
    want: impl Fn(u16, &str) -> bool,
) -> (bool, Option<(u16, String)>) {
    let deadline = Instant::now() + timeout;
    loop {
        let answer = get(addr, path).await;
        let ok = answer.as_ref().is_some_and(|(c, b)| want(*c, b));
        if ok || Instant::now() >= deadline {
            return (ok, answer);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_says_why_and_starts_once_the_topic_exists() -> anyhow::Result<()> {
    let cluster = MockCluster::new(1)?;
    let input = unique("campaigns");
    let db = TestDb::new().await?;
    let status: std::net::SocketAddr = format!("127.0.0.1:{}", closed_port()).parse()?;
    let setup = Setup::new(&cluster.bootstrap_servers(), &db.url, &input).extra(&format!(
        "[status]\nlisten = \"{status}\"\n[startup]\ntimeout = \"2s\"\non_timeout = \"wait\"\n"
    ));
    let mut child = setup.spawn();

    // While it waits: not ready, starting, the cause named.
    let (ok, seen) = answer_until(status, "/health/ready", Duration::from_secs(20), |c, b| {
        c == 503 && b.contains("input_topic_missing")
    })
    .await;
    assert!(ok, "{seen:?}\n{}", setup.log());
    // Past the deadline: startup_failed, still waiting.
    let (ok, seen) = answer_until(status, "/health/ready", Duration::from_secs(20), |c, b| {
        c == 503 && b.contains("startup_failed")
    })
    .await;
    assert!(ok, "{seen:?}\n{}", setup.log());
    let (code, body) = get(status, "/health/ready").await.expect("an answer");
    eprintln!("/health/ready while waiting: {code} {body}");
    let ready: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(
        ready["pipelines"]["campaigns"],
        serde_json::json!(["startup_failed", "input_topic_missing"]),
        "{body}"
    );
    let detail = ready["startup"]["campaigns"]["details"][0]
        .as_str()
        .unwrap_or_default();
    assert!(
        detail.contains(&format!("input topic {input} does not exist")),
        "{body}"
    );
    let (code, body) = get(status, "/health").await.expect("an answer");
    eprintln!("/health while waiting: {code} {body}");
    assert!(
        code == 503 && body.contains("input_topic_missing"),
        "{body}"
    );
    let (code, _) = get(status, "/health/live").await.expect("an answer");
    assert_eq!(code, 200, "alive while it waits");
    assert!(child.try_wait()?.is_none(), "it waits on: {}", setup.log());

    // The cause removed: it starts and becomes ready by itself.
    cluster.create_topic(&input, 2, 1)?;
    let (ok, seen) = answer_until(status, "/health/ready", Duration::from_secs(30), |c, _| {
        c == 200
    })
    .await;
    assert!(ok, "{seen:?}\n{}", setup.log());
    let (code, body) = get(status, "/health").await.expect("an answer");
    assert_eq!(code, 200, "{body}");
    assert!(!body.contains("startup"), "{body}");

    // SIGTERM: a clean stop.
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    let (exit, _) = exit_within(&mut child, Instant::now(), Duration::from_secs(40));
    let log = setup.log();
    eprintln!("--- the runner's output ---\n{log}---");
    assert!(exit.success(), "{exit}: {log}");
    assert!(log.contains("Pipeline consuming."), "{log}");
    // Said when seen, and when the deadline passed; not once per check.
    assert!(lines_with(&log, "input_topic_missing") <= 2, "{log}");
    Ok(())
}
