//! Turns a core wasm module built for `wasm32-unknown-unknown` by a wit-bindgen guest into a
//! component (the module carries its WIT world in a custom section). The result imports only
//! what the world imports: no WASI adapter is linked, so any WASI import makes this fail.
//! Given a `.wat` file instead, it assembles the text into its binary form (test fixtures).

use anyhow::{Context, Result};
use clap::Parser;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(about = "Wrap a wit-bindgen core module into a WebAssembly component")]
struct Args {
    /// The core module (.wasm) produced by `cargo build --target wasm32-unknown-unknown`.
    input: PathBuf,
    /// Where to write the component.
    output: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(dir) = args.output.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if args.input.extension().is_some_and(|e| e == "wat") {
        let binary = wat::parse_file(&args.input)
            .with_context(|| format!("assembling {}", args.input.display()))?;
        std::fs::write(&args.output, binary)
            .with_context(|| format!("writing {}", args.output.display()))?;
        eprintln!(
            "componentize: assembled {} -> {}",
            args.input.display(),
            args.output.display()
        );
        return Ok(());
    }
    let module =
        std::fs::read(&args.input).with_context(|| format!("reading {}", args.input.display()))?;
    let component = wit_component::ComponentEncoder::default()
        .module(&module)
        .context("the module has no usable component-type metadata (is it a wit-bindgen guest?)")?
        .validate(true)
        .encode()
        .with_context(|| format!("encoding {} as a component", args.input.display()))?;
    if let Some(dir) = args.output.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.output, component)
        .with_context(|| format!("writing {}", args.output.display()))?;
    eprintln!(
        "componentize: {} -> {}",
        args.input.display(),
        args.output.display()
    );
    Ok(())
}
