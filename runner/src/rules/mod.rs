//! The business rules, hosted: the WIT bindings, the sandboxed engine, and the one swappable
//! handle through which the pipeline reaches whichever rules are current.

mod bindings;
mod drafts;
mod engine;
mod reload;

pub use bindings::{
    Activity, Campaign, Rejection, RejectionCode, TemplateDrafts, Verdict, WIT_PACKAGE, WIT_VERSION,
};
pub use drafts::{BadDrafts, BadEncoding, ClientIds, Draft, Drafts};
pub use engine::{
    CallError, LoadError, LoadedRules, RulesEngine, RulesIdentity, RulesInstance, SandboxLimits,
};
pub use reload::{Reloaded, Reloader};

use arc_swap::ArcSwap;
use std::sync::Arc;

/// The current rules, swappable atomically. Readers take a cheap `Arc` snapshot per batch.
#[derive(Debug, Clone)]
pub struct RulesHandle {
    current: Arc<ArcSwap<LoadedRules>>,
}

impl RulesHandle {
    pub fn new(initial: LoadedRules) -> Self {
        RulesHandle {
            current: Arc::new(ArcSwap::from_pointee(initial)),
        }
    }

    pub fn current(&self) -> Arc<LoadedRules> {
        self.current.load_full()
    }

    /// Puts `next` in place; returns the rules it replaced.
    pub fn swap(&self, next: LoadedRules) -> Arc<LoadedRules> {
        self.current.swap(Arc::new(next))
    }
}

/// Calls the current rules, keeping one instance alive between calls and replacing it after any
/// failure (a trapped instance is never called again) or when the handle points at new rules.
#[derive(Debug)]
pub struct Evaluator {
    handle: RulesHandle,
    rules: Arc<LoadedRules>,
    instance: Option<RulesInstance>,
}

impl Evaluator {
    pub fn new(handle: RulesHandle) -> Self {
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

    fn with_instance<T>(
        &mut self,
        f: impl FnOnce(&mut RulesInstance) -> Result<T, CallError>,
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

    pub fn validate(
        &mut self,
        payload: &[u8],
        now: i64,
    ) -> Result<Result<Verdict, Rejection>, CallError> {
        self.with_instance(|i| i.validate(payload, now))
    }

    pub fn shape<S: AsRef<str>>(
        &mut self,
        campaign: &Campaign,
        clients: &[S],
        now: i64,
    ) -> Result<Drafts, CallError> {
        self.with_instance(|i| i.shape(campaign, clients, now))
    }
}
