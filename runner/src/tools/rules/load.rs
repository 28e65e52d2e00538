//! Loading a component as `runner rules check` and the pipelines do: the pipeline's sandbox
//! limits from the configuration (built-in defaults, then RUNNER__* environment variables), the
//! pipeline from --kind or, without it, from the component's world.

use super::Kind;
use crate::config::{Config, Sources};
use crate::pipelines::{campaigns, store_revenue};
use crate::sandbox::{LoadError, RulesIdentity, SandboxLimits};
use anyhow::Context;
use std::path::Path;

/// A component loaded, compiled, linked and smoke-tested for its pipeline.
pub(super) enum Loaded {
    Campaign(campaigns::contract::LoadedRules),
    /// With the currency's minor digits the pipeline passes to `validate`.
    Sales(store_revenue::contract::LoadedRules, u8),
}

impl Loaded {
    pub(super) fn kind(&self) -> Kind {
        match self {
            Loaded::Campaign(_) => Kind::Campaign,
            Loaded::Sales(..) => Kind::Sales,
        }
    }

    pub(super) fn identity(&self) -> &RulesIdentity {
        match self {
            Loaded::Campaign(l) => l.identity(),
            Loaded::Sales(l, _) => l.identity(),
        }
    }
}

/// What the pipelines would run with: the configuration from the environment when it enables
/// the pipeline, the defaults of an enabled pipeline otherwise.
struct Settings {
    campaign_limits: SandboxLimits,
    sales_limits: SandboxLimits,
    minor_digits: u8,
}

fn settings() -> anyhow::Result<Settings> {
    let configured = Config::load(&Sources {
        file: None,
        overlay: None,
        env: true,
    })
    .context("loading the configuration (RUNNER__* environment variables)")?;
    let enabled = Config::load(&Sources {
        file: None,
        overlay: Some(
            "[pipelines.campaigns]\nenabled = true\n[pipelines.store_revenue]\nenabled = true\n",
        ),
        env: false,
    })
    .context("loading the built-in defaults")?;
    let campaigns = configured
        .campaigns
        .or(enabled.campaigns)
        .context("the defaults enable the campaign pipeline")?;
    let sales = configured
        .store_revenue
        .or(enabled.store_revenue)
        .context("the defaults enable the store-revenue pipeline")?;
    Ok(Settings {
        campaign_limits: campaigns.rules.limits,
        sales_limits: sales.rules.limits,
        minor_digits: sales.minor_digits,
    })
}

fn load_kind(file: &Path, kind: Kind, settings: &Settings) -> anyhow::Result<Loaded> {
    Ok(match kind {
        Kind::Campaign => {
            let engine = campaigns::contract::RulesEngine::new(settings.campaign_limits.clone())?;
            Loaded::Campaign(engine.load_file(file)?)
        }
        Kind::Sales => {
            let engine = store_revenue::contract::RulesEngine::new(settings.sales_limits.clone())?;
            Loaded::Sales(engine.load_file(file)?, settings.minor_digits)
        }
    })
}

/// Loads `file` as rules of `kind`, or of the pipeline whose world it fits.
pub(super) fn load(file: &Path, kind: Option<Kind>) -> anyhow::Result<Loaded> {
    let settings = settings()?;
    let kinds = match kind {
        Some(k) => vec![k],
        None => vec![Kind::Campaign, Kind::Sales],
    };
    let mut refusals = Vec::new();
    for k in kinds {
        match load_kind(file, k, &settings) {
            Ok(loaded) => return Ok(loaded),
            // Another pipeline's world: try the next kind.
            Err(e)
                if kind.is_none()
                    && e.downcast_ref::<LoadError>().is_some_and(|l| {
                        matches!(
                            l.code(),
                            "wrong_world" | "forbidden_import" | "incompatible_version"
                        )
                    }) =>
            {
                refusals.push(e.to_string())
            }
            Err(e) => {
                return Err(e.context(format!(
                    "{} would be refused as {} rules",
                    file.display(),
                    k.as_str()
                )))
            }
        }
    }
    anyhow::bail!(
        "{} would be refused: it fits no pipeline's rules ({})",
        file.display(),
        refusals.join("; ")
    )
}
