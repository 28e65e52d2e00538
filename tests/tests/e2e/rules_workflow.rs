//! The rules workflow through the real binary: `runner rules new` writes a crate for each kind
//! that `runner rules build` turns into a component the runner accepts, and `runner rules test`
//! runs it over the crate's samples; `rules test`'s exact output on SPEC.md's example campaign
//! and subscriptions, every rejection code, a campaign not started yet scheduled with its
//! window, traps and timeouts reported per line, `--against` with the v2 fixtures and with a
//! changed rule whose window moves, and clear errors for bad inputs (a component of the old
//! contract among them).

use e2e_tests::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// SPEC.md's example campaign is active at this instant.
const SPEC_NOW: &str = "1659304828";
/// SPEC.md's example draft (client 023e…).
const SPEC_DRAFT: &str = r#"{"restaurant_id":"123e4567-e89b-12d3-a456-426614174000","adv_campaign_id":"123e4567-e89b-12d3-a456-426614174003","adv_campaign_content":"first campaign","adv_campaign_owner":"Ivanov Ivan Ivanovich","adv_campaign_owner_contact":"iiivanov@restaurant.ru","adv_campaign_datetime_start":1659203516,"adv_campaign_datetime_end":2659207116,"client_id":"023e4567-e89b-12d3-a456-426614174000","datetime_created":1659131516,"trigger_datetime_created":1659304828}"#;
const R0: &str = "123e4567-e89b-12d3-a456-426614174000";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf()
}

/// The target directory this test binary was built in: generated crates build there too, so
/// their dependencies are compiled once.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            runner_binary()
                .parent()
                .and_then(Path::parent)
                .expect("target/debug/runner")
                .to_path_buf()
        })
}

fn runner(args: &[&str]) -> Output {
    runner_with(args, &[])
}

fn runner_with(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(runner_binary());
    c.args(["--log", "off", "rules"]).args(args);
    c.env("CARGO_TARGET_DIR", target_dir());
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("the runner runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn succeeded(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        o.status,
        stdout(o),
        stderr(o)
    );
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p
}

/// The SPEC draft for another client.
fn spec_draft(client: &str) -> String {
    SPEC_DRAFT.replace("023e4567-e89b-12d3-a456-426614174000", client)
}

/// SPEC.md's ten example subscriptions as a `client_id,restaurant_id` CSV.
fn spec_subscribers(dir: &Path) -> PathBuf {
    let mut csv = String::from("client_id,restaurant_id\n");
    for (client, restaurant) in SPEC_SUBSCRIBERS {
        csv.push_str(&format!("{client},{restaurant}\n"));
    }
    write(dir, "subscribers.csv", &csv)
}

