//! The `runner` binary as an operator uses it: `rules check` accepts the campaign rules and
//! refuses each kind of bad component with a non-zero exit and the reason; `config` helpers.

use std::path::PathBuf;
use std::process::{Command, Output};

fn runner(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_runner"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("the runner binary runs")
}

fn wasm_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../build/wasm")
}

fn fixture(name: &str) -> String {
    let dir = std::env::var_os("RULES_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| wasm_dir().join("fixtures"));
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `make transforms` first",
        p.display()
    );
    p.display().to_string()
}

#[test]
fn rules_check_accepts_the_campaign_rules() {
    let path = std::env::var("CAMPAIGN_RULES_WASM")
        .unwrap_or_else(|_| wasm_dir().join("campaign-rules.wasm").display().to_string());
    let out = runner(&["rules", "check", &path]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("is accepted as campaign rules: campaign-rules 4.0.0 (sha256:"),
        "{stdout}"
    );
}

#[test]
fn rules_check_refuses_each_bad_component_with_its_reason() {
    let cases = [
        (fixture("garbage.wasm"), "not a loadable component"),
        (
            fixture("wrong-world.wasm"),
            "does not export fooddelivery:campaign-rules/rules",
        ),
        (
            fixture("wasi-import.wasm"),
            "imports wasi:cli/environment@0.2.0",
        ),
        (
            fixture("incompatible-version.wasm"),
            "exports fooddelivery:campaign-rules/rules@1.0.0",
        ),
        (fixture("hostile-broken.wasm"), "smoke check failed"),
        (
            "/nonexistent/rules.wasm".to_string(),
            "cannot read rules file",
        ),
    ];
    for (path, reason) in cases {
        let out = runner(&["rules", "check", &path]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{path} must be refused");
        assert!(
            stderr.contains("would be refused") && stderr.contains(reason),
            "{path}: {stderr}"
        );
    }
}

#[test]
fn rules_check_accepts_the_v2_build_and_names_it() {
    let out = runner(&["rules", "check", &fixture("campaign-rules-v2.wasm")]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("campaign-rules 4.0.0+v2"));
}

#[test]
fn config_check_reports_every_problem_and_hides_secrets() {
    let dir = std::env::temp_dir().join(format!("runner-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[kafka]\noutput_topic = \"campaigns\"\n[pipeline]\nbatch_max_messages = 0\n",
    )
    .unwrap();
    let out = runner(&["config", "check", "--config", bad.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("three different topics") && stderr.contains("batch_max_messages"),
        "{stderr}"
    );

    let good = dir.join("good.toml");
    std::fs::write(&good, "[kafka]\nsasl_mechanism = \"SCRAM-SHA-512\"\nsasl_username = \"u\"\nsasl_password = \"hunter2\"\n").unwrap();
    let out = runner(&["config", "check", "--config", good.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("SCRAM-SHA-512") && !stdout.contains("hunter2"),
        "{stdout}"
    );
}

#[test]
fn help_documents_the_commands() {
    let out = runner(&["--help"]);
    let s = String::from_utf8_lossy(&out.stdout);
    for word in ["run", "demo", "rules", "config", "RUNNER__KAFKA__BROKERS"] {
        assert!(s.contains(word), "--help mentions {word}: {s}");
    }
}

#[test]
fn demo_never_drops_a_database_it_did_not_create() {
    let admin = std::env::var("TEST_PG_ADMIN_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=postgres".into());
    let name = format!("not_a_demo_{}", std::process::id());
    let psql = |sql: &str| {
        Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-tAc",
                sql,
            ])
            .output()
            .expect("psql runs")
    };
    assert!(psql(&format!("CREATE DATABASE {name}")).status.success());
    let out = Command::new(env!("CARGO_BIN_EXE_runner"))
        .args(["demo", "--database", &name, "--admin-url", &admin])
        .output()
        .expect("the runner binary runs");
    let kept = String::from_utf8_lossy(
        &psql(&format!(
            "SELECT count(*) FROM pg_database WHERE datname = '{name}'"
        ))
        .stdout,
    )
    .trim()
    .to_string();
    psql(&format!("DROP DATABASE IF EXISTS {name}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("was not created by `runner demo`"),
        "{stderr}"
    );
    assert_eq!(kept, "1", "the database is still there");
}
