//! Secrets are never printed. A distinct secret is planted in every place the runner takes one
//! — the Kafka SASL password, the PostgreSQL password in key=value and in URL form, and client
//! properties whose names say password, secret or key, for every client, then per role — from
//! the configuration file and from `RUNNER__…` environment variables; then every output is
//! searched for each: `runner config check`, `runner config defaults`, a `runner run` process
//! logging at trace with librdkafka's `debug` on, its `/health`, `/status` and `/metrics`, and
//! the `Debug` form of the loaded configuration. Each secret is also shown to have reached
//! the configuration (its real value, or the property in librdkafka's configuration dump), so
//! a secret lost on the way cannot pass for one kept quiet.
//!
//! Also here: librdkafka's repeated errors, rate-limited, give a bounded number of log lines
//! while the broker refuses connections for several seconds.

use e2e_tests::*;
use runner::config::{Config, RawConfig, Sources};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// A secret no output has any other reason to contain.
fn secret(what: &str) -> String {
    format!("{what}{}", uuid::Uuid::new_v4().simple())
}

/// Where a secret is planted.
struct Planted {
    /// Which place, for the failure message.
    place: &'static str,
    value: String,
}

/// The runner binary with a clean environment for the runner's own variables.
fn runner(env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(runner_binary());
    for (k, _) in std::env::vars() {
        if k.starts_with("RUNNER_") || k == "RUST_LOG" {
            c.env_remove(k);
        }
    }
    c.envs(env.iter().copied());
    c
}

