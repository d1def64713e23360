//! Opening the store: sled in a thread of its own (a damaged file is a
//! sentence, not a crash or a hang), the lock a process just let go of,
//! the layout check and the moves of older layouts, the store's identity.

use super::*;

std::thread_local! {
    /// Set while this thread runs [`quietly`].
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, turning a panic into its message, not printed: the caller
/// says what it means in one sentence.
fn quietly<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
    QUIET.with(|q| q.set(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(false));
    result.map_err(|panic| {
        let text = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned());
        format!(
            "sled: {}",
            text.unwrap_or_else(|| "it failed to read it".into())
        )
    })
}

/// How long opening the store at `db` may take before it counts as stuck:
/// ten seconds, and one more for every 10 MB of its file (sled reads its
/// whole log at open, at well over 100 MB/s).
fn open_deadline(db: &Path) -> std::time::Duration {
    let bytes = std::fs::metadata(db).map(|m| m.len()).unwrap_or(0);
    std::time::Duration::from_secs(10 + bytes / 10_000_000)
}

/// Directories of stores this process closed. sled's IO threads keep the
/// file lock a few milliseconds past the close, so reopening one of these
/// waits for the lock instead of reporting it taken.
static CLOSED_HERE: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());

pub(super) struct OpenHere(pub(super) std::path::PathBuf);

impl Drop for OpenHere {
    fn drop(&mut self) {
        let mut closed = CLOSED_HERE.lock().unwrap_or_else(|e| e.into_inner());
        closed.push(self.0.clone());
    }
}

fn closed_here(path: &Path) -> bool {
    CLOSED_HERE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|p| p == path)
}

/// Makes the store readable by its owner only: it holds Telegram auth
/// keys. Best effort: a store on a filesystem without modes still opens.
fn private(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if std::fs::create_dir_all(path).is_err() {
        return;
    }
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700));
    if let Ok(entries) = std::fs::read_dir(path) {
        for e in entries.flatten() {
            let mode = if e.path().is_dir() { 0o700 } else { 0o600 };
            let _ = std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(mode));
        }
    }
}

impl Store {
    /// Opens (or creates) the store under `dir`. sled may panic on a
    /// damaged file while it recovers or reads it, or spin on it for ever:
    /// the open runs on a thread of its own, and a panic, sled's
    /// `Corruption` or a thread still reading after `open_deadline` (10 s and 1 s per 10 MB) is
    /// the damaged store's sentence, not a crash or a hang (the stuck
    /// thread is left to the process's exit).
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let damaged = |why: &str| {
            StoreError::NeedsOperator(format!(
                "the store in {} is damaged ({why}); restore a backup with `colloquy restore`",
                dir.display()
            ))
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let path = dir.to_path_buf();
        std::thread::Builder::new()
            .name("store-open".into())
            .spawn(move || {
                let _ = tx.send(quietly(|| Store::open_unguarded(&path)));
            })
            .map_err(|e| StoreError::Storage(format!("cannot start a thread: {e}")))?;
        // sled can spin forever on some damaged pages instead of failing.
        // A healthy store opens far within this, however large it is.
        let deadline = open_deadline(&dir.join("store").join("db"));
        let opened = match rx.recv_timeout(deadline) {
            Ok(opened) => opened,
            Err(_) => {
                return Err(damaged(&format!(
                    "sled was still reading its files after {}, which it does only when they are damaged",
                    humantime::format_duration(deadline)
                )))
            }
        };
        match opened {
            Err(why) => Err(damaged(&why)),
            Ok(Err(StoreError::Damaged)) => Err(damaged("sled found unreadable data in its files")),
            Ok(Err(e @ StoreError::Corrupt { .. })) => Err(damaged(&e.to_string())),
            Ok(opened) => opened,
        }
    }