#[test]
fn new_build_and_test_a_campaign_crate() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("my-campaign");
    let out = runner(&[
        "new",
        "my-campaign",
        "--kind",
        "campaign",
        "--path",
        s(&dir),
    ]);
    succeeded(&out, "rules new");
    assert!(
        stdout(&out).contains("runner rules build ."),
        "{}",
        stdout(&out)
    );
    // The template is the shipped rules.
    let shipped = repo_root().join("transforms/campaign/src/rules.rs");
    assert_eq!(
        std::fs::read_to_string(dir.join("src/rules.rs")).unwrap(),
        std::fs::read_to_string(shipped).unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("wit/campaign-rules.wit")).unwrap(),
        std::fs::read_to_string(repo_root().join("wit/campaign/campaign-rules.wit")).unwrap()
    );
    for f in [
        "Cargo.toml",
        "Cargo.lock",
        "README.md",
        "tests/component.rs",
        "src/lib.rs",
    ] {
        assert!(dir.join(f).is_file(), "{f} written");
    }

    // An existing, non-empty directory is refused and left alone.
    let again = runner(&["new", "my-campaign", "--kind", "sales", "--path", s(&dir)]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );
    assert!(dir.join("wit/campaign-rules.wit").is_file());
    assert!(!dir.join("wit/sales-rules.wit").exists());

    let out = runner(&["build", s(&dir)]);
    succeeded(&out, "rules build");
    let wasm = dir.join("my-campaign.wasm");
    assert_eq!(
        stdout(&out).trim(),
        format!(
            "Built {}: campaign rules my-campaign 0.1.0 (sha256:{})",
            wasm.display(),
            &sha256_hex(&std::fs::read(&wasm).unwrap())[..12]
        )
    );

    let out = runner(&[
        "test",
        s(&wasm),
        "--input",
        s(&dir.join("samples.jsonl")),
        "--subscribers",
        s(&dir.join("subscribers.csv")),
        "--now",
        SPEC_NOW,
    ]);
    succeeded(&out, "rules test");
    let want = [
        format!("line 1: draft {SPEC_DRAFT}"),
        format!("line 1: draft {}", spec_draft("223e4567-e89b-12d3-a456-426614174000")),
        "line 2: rejected missing_field adv_campaign_id required field `adv_campaign_id` is missing"
            .to_string(),
        "line 3: skipped expired".to_string(),
        "line 4: scheduled 1659441601 1659448800".to_string(),
        "4 messages: 2 drafts from 1 campaigns, 1 rejected, 1 scheduled, 1 skipped, 0 errors"
            .to_string(),
    ];
    assert_eq!(stdout(&out).lines().collect::<Vec<_>>(), want);

    // Unchanged, the generated rules do what the shipped ones do.
    let out = runner(&[
        "test",
        s(&wasm),
        "--input",
        s(&dir.join("samples.jsonl")),
        "--subscribers",
        s(&dir.join("subscribers.csv")),
        "--now",
        SPEC_NOW,
        "--against",
        s(&rules_wasm()),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("0 of 4 messages differ"),
        "{}",
        stdout(&out)
    );

    // A changed rule: active from the start second itself, its window moved to match. The same
    // drafts, but every valid campaign's window differs, and `--against` says so.
    let rules_rs = dir.join("src/rules.rs");
    let text = std::fs::read_to_string(&rules_rs).unwrap();
    let changed = text
        .replace(
            "if now <= c.adv_campaign_datetime_start {",
            "if now < c.adv_campaign_datetime_start {",
        )
        .replace(
            "let opens = c.adv_campaign_datetime_start.saturating_add(1);",
            "let opens = c.adv_campaign_datetime_start;",
        );
    assert_ne!(changed, text, "the shipped rules changed: update this test");
    std::fs::write(&rules_rs, changed).unwrap();
    succeeded(&runner(&["build", s(&dir)]), "rules build");
    let out = runner(&[
        "test",
        s(&wasm),
        "--input",
        s(&dir.join("samples.jsonl")),
        "--subscribers",
        s(&dir.join("subscribers.csv")),
        "--now",
        SPEC_NOW,
        "--against",
        s(&rules_wasm()),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let draft_lines = |sign: &str| {
        [
            format!("line 1: {sign} draft {SPEC_DRAFT}"),
            format!(
                "line 1: {sign} draft {}",
                spec_draft("223e4567-e89b-12d3-a456-426614174000")
            ),
        ]
    };
    let mut want = vec!["line 1: - window 1659203517 2659207116".to_string()];
    want.extend(draft_lines("-"));
    want.push("line 1: + window 1659203516 2659207116".into());
    want.extend(draft_lines("+"));
    want.extend(
        [
            "line 3: - window 1659203517 1659207116",
            "line 3: - skipped expired",
            "line 3: + window 1659203516 1659207116",
            "line 3: + skipped expired",
            "line 4: - scheduled 1659441601 1659448800",
            "line 4: + scheduled 1659441600 1659448800",
        ]
        .map(String::from),
    );
    want.push(format!(
        "3 of 4 messages differ (- {}, + {})",
        rules_wasm().display(),
        wasm.display()
    ));
    assert_eq!(stdout(&out).lines().collect::<Vec<_>>(), want);
    let out = runner(&[
        "test",
        s(&wasm),
        "--input",
        s(&dir.join("samples.jsonl")),
        "--subscribers",
        s(&dir.join("subscribers.csv")),
        "--now",
        SPEC_NOW,
        "--against",
        s(&rules_wasm()),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{}", stdout(&out));
    assert_eq!(lines[0]["old"]["outcome"], "drafts");
    assert_eq!(
        lines[0]["old"]["window"],
        serde_json::json!({"opens": 1659203517, "closes": 2_659_207_116_i64})
    );
    assert_eq!(
        lines[0]["new"]["window"],
        serde_json::json!({"opens": 1659203516, "closes": 2_659_207_116_i64})
    );
    assert_eq!(
        lines[2],
        serde_json::json!({
            "line": 4,
            "old": {"outcome": "scheduled", "opens": 1659441601, "closes": 1659448800},
            "new": {"outcome": "scheduled", "opens": 1659441600, "closes": 1659448800},
        })
    );
}

#[test]
fn new_build_and_test_a_sales_crate() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("shop_rules");
    succeeded(
        &runner(&["new", "shop_rules", "--kind", "sales", "--path", s(&dir)]),
        "rules new",
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("wit/sales-rules.wit")).unwrap(),
        std::fs::read_to_string(repo_root().join("wit/sales/sales-rules.wit")).unwrap()
    );
    let wasm = tmp.path().join("out/shop.wasm");
    let out = runner(&["build", s(&dir), "--output", s(&wasm)]);
    succeeded(&out, "rules build");
    assert!(
        stdout(&out).starts_with(&format!(
            "Built {}: sales rules shop_rules 0.1.0 (sha256:",
            wasm.display()
        )),
        "{}",
        stdout(&out)
    );
    // `rules check` accepts it too.
    let check = Command::new(runner_binary())
        .args(["--log", "off", "rules", "check", s(&wasm)])
        .output()
        .unwrap();
    succeeded(&check, "rules check");

    let out = runner(&["test", s(&wasm), "--input", s(&dir.join("samples.jsonl"))]);
    succeeded(&out, "rules test");
    assert_eq!(
        stdout(&out).lines().collect::<Vec<_>>(),
        [
            r#"line 1: sale store="store-1" amount_minor=287 event_time=1756809000"#,
            r#"line 2: rejected wrong_type price field `price` must be a number, found a string ("2.87")"#,
            "line 3: rejected negative_price price field `price` must not be negative, found -1",
            "3 messages: 1 sales, 2 rejected, 0 errors",
        ]
    );
}

#[test]
fn the_spec_example_gives_one_exact_draft_per_subscriber() {
    let tmp = tempfile::tempdir().unwrap();
    let input = write(tmp.path(), "campaigns.jsonl", &format!("{SPEC_CAMPAIGN}\n"));
    let subscribers = spec_subscribers(tmp.path());
    let shipped = rules_wasm();
    let args = [
        "test",
        s(&shipped),
        "--input",
        s(&input),
        "--subscribers",
        s(&subscribers),
        "--now",
        SPEC_NOW,
    ];
    let out = runner(&args);
    succeeded(&out, "rules test");
    // The eight distinct subscribers of restaurant …4000, in the order the runner passes them.
    let clients = ["023", "223", "323", "423", "523", "623", "723", "823"]
        .map(|p| format!("{p}e4567-e89b-12d3-a456-426614174000"));
    let mut want: Vec<String> = clients
        .iter()
        .map(|c| format!("line 1: draft {}", spec_draft(c)))
        .collect();
    want.push(
        "1 messages: 8 drafts from 1 campaigns, 0 rejected, 0 scheduled, 0 skipped, 0 errors"
            .into(),
    );
    assert_eq!(stdout(&out).lines().collect::<Vec<_>>(), want);
    assert_eq!(want[0], format!("line 1: draft {SPEC_DRAFT}"));

    // --json: one object per input line, the drafts' exact values.
    let out = runner(&[&args[..], &["--json"][..]].concat());
    succeeded(&out, "rules test --json");
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["line"], 1);
    assert_eq!(lines[0]["outcome"], "drafts");
    let drafts = lines[0]["drafts"].as_array().unwrap();
    assert_eq!(drafts.len(), 8);
    assert_eq!(drafts[0]["client_id"], clients[0].as_str());
    assert_eq!(drafts[0]["value"], SPEC_DRAFT);
}

#[test]
fn rejections_and_skips_come_with_their_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let spec: serde_json::Value = serde_json::from_str(SPEC_CAMPAIGN).unwrap();
    let with = |k: &str, v: serde_json::Value| {
        let mut c = spec.clone();
        c[k] = v;
        c.to_string()
    };
    let other_restaurant = "123e4567-e89b-12d3-a456-426614179999";
    let mut input = [
        "{not json".to_string(),
        "[1, 2]".to_string(),
        {
            let mut c = spec.clone();
            c.as_object_mut().unwrap().remove("adv_campaign_owner");
            c.to_string()
        },
        with("adv_campaign_datetime_start", "yesterday".into()),
        with("restaurant_id", "not-a-uuid".into()),
        with("adv_campaign_datetime_end", 1_659_203_516.into()),
        with("adv_campaign_datetime_start", 1_759_203_516.into()),
        with("adv_campaign_datetime_end", 1_659_300_000.into()),
        with("restaurant_id", other_restaurant.into()),
        String::new(),
    ]
    .join("\n")
    .into_bytes();
    // Line 11: not UTF-8 (line 10 is blank: skipped, still counted).
    input.extend_from_slice(b"\n{\"a\": \"\xff\"}\n");
    let input_path = tmp.path().join("bad.jsonl");
    std::fs::write(&input_path, input).unwrap();
    let subscribers = spec_subscribers(tmp.path());
    let out = runner(&[
        "test",
        s(&rules_wasm()),
        "--input",
        s(&input_path),
        "--subscribers",
        s(&subscribers),
        "--now",
        SPEC_NOW,
    ]);
    succeeded(&out, "rules test");
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    let want = [
        "line 1: rejected malformed_json - ",
        "line 2: rejected not_an_object - ",
        "line 3: rejected missing_field adv_campaign_owner ",
        "line 4: rejected wrong_type adv_campaign_datetime_start ",
        "line 5: rejected invalid_uuid restaurant_id ",
        "line 6: rejected invalid_interval ",
        "line 7: scheduled 1759203517 2659207116",
        "line 8: skipped expired",
        "line 9: skipped no_subscribers",
        "line 11: rejected not_utf8 - ",
        "10 messages: 0 drafts from 0 campaigns, 7 rejected, 1 scheduled, 2 skipped, 0 errors",
    ];
    assert_eq!(lines.len(), want.len(), "{text}");
    for (got, want) in lines.iter().zip(want) {
        assert!(got.starts_with(want), "{got:?} should start with {want:?}");
    }
}

