//! Helpers for the end-to-end tests (and the benchmarks): service addresses from the
//! environment with local defaults, a fresh database and fresh topics per test, and waiting for
//! a condition with a deadline instead of sleeping.

use anyhow::{Context, Result};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use runner::app::{self, RunOptions, Running};
use runner::config::{Config, Sources};
use runner::events::Stats;
use std::path::PathBuf;
use std::time::Duration;

pub use runner::demo::{produce, read_topic, wait_for, SPEC_CAMPAIGN, SPEC_SUBSCRIBERS};

/// A PostgreSQL database where tests may create their own databases.
pub fn pg_admin_url() -> String {
    std::env::var("TEST_PG_ADMIN_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=postgres".into())
}

/// The built campaign rules component.
pub fn rules_wasm() -> PathBuf {
    let p = std::env::var_os("CAMPAIGN_RULES_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../build/wasm/campaign-rules.wasm")
        });
    assert!(
        p.exists(),
        "{} is missing: run `make transforms` first",
        p.display()
    );
    p
}

/// A short random suffix for names.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Drops `database` if it exists and creates it anew through `admin_url`; returns its URL.
/// Only for databases a test or benchmark names for itself.
pub async fn fresh_database(admin_url: &str, database: &str) -> Result<String> {
    let admin = runner::db::connect(admin_url)
        .await
        .context("connecting to PostgreSQL as admin")?;
    admin
        .batch_execute(&format!(
            "DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)"
        ))
        .await?;
    admin
        .batch_execute(&format!("CREATE DATABASE \"{database}\""))
        .await?;
    let mut cfg: tokio_postgres::Config = admin_url.parse()?;
    cfg.dbname(database);
    Ok(runner::demo::config_to_url(&cfg))
}

/// A fresh database of its own for one test, with the runner's schema.
#[derive(Debug, Clone)]
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn new() -> Result<TestDb> {
        let name = unique("t");
        let url = fresh_database(&pg_admin_url(), &name).await?;
        Ok(TestDb { name, url })
    }

    pub async fn client(&self) -> Result<tokio_postgres::Client> {
        Ok(runner::db::connect(&self.url).await?)
    }

    pub async fn with_schema(self) -> Result<TestDb> {
        runner::pipelines::campaigns::ensure_schema(&self.client().await?).await?;
        Ok(self)
    }

    /// A fresh database with the runner's schema and SPEC.md's ten subscriber rows.
    pub async fn with_spec_subscribers() -> Result<TestDb> {
        let db = TestDb::new().await?.with_schema().await?;
        db.seed_spec_subscribers().await?;
        Ok(db)
    }

    pub async fn seed_spec_subscribers(&self) -> Result<()> {
        let c = self.client().await?;
        for (client, restaurant) in SPEC_SUBSCRIBERS {
            self.subscribe_with(&c, client, restaurant).await?;
        }
        Ok(())
    }

    pub async fn subscribe_with(
        &self,
        c: &tokio_postgres::Client,
        client: &str,
        restaurant: &str,
    ) -> Result<()> {
        c.execute(
            "INSERT INTO public.subscribers_restaurants (client_id, restaurant_id) VALUES ($1, $2)",
            &[&client, &restaurant],
        )
        .await?;
        Ok(())
    }

    pub async fn count(&self, sql: &str) -> Result<i64> {
        Ok(self.client().await?.query_one(sql, &[]).await?.get(0))
    }

    /// Waits until the count `sql` returns is `want`, or `timeout` passes.
    pub async fn wait_count(&self, sql: &str, want: i64, timeout: Duration) -> bool {
        wait_for_async(timeout, || async {
            self.count(sql).await.ok() == Some(want)
        })
        .await
    }
}

/// The campaign pipeline's PostgreSQL side of delivery on `db`, as another runner would have
/// it (claims, unit transactions).
pub fn campaigns_pg(
    db: &TestDb,
) -> runner::delivery::PgSide<runner::pipelines::campaigns::Campaigns> {
    campaigns_pg_at(&db.url)
}

/// The same on the database at `url`.
pub fn campaigns_pg_at(
    url: &str,
) -> runner::delivery::PgSide<runner::pipelines::campaigns::Campaigns> {
    use runner::pipelines::campaigns::{self, cache};
    let pipeline =
        campaigns::Campaigns::new(cache::SubscriberCache::fixed(cache::Snapshot::default()));
    runner::delivery::PgSide::new(
        url.to_string(),
        std::sync::Arc::new(campaigns::tables()),
        std::sync::Arc::new(pipeline),
    )
}

/// An in-process librdkafka mock cluster with this test's own topics.
pub struct MockKafka {
    pub cluster: MockCluster<'static, DefaultProducerContext>,
    pub brokers: String,
    pub input: String,
    pub output: String,
    pub dlq: String,
}

impl std::fmt::Debug for MockKafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockKafka")
            .field("brokers", &self.brokers)
            .finish()
    }
}

