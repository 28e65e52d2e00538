//! Hot swap: when the rules file changes (and has settled) or on SIGHUP, the new component is
//! compiled, checked against the contract, smoke-tested and pre-instantiated off the hot path,
//! then swapped in atomically; the pipeline picks it up at its next batch boundary. On any
//! failure the running version stays in service and the refusal is logged, counted and shown.

use super::{Contract, LoadError, RulesEngine, RulesHandle, RulesIdentity};
use crate::events::Events;
use crate::retry::stopped;
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// Waits until no further change arrived for `settle`; false when shutting down meanwhile.
async fn settled(
    rx: &mut mpsc::UnboundedReceiver<()>,
    settle: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    loop {
        tokio::select! {
            _ = stopped(shutdown) => return false,
            Some(()) = rx.recv() => continue,
            _ = tokio::time::sleep(settle) => return true,
        }
    }
}

/// What one reload did.
#[derive(Debug)]
pub enum Reloaded {
    Swapped {
        old: RulesIdentity,
        new: RulesIdentity,
    },
    /// The file holds the rules already in service.
    Unchanged,
    Refused(LoadError),
}

pub struct Reloader<C: Contract> {
    engine: RulesEngine<C>,
    handle: RulesHandle<C>,
    path: PathBuf,
    events: Arc<Events>,
    /// The hash of the last file refused: the same bytes are not tried (nor reported) again.
    last_refused: Arc<std::sync::Mutex<Option<String>>>,
}

impl<C: Contract> Clone for Reloader<C> {
    fn clone(&self) -> Self {
        Reloader {
            engine: self.engine.clone(),
            handle: self.handle.clone(),
            path: self.path.clone(),
            events: self.events.clone(),
            last_refused: self.last_refused.clone(),
        }
    }
}

impl<C: Contract> std::fmt::Debug for Reloader<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl<C: Contract> Reloader<C> {
    pub fn new(
        engine: RulesEngine<C>,
        handle: RulesHandle<C>,
        path: PathBuf,
        events: Arc<Events>,
    ) -> Self {
        Reloader {
            engine,
            handle,
            path,
            events,
            last_refused: Default::default(),
        }
    }

    /// Loads the file and swaps it in if it is new and passes every check. Blocking.
    pub fn reload_now(&self, trigger: &str) -> Reloaded {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(source) => {
                let e = LoadError::Read {
                    path: self.path.display().to_string(),
                    source,
                };
                self.events.rules_refused(&self.path, e.code(), &e, trigger);
                return Reloaded::Refused(e);
            }
        };
        let sha = hex::encode(Sha256::digest(&bytes));
        let refused_before =
            self.last_refused.lock().expect("reload lock").as_deref() == Some(sha.as_str());
        if sha == self.handle.current().identity().sha256 || refused_before {
            tracing::debug!(path = %self.path.display(), trigger, "Rules file unchanged; nothing to swap.");
            return Reloaded::Unchanged;
        }
        match self.engine.load_bytes(&bytes) {
            Ok(next) => {
                let new = next.identity().clone();
                let old = self.handle.swap(next).identity().clone();
                self.events
                    .rules_swapped(&old, &new, &new.version, &new.sha256, trigger);
                Reloaded::Swapped { old, new }
            }
            Err(e) => {
                *self.last_refused.lock().expect("reload lock") = Some(sha);
                self.events.rules_refused(&self.path, e.code(), &e, trigger);
                Reloaded::Refused(e)
            }
        }
    }

    /// Starts watching (the file, through its directory, so replacing it by rename is seen too)
    /// and listening for SIGHUP before returning, so no change is missed; then reloads on each
    /// until `shutdown` turns true. A catch-up reload covers changes made before the watch began.
    pub async fn spawn(
        self,
        watch_file: bool,
        settle: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        let (tx, mut rx) = mpsc::unbounded_channel::<()>();
        let watcher = if watch_file { self.watch(tx) } else { None };
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "Cannot listen for SIGHUP; reload by file change only.");
                None
            }
        };
        // The catch-up reload finishes before this returns: started means checked.
        let this = self.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || this.reload_now("catch-up")).await {
            tracing::error!(error = %e, "Rules reload task failed.");
        }
        tokio::spawn(async move {
            let _watcher = watcher;
            loop {
                let trigger = tokio::select! {
                    _ = stopped(&mut shutdown) => return,
                    Some(()) = rx.recv() => "file change",
                    Some(()) = async {
                        match hup.as_mut() {
                            Some(h) => h.recv().await,
                            None => std::future::pending().await,
                        }
                    } => "SIGHUP",
                };
                if trigger == "file change" && !settled(&mut rx, settle, &mut shutdown).await {
                    return;
                }
                if self.clone().reload_in_background(trigger).await.is_none() {
                    tracing::error!("Rules reload task failed.");
                }
            }
        })
    }

    /// Reloads on a thread of its own, in the lowest scheduling class (SCHED_IDLE on Linux):
    /// loading a component (reading, deserialising or compiling it, checking it, smoke-testing
    /// it) costs tens of milliseconds of CPU, which must not be taken from the pipeline when
    /// the cores are busy; the rules in service keep serving meanwhile, so a slower reload
    /// costs nothing. None if the thread could not run or died.
    async fn reload_in_background(self, trigger: &'static str) -> Option<Reloaded> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("rules-reload".into())
            .spawn(move || {
                use thread_priority::{
                    set_thread_priority_and_policy, thread_native_id, NormalThreadSchedulePolicy,
                    ThreadPriority, ThreadSchedulePolicy,
                };
                let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
                if let Err(e) =
                    set_thread_priority_and_policy(thread_native_id(), ThreadPriority::Min, idle)
                {
                    tracing::debug!(error = ?e, "Cannot lower the reload thread's priority; reloading at normal priority.");
                }
                let _ = tx.send(self.reload_now(trigger));
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "Cannot start the rules reload thread.");
            return None;
        }
        rx.await.ok()
    }

    /// Watches the file's directory; only writes, creations, renames and removals of the file
    /// count (reading it, as every reload does, must not trigger another reload).
    fn watch(&self, tx: mpsc::UnboundedSender<()>) -> Option<RecommendedWatcher> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = self.path.file_name().map(|n| n.to_owned());
        let handler = move |res: notify::Result<notify::Event>| match res {
            Ok(event) => {
                let relevant = matches!(
                    event.kind,
                    EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
                );
                if relevant && event.paths.iter().any(|p| p.file_name() == name.as_deref()) {
                    let _ = tx.send(());
                }
            }
            Err(e) => tracing::warn!(error = %e, "Watching the rules file failed."),
        };
        let started = notify::recommended_watcher(handler).and_then(|mut w| {
            w.watch(&dir, RecursiveMode::NonRecursive)?;
            Ok(w)
        });
        match started {
            Ok(w) => {
                tracing::info!(path = %self.path.display(), "Watching the rules file.");
                Some(w)
            }
            Err(e) => {
                tracing::warn!(error = %e, dir = %dir.display(), "Cannot watch the rules directory; reload with SIGHUP.");
                None
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}