#[test]
fn traps_and_timeouts_are_the_outcome_of_their_line() {
    let tmp = tempfile::tempdir().unwrap();
    let spec: serde_json::Value = serde_json::from_str(SPEC_CAMPAIGN).unwrap();
    let content = |text: &str| {
        let mut c = spec.clone();
        c["adv_campaign_content"] = text.into();
        c.to_string()
    };
    let input = write(
        tmp.path(),
        "hostile.jsonl",
        &[content("SPIN"), content("PANIC"), content("fine")].join("\n"),
    );
    let subscribers = write(tmp.path(), "s.csv", &format!("client-1,{R0}\n"));
    let out = runner(&[
        "test",
        s(&fixture("hostile.wasm")),
        "--input",
        s(&input),
        "--subscribers",
        s(&subscribers),
        "--now",
        SPEC_NOW,
    ]);
    succeeded(&out, "rules test");
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(
        lines[0].starts_with("line 1: error rules_timeout "),
        "{text}"
    );
    assert!(lines[1].starts_with("line 2: error rules_trap "), "{text}");
    assert!(lines[1].contains("panics on purpose"), "{text}");
    let draft: serde_json::Value =
        serde_json::from_str(lines[2].strip_prefix("line 3: draft ").expect("a draft")).unwrap();
    assert_eq!(draft["client_id"], "client-1");
    assert_eq!(draft["adv_campaign_content"], "fine");
    assert_eq!(
        lines[3],
        "3 messages: 1 drafts from 1 campaigns, 0 rejected, 0 scheduled, 0 skipped, 2 errors"
    );
}

