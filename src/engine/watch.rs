//! Reload on save: a notify watcher over the engine, module and template
//! directories, debounced, plus SIGHUP.

use std::sync::mpsc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};

use super::EngineRuntime;

/// File events closer together than this are one change.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// Keeps watching while it lives.
pub struct WatchGuard {
    _watcher: notify::RecommendedWatcher,
}

/// Starts reloading `runtime` whenever a watched file changes, and on SIGHUP
/// when called inside a tokio runtime. Returns the guard that keeps the
/// watcher alive.
pub fn watch(runtime: &EngineRuntime) -> notify::Result<WatchGuard> {
    let (tx, rx) = mpsc::channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(e) = event {
            let relevant = e.paths.iter().any(|p| {
                p.extension()
                    .is_some_and(|x| x == "lua" || x == "md" || x == "txt" || x == "mustache")
            });
            if relevant && !e.kind.is_access() {
                let _ = tx.send(());
            }
        }
    })?;
    let watched = runtime
        .shared
        .dirs
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .watched();
    for dir in watched {
        if dir.is_dir() {
            watcher.watch(&dir, RecursiveMode::Recursive)?;
        }
    }
    let rt = runtime.clone();
    std::thread::Builder::new()
        .name("engine-reload".into())
        .spawn(move || {
            while rx.recv().is_ok() {
                // Drain the burst: wait until the files have been quiet.
                while rx.recv_timeout(DEBOUNCE).is_ok() {}
                let report = rt.reload();
                tracing::info!(
                    engines = rt.engines().len(),
                    problems = report.problems.len(),
                    "engines reloaded"
                );
            }
        })
        .map_err(|e| notify::Error::generic(&e.to_string()))?;
    #[cfg(unix)]
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        let rt = runtime.clone();
        handle.spawn(async move {
            let Ok(mut hup) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            else {
                return;
            };
            while hup.recv().await.is_some() {
                let report = rt.reload();
                tracing::info!(
                    problems = report.problems.len(),
                    "engines reloaded on SIGHUP"
                );
            }
        });
    }
    Ok(WatchGuard { _watcher: watcher })
}
