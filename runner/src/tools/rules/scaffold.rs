//! `runner rules new`: writes a transform crate that builds standalone, made from the shipped
//! guests' own files (their WIT, `src/lib.rs`, `src/rules.rs`, their manifest's dependencies
//! resolved against this workspace's versions and Cargo.lock), so the template is always the
//! rules the runner ships. Only what a standalone crate needs besides (its manifest's frame, a
//! README, a test running the component under wasmtime, sample inputs) lives in `template/`.

use super::{Kind, NewArgs};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const WORKSPACE_MANIFEST: &str = include_str!("../../../../Cargo.toml");
const WORKSPACE_LOCK: &str = include_str!("../../../../Cargo.lock");
const MANIFEST_TEMPLATE: &str = include_str!("template/Cargo.toml.in");
const README_TEMPLATE: &str = include_str!("template/README.md.in");
const GITIGNORE: &str = include_str!("template/gitignore");

/// The shipped campaign `lib.rs`'s module for the old-contract fixture
/// (`transforms/fixtures/contract-3`).
const CAMPAIGN_CONTRACT_3: &str = r#"
// The same rules built against the previous contract (3.0.0, no window): a fixture the runner
// must refuse. Built alone: `--no-default-features --features contract-3`.
#[cfg(all(target_arch = "wasm32", feature = "contract-3"))]
#[path = "../../fixtures/contract-3/glue.rs"]
mod contract_3;
"#;

/// The shipped guest a kind's crate starts from.
struct Guest {
    /// The shipped guest's manifest.
    manifest: &'static str,
    lib: &'static str,
    rules: &'static str,
    wit_file: &'static str,
    wit: &'static str,
    /// How the shipped `lib.rs` points wit-bindgen at the WIT folder.
    wit_path: &'static str,
    /// How the shipped `lib.rs` starts its version string.
    version_prefix: &'static str,
    /// What the shipped `lib.rs` and manifest hold for the repository's own test fixtures
    /// (a module in `lib.rs`, a feature), left out of a standalone crate.
    fixture_module: Option<&'static str>,
    fixture_feature: Option<&'static str>,
    test: &'static str,
    samples: &'static str,
    subscribers: Option<&'static str>,
    /// The pipeline's section in the runner's configuration.
    section: &'static str,
}

fn guest(kind: Kind) -> Guest {
    match kind {
        Kind::Campaign => Guest {
            manifest: include_str!("../../../../transforms/campaign/Cargo.toml"),
            lib: include_str!("../../../../transforms/campaign/src/lib.rs"),
            rules: include_str!("../../../../transforms/campaign/src/rules.rs"),
            wit_file: "campaign-rules.wit",
            wit: include_str!("../../../../wit/campaign/campaign-rules.wit"),
            wit_path: r#"path: "../../wit/campaign","#,
            version_prefix: r#"concat!("campaign-rules ", "#,
            fixture_module: Some(CAMPAIGN_CONTRACT_3),
            fixture_feature: Some("contract-3"),
            test: include_str!("template/campaign_component_test.rs"),
            samples: include_str!("template/samples-campaign.jsonl"),
            subscribers: Some(include_str!("template/subscribers.csv")),
            section: "campaigns",
        },
        Kind::Sales => Guest {
            manifest: include_str!("../../../../transforms/sales/Cargo.toml"),
            lib: include_str!("../../../../transforms/sales/src/lib.rs"),
            rules: include_str!("../../../../transforms/sales/src/rules.rs"),
            wit_file: "sales-rules.wit",
            wit: include_str!("../../../../wit/sales/sales-rules.wit"),
            wit_path: r#"path: "../../wit/sales","#,
            version_prefix: r#"concat!("sales-rules ", "#,
            fixture_module: None,
            fixture_feature: None,
            test: include_str!("template/sales_component_test.rs"),
            samples: include_str!("template/samples-sales.jsonl"),
            subscribers: None,
            section: "store_revenue",
        },
    }
}

