//! A header name other clients can send and the Rust client cannot read: one that is not UTF-8
//! (kcat, on the C client, takes a name as bytes). A message with such a header is
//! dead-lettered whole (key and value), says how many of its headers could not be read, and
//! the partition goes on. Sent and read back with kcat.

use e2e_tests::*;
use runner::app::RunOptions;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::Duration;

const NOW: i64 = 1_700_000_000;
const R0: &str = "123e4567-e89b-12d3-a456-426614174000";

/// Sends `value` to `topic` with one header `name`=`v` through kcat.
fn kcat_send(brokers: &str, topic: &str, name: &[u8], value: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut h = name.to_vec();
    h.extend_from_slice(b"=v");
    let mut child = std::process::Command::new("kcat")
        .args(["-b", brokers, "-t", topic, "-P", "-H"])
        .arg(std::ffi::OsStr::from_bytes(&h))
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    child.stdin.take().expect("stdin").write_all(value)?;
    anyhow::ensure!(child.wait()?.success(), "kcat failed");
    Ok(())
}

/// The first record's headers on `topic` as kcat prints them (`name=value`, comma-separated).
fn kcat_headers(brokers: &str, topic: &str) -> anyhow::Result<Vec<u8>> {
    let out = std::process::Command::new("kcat")
        .args([
            "-b", brokers, "-t", topic, "-C", "-c", "1", "-e", "-f", "%h",
        ])
        .args(["-X", "isolation.level=read_committed"])
        .output()?;
    anyhow::ensure!(out.status.success(), "kcat failed");
    Ok(out.stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_name_that_is_not_utf8_does_not_stop_the_partition() -> anyhow::Result<()> {
    let kafka = MockKafka::new(1)?;
    let db = TestDb::with_spec_subscribers().await?;
    let running = start(
        config(&kafka, &db, ""),
        RunOptions {
            clock: Arc::new(FixedClock(NOW)),
            ..RunOptions::default()
        },
    )
    .await?;
    kcat_send(&kafka.brokers, &kafka.input, NAME, b"not json")?;
    let marker = campaign(
        R0,
        "00000000-0000-4000-8000-0000000000c1",
        NOW - 10,
        NOW + 10,
    );
    kafka.produce(&[(None, marker.as_bytes())]).await?;
    let delivered = db
        .wait_count(
            "SELECT count(*) FROM subscribers_feedback",
            8,
            Duration::from_secs(20),
        )
        .await;
    assert!(
        delivered,
        "the partition goes on to the marker: {:?}",
        running.campaigns().stats()
    );
    // Counted once its Kafka transaction has committed.
    assert!(
        wait_for(Duration::from_secs(20), || running
            .campaigns()
            .stats()
            .dead_lettered("malformed_json")
            == 1)
        .await,
        "{:?}",
        running.campaigns().stats()
    );
    check_kept(&kcat_headers(&kafka.brokers, &kafka.dlq)?);
    stop(running).await?;
    Ok(())
}

/// A name that is not UTF-8 (0xFF never occurs in UTF-8).
const NAME: &[u8] = b"bad\xffname";

/// The dead letter says a header could not be read (the Kafka client the runner is built on
/// can neither read nor write a name that is not UTF-8), and does not carry it.
fn check_kept(headers: &[u8]) {
    let text = String::from_utf8_lossy(headers);
    assert!(text.contains("dlq-unreadable-headers=1"), "{text}");
    assert!(!headers.windows(NAME.len()).any(|w| w == NAME), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_with_a_header_name_that_is_not_utf8_does_not_stop_the_partition(
) -> anyhow::Result<()> {
    const T0: i64 = 1_764_255_600;
    let kafka = SalesKafka::new(1)?;
    let db = TestDb::new().await?;
    let running = start(
        sales_config(&kafka, &db, ""),
        RunOptions {
            clock: Arc::new(FixedClock(T0 - 3600)),
            ..RunOptions::default()
        },
    )
    .await?;
    kcat_send(&kafka.brokers, &kafka.input, NAME, b"not json")?;
    kafka
        .send(None, Some("marker"), &sale("marker", "1.00", T0))
        .await?;
    let counted = db
        .wait_count(
            "SELECT count(*) FROM store_revenue_windows WHERE store = 'marker'",
            1,
            Duration::from_secs(20),
        )
        .await;
    let stats = running.store_revenue().stats();
    assert!(counted, "the partition goes on to the marker: {stats:?}");
    assert_eq!(stats.dead_lettered("malformed_json"), 1, "{stats:?}");
    kafka.read_at_least(&kafka.dlq, 1).await?;
    check_kept(&kcat_headers(&kafka.brokers, &kafka.dlq)?);
    running.stop().await?;
    Ok(())
}
