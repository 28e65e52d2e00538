//! Rules overhead: the same validate + shape logic compiled natively (the campaign crate as an
//! rlib) and run as the WASM component through the runner's sandbox, on the same inputs.
//! Reported per draft and per validation, and as the ratio WASM / native.

use crate::report::Report;
use anyhow::Result;
use runner::pipelines::campaigns::contract::RulesEngine;
use runner::sandbox::SandboxLimits;
use std::path::Path;
use std::time::{Duration, Instant};

const SPEC: &str = r#"{"restaurant_id": "123e4567-e89b-12d3-a456-426614174000","adv_campaign_id": "123e4567-e89b-12d3-a456-426614174003","adv_campaign_content": "first campaign","adv_campaign_owner": "Ivanov Ivan Ivanovich","adv_campaign_owner_contact": "iiivanov@restaurant.ru","adv_campaign_datetime_start": 1659203516,"adv_campaign_datetime_end": 2659207116,"datetime_created": 1659131516}"#;
const NOW: i64 = 1_659_304_828;

fn time<F: FnMut()>(iters: usize, mut f: F) -> f64 {
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    t.elapsed().as_secs_f64() / iters as f64
}

pub fn run(component: &Path, runs: usize) -> Result<Report> {
    let engine_with = |interruptible: bool| {
        RulesEngine::new(SandboxLimits {
            call_timeout: Duration::from_secs(5),
            call_timeout_per_1000: Duration::from_millis(100),
            memory_limit_bytes: 256 << 20,
            compile_cache_dir: None,
            interruptible,
        })
    };
    let engine = engine_with(true)?;
    let loaded = engine.load_file(component)?;
    let mut wasm = loaded.instantiate()?;
    let bare_engine = engine_with(false)?;
    let bare_loaded = bare_engine.load_file(component)?;
    let mut bare = bare_loaded.instantiate()?;
    let clients: Vec<String> = (0..1000)
        .map(|i| format!("{:08x}-e89b-12d3-a456-426614174000", i))
        .collect();
    let campaign = wasm
        .validate(SPEC.as_bytes(), NOW)?
        .map_err(|r| anyhow::anyhow!(r.detail))?
        .campaign;
    let native_campaign =
        campaign_rules::rules::validate(SPEC.as_bytes()).map_err(|r| anyhow::anyhow!(r.detail))?;

    let mut report = Report::new("rules");
    let (mut v_nat, mut v_wasm, mut s_nat, mut s_wasm, mut ratio_draft, mut ratio_validate) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut dl_validate, mut dl_shape) = (vec![], vec![]);
    for _ in 0..runs {
        let vn = time(20_000, || {
            let c = campaign_rules::rules::validate(std::hint::black_box(SPEC.as_bytes())).unwrap();
            std::hint::black_box(campaign_rules::rules::activity(&c, NOW));
        });
        let vw = time(20_000, || {
            std::hint::black_box(
                wasm.validate(std::hint::black_box(SPEC.as_bytes()), NOW)
                    .unwrap()
                    .is_ok(),
            );
        });
        // Per draft: shape for 1,000 clients, both ways through the runner's packing of the
        // clients and its checking and rendering of the drafts.
        let sn = time(200, || {
            std::hint::black_box(bench::shape(&campaign, &native_campaign, &clients, NOW));
        }) / clients.len() as f64;
        let sw = time(200, || {
            std::hint::black_box(wasm.shape(&campaign, &clients, NOW).unwrap());
        }) / clients.len() as f64;
        let vb = time(20_000, || {
            std::hint::black_box(
                bare.validate(std::hint::black_box(SPEC.as_bytes()), NOW)
                    .unwrap()
                    .is_ok(),
            );
        });
        let sb = time(200, || {
            std::hint::black_box(bare.shape(&campaign, &clients, NOW).unwrap());
        }) / clients.len() as f64;
        dl_validate.push(vw / vb);
        dl_shape.push(sw / sb);
        v_nat.push(vn * 1e6);
        v_wasm.push(vw * 1e6);
        s_nat.push(sn * 1e9);
        s_wasm.push(sw * 1e9);
        ratio_validate.push(vw / vn);
        ratio_draft.push(sw / sn);
    }
    report.add("validate, native", "µs", v_nat, None);
    report.add("validate, WASM", "µs", v_wasm, None);
    report.add("shape per draft (1,000 clients), native", "ns", s_nat, None);
    report.add("shape per draft (1,000 clients), WASM", "ns", s_wasm, None);
    report.add(
        "WASM / native, per draft",
        "ratio",
        ratio_draft,
        Some(("<=", 1.5)),
    );
    report.add(
        "WASM / native, per validation",
        "ratio",
        ratio_validate,
        None,
    );
    report.add(
        "deadline overhead (epoch interruption on / off), validate",
        "ratio",
        dl_validate,
        None,
    );
    report.add(
        "deadline overhead (epoch interruption on / off), shape",
        "ratio",
        dl_shape,
        None,
    );
    report.notes.push("Same Rust rules code (transforms/campaign/src/rules.rs): natively as an rlib, and as the component through the runner's sandbox (epoch deadlines and memory limits on).".into());
    report.notes.push("Shape, both ways: the runner packs the client ids, the rules return the drafts as a template (WIT 3.x: the shared parts once, each client's fills), and the runner checks it and renders every draft in full. WASM adds only the sandbox: the call, copying in and out, deadlines.".into());
    Ok(report)
}
