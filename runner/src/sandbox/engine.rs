//! The engine: one wasmtime engine per pipeline (compiled code shared, an epoch thread for call
//! deadlines), components compiled once, checked against their contract, smoke-tested and
//! pre-instantiated, and per-call limits. The store's data holds the memory limits and what the
//! guest's one import (a log line) needs; the epoch deadline is set right where each call is
//! made, and before instantiating.

use super::Contract;
use sha2::{Digest, Sha256};
use std::fmt;
use std::marker::PhantomData;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use wasmtime::component::{Component, Linker};
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
    #[error("the component exports {found}, but this runner hosts {hosts}")]
    IncompatibleVersion { found: String, hosts: String },
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

/// `"3"` of `"3.0.0"`.
fn major(version: &str) -> &str {
    version.split('.').next().unwrap_or(version)
}

/// Splits `PACKAGE/NAME@VERSION` into (NAME, VERSION) for the contract's package.
fn interface_name<C: Contract>(name: &str) -> Option<(&str, &str)> {
    let rest = name.strip_prefix(C::PACKAGE)?.strip_prefix('/')?;
    rest.split_once('@')
}

fn same_major<C: Contract>(version: &str) -> bool {
    major(version) == major(C::VERSION)
}

/// Checks the exported interface's version and the imports before linking, so that a refusal
/// says what is wrong in the operator's terms rather than the linker's. The version comes
/// first: a component built against another major version of the contract imports that
/// version's interfaces too, and is refused as of that version, not for its imports.
fn check_contract<C: Contract>(component: &Component, engine: &Engine) -> Result<(), LoadError> {
    let ty = component.component_type();
    let major = major(C::VERSION);
    let exported: Vec<&str> = ty.exports(engine).map(|(n, _)| n).collect();
    let rules = exported
        .iter()
        .copied()
        .find(|n| matches!(interface_name::<C>(n), Some((e, _)) if e == C::EXPORT));
    if let Some((_, v)) = rules.and_then(interface_name::<C>) {
        if !same_major::<C>(v) {
            return Err(LoadError::IncompatibleVersion {
                found: rules.unwrap_or_default().to_string(),
                hosts: format!(
                    "{}/{}@{} (compatible: {major}.x)",
                    C::PACKAGE,
                    C::EXPORT,
                    C::VERSION
                ),
            });
        }
    }
    for (name, _) in ty.imports(engine) {
        let allowed = matches!(interface_name::<C>(name),
            Some((n, v)) if C::IMPORTS.contains(&n) && same_major::<C>(v));
        if !allowed {
            let first = C::IMPORTS.first().copied().unwrap_or("");
            return Err(LoadError::ForbiddenImport {
                name: name.to_string(),
                allowed: format!("{}/{first}@{major}.x", C::PACKAGE),
            });
        }
    }
    match rules {
        Some(_) => Ok(()),
        None => Err(LoadError::WrongWorld {
            world: C::WORLD,
            detail: anyhow::anyhow!(
                "it does not export {}/{} (its exports: {exported:?})",
                C::PACKAGE,
                C::EXPORT
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
    BadOutput(String),
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

/// How severe a line the guest logs is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestLog {
    Error,
    Warn,
    Info,
    Debug,
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

impl fmt::Debug for StoreData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreData")
            .field("rules", &self.identity_version)
            .field("memory_refused", &self.memory_refused)
            .finish_non_exhaustive()
    }
}

impl StoreData {
    /// A line the guest logged, through the one import a rules world has.
    pub fn log(&mut self, level: GuestLog, message: String) {
        let rules = &*self.identity_version;
        match level {
            GuestLog::Error => {
                tracing::error!(rules, message = %message, "Rules component logged an error.");
                self.last_error = Some(message);
            }
            GuestLog::Warn => {
                tracing::warn!(rules, message = %message, "Rules component logged a warning.")
            }
            GuestLog::Info => tracing::info!(rules, message = %message, "Rules component logged."),
            GuestLog::Debug => {
                tracing::debug!(rules, message = %message, "Rules component logged.")
            }
        }
    }
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

/// Sandbox limits, from configuration.
#[derive(Debug, Clone)]
pub struct SandboxLimits {
    pub call_timeout: Duration,
    /// Extra time per 1,000 items of a call whose work grows with its input (a campaign's
    /// subscribers).
    pub call_timeout_per_1000: Duration,
    pub memory_limit_bytes: usize,
    /// Where compiled components are cached (keyed by wasmtime on the component's bytes and the
    /// engine's configuration), so a restart with an unchanged component does not recompile.
    pub compile_cache_dir: Option<std::path::PathBuf>,
    /// Epoch deadlines on calls. Always on in the runner; off only to measure their cost.
    pub interruptible: bool,
}

/// The engine of one rules contract plus the thread that advances its epoch.
pub struct RulesEngine<C: Contract> {
    inner: Arc<EngineInner>,
    linker: Arc<Linker<StoreData>>,
    contract: PhantomData<fn() -> C>,
}

impl<C: Contract> Clone for RulesEngine<C> {
    fn clone(&self) -> Self {
        RulesEngine {
            inner: self.inner.clone(),
            linker: self.linker.clone(),
            contract: PhantomData,
        }
    }
}

struct EngineInner {
    engine: Engine,
    limits: SandboxLimits,
    cache: Option<Cache>,
    stop_ticker: Arc<AtomicBool>,
}

impl Drop for EngineInner {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

impl<C: Contract> fmt::Debug for RulesEngine<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RulesEngine")
            .field("world", &C::WORLD)
            .field("limits", &self.inner.limits)
            .finish()
    }
}

impl<C: Contract> RulesEngine<C> {
    pub fn new(limits: SandboxLimits) -> anyhow::Result<RulesEngine<C>> {
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
        C::add_to_linker(&mut linker)?;

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
                limits,
                cache: compile_cache,
                stop_ticker,
            }),
            linker: Arc::new(linker),
            contract: PhantomData,
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
    pub fn load_file(&self, path: &Path) -> Result<LoadedRules<C>, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.display().to_string(),
            source,
        })?;
        self.load_bytes(&bytes)
    }

    pub fn load_bytes(&self, bytes: &[u8]) -> Result<LoadedRules<C>, LoadError> {
        let sha256 = hex::encode(Sha256::digest(bytes));
        let component =
            Component::new(&self.inner.engine, bytes).map_err(|e| LoadError::Compile(e.into()))?;
        check_contract::<C>(&component, &self.inner.engine)?;
        let wrong_world = |e: wasmtime::Error| LoadError::WrongWorld {
            world: C::WORLD,
            detail: e.into(),
        };
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(wrong_world)?;
        let pre = C::pre(pre).map_err(wrong_world)?;
        let mut loaded = LoadedRules {
            pre: Arc::new(pre),
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
            .call(instance.limits.call_timeout, C::version)
            .map_err(|e| LoadError::Smoke(e.to_string()))?;
        if version.trim().is_empty() {
            return Err(LoadError::Smoke(
                "the component reports an empty version".into(),
            ));
        }
        loaded.identity.version = version;
        C::smoke(&mut instance).map_err(LoadError::Smoke)?;
        Ok(loaded)
    }
}

