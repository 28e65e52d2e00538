//! The sandbox that hosts a pipeline's business rules: a WASM component behind a versioned WIT
//! contract. Written once for every pipeline, generic over the contract ([`Contract`]: the
//! package and version it hosts, how to link and instantiate its world, a smoke test):
//!
//! - `engine`: limits (memory, call deadlines), compile cache, contract checks, loading;
//! - `reload`: hot swap (file watch, SIGHUP): build → check → smoke-test → swap, or keep the
//!   old version and say so;
//! - here: the swappable handle and the evaluator through which a pipeline calls the rules.

mod engine;
mod reload;

pub use engine::{
    CallError, GuestLog, LoadError, LoadedRules, RulesEngine, RulesIdentity, RulesInstance,
    SandboxLimits, StoreData,
};
pub use reload::{Reloaded, Reloader};

use arc_swap::ArcSwap;
use std::sync::Arc;
use wasmtime::component::{InstancePre, Linker};
use wasmtime::Store;

/// A rules contract: one WIT world the runner hosts. A pipeline implements this for its world
/// (with the types `wasmtime::component::bindgen!` generates) and gets the engine, the limits,
/// the checks, hot swap and the evaluator for free.
pub trait Contract: Send + Sync + Sized + 'static {
    /// The WIT package, e.g. `fooddelivery:campaign-rules`.
    const PACKAGE: &'static str;
    /// Its version; components exporting the same major version are accepted.
    const VERSION: &'static str;
    /// The world's name, for messages.
    const WORLD: &'static str;
    /// The package's interfaces a component may import (no WASI, nothing else).
    const IMPORTS: &'static [&'static str];
    /// The interface a component must export.
    const EXPORT: &'static str;
    /// The world pre-instantiated (`…Pre<StoreData>`).
    type Pre: Send + Sync + 'static;
    /// An instance's bindings.
    type Bindings: Send + 'static;

    /// Adds the world's imports (its `host-log`) to the linker.
    fn add_to_linker(linker: &mut Linker<StoreData>) -> wasmtime::Result<()>;
    fn pre(pre: InstancePre<StoreData>) -> wasmtime::Result<Self::Pre>;
    fn instantiate(
        pre: &Self::Pre,
        store: &mut Store<StoreData>,
    ) -> wasmtime::Result<Self::Bindings>;
    /// The component's own version string.
    fn version(bindings: &Self::Bindings, store: &mut Store<StoreData>)
        -> wasmtime::Result<String>;
    /// Exercises a fresh instance on a known input; Err(why) refuses the component.
    fn smoke(instance: &mut RulesInstance<Self>) -> Result<(), String>;
}

/// The current rules, swappable atomically. Readers take a cheap `Arc` snapshot per batch.
pub struct RulesHandle<C: Contract> {
    current: Arc<ArcSwap<LoadedRules<C>>>,
}

impl<C: Contract> Clone for RulesHandle<C> {
    fn clone(&self) -> Self {
        RulesHandle {
            current: self.current.clone(),
        }
    }
}

impl<C: Contract> std::fmt::Debug for RulesHandle<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RulesHandle")
            .field("current", &self.current.load().identity())
            .finish()
    }
}

impl<C: Contract> RulesHandle<C> {
    pub fn new(initial: LoadedRules<C>) -> Self {
        RulesHandle {
            current: Arc::new(ArcSwap::from_pointee(initial)),
        }
    }

    pub fn current(&self) -> Arc<LoadedRules<C>> {
        self.current.load_full()
    }

    /// Puts `next` in place; returns the rules it replaced.
    pub fn swap(&self, next: LoadedRules<C>) -> Arc<LoadedRules<C>> {
        self.current.swap(Arc::new(next))
    }
}

/// Calls the current rules, keeping one instance alive between calls and replacing it after any
/// failure (a trapped instance is never called again) or when the handle points at new rules.
pub struct Evaluator<C: Contract> {
    handle: RulesHandle<C>,
    rules: Arc<LoadedRules<C>>,
    instance: Option<RulesInstance<C>>,
}

impl<C: Contract> std::fmt::Debug for Evaluator<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Evaluator")
            .field("rules", self.rules.identity())
            .finish_non_exhaustive()
    }
}

impl<C: Contract> Evaluator<C> {
    pub fn new(handle: RulesHandle<C>) -> Self {
        let rules = handle.current();
        Evaluator {
            handle,
            rules,
            instance: None,
        }
    }

    /// Picks up swapped rules. Called at batch boundaries only, so one batch sees one version.
    pub fn refresh(&mut self) {
        let current = self.handle.current();
        if !Arc::ptr_eq(&current, &self.rules) {
            self.rules = current;
            self.instance = None;
        }
    }

    pub fn identity(&self) -> &RulesIdentity {
        self.rules.identity()
    }

    /// Runs `f` on the live instance (made first if needed); after a failure the instance is
    /// dropped and the next call makes a new one from the pre-instantiated component.
    pub fn with_instance<T>(
        &mut self,
        f: impl FnOnce(&mut RulesInstance<C>) -> Result<T, CallError>,
    ) -> Result<T, CallError> {
        let instance = match &mut self.instance {
            Some(i) => i,
            slot => slot.insert(self.rules.instantiate()?),
        };
        let r = f(instance);
        if r.is_err() {
            self.instance = None;
        }
        r
    }
}
