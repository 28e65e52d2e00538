//! Hostile rules: contained at call time (spin, memory exhaustion, panic) or refused at load
//! time (garbage, wrong world, a WASI import, an incompatible version, a failed smoke check),
//! with the runner delivering the next good campaign either way.

use e2e_tests::*;
use rdkafka::message::Message;
use runner::app::RunOptions;
use runner::pipelines::campaigns::header;
use std::sync::Arc;
use std::time::Duration;

const NOW: i64 = 1_700_000_000;
const R0: &str = "123e4567-e89b-12d3-a456-426614174000";

fn with_content(id: u32, content: &str) -> String {
    let mut v: serde_json::Value = serde_json::from_str(&campaign(
        R0,
        &format!("00000000-0000-4000-8000-{id:012}"),
        NOW - 10,
        NOW + 10,
    ))
    .unwrap();
    v["adv_campaign_content"] = content.into();
    v.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_calls_are_contained_and_the_next_campaign_is_delivered() -> anyhow::Result<()> {
    let kafka = MockKafka::new(1)?;
    let db = TestDb::with_spec_subscribers().await?;
    // A deadline well above what the good and the amplifying calls need on a loaded machine
    // (the test suite runs builds beside it), so that only the spinning call reaches it.
    let extra = format!(
        "[pipelines.campaigns.rules]\npath = \"{}\"\ncall_timeout = \"1s\"\nmemory_limit_mib = 16\n",
        fixture("hostile.wasm").display()
    );
    let running = start(
        config(&kafka, &db, &extra),
        RunOptions {
            clock: Arc::new(FixedClock(NOW)),
            ..RunOptions::default()
        },
    )
    .await?;
    let values = [
        with_content(1, "SPIN until the deadline"),
        with_content(2, "good one"),
        with_content(3, "OOM please"),
        with_content(4, "good two"),
        with_content(5, "PANIC now"),
        with_content(6, "good three"),
        with_content(7, "AMPLIFY past the memory limit"),
        with_content(8, "good four"),
    ];
    let messages: Vec<(Option<&str>, &[u8])> =
        values.iter().map(|v| (None, v.as_bytes())).collect();
    kafka.produce(&messages).await?;
    assert!(
        wait_for(Duration::from_secs(30), || running
            .campaigns()
            .stats()
            .offsets_stored
            >= 8)
        .await,
        "{:?}",
        running.campaigns().stats()
    );
    let stats = stop(running).await?;
    assert_eq!(stats.dead_lettered("rules_timeout"), 1, "{stats:?}");
    assert_eq!(stats.dead_lettered("rules_oom"), 1, "{stats:?}");
    assert_eq!(stats.dead_lettered("rules_trap"), 1, "{stats:?}");
    assert_eq!(stats.dead_lettered("rules_bad_output"), 1, "{stats:?}");
    assert_eq!(
        stats.delivered, 4,
        "each good campaign after a hostile one is delivered"
    );

    let dead = kafka.dead_letters(4).await?;
    assert_eq!(dead.len(), 4);
    let by_reason = |r: &str| {
        dead.iter()
            .find(|m| header(m, header::DLQ_REASON) == Some(r))
            .expect(r)
    };
    for r in [
        "rules_timeout",
        "rules_oom",
        "rules_trap",
        "rules_bad_output",
    ] {
        let m = by_reason(r);
        assert_eq!(
            header(m, header::RULES_VERSION),
            Some("hostile-rules 0.0.1")
        );
        assert!(m.payload().is_some_and(|p| !p.is_empty()), "raw value kept");
    }
    let trap = header(by_reason("rules_trap"), header::DLQ_DETAIL).unwrap();
    assert!(
        trap.contains("panics on purpose"),
        "the guest's panic message reaches the dead letter: {trap}"
    );
    let amplified = header(by_reason("rules_bad_output"), header::DLQ_DETAIL).unwrap();
    assert!(
        amplified.contains("memory limit"),
        "a template that would render past the limit is refused, not rendered: {amplified}"
    );
    let drafts = kafka.drafts(32).await?;
    assert_eq!(drafts.len(), 32);
    assert!(drafts.iter().all(|m| json(m)["adv_campaign_content"]
        .as_str()
        .unwrap()
        .starts_with("good")));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_components_keep_the_running_rules_in_service() -> anyhow::Result<()> {
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
    let addr = running.status_addr.expect("status endpoint");

    let refusals = [
        ("garbage.wasm", "not_a_component"),
        ("wrong-world.wasm", "wrong_world"),
        ("wasi-import.wasm", "forbidden_import"),
        ("incompatible-version.wasm", "incompatible_version"),
        ("hostile-broken.wasm", "smoke_check_failed"),
    ];
    for (file, code) in refusals {
        replace_atomically(&fixture(file), &live)?;
        let refused = wait_for(Duration::from_secs(5), || {
            running.campaigns().stats().rules.refused.get(code) == Some(&1)
        })
        .await;
        assert!(
            refused,
            "{file} refused as {code}: {:?}",
            running.campaigns().stats().rules
        );
        assert_eq!(
            running.campaigns().rules.current().identity(),
            &good,
            "{file}: the running rules stay"
        );
        let (_, status) = http_get(addr, "/status").await?;
        let status: serde_json::Value = serde_json::from_str(&status)?;
        let last = status["pipelines"]["campaigns"]["stats"]["rules"]["last_refusal"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(last.starts_with(code), "status reports the refusal: {last}");
    }

    // Still consuming, with the good rules.
    let value = campaign(
        R0,
        "00000000-0000-4000-8000-0000000000aa",
        NOW - 10,
        NOW + 10,
    );
    kafka.produce(&[(None, value.as_bytes())]).await?;
    assert!(
        wait_for(Duration::from_secs(20), || running
            .campaigns()
            .stats()
            .offsets_stored
            >= 1)
        .await
    );
    let (code, metrics) = http_get(addr, "/metrics").await?;
    assert_eq!(code, 200);
    for (_, reason) in refusals {
        assert!(
            metrics.contains(&format!(
                "runner_rules_refused_total{{pipeline=\"campaigns\",reason=\"{reason}\"}} 1"
            )),
            "{metrics}"
        );
    }
    assert!(metrics.contains(&format!(
        "runner_rules_info{{pipeline=\"campaigns\",sha256=\"{}\",version=\"{}\"}} 1",
        good.sha256, good.version
    )));
    let (code, _) = http_get(addr, "/health").await?;
    assert_eq!(
        code, 200,
        "a refused reload does not make the runner unhealthy"
    );
    stop(running).await?;
    let drafts = kafka.drafts(8).await?;
    assert_eq!(drafts.len(), 8);
    assert!(drafts
        .iter()
        .all(|m| provenance(m).is_some_and(|p| p.rules_sha256 == good.sha256)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_forces_a_reload() -> anyhow::Result<()> {
    let kafka = MockKafka::new(1)?;
    let db = TestDb::new().await?.with_schema().await?;
    let dir = tempfile::tempdir()?;
    let live = dir.path().join("rules.wasm");
    std::fs::copy(rules_wasm(), &live)?;
    // No watching: only the signal can make the runner look at the file.
    let extra = format!(
        "[pipelines.campaigns.rules]\npath = \"{}\"\nwatch = false\n",
        live.display()
    );
    let running = start(config(&kafka, &db, &extra), RunOptions::default()).await?;
    let v2 = fixture("campaign-rules-v2.wasm");
    replace_atomically(&v2, &live)?;
    let want = sha256_hex(&std::fs::read(&v2)?);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_ne!(
        running.campaigns().rules.current().identity().sha256,
        want,
        "not watching: no swap yet"
    );
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()?;
    assert!(status.success());
    assert!(
        wait_for(Duration::from_secs(5), || running
            .campaigns()
            .rules
            .current()
            .identity()
            .sha256
            == want)
        .await
    );
    assert!(running
        .campaigns()
        .rules
        .current()
        .identity()
        .version
        .ends_with("+v2"));
    stop(running).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_an_unchanged_component_does_not_recompile() -> anyhow::Result<()> {
    use runner::pipelines::campaigns::contract::RulesEngine;
    use runner::sandbox::SandboxLimits;
    let dir = tempfile::tempdir()?;
    let limits = SandboxLimits {
        call_timeout: Duration::from_secs(1),
        call_timeout_per_1000: Duration::from_millis(10),
        memory_limit_bytes: 64 << 20,
        compile_cache_dir: Some(dir.path().to_path_buf()),
        interruptible: true,
    };
    let first = RulesEngine::new(limits.clone())?;
    let loaded = first.load_file(&rules_wasm())?;
    assert_eq!(
        first.compile_cache_stats(),
        (0, 1),
        "the first start compiles"
    );
    // wasmtime writes the cache entry in the background: a later start finds it.
    let hit = wait_for(Duration::from_secs(10), || {
        let again = RulesEngine::new(limits.clone()).expect("engine");
        let reloaded = again.load_file(&rules_wasm()).expect("load");
        assert_eq!(reloaded.identity(), loaded.identity());
        again.compile_cache_stats() == (1, 0)
    })
    .await;
    assert!(hit, "a restart loads the compiled component from the cache");
    Ok(())
}
