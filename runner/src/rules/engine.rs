//! The sandbox: one wasmtime engine (compiled code shared), components compiled once and
//! pre-instantiated, and per-call limits. The store's data holds the memory limits and the one
//! import the guest may call; the epoch deadline is set right where each call is made.

use super::bindings::{
    CampaignRules, CampaignRulesPre, HostLog, HostTypes, LogLevel, Rejection, Verdict, WIT_PACKAGE,
    WIT_VERSION,
};
use super::drafts::{BadDrafts, ClientIds, Drafts};
use crate::config::RulesConfig;
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{
    Cache, CacheConfig, Config, Engine, ResourceLimiter, Store, StoreLimits, StoreLimitsBuilder,
    Trap,
};

/// How often the epoch advances: the granularity of call deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Failures of loading a component: each means "keep the rules you have".
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read rules file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("not a loadable component: {0:#}")]
    Compile(anyhow::Error),
    #[error("the component imports {name}, but rules may import only {allowed} (no WASI capability is granted)")]
    ForbiddenImport { name: String, allowed: String },
    #[error("the component exports {found}, but this runner hosts {WIT_PACKAGE}/rules@{WIT_VERSION} (compatible: {WIT_MAJOR}.x)")]
    IncompatibleVersion { found: String },
    #[error("component does not fit the {world} world this runner hosts: {detail:#}")]
    WrongWorld {
        world: &'static str,
        detail: anyhow::Error,
    },
    #[error("smoke check failed: {0}")]
    Smoke(String),
}

impl LoadError {
    /// The reason code counted in metrics and shown in status.
    pub fn code(&self) -> &'static str {
        match self {
            LoadError::Read { .. } => "read",
            LoadError::Compile(_) => "not_a_component",
            LoadError::ForbiddenImport { .. } => "forbidden_import",
            LoadError::IncompatibleVersion { .. } => "incompatible_version",
            LoadError::WrongWorld { .. } => "wrong_world",
            LoadError::Smoke(_) => "smoke_check_failed",
        }
    }
}

/// The major version of the WIT package: components exporting the same major are accepted.
const WIT_MAJOR: &str = major(WIT_VERSION);

/// `"3"` of `"3.0.0"`.
const fn major(version: &str) -> &str {
    let b = version.as_bytes();
    let mut i = 0;
    while i < b.len() && b[i] != b'.' {
        i += 1;
    }
    version.split_at(i).0
}

/// Splits `fooddelivery:campaign-rules/NAME@VERSION` into (NAME, VERSION).
fn interface_name(name: &str) -> Option<(&str, &str)> {
    let rest = name.strip_prefix(WIT_PACKAGE)?.strip_prefix('/')?;
    rest.split_once('@')
}

fn same_major(version: &str) -> bool {
    version.split('.').next() == Some(WIT_MAJOR)
}

/// Checks imports and the exported interface's version before linking, so that a refusal
/// says what is wrong in the operator's terms rather than the linker's.
fn check_contract(component: &Component, engine: &Engine) -> Result<(), LoadError> {
    let ty = component.component_type();
    for (name, _) in ty.imports(engine) {
        if !matches!(interface_name(name), Some(("host-log" | "types", v)) if same_major(v)) {
            return Err(LoadError::ForbiddenImport {
                name: name.to_string(),
                allowed: format!("{WIT_PACKAGE}/host-log@{WIT_MAJOR}.x"),
            });
        }
    }
    let exported: Vec<&str> = ty.exports(engine).map(|(n, _)| n).collect();
    let rules = exported
        .iter()
        .find(|n| matches!(interface_name(n), Some(("rules", _))));
    match rules.and_then(|n| interface_name(n)) {
        Some((_, v)) if same_major(v) => Ok(()),
        Some(_) => Err(LoadError::IncompatibleVersion {
            found: rules.map(|n| n.to_string()).unwrap_or_default(),
        }),
        None => Err(LoadError::WrongWorld {
            world: "campaign-rules",
            detail: anyhow::anyhow!(
                "it does not export {WIT_PACKAGE}/rules (its exports: {exported:?})"
            ),
        }),
    }
}

/// Failures of one call into the guest. Rejections are not here: they are data.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CallError {
    #[error("rules call exceeded its deadline of {0:?}")]
    Timeout(Duration),
    #[error("rules instance exceeded its memory limit of {limit} bytes")]
    OutOfMemory { limit: usize },
    #[error("rules trapped: {0}")]
    Trap(String),
    /// The call returned, but its result breaks the contract (e.g. not one draft per client).
    #[error("rules returned a result that breaks the contract: {0}")]
    BadOutput(BadDrafts),
}

