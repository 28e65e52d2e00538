//! `runner rules build DIR`: cargo builds the crate's library for `wasm32-unknown-unknown` (its
//! `wasm` profile when it has one, `release` otherwise), the core module is wrapped into a
//! component in-process (wit-component, no WASI adapter: as `transforms/componentize` does for
//! the shipped rules), and the component is loaded as `runner rules check` loads it.

use super::load::load;
use super::BuildArgs;
use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const WASM_TARGET: &str = "wasm32-unknown-unknown";

/// The tool cargo itself would run (cargo and rustc honour `CARGO` and `RUSTC`).
fn tool(var: &str, default: &str) -> OsString {
    std::env::var_os(var).unwrap_or_else(|| default.into())
}

/// The crate's package name, library file stem and build profile, from its manifest.
struct Crate {
    name: String,
    lib: String,
    profile: &'static str,
}

fn read_crate(manifest: &Path) -> Result<Crate> {
    let text = std::fs::read_to_string(manifest).with_context(|| {
        format!(
            "{} is not a crate's directory (cannot read its Cargo.toml)",
            manifest.parent().unwrap_or(manifest).display()
        )
    })?;
    let toml: toml::Table = toml::from_str(&text)
        .with_context(|| format!("{} is not valid TOML", manifest.display()))?;
    let name = toml
        .get("package")
        .and_then(|p| p.get("name"))
        .and_then(toml::Value::as_str)
        .with_context(|| format!("{} has no package.name", manifest.display()))?
        .to_string();
    let lib = toml
        .get("lib")
        .and_then(|l| l.get("name"))
        .and_then(toml::Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| name.replace('-', "_"));
    let profile = if toml.get("profile").and_then(|p| p.get("wasm")).is_some() {
        "wasm"
    } else {
        "release"
    };
    Ok(Crate { name, lib, profile })
}

/// Fails with the command that installs the target when the toolchain building `dir` lacks it.
fn check_target(dir: &Path) -> Result<()> {
    let rustc = tool("RUSTC", "rustc");
    let out = Command::new(&rustc)
        .args(["--print", "target-libdir", "--target", WASM_TARGET])
        .current_dir(dir)
        .output()
        .with_context(|| format!("cannot run {}", rustc.to_string_lossy()))?;
    let libdir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || libdir.is_empty() || !Path::new(&libdir).is_dir() {
        bail!(
            "the {WASM_TARGET} target is not installed for the Rust toolchain that builds {} \
             (no {}): install it with `rustup target add {WASM_TARGET}`",
            dir.display(),
            if libdir.is_empty() {
                "target library directory".to_string()
            } else {
                libdir
            },
        );
    }
    Ok(())
}

/// Where cargo puts the crate's build output (honours CARGO_TARGET_DIR and cargo config).
fn target_dir(cargo: &OsString, manifest: &Path) -> Result<PathBuf> {
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--manifest-path",
        ])
        .arg(manifest)
        .output()
        .with_context(|| format!("cannot run {}", cargo.to_string_lossy()))?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed on {}: {}",
            manifest.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("cargo metadata's output")?;
    meta["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata gave no target_directory")
}

/// Wraps a wit-bindgen core module into a component; any import outside its world (WASI)
/// makes this fail.
pub(super) fn componentize(module: &[u8]) -> Result<Vec<u8>> {
    wit_component::ComponentEncoder::default()
        .module(module)
        .context("the module has no usable component-type metadata (is it a wit-bindgen guest?)")?
        .validate(true)
        .encode()
        .context("encoding the module as a component")
}

pub(super) fn run(args: BuildArgs) -> Result<ExitCode> {
    let manifest = args.dir.join("Cargo.toml");
    let krate = read_crate(&manifest)?;
    check_target(&args.dir)?;
    let cargo = tool("CARGO", "cargo");
    let target_dir = target_dir(&cargo, &manifest)?;
    eprintln!(
        "Building {} for {WASM_TARGET} (profile {}).",
        krate.name, krate.profile
    );
    let status = Command::new(&cargo)
        .args([
            "build",
            "--lib",
            "--target",
            WASM_TARGET,
            "--profile",
            krate.profile,
        ])
        .arg("--manifest-path")
        .arg(&manifest)
        .status()
        .with_context(|| format!("cannot run {}", cargo.to_string_lossy()))?;
    if !status.success() {
        bail!(
            "cargo build of {} failed ({status}): its errors are above",
            args.dir.display()
        );
    }
    let core = target_dir
        .join(WASM_TARGET)
        .join(krate.profile)
        .join(format!("{}.wasm", krate.lib));
    let module = std::fs::read(&core).with_context(|| {
        format!(
            "cargo built no {} (is the crate's crate-type cdylib?)",
            core.display()
        )
    })?;
    let component =
        componentize(&module).with_context(|| format!("wrapping {}", core.display()))?;
    let output = args
        .output
        .unwrap_or_else(|| args.dir.join(format!("{}.wasm", krate.name)));
    if let Some(parent) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(&output, component).with_context(|| format!("writing {}", output.display()))?;
    let loaded = load(&output, None)
        .with_context(|| format!("{} was built but would be refused", output.display()))?;
    println!(
        "Built {}: {} rules {}",
        output.display(),
        loaded.kind().as_str(),
        loaded.identity()
    );
    Ok(ExitCode::SUCCESS)
}
