//! Backups and restores. A backup is a data_dir of its own: `store/` (the
//! sled files) and `store.witness` (what the store had written), so
//! restoring it puts both back. It is taken while the host runs: every
//! write holds the store's gate shared, the backup holds it alone for the
//! flush, the copy and a checksum, then checks the copy's checksum apart.

use std::path::{Path, PathBuf};

use super::witness::{self, Seen};
use super::{Store, StoreError};

/// What a backup wrote.
pub struct Backup {
    pub bytes: u64,
    pub seen: Seen,
}

impl Store {
    /// Copies the store into `dest` (missing or empty), consistent with
    /// what it held at one moment between two writes.
    pub fn backup(&self, dest: &Path) -> Result<Backup, StoreError> {
        let Some(open) = &self._open else {
            return Err(StoreError::Storage(
                "a temporary store has no files to back up".into(),
            ));
        };
        let source = &open.0;
        if source_inside(source, dest) {
            return Err(refused(dest, "it is inside the store it would back up"));
        }
        match std::fs::read_dir(dest).map(|mut entries| entries.next().is_some()) {
            Ok(true) => return Err(refused(dest, "it is not empty; name a new directory")),
            Ok(false) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(refused(dest, &e.to_string())),
        }
        let partial = dest.join("store.partial");
        std::fs::create_dir_all(&partial).map_err(|e| io(&partial, e))?;
        let (bytes, checksum, seen) = {
            let _alone = self.gate.write().unwrap_or_else(|e| e.into_inner());
            let mark = self.mark();
            self.db.flush()?;
            let bytes = copy_dir(source, &partial)?;
            (
                bytes,
                self.db.checksum()?,
                Seen::now(&self.identity(source)?, mark),
            )
        };
        let copy = sled::Config::new().path(&partial).open()?;
        let copied = copy.checksum()?;
        drop(copy);
        if copied != checksum {
            return Err(StoreError::Storage(format!(
                "the copy in {} does not read back as the store did; it is left there for inspection",
                partial.display()
            )));
        }
        std::fs::rename(&partial, dest.join("store")).map_err(|e| io(dest, e))?;
        seen.write(&dest.join(witness::FILE))
            .map_err(|e| io(dest, e))?;
        Ok(Backup { bytes, seen })
    }
}

/// Puts the backup in `source` (a directory `colloquy backup` wrote) in
/// place of the store in `data_dir`, whose host must be stopped. An older
/// backup than the store the data_dir held last is refused unless
/// `accept_older`: contacts written to since could be written to again.
/// The store it replaces is kept beside it; returns where.
pub fn restore(
    source: &Path,
    data_dir: &Path,
    accept_older: bool,
) -> Result<Option<PathBuf>, StoreError> {
    let backup = Seen::read(&source.join(witness::FILE))?.ok_or_else(|| {
        StoreError::NeedsOperator(format!(
            "{} holds no backup: `colloquy backup` writes store/ and {} there",
            source.display(),
            witness::FILE
        ))
    })?;
    let store = data_dir.join("store");
    if store.exists() {
        match Store::open(data_dir) {
            Err(e @ StoreError::Locked(_)) => return Err(e),
            Ok(store) => drop(store),
            Err(_) => {} // damaged or behind: what a restore is for
        }
    }
    let current = Seen::read(&data_dir.join(witness::FILE))?;
    if let Some(current) = current.filter(|c| !accept_older && is_older(&backup, c)) {
        return Err(StoreError::NeedsOperator(format!(
            "the backup in {}, of {}, is older than the store {} held at {} (the backup holds {}): contacts written to since could be written to again; restore a newer backup, or pass --accept-older if you accept that",
            source.display(),
            backup.at,
            data_dir.display(),
            current.at,
            match backup.mark.lacks(&current.mark) {
                Some(lacks) => lacks.replace("where it had", "where the store had"),
                None => "another store's records".into(),
            },
        )));
    }
    let kept = if store.exists() {
        let kept = data_dir.join(format!(
            "store.replaced-{}",
            humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                .to_string()
                .replace(':', "")
        ));
        std::fs::rename(&store, &kept).map_err(|e| io(&store, e))?;
        Some(kept)
    } else {
        None
    };
    copy_dir(&source.join("store"), &store)?;
    backup
        .write(&data_dir.join(witness::FILE))
        .map_err(|e| io(data_dir, e))?;
    drop(Store::open(data_dir)?);
    Ok(kept)
}

/// Whether the backup lacks writes the data_dir's store had made.
fn is_older(backup: &Seen, current: &Seen) -> bool {
    backup.store != current.store || backup.mark.lacks(&current.mark).is_some()
}

fn source_inside(source: &Path, dest: &Path) -> bool {
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let dest = canonical(dest.parent().unwrap_or(dest)).join(dest.file_name().unwrap_or_default());
    dest.starts_with(canonical(source))
}

fn refused(dest: &Path, why: &str) -> StoreError {
    StoreError::NeedsOperator(format!("cannot back up to {}: {why}", dest.display()))
}

fn io(path: &Path, e: std::io::Error) -> StoreError {
    if super::is_disk_full(&e) {
        return StoreError::DiskFull;
    }
    StoreError::Storage(format!("{}: {e}", path.display()))
}

/// Copies the files under `from` into `to` (made), synced; returns bytes.
fn copy_dir(from: &Path, to: &Path) -> Result<u64, StoreError> {
    std::fs::create_dir_all(to).map_err(|e| io(to, e))?;
    let mut bytes = 0;
    for entry in std::fs::read_dir(from).map_err(|e| io(from, e))? {
        let entry = entry.map_err(|e| io(from, e))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type().map_err(|e| io(&src, e))?.is_dir() {
            bytes += copy_dir(&src, &dst)?;
        } else {
            bytes += std::fs::copy(&src, &dst).map_err(|e| io(&src, e))?;
            std::fs::File::open(&dst)
                .and_then(|f| f.sync_all())
                .map_err(|e| io(&dst, e))?;
        }
    }
    Ok(bytes)
}
