//! The campaign rules contract's major version (fooddelivery:campaign-rules@4.0.0, the one
//! with the delivery window): rules built against 3.0.0 cannot say when their campaigns open,
//! so the runner refuses them, naming both versions: the binary does not start with them, and a
//! running pipeline given them by hot reload keeps its rules in service and says why. Rules of
//! the new contract whose window disagrees with their activity are refused too.

use e2e_tests::*;
use runner::app::RunOptions;
use std::sync::Arc;
use std::time::{Duration, Instant};

const NOW: i64 = 1_700_000_000;
const R0: &str = "123e4567-e89b-12d3-a456-426614174000";
/// What a refusal of the old contract names: the version of the component and the runner's.
const OLD: &str = "fooddelivery:campaign-rules/rules@3.0.0";
const HOSTED: &str = "fooddelivery:campaign-rules/rules@4.0.0 (compatible: 4.x)";

fn old_contract() -> std::path::PathBuf {
    fixture("campaign-rules-contract-3.wasm")
}

#[test]
fn the_runner_does_not_start_with_rules_of_the_old_contract() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens at these addresses: the rules are checked before anything is reached.
    let config = dir.path().join("runner.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = \"127.0.0.1:9\"\n\
             [postgres]\nurl = \"host=127.0.0.1 port=9 user=nobody dbname=nothing\"\n\
             [pipelines.campaigns]\nenabled = true\n\
             [pipelines.campaigns.rules]\npath = \"{}\"\n\
             [pipelines.store_revenue]\nenabled = false\n",
            old_contract().display()
        ),
    )
    .unwrap();
    let err = dir.path().join("stderr");
    let mut child = ChildGuard(
        std::process::Command::new(runner_binary())
            .args(["--log", "error", "run", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("the runner runs"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the runner is still running after 30 s with rules of the old contract"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::fs::read_to_string(&err).unwrap();
    assert!(!status.success(), "{status}: {stderr}");
    assert!(
        stderr.contains(OLD) && stderr.contains(HOSTED),
        "the refusal names both versions: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_to_rules_of_the_old_contract_is_refused_and_the_rules_in_service_stay(
) -> anyhow::Result<()> {
    let kafka = MockKafka::new(1)?;
    let db = TestDb::with_spec_subscribers().await?;
    let dir = tempfile::tempdir()?;
    let live = dir.path().join("rules.wasm");
    std::fs::copy(rules_wasm(), &live)?;
    let extra = format!(
        "[pipelines.campaigns.rules]\npath = \"{}\"\nsettle = \"100ms\"\n[status]\nlisten = \"127.0.0.1:0\"\n",
        live.display()
    );
    let running = start(
        config(&kafka, &db, &extra),
        RunOptions {
            clock: Arc::new(FixedClock(NOW)),
            ..RunOptions::default()
        },
    )
    .await?;
    let good = running.campaigns().rules.current().identity().clone();
    assert!(good.version.starts_with("campaign-rules 4."), "{good}");
    let addr = running.status_addr.expect("status endpoint");

    replace_atomically(&old_contract(), &live)?;
    let refused = wait_for(Duration::from_secs(10), || {
        running
            .campaigns()
            .stats()
            .rules
            .refused
            .get("incompatible_version")
            == Some(&1)
    })
    .await;
    let rules = running.campaigns().stats().rules;
    assert!(refused, "refused as incompatible_version: {rules:?}");
    let why = rules.last_refusal.clone().unwrap_or_default();
    assert!(
        why.starts_with("incompatible_version: ") && why.contains(OLD) && why.contains(HOSTED),
        "the refusal names both versions: {why}"
    );
    assert_eq!(rules.swaps, 0);
    assert_eq!(
        running.campaigns().rules.current().identity(),
        &good,
        "the 4.0.0 rules stay in service"
    );
    let (_, status) = http_get(addr, "/status").await?;
    let status: serde_json::Value = serde_json::from_str(&status)?;
    assert_eq!(
        status["pipelines"]["campaigns"]["stats"]["rules"]["last_refusal"].as_str(),
        Some(why.as_str()),
        "/status says why"
    );
    let (_, metrics) = http_get(addr, "/metrics").await?;
    assert!(
        metrics.contains(
            "runner_rules_refused_total{pipeline=\"campaigns\",reason=\"incompatible_version\"} 1"
        ),
        "{metrics}"
    );

    // A campaign sent after the refusal is delivered by the rules in service.
    let value = campaign(
        R0,
        "00000000-0000-4000-8000-0000000000c3",
        NOW - 10,
        NOW + 10,
    );
    kafka.produce(&[(None, value.as_bytes())]).await?;
    assert!(
        wait_for(Duration::from_secs(30), || running
            .campaigns()
            .stats()
            .offsets_stored
            >= 1)
        .await,
        "{:?}",
        running.campaigns().stats()
    );
    let stats = stop(running).await?;
    assert_eq!(stats.delivered, 1, "{stats:?}");
    let drafts = kafka.drafts(8).await?;
    assert_eq!(drafts.len(), 8);
    for m in &drafts {
        assert_eq!(
            json(m)["adv_campaign_id"],
            "00000000-0000-4000-8000-0000000000c3"
        );
        let p = provenance(m).expect("a provenance header");
        assert_eq!(p.rules_sha256, good.sha256);
        assert_eq!(p.rules_version, good.version);
    }
    Ok(())
}

#[test]
fn rules_whose_window_disagrees_with_their_activity_are_refused() {
    use runner::pipelines::campaigns::contract::RulesEngine;
    use runner::sandbox::{LoadError, SandboxLimits};
    let engine = RulesEngine::new(SandboxLimits {
        call_timeout: Duration::from_secs(5),
        call_timeout_per_1000: Duration::from_millis(100),
        memory_limit_bytes: 64 << 20,
        compile_cache_dir: None,
        interruptible: true,
    })
    .expect("engine");
    engine
        .load_file(&rules_wasm())
        .expect("the shipped rules' window agrees with their activity");
    // The same rules, except that their window opens at the start second, when they still say
    // not-started.
    match engine.load_file(&fixture("hostile-wrong-window.wasm")) {
        Ok(l) => panic!("{} was accepted", l.identity()),
        Err(e) => {
            let text = e.to_string();
            assert!(matches!(e, LoadError::Smoke(_)), "{text}");
            assert!(
                text.contains(
                    "the rules' window (opens 1659203516, closes 2659207116) disagrees with \
                     their activity on the SPEC example: at 1659203516 validate says \
                     not-started, not active"
                ),
                "{text}"
            );
        }
    }
    let old = engine
        .load_file(&old_contract())
        .expect_err("the old contract is refused");
    assert_eq!(old.code(), "incompatible_version", "{old}");
}