/// stdout and stderr of a finished command, and whether it succeeded.
fn output(mut c: Command) -> (bool, String) {
    let out = c.output().expect("the runner runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Fails if `text` (what `what` printed) contains any planted secret.
fn assert_quiet(what: &str, text: &str, secrets: &[Planted]) {
    for s in secrets {
        if let Some(at) = text.find(&s.value) {
            let from = text[..at].rfind('\n').map_or(0, |i| i + 1);
            let to = text[at..].find('\n').map_or(text.len(), |i| at + i);
            panic!(
                "{what} printed the {} secret:\n{}",
                s.place,
                &text[from..to]
            );
        }
    }
}

/// A free local port for the status endpoint.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The `[pipelines.campaigns]` section of a test.
fn pipeline_section(kafka: &MockKafka) -> String {
    format!(
        "[pipelines.campaigns]\ninput_topic = \"{}\"\noutput_topic = \"{}\"\ndead_letter_topic = \"{}\"\n\
         group_id = \"{}\"\n[pipelines.campaigns.rules]\npath = \"{}\"\n",
        kafka.input,
        kafka.output,
        kafka.dlq,
        unique("group"),
        rules_wasm().display()
    )
}

/// Sends SIGTERM to the child (by its id) and waits for it, then returns what it wrote to
/// `stderr_path`.
fn stop_and_read(child: &mut ChildGuard, stderr_path: &Path) -> String {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::read_to_string(stderr_path).unwrap_or_default()
}

/// Runs `runner run` with `file` and `env` for a few seconds once its status endpoint
/// answers, and returns its stderr and stdout and the bodies of every endpoint.
async fn run_and_collect(
    file: &Path,
    env: &[(&str, &str)],
    status: std::net::SocketAddr,
    dir: &Path,
) -> anyhow::Result<(String, Vec<(String, String)>)> {
    let stderr_path = dir.join("run.stderr");
    let stdout_path = dir.join("run.stdout");
    let mut c = runner(env);
    c.args(["--log", "trace", "run", "--config"])
        .arg(file)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path)?)
        .stderr(std::fs::File::create(&stderr_path)?);
    let mut child = ChildGuard(c.spawn()?);
    // The endpoint listens once the pipeline has started; the consumer then joins its group.
    let ready = wait_for_async(Duration::from_secs(60), || async {
        matches!(http_get(status, "/health/ready").await, Ok((200, _)))
    })
    .await;
    let mut bodies = Vec::new();
    if ready {
        // A few seconds of work: rebalances, producers made at the takeover, probes.
        tokio::time::sleep(Duration::from_secs(3)).await;
        for path in [
            "/health",
            "/health/live",
            "/health/ready",
            "/status",
            "/metrics",
        ] {
            let (code, body) = http_get(status, path).await?;
            bodies.push((format!("{path} ({code})"), body));
        }
    }
    let stderr = stop_and_read(&mut child, &stderr_path);
    let stdout = std::fs::read_to_string(&stdout_path).unwrap_or_default();
    anyhow::ensure!(
        ready,
        "the runner did not become ready:\n{}",
        tail(&stderr, 40)
    );
    Ok((stderr + &stdout, bodies))
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Checks every output of one configuration: `file` plus `env`. `overlay` is `env` written
/// as TOML (to load the same configuration in-process); `markers` are texts the printed
/// configuration shows, without its white space, when each secret reached it; `dumped` are the client properties
/// librdkafka's configuration dump must list (as `[redacted]`).
#[allow(clippy::too_many_arguments)]
async fn check_every_output(
    file: &Path,
    env: &[(&str, &str)],
    overlay: &str,
    secrets: &[Planted],
    markers: &[&str],
    dumped: &[&str],
    status: std::net::SocketAddr,
    dir: &Path,
) -> anyhow::Result<()> {
    // In-process: the loaded configuration holds the real values, its Debug none of them.
    let sources = Sources {
        file: Some(file),
        overlay: Some(overlay),
        env: false,
    };
    let config = Config::load(&sources)?;
    let raw = RawConfig::load(&sources)?;
    let consumer = config.kafka.consumer_config("g");
    let producer = config.kafka.producer_config();
    let real = [
        consumer.get("sasl.password").unwrap_or_default(),
        consumer.get("ssl.key.password").unwrap_or_default(),
        consumer.get("ssl.keystore.password").unwrap_or_default(),
        producer.get("ssl.key.pem").unwrap_or_default(),
        config.postgres_url.as_str(),
    ]
    .join(" ");
    for s in secrets {
        assert!(
            real.contains(&s.value),
            "the {} secret did not reach the configuration",
            s.place
        );
    }
    for (what, text) in [
        ("Debug of Config", format!("{config:?}")),
        ("pretty Debug of Config", format!("{config:#?}")),
        ("Debug of RawConfig", format!("{raw:?}")),
    ] {
        assert_quiet(what, &text, secrets);
    }

    // `runner config check`: the configuration shows where each secret is, not what.
    let mut check = runner(env);
    check.args(["config", "check", "--config"]).arg(file);
    let (ok, text) = output(check);
    assert!(ok, "config check failed: {text}");
    assert_quiet("runner config check", &text, secrets);
    let compact: String = text.split_whitespace().collect();
    for m in markers {
        assert!(
            compact.contains(m),
            "config check does not show {m}: {text}"
        );
    }

    let mut defaults = runner(env);
    defaults.args(["config", "defaults"]);
    let (ok, text) = output(defaults);
    assert!(ok, "{text}");
    assert_quiet("runner config defaults", &text, secrets);

    // `runner run` at trace, librdkafka's debug on.
    let (logs, bodies) = run_and_collect(file, env, status, dir).await?;
    assert_quiet("runner run (its log)", &logs, secrets);
    for (endpoint, body) in &bodies {
        assert_quiet(endpoint, body, secrets);
    }
    // librdkafka dumps each client's configuration (the properties set, sensitive ones
    // redacted by librdkafka): the planted properties reached the clients.
    assert!(
        logs.contains("Client configuration:"),
        "no configuration dump in the run's log:\n{}",
        tail(&logs, 40)
    );
    for p in dumped {
        let line = format!("{p} = [redacted]");
        assert!(logs.contains(&line), "no `{line}` in the run's log");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_never_printed() -> anyhow::Result<()> {
    let kafka = MockKafka::new(2)?;
    let db = TestDb::new().await?;
    let dir = tempfile::tempdir()?;
    let status: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let head = format!(
        "[status]\nlisten = \"{status}\"\n{}[kafka.properties]\n\"debug\" = \"all\"\n",
        pipeline_section(&kafka)
    );

    // 1. In the file: the SASL password, the PostgreSQL password (key=value), a secret
    //    property of every client, of the consumer and of the producers.
    let file_secrets = vec![
        Planted {
            place: "kafka.sasl_password (file)",
            value: secret("saslfile"),
        },
        Planted {
            place: "postgres.url password=… (file)",
            value: secret("pgkv"),
        },
        Planted {
            place: "kafka.properties ssl.key.password",
            value: secret("keypass"),
        },
        Planted {
            place: "kafka.consumer_properties ssl.keystore.password",
            value: secret("keystore"),
        },
        Planted {
            place: "kafka.producer_properties ssl.key.pem",
            value: secret("pem"),
        },
    ];
    let file = dir.path().join("file.toml");
    std::fs::write(
        &file,
        format!(
            "{head}\"ssl.key.password\" = \"{}\"\n\
             [kafka]\nbrokers = \"{}\"\nsasl_username = \"runner\"\nsasl_password = \"{}\"\n\
             [kafka.consumer_properties]\n\"ssl.keystore.password\" = \"{}\"\n\
             [kafka.producer_properties]\n\"ssl.key.pem\" = \"{}\"\n\
             [postgres]\nurl = \"{} password={}\"\n",
            file_secrets[2].value,
            kafka.brokers,
            file_secrets[0].value,
            file_secrets[3].value,
            file_secrets[4].value,
            db.url,
            file_secrets[1].value,
        ),
    )?;
    check_every_output(
        &file,
        &[],
        "",
        &file_secrets,
        &[
            "\"sasl.password\":\"<redacted>\"",
            "\"ssl.key.password\":\"<redacted>\"",
            "\"ssl.keystore.password\":\"<redacted>\"",
            "\"ssl.key.pem\":\"<redacted>\"",
            "password:Some(\"<redacted>\"",
        ],
        &["sasl.password", "ssl.key.password", "ssl.keystore.password"],
        status,
        dir.path(),
    )
    .await?;

    // 2. From the environment: the SASL password, and the PostgreSQL connection string in URL
    //    form with its password (the file has neither).
    let pg: tokio_postgres::Config = db.url.parse()?;
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".into(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let user = pg.get_user().unwrap_or("postgres").to_string();
    let env_secrets = vec![
        Planted {
            place: "RUNNER__KAFKA__SASL_PASSWORD",
            value: secret("saslenv"),
        },
        Planted {
            place: "RUNNER__POSTGRES__URL postgresql://user:…@",
            value: secret("pgurl"),
        },
    ];
    let url = format!(
        "postgresql://{user}:{}@{host}:{port}/{}",
        env_secrets[1].value, db.name
    );
    let file = dir.path().join("env.toml");
    std::fs::write(
        &file,
        format!(
            "{head}[kafka]\nbrokers = \"{}\"\nsasl_mechanism = \"SCRAM-SHA-512\"\nsasl_username = \"runner\"\n",
            kafka.brokers
        ),
    )?;
    let env = [
        (
            "RUNNER__KAFKA__SASL_PASSWORD",
            env_secrets[0].value.as_str(),
        ),
        ("RUNNER__POSTGRES__URL", url.as_str()),
    ];
    let overlay = format!(
        "[kafka]\nsasl_password = \"{}\"\n[postgres]\nurl = \"{url}\"\n",
        env_secrets[0].value
    );
    check_every_output(
        &file,
        &env,
        &overlay,
        &env_secrets,
        &[
            "\"sasl.password\":\"<redacted>\"",
            "password:Some(\"<redacted>\"",
        ],
        &["sasl.password"],
        status,
        dir.path(),
    )
    .await?;
    Ok(())
}

/// A configuration `runner config check` must refuse, and the secret it holds.
struct Refused {
    what: &'static str,
    /// The configuration file, if any.
    file: Option<String>,
    /// An environment variable, if any.
    env: Option<(&'static str, String)>,
    planted: String,
    /// What the error must name.
    names: &'static str,
}

/// A configuration the runner refuses says why without quoting a secret: a password that is
/// not a string, a secret property librdkafka refuses, a syntax error on a secret's line, a
/// connection string that does not parse.
#[test]
fn refused_configurations_do_not_print_their_secrets() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let check = |file: Option<&PathBuf>, env: &[(&str, &str)]| {
        let mut c = runner(env);
        c.args(["config", "check"]);
        if let Some(f) = file {
            c.arg("--config").arg(f);
        }
        output(c)
    };
    let digits = format!("{}", 100_000_000_000u64 + u64::from(rand_u32()));
    let words = secret("syntax");
    let file = |what: &'static str, toml: String, planted: &str, names: &'static str| Refused {
        what,
        file: Some(toml),
        env: None,
        planted: planted.to_string(),
        names,
    };
    let cases = [
        Refused {
            what: "a numeric SASL password from the environment",
            file: None,
            env: Some(("RUNNER__KAFKA__SASL_PASSWORD", digits.clone())),
            planted: digits.clone(),
            names: "sasl_password",
        },
        file(
            "a numeric secret property",
            format!("[kafka.properties]\n\"ssl.key.password\" = {digits}\n"),
            &digits,
            "ssl.key.password",
        ),
        file(
            "a secret property librdkafka does not know",
            format!("[kafka.producer_properties]\n\"ssl.secret.typo\" = \"{words}\"\n"),
            &words,
            "ssl.secret.typo",
        ),
        file(
            "a syntax error on the SASL password's line",
            format!("[kafka]\nsasl_password = \"{words}\n"),
            &words,
            "line 2",
        ),
        file(
            "a PostgreSQL URL that does not parse",
            format!("[postgres]\nurl = \"postgresql://runner:{words}@db:notaport/x\"\n"),
            &words,
            "postgres.url",
        ),
        file(
            "a key=value connection string that does not parse",
            format!("[postgres]\nurl = \"host=db password={words} port=notaport\"\n"),
            &words,
            "postgres.url",
        ),
    ];
    for (i, case) in cases.iter().enumerate() {
        let Refused {
            what,
            planted,
            names,
            ..
        } = case;
        let file = case.file.as_ref().map(|t| {
            let p = dir.path().join(format!("case{i}.toml"));
            std::fs::write(&p, t).expect("write the case's file");
            p
        });
        let env: Vec<(&str, &str)> = case.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (ok, text) = check(file.as_ref(), &env);
        assert!(!ok, "{what}: the configuration was accepted: {text}");
        assert!(
            !text.contains(planted.as_str()),
            "{what}: the error quotes the secret: {text}"
        );
        assert!(
            text.contains(names),
            "{what}: the error does not name {names}: {text}"
        );
    }
    Ok(())
}

/// A number for a secret made of digits.
fn rand_u32() -> u32 {
    uuid::Uuid::new_v4().as_u128() as u32
}

/// One line of the runner's JSON log.
#[derive(Debug)]
struct LogLine {
    level: String,
    target: String,
    /// The client, for librdkafka's lines.
    client: String,
    /// The message with the error and reason of an error event.
    text: String,
}

fn parse_log(text: &str) -> Vec<LogLine> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| {
            let field = |k: &str| v["fields"][k].as_str().unwrap_or_default().to_string();
            LogLine {
                level: v["level"].as_str().unwrap_or_default().to_string(),
                target: v["target"].as_str().unwrap_or_default().to_string(),
                client: field("client"),
                text: format!(
                    "{} {} {}",
                    field("message"),
                    field("error"),
                    field("reason")
                ),
            }
        })
        .collect()
}

/// The brokers of a running pipeline go away (their ports then refuse connections) for
/// several seconds while its clients retry every 10 to 100 ms: librdkafka's errors and warnings
/// come out once per client and message (numbers aside), however many attempts fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_refusing_connections_gives_a_bounded_number_of_log_lines() -> anyhow::Result<()> {
    let cluster = rdkafka::mocking::MockCluster::new(3)?;
    let brokers = cluster.bootstrap_servers();
    let (input, output, dlq) = (unique("campaigns"), unique("drafts"), unique("dlq"));
    cluster.create_topic(&input, 3, 1)?;
    cluster.create_topic(&output, 3, 1)?;
    cluster.create_topic(&dlq, 1, 1)?;
    let db = TestDb::new().await?;
    let dir = tempfile::tempdir()?;
    let status: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let file = dir.path().join("storm.toml");
    std::fs::write(
        &file,
        format!(
            "[status]\nlisten = \"{status}\"\n[postgres]\nurl = \"{}\"\n\
             [kafka]\nbrokers = \"{brokers}\"\n\
             [kafka.properties]\n\"reconnect.backoff.ms\" = \"10\"\n\"reconnect.backoff.max.ms\" = \"100\"\n\
             \"debug\" = \"broker\"\n\
             [pipelines.campaigns]\ninput_topic = \"{input}\"\noutput_topic = \"{output}\"\n\
             dead_letter_topic = \"{dlq}\"\ngroup_id = \"{}\"\n\
             [pipelines.campaigns.rules]\npath = \"{}\"\n",
            db.url,
            unique("group"),
            rules_wasm().display()
        ),
    )?;
    let stderr_path = dir.path().join("storm.stderr");
    let mut c = runner(&[]);
    c.args([
        "--log",
        "info,librdkafka=debug",
        "--log-format",
        "json",
        "run",
        "--config",
    ])
    .arg(&file)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(std::fs::File::create(&stderr_path)?);
    let mut child = ChildGuard(c.spawn()?);
    let ready = wait_for_async(Duration::from_secs(60), || async {
        matches!(http_get(status, "/health/ready").await, Ok((200, _)))
    })
    .await;
    // A little work with the brokers there (producers made at the takeover), then they go.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mark = std::fs::metadata(&stderr_path)?.len() as usize;
    drop(cluster);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let log = stop_and_read(&mut child, &stderr_path);
    assert!(
        ready,
        "the runner did not become ready:\n{}",
        tail(&log, 40)
    );
    let lines = parse_log(log.get(mark..).unwrap_or_default());

    // Every failed attempt is in librdkafka's debug output (not limited: asked for).
    let attempts = lines
        .iter()
        .filter(|l| l.level == "DEBUG" && l.target == "librdkafka" && l.text.contains("refused"))
        .count();
    assert!(
        attempts >= 50,
        "the brokers were not retried often ({attempts} failed attempts logged)"
    );
    // Errors and warnings: no message twice for one client (numbers aside), a few in all.
    let noisy: Vec<&LogLine> = lines
        .iter()
        .filter(|l| l.target == "librdkafka" && (l.level == "ERROR" || l.level == "WARN"))
        .collect();
    let mut seen = std::collections::HashSet::new();
    for l in &noisy {
        let key = (
            l.client.clone(),
            l.level.clone(),
            runner::logging::shape(&l.text),
        );
        assert!(
            seen.insert(key),
            "logged twice within a minute by {}: {} (of {} lines for {attempts} failed attempts)",
            l.client,
            l.text,
            noisy.len()
        );
    }
    let shown: Vec<String> = noisy
        .iter()
        .map(|l| format!("{} {} {}", l.level, l.client, l.text))
        .collect();
    let mut per_client: std::collections::BTreeMap<&str, usize> = Default::default();
    for l in &noisy {
        *per_client.entry(l.client.as_str()).or_default() += 1;
    }
    // A client says each broker connection it retries is refused: the brokers, the group or
    // transaction coordinator.
    assert!(
        !noisy.is_empty() && per_client.values().all(|&n| n <= 4),
        "{} error and warning lines for {attempts} failed attempts ({per_client:?}):\n{}",
        noisy.len(),
        shown.join("\n")
    );
    eprintln!(
        "{attempts} failed connection attempts gave {} error and warning lines:\n{}",
        noisy.len(),
        shown.join("\n")
    );
    Ok(())
}