/// A compiled, linked, smoke-tested component: cheap to instantiate.
pub struct LoadedRules<C: Contract> {
    pre: Arc<C::Pre>,
    identity: RulesIdentity,
    engine: RulesEngine<C>,
}

impl<C: Contract> fmt::Debug for LoadedRules<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedRules")
            .field("identity", &self.identity)
            .finish()
    }
}

impl<C: Contract> LoadedRules<C> {
    pub fn identity(&self) -> &RulesIdentity {
        &self.identity
    }

    /// A fresh instance with its own store and limits.
    pub fn instantiate(&self) -> Result<RulesInstance<C>, CallError> {
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
        let bindings = C::instantiate(&self.pre, &mut store).map_err(|e| {
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
pub struct RulesInstance<C: Contract> {
    store: Store<StoreData>,
    bindings: C::Bindings,
    limits: SandboxLimits,
}

impl<C: Contract> fmt::Debug for RulesInstance<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RulesInstance").finish_non_exhaustive()
    }
}

impl<C: Contract> RulesInstance<C> {
    pub fn limits(&self) -> &SandboxLimits {
        &self.limits
    }

    /// One call into the guest within `timeout`: the deadline is armed, the call made, and a
    /// failure classified (deadline, memory limit, or any other trap with what the guest
    /// logged last).
    pub fn call<T>(
        &mut self,
        timeout: Duration,
        f: impl FnOnce(&C::Bindings, &mut Store<StoreData>) -> wasmtime::Result<T>,
    ) -> Result<T, CallError> {
        if self.limits.interruptible {
            self.store.set_epoch_deadline(ticks(timeout));
        }
        self.store.data_mut().last_error = None;
        let r = f(&self.bindings, &mut self.store);
        r.map_err(|e| classify(e, &mut self.store, timeout, self.limits.memory_limit_bytes))
    }

    /// The deadline of a call whose work grows with `items` (e.g. a campaign's subscribers).
    pub fn timeout_for(&self, items: usize) -> Duration {
        self.limits.call_timeout + self.limits.call_timeout_per_1000 * (items.div_ceil(1000) as u32)
    }
}