#[test]
fn against_prints_only_the_lines_that_differ() {
    let tmp = tempfile::tempdir().unwrap();
    let spec: serde_json::Value = serde_json::from_str(SPEC_CAMPAIGN).unwrap();
    let mut expired = spec.clone();
    expired["adv_campaign_datetime_end"] = 1_659_300_000.into();
    let input = write(
        tmp.path(),
        "campaigns.jsonl",
        &[SPEC_CAMPAIGN.to_string(), "{}".into(), expired.to_string()].join("\n"),
    );
    let subscribers = write(
        tmp.path(),
        "s.csv",
        "023e4567-e89b-12d3-a456-426614174000,123e4567-e89b-12d3-a456-426614174000\n",
    );
    let shipped = rules_wasm();
    let v2 = fixture("campaign-rules-v2.wasm");
    let args = [
        "test",
        s(&v2),
        "--input",
        s(&input),
        "--subscribers",
        s(&subscribers),
        "--now",
        SPEC_NOW,
        "--against",
        s(&shipped),
    ];
    let out = runner(&args);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).lines().collect::<Vec<_>>(),
        [
            format!("line 1: - draft {SPEC_DRAFT}"),
            format!(
                "line 1: + draft {}",
                SPEC_DRAFT.replace("\"first campaign\"", "\"[v2] first campaign\"")
            ),
            format!(
                "1 of 3 messages differ (- {}, + {})",
                rules_wasm().display(),
                v2.display()
            ),
        ]
    );
    let out = runner(&[&args[..], &["--json"][..]].concat());
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["line"], 1);
    assert_eq!(lines[0]["old"]["drafts"][0]["value"], SPEC_DRAFT);
    let new = lines[0]["new"]["drafts"][0]["value"].as_str().unwrap();
    assert!(new.contains("[v2] first campaign"), "{new}");

    // The v2 sales rules differ only in their version: the same outcome on every line.
    let sales = write(
        tmp.path(),
        "sales.jsonl",
        &[
            sale("store-1", "2.87", 1_756_809_000),
            sale("store-2", "-1", 1_756_809_000),
            sale("store-3", "0.001", 1_756_809_000),
        ]
        .join("\n"),
    );
    let out = runner(&[
        "test",
        s(&fixture("sales-rules-v2.wasm")),
        "--input",
        s(&sales),
        "--against",
        s(&sales_wasm()),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).starts_with("0 of 3 messages differ"),
        "{}",
        stdout(&out)
    );

    // Two kinds cannot be compared: trouble, exit status 2.
    let out = runner(&[
        "test",
        s(&fixture("sales-rules-v2.wasm")),
        "--input",
        s(&sales),
        "--against",
        s(&rules_wasm()),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is not sales rules"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_inputs_give_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let good = write(tmp.path(), "good.jsonl", &format!("{SPEC_CAMPAIGN}\n"));
    let wasm = rules_wasm();
    let fails = |args: &[&str], want: &str| {
        let out = runner(args);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(
            stderr(&out).contains(want),
            "{args:?}: stderr should say {want:?}:\n{}",
            stderr(&out)
        );
    };
    let missing = tmp.path().join("missing.jsonl");
    fails(
        &["test", s(&wasm), "--input", s(&missing)],
        &format!("cannot read the input file {}", missing.display()),
    );
    let blank = write(tmp.path(), "blank.jsonl", "\n  \n");
    fails(
        &["test", s(&wasm), "--input", s(&blank)],
        "has no messages: it takes one message value per line",
    );
    let bad_csv = write(
        tmp.path(),
        "subs.csv",
        &format!("client_id,restaurant_id\nc1,{R0}\nc2;{R0}\n"),
    );
    fails(
        &[
            "test",
            s(&wasm),
            "--input",
            s(&good),
            "--subscribers",
            s(&bad_csv),
        ],
        &format!(
            "the subscribers file {} line 3: expected `client_id,restaurant_id`",
            bad_csv.display()
        ),
    );
    fails(
        &[
            "test",
            s(&sales_wasm()),
            "--input",
            s(&good),
            "--subscribers",
            s(&bad_csv),
        ],
        "--subscribers and --now apply to campaign rules",
    );
    fails(
        &["test", s(&fixture("garbage.wasm")), "--input", s(&good)],
        "not a loadable component",
    );
    fails(
        &[
            "test",
            s(&sales_wasm()),
            "--kind",
            "campaign",
            "--input",
            s(&good),
        ],
        "would be refused as campaign rules",
    );
    // Campaign rules built against the previous contract: refused, both versions named.
    let old = fixture("campaign-rules-contract-3.wasm");
    for want in [
        "would be refused as campaign rules",
        "fooddelivery:campaign-rules/rules@3.0.0",
        "fooddelivery:campaign-rules/rules@4.0.0",
    ] {
        fails(
            &["test", s(&old), "--kind", "campaign", "--input", s(&good)],
            want,
        );
    }
    fails(
        &["new", "9lives", "--kind", "campaign"],
        "is not a usable crate name",
    );
    fails(
        &["build", s(tmp.path())],
        "is not a crate's directory (cannot read its Cargo.toml)",
    );
}

#[test]
fn build_failures_say_why() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("broken");
    succeeded(
        &runner(&["new", "broken", "--kind", "campaign", "--path", s(&dir)]),
        "rules new",
    );

    // A toolchain without the wasm32 target: the command that installs it.
    let rustc = write(
        tmp.path(),
        "fake-rustc",
        "#!/bin/sh\necho /nonexistent/wasm32-unknown-unknown/lib\n",
    );
    std::fs::set_permissions(&rustc, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = runner_with(&["build", s(&dir)], &[("RUSTC", rustc.as_path())]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("the wasm32-unknown-unknown target is not installed")
            && stderr(&out).contains("rustup target add wasm32-unknown-unknown"),
        "{}",
        stderr(&out)
    );

    // Rules whose window disagrees with their activity: built, then refused, saying why.
    let rules = dir.join("src/rules.rs");
    let shipped = std::fs::read_to_string(&rules).unwrap();
    let wrong = shipped.replace(
        "let opens = c.adv_campaign_datetime_start.saturating_add(1);",
        "let opens = c.adv_campaign_datetime_start;",
    );
    assert_ne!(
        wrong, shipped,
        "the shipped rules changed: update this test"
    );
    std::fs::write(&rules, wrong).unwrap();
    let out = runner(&["build", s(&dir)]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("was built but would be refused")
            && err.contains(
                "window (opens 1659203516, closes 2659207116) disagrees with their activity"
            )
            && err.contains("at 1659203516 validate says"),
        "{err}"
    );
    std::fs::write(&rules, shipped).unwrap();
    std::fs::remove_file(dir.join("broken.wasm")).expect("built, then refused");

    // Rules that do not compile: cargo's errors, then which build failed.
    let mut text = std::fs::read_to_string(&rules).unwrap();
    text.push_str("\nfn broken() -> u32 { \"not a number\" }\n");
    std::fs::write(&rules, text).unwrap();
    let out = runner(&["build", s(&dir)]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("mismatched types"), "{err}");
    assert!(
        err.contains(&format!("cargo build of {} failed", dir.display())),
        "{err}"
    );
    assert!(!dir.join("broken.wasm").exists());
}