/// A crate name cargo accepts and a file name as it is.
fn check_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && name.len() <= 64;
    if !ok {
        bail!(
            "{name:?} is not a usable crate name: letters, digits, `-` and `_`, starting with a \
             letter (at most 64)"
        );
    }
    Ok(())
}

/// Replaces every occurrence of `from` (at least one) in a shipped file.
fn patch(text: &str, from: &str, to: &str, file: &str) -> Result<String> {
    if !text.contains(from) {
        bail!("the shipped {file} no longer contains {from:?}: the template must be updated");
    }
    Ok(text.replace(from, to))
}

/// The shipped `lib.rs`, pointed at the crate's own `wit/` and reporting the crate's name.
fn lib_rs(g: &Guest) -> Result<String> {
    let lib = match g.fixture_module {
        Some(module) => patch(g.lib, module, "", "src/lib.rs")?,
        None => g.lib.to_string(),
    };
    let lib = patch(&lib, g.wit_path, r#"path: "wit","#, "src/lib.rs")?;
    let lib = patch(
        &lib,
        g.version_prefix,
        r#"concat!(env!("CARGO_PKG_NAME"), " ", "#,
        "src/lib.rs",
    )?;
    patch(
        &lib,
        "`transforms/componentize`",
        "`runner rules build`",
        "src/lib.rs",
    )
}

/// A TOML key, bare when it can be.
fn key(k: &str) -> String {
    if !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        k.to_string()
    } else {
        toml::Value::String(k.to_string()).to_string()
    }
}

/// `key = value` lines, values inline.
fn lines(table: &toml::Table) -> String {
    table
        .iter()
        .map(|(k, v)| format!("{} = {v}", key(k)))
        .collect::<Vec<_>>()
        .join("\n")
}

fn table<'a>(t: &'a toml::Table, path: &[&str]) -> Result<&'a toml::Table> {
    let mut cur = t;
    for p in path {
        cur = cur
            .get(*p)
            .and_then(toml::Value::as_table)
            .with_context(|| format!("the manifest has no [{}] table", path.join(".")))?;
    }
    Ok(cur)
}

