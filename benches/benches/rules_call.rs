//! Criterion micro-benchmarks of one rules call: `validate` on SPEC.md's example payload and
//! `shape` for 1, 100 and 10,000 subscribers, through the runner's sandbox (the component
//! under wasmtime, epoch deadlines and memory limits on, as in production) and natively (the
//! same rules code as an rlib), so the two can be read side by side.
//!
//! `cargo bench -p bench --bench rules_call` (after `make transforms`); the component is
//! `CAMPAIGN_RULES_WASM` or `build/wasm/campaign-rules.wasm`. Short measurement times: the
//! whole group runs in well under a minute.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use runner::pipelines::campaigns::contract::{
    Campaign, CampaignInstance as RulesInstance, RulesEngine,
};
use runner::sandbox::SandboxLimits;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

const SPEC: &str = r#"{"restaurant_id": "123e4567-e89b-12d3-a456-426614174000","adv_campaign_id": "123e4567-e89b-12d3-a456-426614174003","adv_campaign_content": "first campaign","adv_campaign_owner": "Ivanov Ivan Ivanovich","adv_campaign_owner_contact": "iiivanov@restaurant.ru","adv_campaign_datetime_start": 1659203516,"adv_campaign_datetime_end": 2659207116,"datetime_created": 1659131516}"#;
const NOW: i64 = 1_659_304_828;
const SUBSCRIBERS: [usize; 3] = [1, 100, 10_000];

fn component_path() -> PathBuf {
    std::env::var_os("CAMPAIGN_RULES_WASM")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../build/wasm/campaign-rules.wasm")
        })
}

/// One instance of the component, loaded the way the runner loads it.
fn wasm_instance() -> RulesInstance {
    let engine = RulesEngine::new(SandboxLimits {
        call_timeout: Duration::from_secs(5),
        call_timeout_per_1000: Duration::from_millis(100),
        memory_limit_bytes: 256 << 20,
        compile_cache_dir: None,
        interruptible: true,
    })
    .expect("rules engine");
    let path = component_path();
    let loaded = engine.load_file(&path).unwrap_or_else(|e| {
        panic!(
            "cannot load {} (run `make transforms` first): {e}",
            path.display()
        )
    });
    loaded.instantiate().expect("instantiate the component")
}

fn clients(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("{i:08x}-e89b-12d3-a456-426614174000"))
        .collect()
}

fn validate(c: &mut Criterion, wasm: &mut RulesInstance) {
    let mut g = c.benchmark_group("validate");
    g.throughput(Throughput::Elements(1));
    g.bench_function("native", |b| {
        b.iter(|| {
            let c = campaign_rules::rules::validate(black_box(SPEC.as_bytes())).unwrap();
            black_box(campaign_rules::rules::activity(&c, NOW))
        })
    });
    g.bench_function("wasm", |b| {
        b.iter(|| {
            black_box(
                wasm.validate(black_box(SPEC.as_bytes()), NOW)
                    .expect("no trap")
                    .is_ok(),
            )
        })
    });
    g.finish();
}

fn shape(c: &mut Criterion, wasm: &mut RulesInstance) {
    let campaign: Campaign = wasm
        .validate(SPEC.as_bytes(), NOW)
        .expect("no trap")
        .expect("the SPEC example is valid")
        .campaign;
    let native_campaign = campaign_rules::rules::validate(SPEC.as_bytes()).expect("valid");
    let mut g = c.benchmark_group("shape");
    // 10,000 drafts take milliseconds: fewer, longer samples keep the group short.
    g.sample_size(20);
    for n in SUBSCRIBERS {
        let clients = clients(n);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("native", n), &clients, |b, clients| {
            b.iter(|| black_box(bench::shape(&campaign, &native_campaign, clients, NOW)))
        });
        g.bench_with_input(BenchmarkId::new("wasm", n), &clients, |b, clients| {
            b.iter(|| black_box(wasm.shape(&campaign, clients, NOW).expect("no trap")))
        });
    }
    g.finish();
}

fn rules_call(c: &mut Criterion) {
    let mut wasm = wasm_instance();
    validate(c, &mut wasm);
    shape(c, &mut wasm);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    targets = rules_call
}
criterion_main!(benches);
