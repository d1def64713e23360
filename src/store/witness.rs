//! The store's witness: a small file beside the store (`data_dir/store.witness`)
//! that says which store the data_dir holds and how far it had got, kept
//! outside anything sled may roll back. sled recovers a damaged file by
//! dropping what it cannot read, silently; a store restored from an older
//! backup looks healthy too. Either would forget sends and message
//! contacts a second time, so `Store::open` refuses a store that is
//! behind its witness.
//!
//! How far a store had got is a [`Mark`]: its count of account writes
//! (every send is one, see `accounts.rs`), of contact identities and of
//! claimed contacts (one per dialog). sled loses a damaged page whole, so
//! a lost part of any of those trees shows in its count. The first only
//! grows; the others shrink only when `release-contacts` runs, with no host
//! and a flush right after. The witness is written after a flush made the
//! mark durable, with the mark taken before the flush, so it never runs
//! ahead of the store: at most once a second while the host works, and on
//! every explicit flush (a clean stop). A crash loses at most that second
//! of the witness's view, never the store's.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::StoreError;

/// The file's name in the data_dir.
pub const FILE: &str = "store.witness";

/// How often a busy host rewrites the witness at most.
const EVERY: Duration = Duration::from_secs(1);

/// How far a store had got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    pub account_writes: u64,
    pub identities: u64,
    pub claims: u64,
}

impl Mark {
    /// What `self` lacks of `seen`, in the operator's words, if anything:
    /// "363 account writes where it had 618".
    pub fn lacks(&self, seen: &Mark) -> Option<String> {
        let counts = [
            (self.account_writes, seen.account_writes, "account writes"),
            (self.identities, seen.identities, "contacts"),
            (self.claims, seen.claims, "contacted contacts"),
        ];
        counts
            .into_iter()
            .find(|(has, had, _)| has < had)
            .map(|(has, had, what)| format!("{has} {what} where it had {had}"))
    }
}

/// What the witness records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Seen {
    /// The store's identity, made when it was created.
    pub store: String,
    #[serde(flatten)]
    pub mark: Mark,
    /// When this was written (RFC 3339, for the operator).
    pub at: String,
}

impl Seen {
    pub fn now(store: &str, mark: Mark) -> Seen {
        Seen {
            store: store.to_string(),
            mark,
            at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        }
    }

    pub fn read(path: &Path) -> Result<Option<Seen>, StoreError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                StoreError::Storage(format!(
                    "{} is unreadable ({e}); it is written by colloquy only",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Storage(format!(
                "cannot read {}: {e}",
                path.display()
            ))),
        }
    }

    /// Replaces the file whole (a new file, synced, renamed over the old).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let partial = path.with_extension("witness.partial");
        let mut f = std::fs::File::create(&partial)?;
        f.write_all(&serde_json::to_vec_pretty(self).unwrap_or_default())?;
        f.sync_all()?;
        std::fs::rename(&partial, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// The witness of an open store.
pub(super) struct Witness {
    path: PathBuf,
    store: String,
    /// The mark last written, and when.
    last: Mutex<(Mark, Option<Instant>)>,
}

impl Witness {
    /// Checks the store in `dir` (its identity and its mark) against the
    /// witness, and writes one if there is none: a new store, or one a
    /// version without witnesses kept.
    pub(super) fn check(dir: &Path, store: &str, mark: Mark) -> Result<Witness, StoreError> {
        let path = dir.join(FILE);
        let witness = Witness {
            path: path.clone(),
            store: store.to_string(),
            last: Mutex::new((mark, None)),
        };
        let Some(seen) = Seen::read(&path)? else {
            witness.write(mark);
            return Ok(witness);
        };
        if seen.store != store {
            return Err(StoreError::NotThisStore {
                dir: dir.display().to_string(),
                witness: path.display().to_string(),
            });
        }
        if let Some(lacks) = mark.lacks(&seen.mark) {
            return Err(StoreError::Behind {
                dir: dir.display().to_string(),
                lacks,
                at: seen.at,
                witness: path.display().to_string(),
            });
        }
        Ok(witness)
    }

    /// Records `mark`, taken before a flush that has now made it durable:
    /// at once when `now`, else at most once per [`EVERY`].
    pub(super) fn saw(&self, mark: Mark, now: bool) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let recent = last.1.is_some_and(|at| at.elapsed() < EVERY);
        if mark == last.0 || (recent && !now) {
            return;
        }
        *last = (mark, Some(Instant::now()));
        drop(last);
        self.write(mark);
    }

    fn write(&self, mark: Mark) {
        // A witness that cannot be written weakens the check at the next
        // open; it loses nothing, so the host goes on.
        if let Err(e) = Seen::now(&self.store, mark).write(&self.path) {
            tracing::warn!("cannot write {}: {e}", self.path.display());
        }
    }
}