/// A dependency of a shipped guest with `workspace = true` replaced by the workspace's entry
/// (its features extended by the guest's own).
fn resolve(name: &str, dep: &toml::Value, workspace: &toml::Table) -> Result<toml::Value> {
    let Some(local) = dep.as_table() else {
        return Ok(dep.clone());
    };
    if local.get("workspace").and_then(toml::Value::as_bool) != Some(true) {
        return Ok(dep.clone());
    }
    let mut out = match workspace.get(name) {
        Some(toml::Value::String(v)) => {
            let mut t = toml::Table::new();
            t.insert("version".into(), toml::Value::String(v.clone()));
            t
        }
        Some(toml::Value::Table(t)) => t.clone(),
        _ => bail!("the workspace has no dependency {name}"),
    };
    for (k, v) in local {
        match (k.as_str(), v) {
            ("workspace", _) => {}
            ("features", toml::Value::Array(extra)) => {
                let features = out
                    .entry("features")
                    .or_insert_with(|| toml::Value::Array(Vec::new()));
                if let toml::Value::Array(f) = features {
                    f.extend(
                        extra
                            .iter()
                            .filter(|e| !f.contains(e))
                            .cloned()
                            .collect::<Vec<_>>(),
                    );
                }
            }
            _ => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    // A standalone inline table reads best as `{ version = "1" }` → `"1"`.
    if out.len() == 1 {
        if let Some(toml::Value::String(v)) = out.get("version") {
            return Ok(toml::Value::String(v.clone()));
        }
    }
    Ok(toml::Value::Table(out))
}

fn resolve_all(deps: &toml::Table, workspace: &toml::Table) -> Result<toml::Table> {
    deps.iter()
        .map(|(n, d)| Ok((n.clone(), resolve(n, d, workspace)?)))
        .collect()
}

/// The generated crate's manifest: the template's frame, the shipped guest's features and
/// dependencies at this workspace's versions, the workspace's wasm profile.
fn manifest(name: &str, kind: Kind, g: &Guest) -> Result<String> {
    let ws: toml::Table = toml::from_str(WORKSPACE_MANIFEST).context("the workspace manifest")?;
    let guest: toml::Table = toml::from_str(g.manifest).context("the guest's manifest")?;
    let ws_deps = table(&ws, &["workspace", "dependencies"])?;
    let package = table(&ws, &["workspace", "package"])?;
    let field = |k: &str| {
        package
            .get(k)
            .map(|v| v.to_string())
            .with_context(|| format!("the workspace has no package.{k}"))
    };
    let mut features = table(&guest, &["features"])?.clone();
    if let Some(f) = g.fixture_feature {
        if features.remove(f).is_none() {
            bail!(
                "the shipped manifest no longer has the feature {f}: the template must be updated"
            );
        }
    }
    let deps = resolve_all(table(&guest, &["dependencies"])?, ws_deps)?;
    let wasm_deps = resolve_all(
        table(
            &guest,
            &["target", "cfg(target_arch = \"wasm32\")", "dependencies"],
        )?,
        ws_deps,
    )?;
    let mut dev = toml::Table::new();
    for d in ["wasmtime", "serde_json"] {
        let mut w = toml::Table::new();
        w.insert("workspace".into(), toml::Value::Boolean(true));
        dev.insert(d.into(), resolve(d, &toml::Value::Table(w), ws_deps)?);
    }
    let profile_dev = match ws
        .get("profile")
        .and_then(|p| p.get("dev"))
        .and_then(|d| d.get("package"))
        .and_then(toml::Value::as_table)
    {
        // The workspace's: wasmtime's compiler optimised even in test builds.
        Some(packages) => packages
            .iter()
            .filter_map(|(p, s)| Some((p, s.as_table()?)))
            .map(|(p, s)| {
                format!(
                    "\n[profile.dev.package.{}]\n{}\n",
                    toml::Value::String(p.clone()),
                    lines(s)
                )
            })
            .collect::<String>(),
        None => String::new(),
    };
    Ok(MANIFEST_TEMPLATE
        .replace("{name}", name)
        .replace("{kind}", kind.as_str())
        .replace("{edition}", &field("edition")?)
        .replace("{rust_version}", &field("rust-version")?)
        .replace("{features}", &lines(&features))
        .replace("{dependencies}", &lines(&deps))
        .replace("{wasm_dependencies}", &lines(&wasm_deps))
        .replace("{dev_dependencies}", &lines(&dev))
        .replace(
            "{lints_rust}",
            &lines(table(&ws, &["workspace", "lints", "rust"])?),
        )
        .replace("{profile_wasm}", &lines(table(&ws, &["profile", "wasm"])?))
        .replace("{profile_dev}", &profile_dev))
}

/// Every file of the crate, relative to its directory.
fn files(name: &str, kind: Kind) -> Result<Vec<(PathBuf, String)>> {
    let g = guest(kind);
    let test_flags = match kind {
        Kind::Campaign => " --subscribers subscribers.csv --now 1659304828",
        Kind::Sales => "",
    };
    let readme = README_TEMPLATE
        .replace("{name}", name)
        .replace("{kind}", kind.as_str())
        .replace("{wit_file}", g.wit_file)
        .replace("{section}", g.section)
        .replace("{test_flags}", test_flags);
    let mut files = vec![
        (PathBuf::from("Cargo.toml"), manifest(name, kind, &g)?),
        // This workspace's resolution: the same versions the shipped rules are built with.
        (PathBuf::from("Cargo.lock"), WORKSPACE_LOCK.to_string()),
        (PathBuf::from(".gitignore"), GITIGNORE.to_string()),
        (PathBuf::from("README.md"), readme),
        (Path::new("wit").join(g.wit_file), g.wit.to_string()),
        (PathBuf::from("src/lib.rs"), lib_rs(&g)?),
        (PathBuf::from("src/rules.rs"), g.rules.to_string()),
        (PathBuf::from("tests/component.rs"), g.test.to_string()),
        (PathBuf::from("samples.jsonl"), g.samples.to_string()),
    ];
    if let Some(s) = g.subscribers {
        files.push((PathBuf::from("subscribers.csv"), s.to_string()));
    }
    Ok(files)
}

pub(super) fn run(args: NewArgs) -> Result<ExitCode> {
    check_name(&args.name)?;
    let dir = args
        .path
        .clone()
        .unwrap_or_else(|| PathBuf::from(&args.name));
    if dir.exists() {
        let empty = dir.is_dir()
            && std::fs::read_dir(&dir)
                .with_context(|| format!("reading {}", dir.display()))?
                .next()
                .is_none();
        if !empty {
            bail!(
                "{} already exists and is not an empty directory: choose another name or --path",
                dir.display()
            );
        }
    }
    let files = files(&args.name, args.kind)?;
    for (rel, text) in &files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    let name = &args.name;
    let test_flags = match args.kind {
        Kind::Campaign => " --subscribers subscribers.csv --now 1659304828",
        Kind::Sales => "",
    };
    println!(
        "Wrote {kind} rules crate {name} to {dir}, starting from the rules this runner ships.\n\
         Next:\n  \
         cd {dir}\n  \
         edit src/rules.rs (the rules) and tests/component.rs (their tests)\n  \
         runner rules build .          # writes {name}.wasm and loads it as the runner would\n  \
         cargo test                    # unit tests, and the component under wasmtime\n  \
         runner rules test {name}.wasm --input samples.jsonl{test_flags}\n  \
         runner rules test {name}.wasm --input samples.jsonl{test_flags} --against CURRENT.wasm\n\
         Then copy {name}.wasm over the file pipelines.{section}.rules.path names (atomically: \
         copy next to it, then rename).",
        kind = args.kind.as_str(),
        dir = dir.display(),
        section = guest(args.kind).section,
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_sources_are_patched_for_a_standalone_crate() {
        for kind in [Kind::Campaign, Kind::Sales] {
            let files = files("my-rules", kind).unwrap();
            let get = |p: &str| {
                &files
                    .iter()
                    .find(|(f, _)| f == Path::new(p))
                    .unwrap_or_else(|| panic!("{p} written"))
                    .1
            };
            let lib = get("src/lib.rs");
            assert!(lib.contains(r#"path: "wit","#), "{lib}");
            assert!(!lib.contains("../../wit"));
            assert!(!lib.contains("fixtures"), "no test fixture: {lib}");
            assert!(
                lib.contains(r#"concat!(env!("CARGO_PKG_NAME"), " ", env!("CARGO_PKG_VERSION"))"#)
            );
            let manifest: toml::Table = toml::from_str(get("Cargo.toml")).unwrap();
            assert_eq!(manifest["package"]["name"].as_str(), Some("my-rules"));
            assert!(manifest["features"].get("contract-3").is_none());
            assert!(manifest["features"].get("default").is_some());
            assert!(manifest["workspace"].as_table().unwrap().is_empty());
            let manifest_text = get("Cargo.toml");
            assert!(
                !manifest_text.contains("workspace = true"),
                "{manifest_text}"
            );
            let wasm = &manifest["target"]["cfg(target_arch = \"wasm32\")"]["dependencies"];
            assert_eq!(wasm["wit-bindgen"]["version"].as_str(), Some("0.61"));
            assert_eq!(
                manifest["dev-dependencies"]["wasmtime"]["version"].as_str(),
                Some("=48.0.8")
            );
            assert_eq!(manifest["profile"]["wasm"]["panic"].as_str(), Some("abort"));
            assert_eq!(
                manifest["profile"]["dev"]["package"]["*"]["opt-level"].as_integer(),
                Some(1)
            );
        }
    }

    #[test]
    fn names_must_be_crate_names() {
        assert!(check_name("my-rules_2").is_ok());
        for bad in ["", "2rules", "my rules", "../x", "a/b"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