impl CallError {
    /// The reason code carried in the dead letter.
    pub fn code(&self) -> &'static str {
        match self {
            CallError::Timeout(_) => "rules_timeout",
            CallError::OutOfMemory { .. } => "rules_oom",
            CallError::Trap(_) => "rules_trap",
            CallError::BadOutput(_) => "rules_bad_output",
        }
    }
}

/// Who a component is: the hash of its bytes and the version it reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RulesIdentity {
    pub sha256: String,
    pub version: String,
}

impl RulesIdentity {
    pub fn short_hash(&self) -> &str {
        &self.sha256[..12]
    }
}

impl fmt::Display for RulesIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (sha256:{})", self.version, self.short_hash())
    }
}

/// Everything a guest's store may touch.
pub struct StoreData {
    limits: StoreLimits,
    /// Set when a memory grow was refused: tells an OOM trap from any other trap.
    memory_refused: bool,
    /// The last error the guest logged (a panic message arrives this way), for dead letters.
    last_error: Option<String>,
    identity_version: Arc<str>,
}

impl ResourceLimiter for StoreData {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let ok = self.limits.memory_growing(current, desired, maximum)?;
        if !ok {
            self.memory_refused = true;
        }
        Ok(ok)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.limits.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.limits.instances()
    }

    fn tables(&self) -> usize {
        self.limits.tables()
    }

    fn memories(&self) -> usize {
        self.limits.memories()
    }
}

impl HostTypes for StoreData {}

impl HostLog for StoreData {
    fn log(&mut self, level: LogLevel, message: String) {
        let rules = &*self.identity_version;
        match level {
            LogLevel::Error => {
                tracing::error!(rules, message = %message, "Rules component logged an error.");
                self.last_error = Some(message);
            }
            LogLevel::Warn => {
                tracing::warn!(rules, message = %message, "Rules component logged a warning.")
            }
            LogLevel::Info => tracing::info!(rules, message = %message, "Rules component logged."),
            LogLevel::Debug => {
                tracing::debug!(rules, message = %message, "Rules component logged.")
            }
        }
    }
}

/// Sandbox limits, from configuration.
#[derive(Debug, Clone)]
pub struct SandboxLimits {
    pub call_timeout: Duration,
    pub call_timeout_per_1000_subscribers: Duration,
    pub memory_limit_bytes: usize,
    /// Where compiled components are cached (keyed by wasmtime on the component's bytes and the
    /// engine's configuration), so a restart with an unchanged component does not recompile.
    pub compile_cache_dir: Option<std::path::PathBuf>,
    /// Epoch deadlines on calls. Always on in the runner; off only to measure their cost.
    pub interruptible: bool,
}

impl From<&RulesConfig> for SandboxLimits {
    fn from(c: &RulesConfig) -> Self {
        SandboxLimits {
            call_timeout: c.call_timeout,
            call_timeout_per_1000_subscribers: c.call_timeout_per_1000_subscribers,
            memory_limit_bytes: c.memory_limit_bytes,
            compile_cache_dir: c.compile_cache_dir.clone(),
            interruptible: true,
        }
    }
}

/// The shared engine plus the thread that advances its epoch.
#[derive(Clone)]
pub struct RulesEngine {
    inner: Arc<EngineInner>,
}

struct EngineInner {
    engine: Engine,
    linker: Linker<StoreData>,
    limits: SandboxLimits,
    cache: Option<Cache>,
    stop_ticker: Arc<AtomicBool>,
}

impl Drop for EngineInner {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

impl fmt::Debug for RulesEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RulesEngine")
            .field("limits", &self.inner.limits)
            .finish()
    }
}

impl RulesEngine {
    pub fn new(limits: SandboxLimits) -> anyhow::Result<RulesEngine> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(limits.interruptible);
        let mut compile_cache = None;
        if let Some(dir) = &limits.compile_cache_dir {
            std::fs::create_dir_all(dir)?;
            let dir = std::fs::canonicalize(dir)?;
            let mut cache = CacheConfig::new();
            cache.with_directory(dir);
            let c = Cache::new(cache)?;
            config.cache(Some(c.clone()));
            compile_cache = Some(c);
        }
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        CampaignRules::add_to_linker::<StoreData, HasSelf<StoreData>>(&mut linker, |s| s)?;