impl MockKafka {
    pub fn new(input_partitions: i32) -> Result<MockKafka> {
        let cluster = MockCluster::new(1).context("mock cluster")?;
        let brokers = cluster.bootstrap_servers();
        let (input, output, dlq) = (unique("campaigns"), unique("drafts"), unique("dlq"));
        cluster.create_topic(&input, input_partitions, 1)?;
        cluster.create_topic(&output, 2, 1)?;
        cluster.create_topic(&dlq, 1, 1)?;
        Ok(MockKafka {
            cluster,
            brokers,
            input,
            output,
            dlq,
        })
    }

    pub async fn produce(&self, messages: &[(Option<&str>, &[u8])]) -> Result<()> {
        produce(&self.brokers, &self.input, messages).await
    }

    pub async fn drafts(&self, expected: usize) -> Result<Vec<OwnedMessage>> {
        read_topic(
            &self.brokers,
            &self.output,
            expected,
            Duration::from_secs(10),
        )
        .await
    }

    pub async fn dead_letters(&self, expected: usize) -> Result<Vec<OwnedMessage>> {
        read_topic(&self.brokers, &self.dlq, expected, Duration::from_secs(10)).await
    }
}

/// The runner configuration for one test: its topics, its database, the built rules.
pub fn config(kafka: &MockKafka, db: &TestDb, extra: &str) -> Config {
    let overlay = format!(
        "[kafka]\nbrokers = \"{}\"\n[pipelines.campaigns]\ninput_topic = \"{}\"\noutput_topic = \"{}\"\ndead_letter_topic = \"{}\"\n\
         group_id = \"{}\"\n[postgres]\nurl = \"{}\"\n[pipelines.campaigns.rules]\npath = \"{}\"\n",
        kafka.brokers,
        kafka.input,
        kafka.output,
        kafka.dlq,
        unique("group"),
        db.url,
        rules_wasm().display()
    );
    // `extra` is merged last, so a test can override any setting.
    let overlay = merge_toml(&overlay, extra);
    Config::load(&Sources {
        file: None,
        overlay: Some(&overlay),
        env: false,
    })
    .expect("test config is valid")
}

/// Merges `extra` into `base`, table by table at any depth.
fn merge_toml(base: &str, extra: &str) -> String {
    fn merge(base: &mut toml::Table, extra: toml::Table) {
        for (k, v) in extra {
            match (base.get_mut(&k), v) {
                (Some(toml::Value::Table(b)), toml::Value::Table(e)) => merge(b, e),
                (_, v) => {
                    base.insert(k, v);
                }
            }
        }
    }
    let mut base: toml::Table = base.parse().expect("base overlay");
    merge(&mut base, extra.parse().expect("extra overlay"));
    base.to_string()
}

/// Starts a runner in-process against the mock cluster.
pub async fn start(config: Config, options: RunOptions) -> Result<Running> {
    init_logging();
    app::start(
        config,
        RunOptions {
            mock_cluster: true,
            ..options
        },
    )
    .await
}

/// Stops a runner (an ordered drain) and returns the campaign pipeline's counters.
pub async fn stop(running: Running) -> Result<Stats> {
    let all = running.stop().await?;
    all.into_iter()
        .find(|s| s.pipeline == runner::pipelines::campaigns::NAME)
        .context("the campaign pipeline ran")
}

/// Test logs, filtered by RUST_LOG (default: warnings), captured per test.
pub fn init_logging() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    });
}

/// A clock stuck at one instant.
#[derive(Debug, Clone, Copy)]
pub struct FixedClock(pub i64);

impl runner::clock::Clock for FixedClock {
    fn now(&self) -> i64 {
        self.0
    }
}

pub fn header<'a>(m: &'a OwnedMessage, name: &str) -> Option<&'a str> {
    let hs = m.headers()?;
    hs.iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// What a draft's `provenance` header says (None when it has none, or not in that form).
pub fn provenance(
    m: &OwnedMessage,
) -> Option<runner::pipelines::campaigns::provenance::Provenance> {
    runner::pipelines::campaigns::provenance::Provenance::parse(header(
        m,
        runner::pipelines::campaigns::header::PROVENANCE,
    )?)
}

pub fn json(m: &OwnedMessage) -> serde_json::Value {
    serde_json::from_slice(m.payload().expect("a value")).expect("JSON value")
}

/// A campaign value for `restaurant`, with the given window.
pub fn campaign(restaurant: &str, campaign_id: &str, start: i64, end: i64) -> String {
    serde_json::json!({
        "restaurant_id": restaurant,
        "adv_campaign_id": campaign_id,
        "adv_campaign_content": format!("campaign {campaign_id}"),
        "adv_campaign_owner": "Ivanov Ivan Ivanovich",
        "adv_campaign_owner_contact": "iiivanov@restaurant.ru",
        "adv_campaign_datetime_start": start,
        "adv_campaign_datetime_end": end,
        "datetime_created": start - 100,
    })
    .to_string()
}

