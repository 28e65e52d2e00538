//! The runner driven as an operator drives it: campaigns typed into `kcat -K: -P`, drafts read
//! back with `kcat -C`. (Debian's kcat speaks to librdkafka's mock cluster.)

use e2e_tests::*;
use runner::app::RunOptions;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

fn kcat() -> Command {
    let mut c = Command::new("kcat");
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaigns_from_kcat_come_out_in_kcat() -> anyhow::Result<()> {
    let kafka = MockKafka::new(3)?;
    let db = TestDb::with_spec_subscribers().await?;
    let running = start(
        config(&kafka, &db, ""),
        RunOptions {
            clock: Arc::new(FixedClock(1_659_304_828)),
            ..RunOptions::default()
        },
    )
    .await?;

    // One `key:value` line per message, as SPEC.md shows.
    let mut child = kcat()
        .args(["-b", &kafka.brokers, "-t", &kafka.input, "-K:", "-P"])
        .spawn()
        .expect("kcat is installed by scripts/setup.sh");
    let line = format!("first_message:{}\n", SPEC_CAMPAIGN);
    let written = child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(line.as_bytes());
    // Closing stdin ends kcat's input; wait for it whatever the write did.
    let out = child.wait_with_output()?;
    written?;
    assert!(
        out.status.success(),
        "kcat -P failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    assert!(
        wait_for(Duration::from_secs(20), || running
            .campaigns()
            .stats()
            .offsets_stored
            >= 1)
        .await,
        "{:?}",
        running.campaigns().stats()
    );
    stop(running).await?;

    let out = kcat()
        .args([
            "-b",
            &kafka.brokers,
            "-t",
            &kafka.output,
            "-C",
            "-e",
            "-q",
            "-o",
            "beginning",
            "-f",
            "%k\t%s\n",
        ])
        .output()?;
    assert!(
        out.status.success(),
        "kcat -C failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 8, "{text}");
    for l in lines {
        let (key, value) = l.split_once('\t').expect("key and value");
        let v: serde_json::Value = serde_json::from_str(value)?;
        assert_eq!(v["client_id"], key);
        assert_eq!(v["adv_campaign_content"], "first campaign");
    }
    Ok(())
}

/// `runner rules check` as an operator runs it before shipping a component: which pipeline's
/// rules it is, or why it would be refused, in the exit status too.
#[test]
fn rules_check_says_which_pipeline_a_component_is_for_or_why_it_is_refused() {
    let check = |file: &std::path::Path, kind: Option<&str>| {
        let mut c = Command::new(runner_binary());
        c.args(["--log", "error", "rules", "check"]);
        if let Some(k) = kind {
            c.args(["--kind", k]);
        }
        let out = c.arg(file).output().expect("the runner runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, text) = check(&sales_wasm(), None);
    assert!(
        ok && text.contains("accepted as sales rules: sales-rules 1.0.0"),
        "{text}"
    );
    let (ok, text) = check(&rules_wasm(), None);
    assert!(ok && text.contains("accepted as campaign rules"), "{text}");
    let (ok, text) = check(&sales_wasm(), Some("campaign"));
    assert!(!ok && text.contains("would be refused"), "{text}");
    let (ok, text) = check(&fixture("wasi-import.wasm"), None);
    assert!(
        !ok && text.contains("fits no pipeline's rules") && text.contains("no WASI"),
        "{text}"
    );
}