        let stop_ticker = Arc::new(AtomicBool::new(false));
        let (weak, stop) = (engine.weak(), stop_ticker.clone());
        std::thread::Builder::new()
            .name("rules-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    match weak.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => break,
                    }
                }
            })?;
        Ok(RulesEngine {
            inner: Arc::new(EngineInner {
                engine,
                linker,
                limits,
                cache: compile_cache,
                stop_ticker,
            }),
        })
    }

    pub fn limits(&self) -> &SandboxLimits {
        &self.inner.limits
    }

    /// Compile-cache hits and misses so far (zeros without a cache).
    pub fn compile_cache_stats(&self) -> (usize, usize) {
        self.inner
            .cache
            .as_ref()
            .map(|c| (c.cache_hits(), c.cache_misses()))
            .unwrap_or((0, 0))
    }

    /// Reads, compiles, links and smoke-tests a component file. Off the hot path.
    pub fn load_file(&self, path: &Path) -> Result<LoadedRules, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.display().to_string(),
            source,
        })?;
        self.load_bytes(&bytes)
    }

    pub fn load_bytes(&self, bytes: &[u8]) -> Result<LoadedRules, LoadError> {
        let sha256 = hex::encode(Sha256::digest(bytes));
        let component =
            Component::new(&self.inner.engine, bytes).map_err(|e| LoadError::Compile(e.into()))?;
        check_contract(&component, &self.inner.engine)?;
        let pre =
            self.inner
                .linker
                .instantiate_pre(&component)
                .map_err(|e| LoadError::WrongWorld {
                    world: "campaign-rules",
                    detail: e.into(),
                })?;
        let pre = CampaignRulesPre::new(pre).map_err(|e| LoadError::WrongWorld {
            world: "campaign-rules",
            detail: e.into(),
        })?;
        let mut loaded = LoadedRules {
            pre,
            identity: RulesIdentity {
                sha256,
                version: String::new(),
            },
            engine: self.clone(),
        };
        let mut instance = loaded
            .instantiate()
            .map_err(|e| LoadError::Smoke(e.to_string()))?;
        let version = instance
            .version()
            .map_err(|e| LoadError::Smoke(e.to_string()))?;
        if version.trim().is_empty() {
            return Err(LoadError::Smoke(
                "the component reports an empty version".into(),
            ));
        }
        loaded.identity.version = version;
        smoke_check(&mut instance)?;
        Ok(loaded)
    }
}

/// The SPEC.md example must validate as active and shape one exact draft.
fn smoke_check(instance: &mut RulesInstance) -> Result<(), LoadError> {
    const EXAMPLE: &str = r#"{"restaurant_id": "123e4567-e89b-12d3-a456-426614174000","adv_campaign_id": "123e4567-e89b-12d3-a456-426614174003","adv_campaign_content": "first campaign","adv_campaign_owner": "Ivanov Ivan Ivanovich","adv_campaign_owner_contact": "iiivanov@restaurant.ru","adv_campaign_datetime_start": 1659203516,"adv_campaign_datetime_end": 2659207116,"datetime_created": 1659131516}"#;
    let now = 1_659_304_828;
    let verdict = match instance.validate(EXAMPLE.as_bytes(), now) {
        Ok(Ok(v)) => v,
        Ok(Err(r)) => {
            return Err(LoadError::Smoke(format!(
                "the SPEC example was rejected: {}",
                r.detail
            )))
        }
        Err(e) => {
            return Err(LoadError::Smoke(format!(
                "validate failed on the SPEC example: {e}"
            )))
        }
    };
    if verdict.activity != super::bindings::Activity::Active {
        return Err(LoadError::Smoke(format!(
            "the SPEC example is not active at {now}: {:?}",
            verdict.activity
        )));
    }
    let client = "023e4567-e89b-12d3-a456-426614174000";
    let drafts = instance
        .shape(&verdict.campaign, &[client], now)
        .map_err(|e| LoadError::Smoke(format!("shape failed on the SPEC example: {e}")))?;
    let draft = drafts
        .get(0)
        .expect("one draft per client, checked by shape");
    let json: serde_json::Value = serde_json::from_slice(draft.payload)
        .map_err(|e| LoadError::Smoke(format!("the shaped draft is not JSON: {e}")))?;
    if json.get("client_id").and_then(|v| v.as_str()) != Some(client) {
        return Err(LoadError::Smoke(
            "the shaped draft lacks the subscriber's client_id".into(),
        ));
    }
    Ok(())
}

/// A compiled, linked, smoke-tested component: cheap to instantiate.
pub struct LoadedRules {
    pre: CampaignRulesPre<StoreData>,
    identity: RulesIdentity,
    engine: RulesEngine,
}

impl fmt::Debug for LoadedRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedRules")
            .field("identity", &self.identity)
            .finish()
    }
}

impl LoadedRules {
    pub fn identity(&self) -> &RulesIdentity {
        &self.identity
    }