    fn open_unguarded(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Storage(format!("cannot create {}: {e}", dir.display())))?;
        private(&dir.join("store"));
        let open = || {
            sled::Config::new()
                .path(dir.join("store"))
                .mode(sled::Mode::HighThroughput)
                .open()
                .map_err(|e| match e {
                    sled::Error::Io(io)
                        if io.kind() == std::io::ErrorKind::WouldBlock
                            || io.to_string().contains("lock") =>
                    {
                        StoreError::Locked(dir.display().to_string())
                    }
                    sled::Error::Unsupported(why) => StoreError::NeedsOperator(format!(
                        "the store in {} is damaged or is not a colloquy store ({why}); restore a backup with `colloquy restore`",
                        dir.display()
                    )),
                    other => other.into(),
                })
        };
        // A store this process just closed keeps its file lock until
        // sled's IO threads let go of it, a few milliseconds later. Another
        // process's lock is reported at once.
        let path = dir.join("store");
        let mut tries = 0;
        let db = loop {
            match open() {
                Err(StoreError::Locked(_)) if tries < 50 && closed_here(&path) => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other?,
            }
        };
        CLOSED_HERE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p| *p != path);
        let mut store = Store::from_db(db)?;
        store._open = Some(Arc::new(OpenHere(path)));
        let layout = store.check_layout(dir)?;
        store.replay_account_log()?;
        store.page_messages()?;
        if layout < 4 {
            store.rebuild_status_index()?;
        }
        store.replay_journal()?;
        store.flights_to_outbox()?;
        store.t.meta.insert("record_version", &[RECORD_VERSION])?;
        if layout < 5 {
            // The index is in memory since layout 5; the layout is named
            // first, so that an older version refuses the store rather
            // than read it without its index.
            store.db.flush()?;
            store.db.drop_tree("dialogs_by_activity")?;
        }
        let id = store.identity(dir)?;
        store.witness = Some(Arc::new(witness::Witness::check(dir, &id, store.mark())?));
        Ok(store)
    }

    /// The layout the store was written in (1 for a store that names
    /// none). Refuses a store written in a layout newer than this version
    /// reads (before anything is written to it); an older one is moved on
    /// as it opens (`page_messages`, `rebuild_status_index`, the journal's
    /// earlier chunks, records on read).
    fn check_layout(&self, dir: &Path) -> Result<u8, StoreError> {
        let stored = self.t.meta.get("record_version")?;
        match stored.as_deref().and_then(|v| v.first()) {
            Some(&v) if v > RECORD_VERSION => Err(StoreError::NeedsOperator(format!(
                "the store in {} was written by a newer colloquy (store layout {v}; this one reads layout {RECORD_VERSION} and older): run that newer version, or restore a backup made with this one with `colloquy restore`; nothing was changed",
                dir.display()
            ))),
            stored => Ok(stored.copied().unwrap_or(1)),
        }
    }

    /// Builds the dialogs-by-status index again in the key layout of
    /// layout 4 ([`status_key`]) from the dialogs as stored (opening
    /// replays the journal after, through the one write path): about 12
    /// seconds a million dialogs. Built from the dialogs, not the old
    /// keys, so that a rebuild a crash cut short is simply done again;
    /// the store names layout 4 only once the index is on disk.
    fn rebuild_status_index(&self) -> Result<(), StoreError> {
        self.t.by_status.clear()?;
        let mut keys = self
            .all_dialogs()
            .map(|d| d.map(|d| status_key(d.status.tag(), d.id)))
            .collect::<Result<Vec<_>, _>>()?;
        // In key order, one insert at a time: sled's batches took 2.5
        // times as long.
        keys.sort_unstable();
        for key in &keys {
            self.t.by_status.insert(key, &[])?;
        }
        self.db.flush()?;
        Ok(())
    }

    /// The store's identity, made when it is first opened. A store that
    /// holds records but lost its identity is damaged, not new.
    pub(super) fn identity(&self, dir: &Path) -> Result<String, StoreError> {
        if let Some(id) = self.t.meta.get("store_id")? {
            return Ok(String::from_utf8_lossy(&id).into_owned());
        }
        if self.holds_records()? {
            return Err(StoreError::NeedsOperator(format!(
                "the store in {} is damaged (it holds records but lost its identity); restore a backup with `colloquy restore`",
                dir.display()
            )));
        }
        let id = format!(
            "{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        );
        self.t.meta.insert("store_id", id.as_bytes())?;
        self.db.flush()?;
        Ok(id)
    }

    /// Whether any tree but `meta` holds a record: sled that lost a
    /// damaged part of its file may have lost some trees and kept others.
    fn holds_records(&self) -> Result<bool, StoreError> {
        for name in self.db.tree_names() {
            if name == "meta" || name == "__sled__default" {
                continue;
            }
            if self.db.open_tree(&name)?.first()?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Moves the messages of the older layout (one key each, in the
    /// `messages` tree) into pages. The pages are rebuilt whole from the
    /// old tree, which is dropped last, so an interrupted move is redone.
    fn page_messages(&self) -> Result<(), StoreError> {
        if !self.db.tree_names().iter().any(|n| n == b"messages") {
            return Ok(());
        }
        let old = self.db.open_tree("messages")?;
        let messages = old
            .iter()
            .values()
            .map(|v| decode::<Message>("message", &v?))
            .collect::<Result<Vec<_>, _>>()?;
        for (key, page) in pages::paged(messages.into_iter())? {
            self.t.messages.insert(key, page)?;
        }
        self.db.flush()?;
        self.db.drop_tree("messages")?;
        Ok(())
    }

    /// A store in a temporary directory that disappears on drop, for tests
    /// and benchmarks.
    pub fn temporary() -> Result<Store, StoreError> {
        Store::from_db(
            sled::Config::new()
                .temporary(true)
                .mode(sled::Mode::HighThroughput)
                .open()?,
        )
    }

    fn from_db(db: sled::Db) -> Result<Store, StoreError> {
        let tree = |name: &str| db.open_tree(name);
        let t = Trees {
            contacts: tree("contacts")?,
            identities: tree("identities")?,
            uncontacted: tree("uncontacted")?,
            do_not_contact: tree("do_not_contact")?,
            dialogs: tree("dialogs")?,
            by_status: tree("dialogs_by_status")?,
            dialog_of_contact: tree("dialog_of_contact")?,
            messages: tree("message_pages")?,
            outbox: tree("outbox")?,
            flights: tree("flights")?,
            journal: tree("journal")?,
            inbound: tree("inbound")?,
            unhandled: tree("unhandled")?,
            orphans: tree("orphans")?,
            accounts: tree("accounts")?,
            meta: tree("meta")?,
        };
        let counts = Counts {
            identities: AtomicU64::new(t.identities.len() as u64),
            claims: AtomicU64::new(t.dialog_of_contact.len() as u64),
        };
        let quiet = QuietDialogs::of(&t.dialogs)?;
        Ok(Store {
            db,
            t,
            quiet: Arc::new(quiet),
            accounts: Arc::default(),
            flight_keys: Arc::default(),
            deferred: Arc::default(),
            touched: Arc::new(Touched::new()),
            flusher: Arc::new(std::sync::OnceLock::new()),
            hold_clock: Arc::new(AtomicBool::new(false)),
            _open: None,
            witness: None,
            counts: Arc::new(counts),
            gate: Arc::default(),
            writer: Arc::default(),
        })
    }
}
