//! Audience files into the store: all of them at start, and each again
//! when it is saved while the host runs (debounced). A file that cannot be
//! read as its header promises is not imported at all: the audience stays
//! as last imported and an alert says why. Rows removed from a file never
//! remove a contact, its dialog or its history; new rows become pickable
//! and changed fields are updated.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::SeededRng;
use crate::config::{Audience, Config};
use crate::safety::alerts::{Alert, AlertKind};
use crate::store::{Store, StoreError};

use super::{Host, RunError};

/// How long a saved file must stay quiet before it is imported: editors
/// write a file in several steps.
const SETTLE: Duration = Duration::from_millis(500);

/// Imports every audience file; the texts of those refused come back for
/// the host's alerts.
pub(super) fn import_all(config: &Config, store: &Store) -> Result<Vec<String>, RunError> {
    let mut refused = Vec::new();
    for a in &config.file.audiences {
        refused.extend(import(config, store, a)?);
    }
    Ok(refused)
}

/// Imports one audience file, or says why it is kept as last imported.
fn import(config: &Config, store: &Store, a: &Audience) -> Result<Option<String>, StoreError> {
    let file = crate::audience::read(&config.resolve(&a.file));
    if file.refused {
        let why: Vec<String> = file.problems.iter().map(|p| p.to_string()).collect();
        let text = format!(
            "audience {} keeps its contacts as last imported: {}",
            a.name,
            why.join("; ")
        );
        tracing::error!(audience = a.name, "{text}");
        return Ok(Some(text));
    }
    for p in &file.problems {
        tracing::warn!("{p}");
    }
    let rng = SeededRng::new(config.file.sim.seed);
    let stats = store.import_audience(&a.name, &file.rows, &mut || rng.next_u64())?;
    tracing::info!(
        audience = a.name,
        added = stats.added,
        updated = stats.updated,
        unchanged = stats.unchanged,
        "audience imported"
    );
    Ok(None)
}

/// Watches the directories of the audience files and imports a file
/// again once it has been saved and left alone for [`SETTLE`]; the
/// campaigns' runners then look again for contacts to open. The files are
/// those of the config at the time of the save. `None` if nothing can be
/// watched (the host runs on; a restart imports).
pub(super) fn watch(host: Arc<Host>) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let (tx, rx) = std::sync::mpsc::channel::<PathBuf>();
    // Only the audience files count: a log written beside them would
    // otherwise keep the debounce below from ever settling.
    let watched = host.clone();
    let mut watcher = notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
        let Ok(e) = e else { return };
        if e.kind.is_access() {
            return;
        }
        let config = watched.config();
        for p in e.paths {
            if is_audience(&config, &p) {
                let _ = tx.send(p);
            }
        }
    })
    .ok()?;
    let config = host.config();
    let dirs: HashSet<PathBuf> = config
        .file
        .audiences
        .iter()
        .filter_map(|a| config.resolve(&a.file).parent().map(Path::to_path_buf))
        .collect();
    for dir in &dirs {
        if let Err(e) = watcher.watch(dir, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(
                "audience files in {} are imported at the next start only: {e}",
                dir.display()
            );
        }
    }
    let rt = tokio::runtime::Handle::current();
    std::thread::spawn(move || {
        while let Ok(first) = rx.recv() {
            let mut saved = HashSet::from([first]);
            while let Ok(p) = rx.recv_timeout(SETTLE) {
                saved.insert(p);
            }
            let config = host.config();
            import_again(&host, &rt, &config, |a| {
                saved.iter().any(|p| same_file(p, &config.resolve(&a.file)))
            });
        }
    });
    Some(watcher)
}

/// After a reload of config.toml: imports the audiences it adds or points
/// at another file.
pub(super) fn import_added(
    host: &Arc<Host>,
    rt: &tokio::runtime::Handle,
    before: &Config,
    after: &Config,
) {
    import_again(host, rt, after, |a| {
        !before
            .file
            .audiences
            .iter()
            .any(|b| b.name == a.name && before.resolve(&b.file) == after.resolve(&a.file))
    });
}

/// Imports the audiences of `config` that `which` picks, raises an alert
/// for each refused, and wakes the runners if any was imported.
fn import_again(
    host: &Arc<Host>,
    rt: &tokio::runtime::Handle,
    config: &Config,
    which: impl Fn(&Audience) -> bool,
) {
    let mut imported = false;
    for a in config.file.audiences.iter().filter(|a| which(a)) {
        match import(config, &host.store, a) {
            Ok(None) => imported = true,
            Ok(Some(refused)) => {
                host.alerts.raise(Alert::new(
                    AlertKind::AudienceRefused,
                    host.clock.now(),
                    refused,
                ));
            }
            Err(e) => tracing::error!(audience = a.name, "the audience could not be imported: {e}"),
        }
    }
    if imported {
        let h = host.clone();
        rt.spawn(async move { h.changed.notify_waiters() });
    }
}

/// Whether a path an event names is one of the config's audience files.
fn is_audience(config: &Config, path: &Path) -> bool {
    config
        .file
        .audiences
        .iter()
        .any(|a| same_file(path, &config.resolve(&a.file)))
}

/// Whether a path an event names is the audience file (relative or not).
fn same_file(event: &Path, file: &Path) -> bool {
    let full = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    full(event) == full(file)
}