    /// A fresh instance with its own store and limits.
    pub fn instantiate(&self) -> Result<RulesInstance, CallError> {
        let limits = &self.engine.inner.limits;
        let data = StoreData {
            limits: StoreLimitsBuilder::new()
                .memory_size(limits.memory_limit_bytes)
                .build(),
            memory_refused: false,
            last_error: None,
            identity_version: Arc::from(self.identity.version.as_str()),
        };
        let mut store = Store::new(&self.engine.inner.engine, data);
        store.limiter(|d| d);
        // Instantiation runs guest code (start functions): it gets a deadline too.
        if limits.interruptible {
            store.set_epoch_deadline(ticks(limits.call_timeout));
            store.epoch_deadline_trap();
        }
        let bindings = self.pre.instantiate(&mut store).map_err(|e| {
            classify(
                e,
                &mut store,
                limits.call_timeout,
                limits.memory_limit_bytes,
            )
        })?;
        Ok(RulesInstance {
            store,
            bindings,
            limits: limits.clone(),
        })
    }
}

fn ticks(d: Duration) -> u64 {
    (d.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64 + 1
}

fn classify(
    e: wasmtime::Error,
    store: &mut Store<StoreData>,
    timeout: Duration,
    limit: usize,
) -> CallError {
    let data = store.data_mut();
    if data.memory_refused {
        return CallError::OutOfMemory { limit };
    }
    if let Some(Trap::Interrupt) = e.downcast_ref::<Trap>() {
        return CallError::Timeout(timeout);
    }
    match data.last_error.take() {
        Some(msg) => CallError::Trap(format!("{e}: {msg}")),
        None => CallError::Trap(format!("{e:#}")),
    }
}

/// One live instance. After any error it must be dropped: a trapped instance is never reused.
pub struct RulesInstance {
    store: Store<StoreData>,
    bindings: CampaignRules,
    limits: SandboxLimits,
}

impl fmt::Debug for RulesInstance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RulesInstance").finish_non_exhaustive()
    }
}

impl RulesInstance {
    fn arm(&mut self, timeout: Duration) {
        if self.limits.interruptible {
            self.store.set_epoch_deadline(ticks(timeout));
        }
        self.store.data_mut().last_error = None;
    }

    fn fail(&mut self, e: wasmtime::Error, timeout: Duration) -> CallError {
        classify(e, &mut self.store, timeout, self.limits.memory_limit_bytes)
    }

    pub fn version(&mut self) -> Result<String, CallError> {
        let timeout = self.limits.call_timeout;
        self.arm(timeout);
        let r = self
            .bindings
            .fooddelivery_campaign_rules_rules()
            .call_version(&mut self.store);
        r.map_err(|e| self.fail(e, timeout))
    }

    pub fn validate(
        &mut self,
        payload: &[u8],
        now: i64,
    ) -> Result<Result<Verdict, Rejection>, CallError> {
        let timeout = self.limits.call_timeout;
        self.arm(timeout);
        let r = self
            .bindings
            .fooddelivery_campaign_rules_rules()
            .call_validate(&mut self.store, payload, now);
        r.map_err(|e| self.fail(e, timeout))
    }

    /// The deadline of a shape call grows with its fan-out.
    pub fn shape_timeout(&self, subscribers: usize) -> Duration {
        self.limits.call_timeout
            + self.limits.call_timeout_per_1000_subscribers * (subscribers.div_ceil(1000) as u32)
    }

    /// Shapes one draft per client. The clients are packed into one buffer for the call (see
    /// [`RulesInstance::shape_packed`]).
    pub fn shape<S: AsRef<str>>(
        &mut self,
        campaign: &super::bindings::Campaign,
        clients: &[S],
        now: i64,
    ) -> Result<Drafts, CallError> {
        self.shape_packed(campaign, ClientIds::packed(clients), now)
    }

    /// Shapes one draft per client of `clients`, already packed. The result keeps `clients`
    /// and is checked against the contract (one draft per client, in order) and rendered,
    /// bounded by the instance's memory limit: a result that breaks the contract or the limit
    /// is a [`CallError::BadOutput`].
    pub fn shape_packed(
        &mut self,
        campaign: &super::bindings::Campaign,
        clients: ClientIds,
        now: i64,
    ) -> Result<Drafts, CallError> {
        let timeout = self.shape_timeout(clients.len());
        self.arm(timeout);
        let r = self
            .bindings
            .fooddelivery_campaign_rules_rules()
            .call_shape(
                &mut self.store,
                campaign,
                clients.bytes(),
                clients.ends(),
                now,
            );
        let template = r.map_err(|e| self.fail(e, timeout))?;
        Drafts::new(clients, template, self.limits.memory_limit_bytes).map_err(CallError::BadOutput)
    }
}