/// A test fixture component built by `make transforms` (build/wasm/fixtures/NAME).
pub fn fixture(name: &str) -> PathBuf {
    let dir = std::env::var_os("RULES_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../build/wasm/fixtures")
        });
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `make transforms` first",
        p.display()
    );
    p
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Replaces `dest` with a copy of `src` the way a deployment does: write aside, then rename.
pub fn replace_atomically(src: &std::path::Path, dest: &std::path::Path) -> Result<()> {
    let tmp = dest.with_extension(format!("tmp-{}", unique("x")));
    std::fs::copy(src, &tmp)?;
    std::fs::rename(&tmp, dest)?;
    Ok(())
}

/// A plain HTTP/1.1 GET against the status endpoint: (status code, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8(buf)?;
    let (head, body) = text.split_once("\r\n\r\n").context("an HTTP response")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .context("a status line")?
        .parse()?;
    Ok((code, body.to_string()))
}

/// Polls an async condition until it holds or `timeout` passes.
pub async fn wait_for_async<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f().await
}

/// A child process killed and reaped when dropped, so a failing test leaves no runner behind.
#[derive(Debug)]
pub struct ChildGuard(pub std::process::Child);

impl std::ops::Deref for ChildGuard {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// The built sales rules component.
pub fn sales_wasm() -> PathBuf {
    let p = std::env::var_os("SALES_RULES_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../build/wasm/sales-rules.wasm")
        });
    assert!(
        p.exists(),
        "{} is missing: run `make transforms` first",
        p.display()
    );
    p
}

/// A mock cluster with one test's sales topics.
pub struct SalesKafka {
    pub cluster: MockCluster<'static, DefaultProducerContext>,
    pub brokers: String,
    pub input: String,
    pub output: String,
    pub dlq: String,
    producer: rdkafka::producer::FutureProducer,
}

impl std::fmt::Debug for SalesKafka {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SalesKafka")
            .field("brokers", &self.brokers)
            .finish()
    }
}

impl SalesKafka {
    pub fn new(input_partitions: i32) -> Result<SalesKafka> {
        let cluster = MockCluster::new(1).context("mock cluster")?;
        let brokers = cluster.bootstrap_servers();
        let (input, output, dlq) = (unique("sales"), unique("revenue"), unique("sales_dlq"));
        cluster.create_topic(&input, input_partitions, 1)?;
        cluster.create_topic(&output, 2, 1)?;
        cluster.create_topic(&dlq, 1, 1)?;
        let producer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()?;
        Ok(SalesKafka {
            cluster,
            brokers,
            input,
            output,
            dlq,
            producer,
        })
    }

    /// Sends one sale value to `partition` (or by key when None), keyed by `key`.
    pub async fn send(&self, partition: Option<i32>, key: Option<&str>, value: &str) -> Result<()> {
        let mut r = rdkafka::producer::FutureRecord::<str, str>::to(&self.input).payload(value);
        if let Some(k) = key {
            r = r.key(k);
        }
        if let Some(p) = partition {
            r = r.partition(p);
        }
        self.producer
            .send(r, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)?;
        Ok(())
    }

    /// Waits until `topic` holds at least `n` records (read_committed), and returns them all.
    pub async fn read_at_least(&self, topic: &str, n: usize) -> Result<Vec<OwnedMessage>> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let got = read_topic(&self.brokers, topic, n, Duration::from_secs(10)).await?;
            if got.len() >= n || std::time::Instant::now() > deadline {
                return Ok(got);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A sale's JSON value.
pub fn sale(store: &str, price: &str, ts: i64) -> String {
    format!(r#"{{"store":"{store}","item":"coffee","price":{price},"ts":{ts}}}"#)
}

/// The runner configuration of a store-revenue test: its topics, its database, a short
/// trigger; the campaign pipeline off. `extra` is merged last.
pub fn sales_config(kafka: &SalesKafka, db: &TestDb, extra: &str) -> Config {
    let overlay = format!(
        "[kafka]\nbrokers = \"{}\"\n[postgres]\nurl = \"{}\"\n[pipelines.campaigns]\nenabled = false\n\
         [pipelines.store_revenue]\nenabled = true\ninput_topic = \"{}\"\noutput_topic = \"{}\"\n\
         dead_letter_topic = \"{}\"\ngroup_id = \"{}\"\ntrigger = \"200ms\"\nidle_after = \"1s\"\n\
         [pipelines.store_revenue.rules]\npath = \"{}\"\n",
        kafka.brokers,
        db.url,
        kafka.input,
        kafka.output,
        kafka.dlq,
        unique("group"),
        sales_wasm().display()
    );
    let overlay = merge_toml(&overlay, extra);
    Config::load(&Sources {
        file: None,
        overlay: Some(&overlay),
        env: false,
    })
    .expect("test config is valid")
}

/// The runner binary next to the test binary (built by `cargo test --workspace`).
pub fn runner_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/debug")
        .join("runner");
    assert!(
        bin.exists(),
        "{} is missing: build with `cargo test --workspace`",
        bin.display()
    );
    bin
}
