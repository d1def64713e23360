//! The embedded store: every tree, key layout and record encoding of the
//! host, over sled 0.34. Nothing else in the crate names sled.
//!
//! # Trees
//!
//! | tree | key | value |
//! |---|---|---|
//! | `contacts` | contact id | [`Contact`] |
//! | `identities` | [`Identity::key`] | contact id |
//! | `uncontacted` | audience, 0, pick key, contact id | (empty) |
//! | `do_not_contact` | contact id | [`DoNotContact`] |
//! | `dialogs` | dialog id | [`Dialog`] |
//! | `dialogs_by_status` | status tag, dialog id with its bits reversed (see [`status_key`]) | (empty) |
//! | `dialog_of_contact` | contact id | dialog id: the claim, at most one per contact |
//! | `message_pages` | dialog id, seq / 16 | up to 16 [`Message`]s of the dialog (see `pages.rs`) |
//! | `outbox` | idempotency key | dialog id, seq (outbound not yet confirmed) |
//! | `flights` | flight id | idempotency key, dialog id, seq of each reply the answer pipeline is sending (see `batch.rs`) |
//! | `journal` | batch id, chunk | the answers whose records the answer pipeline deferred (see `deferred.rs`) |
//! | `inbound` | account, 0, transport id | dialog id, seq: dedupe of incoming messages sent to another account than their dialog's (the dialog's own are found in its pages) |
//! | `unhandled` | dialog id, seq | (empty): incoming messages stored, not yet answered |
//! | `orphans` | account, 0, transport id | an incoming message from a contact with no dialog |
//! | `accounts` | account name | [`AccountRecord`] without its sends |
//! | `accounts` | account name, 1, tenth of a second | the sends of that tenth that count against the limits (key, `at`, opening; see `accounts.rs`) |
//! | `accounts` | 0xFF, sequence, chunk | the account log: keys of this tree with their new values, not yet written to them |
//! | `meta` | name | value |
//! | `tg_sessions`, `tg_peers`, `tg_sent`, ... | string key | records of the Telegram transport ([`Records`]) |
//!
//! Records are a version byte followed by JSON, except dialogs and contacts
//! (binary since layout 2) and account records (since layout 3): see
//! `records.rs`. [`RECORD_VERSION`] names the
//! current layout so that a later one can migrate old records on read.
//! Message pages carry a format byte of their own and binary records (see
//! `pages.rs`).
//! Changes that span records run in one sled transaction.
//!
//! The quiet-dialogs index (each live dialog at [`listed_at`], the
//! reviver's order) is kept in memory, not in a tree: built from the
//! dialogs when the store opens, and moved by each transaction once it
//! committed (see [`Tx::move_quiet`]). Kept on disk (before layout 5), its keys
//! arrived in time order, the costliest for sled, and took a third of an
//! idle dialog's file.

mod accounts;
mod backup;
mod batch;
mod deferred;
mod keys;
mod pages;
mod records;
pub mod witness;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use sled::transaction::{
    ConflictableTransactionError, TransactionError, TransactionalTree, UnabortableTransactionError,
};
use sled::Transactional;

use crate::audience::ContactRow;
use crate::clock::Timestamp;
use crate::model::{
    AccountRecord, Contact, ContactId, Delivery, Dialog, DialogId, DialogStatus, DialogSummary,
    DoNotContact, IdempotencyKey, Identity, Message, MessageKind, TransitionError,
};
use crate::transition::{self, Apply, Change, Event, Incoming, NewDialog, Outbound};
pub use backup::{restore, Backup};
pub use batch::{
    plan, Answer, AnswerOutcome, EngineAnswer, Flight, Plan, PlanCell, Settle, Written,
};
use batch::{FlightKeys, FlightReply, Touched};
use deferred::Deferred;
use keys::*;
use pages::{page_key, split_address, Pages};
use records::{
    decode_contact, decode_dialog, decode_dialog_summary, encode_contact, encode_dialog,
};

/// Bytes at most of a value the store writes in chunks (the journal, the
/// account log). sled keeps a log entry above 128 KiB (a fourth of its
/// segment), be it a value or a leaf of up to sixteen keys rewritten
/// whole, in a file of its own, which it never syncs: with chunks of
/// 7 KiB every leaf stays in sled's log, which `flush` makes durable.
const CHUNK: usize = 7 * 1024;

/// The store's layout, kept in `meta` (see [`Store::check_layout`]).
pub const RECORD_VERSION: u8 = 5;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store in {0} is in use by another colloquy process; stop it first or use another data_dir")]
    Locked(String),
    #[error("the store failed: {0}")]
    Storage(String),
    #[error("the disk holding data_dir is full: free space on it (the store needs room to write), then start the host again; nothing already stored is lost")]
    DiskFull,
    #[error("the store in {dir} is behind what it had written (it holds {lacks}, by {witness} of {at}): it was damaged or restored from an older backup, and running it could message contacts a second time; restore the newest backup with `colloquy restore`, or delete {witness} only if you accept that")]
    Behind {
        dir: String,
        lacks: String,
        at: String,
        witness: String,
    },
    #[error("the store in {dir} is not the one this data_dir held ({witness} names another): it was replaced, or damaged past what sled recovers, and running it could message contacts a second time; put the store back, restore a backup of it with `colloquy restore`, or delete {witness} only if you accept that")]
    NotThisStore { dir: String, witness: String },
    #[error("the store's files are damaged (sled found unreadable data in them); stop the host and restore a backup with `colloquy restore`")]
    Damaged,
    #[error("a stored {what} record is unreadable ({reason})")]
    Corrupt { what: &'static str, reason: String },
    #[error("no {what} {id} in the store")]
    NotFound { what: &'static str, id: String },
    #[error("contact {0} already has a dialog or must not be contacted")]
    Claimed(ContactId),
    #[error(transparent)]
    Transition(#[from] TransitionError),
    /// The operator must do something first; the text says what.
    #[error("{0}")]
    NeedsOperator(String),
    /// A caller's check inside a transaction said no; the text says why.
    #[error("{0}")]
    Refused(String),
}

impl StoreError {
    /// Whether the operator must act before the store can be used: like
    /// bad input, not a failure of the host.
    pub fn needs_operator(&self) -> bool {
        matches!(
            self,
            StoreError::Behind { .. }
                | StoreError::NotThisStore { .. }
                | StoreError::Damaged
                | StoreError::DiskFull
                | StoreError::NeedsOperator(_)
        )
    }
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> StoreError {
        match e {
            sled::Error::Io(io) if is_disk_full(&io) => StoreError::DiskFull,
            sled::Error::Corruption { .. } => StoreError::Damaged,
            e => StoreError::Storage(e.to_string()),
        }
    }
}

/// ENOSPC, or a quota (EDQUOT) that says the same to the user.
fn is_disk_full(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull
        || e.kind() == std::io::ErrorKind::QuotaExceeded
        || matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

impl From<TransactionError<StoreError>> for StoreError {
    fn from(e: TransactionError<StoreError>) -> StoreError {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => e.into(),
        }
    }
}

type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

/// A record stored as a version byte and JSON. Dialogs, contacts and
/// account records, most of a large store and most of its writes, have a
/// binary layout instead (`records.rs`), so they are not `Json`: the
/// compiler keeps them off this path.
trait Json {}

impl Json for DoNotContact {}
impl Json for Message {}
impl Json for serde_json::Value {}

fn encode<T: Serialize + Json>(value: &T) -> Vec<u8> {
    encode_json(value)
}

/// A record as a version byte and JSON.
fn encode_json<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.push(records::JSON);
    // Serializing our own plain data types to JSON cannot fail.
    serde_json::to_writer(&mut out, value).expect("records serialize");
    out
}

fn decode<T: DeserializeOwned + Json>(what: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    decode_json(what, bytes)
}

/// A record of the first layout: a version byte and JSON.
fn decode_json<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    match bytes.split_first() {
        Some((&records::JSON, body)) => {
            serde_json::from_slice(body).map_err(|e| StoreError::Corrupt {
                what,
                reason: e.to_string(),
            })
        }
        Some((v, _)) => Err(StoreError::Corrupt {
            what,
            reason: format!("unknown record version {v}"),
        }),
        None => Err(StoreError::Corrupt {
            what,
            reason: "empty record".into(),
        }),
    }
}

fn abort<T>(e: StoreError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

/// Where [`Tx::write`] puts the keys of the messages a change records as
/// pending.
enum Queue<'f> {
    /// In the outbox.
    Outbox,
    /// The first `n` among a batch's replies in flight, the rest in the
    /// outbox.
    Flight(&'f mut Vec<FlightReply>, usize),
    /// Nowhere: they were queued when the journal's answer was first
    /// written.
    Journaled,
}

/// An event the dialog cannot take, as the transaction's abort.
fn refused<T>(r: Result<T, transition::Refused>) -> TxResult<T> {
    r.or_else(|e| {
        abort(match e {
            transition::Refused::Transition(e) => StoreError::Transition(e),
            e => StoreError::Refused(e.to_string()),
        })
    })
}

/// A record read inside a transaction.
fn tx_read<T>(read: fn(&[u8]) -> Result<T, StoreError>, bytes: &[u8]) -> TxResult<T> {
    read(bytes).map_err(ConflictableTransactionError::Abort)
}

/// Rows written per batch of an import. sled rewrites each leaf a batch
/// touches once, so larger batches leave less of its log behind: at 8,192
/// rows an idle dialog's file took 888–1,003 bytes, at 1,024 1,106–1,170
/// (its contact's three keys are most of the difference); a batch holds
/// the store's writer about 30 ms, and 100,000 rows import in 2.9 s
/// instead of 2.2.
const IMPORT_CHUNK: usize = 8192;

/// Counts of what an audience import did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ImportStats {
    pub added: usize,
    /// Known contacts whose row changed something (a field, a new audience).
    pub updated: usize,
    /// Known contacts whose row changed nothing: not written again.
    pub unchanged: usize,
}

/// The host's store. Cheap to clone: all clones share one database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    t: Trees,
    accounts: Arc<accounts::AccountCache>,
    /// Replies the answer pipeline is sending, by key (see `batch.rs`).
    flight_keys: Arc<FlightKeys>,
    /// The outbox's keys in memory (see [`batch::OutboxKeys`]).
    outbox_keys: Arc<batch::OutboxKeys>,
    /// The answer pipeline's records not yet in their trees.
    deferred: Arc<Deferred>,
    /// Writes to each dialog's records, for the answer pipeline's plans.
    touched: Arc<Touched>,
    /// The quiet-dialogs index (see the module documentation).
    quiet: Arc<QuietDialogs>,
    /// Group commit: flush requests that arrive while a flush runs are
    /// served together by the next one.
    flusher: Arc<std::sync::OnceLock<Option<FlushQueue>>>,
    /// Waits for a flush from a blocking task (see
    /// [`Store::hold_paused_clock`]).
    hold_clock: Arc<AtomicBool>,
    /// Notes the store's directory as closed by this process when the
    /// last clone goes (see [`Store::open`]).
    _open: Option<Arc<OpenHere>>,
    /// The witness beside a store opened from a data_dir (see `witness.rs`).
    witness: Option<Arc<witness::Witness>>,
    /// How many identities and claims the trees hold (see `witness.rs`).
    counts: Arc<Counts>,
    /// Every write holds it shared; a backup holds it alone, so that it
    /// copies the store between two writes (see [`Store::backup`]).
    gate: Arc<std::sync::RwLock<()>>,
    /// The one writer: every transaction runs holding it, so transactions
    /// run one at a time by our own lock (sled does not promise that its
    /// transactions do), and the records kept beside the trees in memory
    /// (the outbox's keys, the replies in flight, the deferred set, the
    /// counts of writes) change in the order the trees do.
    writer: Arc<std::sync::Mutex<()>>,
}

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

struct OpenHere(std::path::PathBuf);

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

/// Counts of two trees, kept as they change: sled's own `len` reads the
/// whole tree.
#[derive(Default)]
struct Counts {
    identities: AtomicU64,
    claims: AtomicU64,
}

/// A move in the quiet-dialogs index: out of `from`, into `to`.
struct QuietMove {
    from: Option<(Timestamp, DialogId)>,
    to: Option<(Timestamp, DialogId)>,
}

/// The quiet-dialogs index: every live dialog at [`listed_at`], quietest
/// first.
#[derive(Default)]
struct QuietDialogs(std::sync::Mutex<std::collections::BTreeSet<(Timestamp, DialogId)>>);

impl QuietDialogs {
    /// The index of the dialogs as stored. A record that cannot be read is
    /// left out, with its sentence in the log: the other dialogs are
    /// served, and reading that one fails as it did.
    fn of(dialogs: &sled::Tree) -> Result<QuietDialogs, StoreError> {
        let mut listed = std::collections::BTreeSet::new();
        for entry in dialogs.iter() {
            let (key, value) = entry?;
            match records::decode_dialog_listing(&value) {
                Ok(d) if d.status.is_live() => {
                    listed.insert((listed_at(&d), d.id));
                }
                Ok(_) => {}
                Err(e) => tracing::error!(
                    dialog = read_u64(&key),
                    "the dialog is left out of the quiet-dialogs index: {e}"
                ),
            }
        }
        Ok(QuietDialogs(std::sync::Mutex::new(listed)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<(Timestamp, DialogId)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn apply(&self, moves: Vec<QuietMove>) {
        if moves.is_empty() {
            return;
        }
        let mut listed = self.lock();
        for QuietMove { from, to } in moves {
            if let Some(from) = from {
                listed.remove(&from);
            }
            if let Some(to) = to {
                listed.insert(to);
            }
        }
    }

    fn first(&self) -> Option<(Timestamp, DialogId)> {
        self.lock().first().copied()
    }
}

/// A flush's outcome as its waiters get it: a full disk kept apart, so
/// that it reads as its own sentence.
#[derive(Clone)]
enum Flushed {
    Done,
    DiskFull,
    Failed(String),
}

type FlushWaiter = tokio::sync::oneshot::Sender<Flushed>;
type FlushQueue = std::sync::mpsc::Sender<FlushWaiter>;

fn mark(accounts: &accounts::AccountCache, counts: &Counts) -> witness::Mark {
    witness::Mark {
        account_writes: accounts.writes(),
        identities: counts.identities.load(Ordering::SeqCst),
        claims: counts.claims.load(Ordering::SeqCst),
    }
}

/// Starts the store's flusher: a thread of its own that serves flush
/// requests in batches, one fsync for everyone who asked before it started
/// (group commit). A thread rather than sled's `flush_async`, which hands
/// each flush to its thread pool and back. It ends when the store's last
/// clone goes.
fn group_flush(
    db: sled::Db,
    mark: impl Fn() -> witness::Mark + Send + 'static,
    witness: Option<Arc<witness::Witness>>,
) -> std::io::Result<FlushQueue> {
    let (tx, rx) = std::sync::mpsc::channel::<FlushWaiter>();
    std::thread::Builder::new()
        .name("store-flush".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut waiters = vec![first];
                waiters.extend(rx.try_iter());
                let mark = mark();
                let result = match db.flush().map_err(StoreError::from) {
                    Ok(_) => Flushed::Done,
                    Err(StoreError::DiskFull) => Flushed::DiskFull,
                    Err(e) => Flushed::Failed(e.to_string()),
                };
                if let (Flushed::Done, Some(witness)) = (&result, &witness) {
                    witness.saw(mark, false);
                }
                for w in waiters {
                    let _ = w.send(result.clone());
                }
            }
        })?;
    Ok(tx)
}

#[derive(Clone)]
struct Trees {
    contacts: sled::Tree,
    identities: sled::Tree,
    uncontacted: sled::Tree,
    do_not_contact: sled::Tree,
    dialogs: sled::Tree,
    by_status: sled::Tree,
    dialog_of_contact: sled::Tree,
    messages: sled::Tree,
    outbox: sled::Tree,
    flights: sled::Tree,
    journal: sled::Tree,
    inbound: sled::Tree,
    unhandled: sled::Tree,
    orphans: sled::Tree,
    accounts: sled::Tree,
    meta: sled::Tree,
}

/// The trees a dialog change touches, inside one transaction.
struct Tx<'a> {
    contacts: &'a TransactionalTree,
    uncontacted: &'a TransactionalTree,
    do_not_contact: &'a TransactionalTree,
    dialogs: &'a TransactionalTree,
    by_status: &'a TransactionalTree,
    /// The moves in the quiet-dialogs index this transaction made, to make
    /// once it committed (see [`Tx::move_quiet`]).
    quiet_moves: std::cell::RefCell<Vec<QuietMove>>,
    dialog_of_contact: &'a TransactionalTree,
    messages: &'a TransactionalTree,
    outbox: &'a TransactionalTree,
    flights: &'a TransactionalTree,
    journal: &'a TransactionalTree,
    /// The replies in flight (see [`FlightKeys`]).
    flight_keys: &'a FlightKeys,
    /// The outbox's keys (see [`batch::OutboxKeys`]), and the removals
    /// this transaction made, to take out of it once committed.
    outbox_keys: &'a batch::OutboxKeys,
    outbox_removed: std::cell::RefCell<Vec<(u64, u64)>>,
    /// The answer pipeline's deferred records (see `deferred.rs`), and
    /// what this transaction did to them.
    deferred: &'a Deferred,
    local: std::cell::RefCell<deferred::Local>,
    touched: &'a Touched,
    inbound: &'a TransactionalTree,
    unhandled: &'a TransactionalTree,
    accounts: &'a TransactionalTree,
}

impl Tx<'_> {
    fn pages(&self) -> Pages<'_, '_> {
        Pages(self)
    }

    /// Whether an incoming message was stored before: among the dialog's
    /// own messages when it came to the dialog's account, else in the
    /// `inbound` index.
    fn seen_incoming(&self, dialog: &Dialog, account: &str, transport_id: i64) -> TxResult<bool> {
        if account == dialog.account {
            if dialog.is_newer_incoming(transport_id) {
                return Ok(false);
            }
            self.pages()
                .has_incoming(dialog.id, dialog.next_seq, transport_id)
        } else {
            Ok(self
                .inbound
                .get(inbound_key(account, transport_id))?
                .is_some())
        }
    }

    /// Notes an incoming message stored at `(dialog, seq)` for
    /// [`Tx::seen_incoming`].
    fn note_incoming(
        &self,
        dialog: &Dialog,
        account: &str,
        transport_id: i64,
        seq: u64,
    ) -> Result<(), UnabortableTransactionError> {
        if account != dialog.account {
            self.inbound.insert(
                inbound_key(account, transport_id),
                &pair(u64_key(dialog.id), u64_key(seq)),
            )?;
        }
        Ok(())
    }

    fn dialog(&self, id: DialogId) -> TxResult<Dialog> {
        let deferred = self.deferred_dialog(id);
        self.write_out_dialog(id)?;
        if let Some(d) = deferred {
            return Ok(d);
        }
        match self.dialogs.get(u64_key(id))? {
            Some(bytes) => tx_read(decode_dialog, &bytes),
            None => abort(StoreError::NotFound {
                what: "dialog",
                id: id.to_string(),
            }),
        }
    }

    /// Writes a dialog and moves its index entries from `old` to `new`.
    fn put_dialog(
        &self,
        old: Option<&Dialog>,
        new: &Dialog,
    ) -> Result<(), UnabortableTransactionError> {
        self.write_out_dialog(new.id)?;
        let mut new = std::borrow::Cow::Borrowed(new);
        if old.is_none_or(|o| o.status.tag() != new.status.tag()) {
            if let Some(old) = old {
                self.by_status
                    .remove(&status_key(old.status.tag(), old.id))?;
            }
            self.by_status
                .insert(&status_key(new.status.tag(), new.id), &[])?;
        }
        let listed = old.filter(|o| o.status.is_live()).map(listed_at);
        let list = index_time(&new);
        if listed != list {
            self.move_quiet(new.id, listed, list);
        }
        if new.indexed_at != list {
            new.to_mut().indexed_at = list;
        }
        self.dialogs.insert(&u64_key(new.id), encode_dialog(&new))?;
        self.touched.touch(new.id);
        Ok(())
    }

    /// Writes a dialog whose status is unchanged, leaving its place in the
    /// quiet-dialogs index behind (at an earlier time): the answer
    /// pipeline's write, one key instead of three. `new` becomes what was
    /// written.
    fn put_dialog_lazily(
        &self,
        old: &Dialog,
        new: &mut Dialog,
    ) -> Result<(), UnabortableTransactionError> {
        if old.status != new.status || !old.status.is_live() {
            self.put_dialog(Some(old), new)?;
            new.indexed_at = index_time(new);
            return Ok(());
        }
        new.indexed_at = Some(listed_at(old));
        self.write_out_dialog(new.id)?;
        self.dialogs.insert(&u64_key(new.id), encode_dialog(new))?;
        self.touched.touch(new.id);
        Ok(())
    }

    /// Writes what an event changed (see [`transition`]): its messages,
    /// a pending one's key where `queue` says, the marks of messages to
    /// handle, the do-not-contact entry, and the dialog, which moves in
    /// the indexes from `old` (or, `lazily`, stays where it was listed in
    /// the quiet-dialogs index: see [`Dialog::indexed_at`]). The one way a
    /// transaction changes a dialog.
    fn write(
        &self,
        old: Option<&Dialog>,
        change: &mut Change,
        mut queue: Queue<'_>,
        lazily: bool,
    ) -> TxResult<()> {
        let id = change.dialog.id;
        let first = old.map_or(0, |o| o.next_seq);
        debug_assert!(old.is_none_or(|o| o.id == id));
        debug_assert_eq!(change.dialog.next_seq, first + change.appended.len() as u64);
        debug_assert!((change.appended.iter().map(|m| (m.dialog, m.seq)))
            .eq((first..).map(|s| (id, s)).take(change.appended.len())));
        for (i, m) in change.pending().enumerate() {
            let Some(key) = m.key else { continue };
            if matches!(queue, Queue::Journaled) {
                break;
            }
            if self.outbox.get(u64_key(key.0))?.is_some() || self.flight_keys.holds(key) {
                return abort(StoreError::Refused(format!(
                    "idempotency key {key} is already in the outbox"
                )));
            }
            let reply = FlightReply {
                key,
                dialog: id,
                seq: m.seq,
            };
            match &mut queue {
                Queue::Flight(flight, n) if i < *n => flight.push(reply),
                _ => self.enqueue(&reply)?,
            }
        }
        for m in &change.appended {
            self.pages().put(m)?;
        }
        for m in &change.rewritten {
            debug_assert_eq!(m.dialog, id);
            self.rewrite(m)?;
        }
        for seq in &change.handled {
            self.unhandled.remove(&pair(u64_key(id), u64_key(*seq)))?;
        }
        for seq in &change.unhandled {
            self.unhandled
                .insert(&pair(u64_key(id), u64_key(*seq)), &[])?;
        }
        if let Some(why) = &change.do_not_contact {
            self.do_not_contact
                .insert(&u64_key(change.dialog.contact), encode(why))?;
        }
        match old {
            Some(old) if lazily => self.put_dialog_lazily(old, &mut change.dialog)?,
            _ => {
                self.put_dialog(old, &change.dialog)?;
                change.dialog.indexed_at = index_time(&change.dialog);
            }
        }
        Ok(())
    }

    /// Stores an incoming message (one not seen before) to be handled by
    /// the dialog's conductor; `lazily` as in [`Tx::write`].
    fn unhandled_incoming(
        &self,
        old: &Dialog,
        account: &str,
        message: Incoming<'_>,
        lazily: bool,
    ) -> TxResult<Message> {
        let event = Event::Incoming {
            message,
            handled: false,
        };
        let mut change = refused(transition::apply(old.clone(), event))?;
        self.write(Some(old), &mut change, Queue::Outbox, lazily)?;
        let msg = change.appended.remove(0);
        self.note_incoming(old, account, message.transport_id, msg.seq)?;
        Ok(msg)
    }

    /// The messages with these keys that still wait to be sent (in the
    /// outbox, or among the replies in flight: a send of those may be
    /// under way, and the pipeline does not retry a cancelled one).
    fn still_waiting(&self, keys: &[IdempotencyKey]) -> TxResult<Vec<Message>> {
        let mut waiting = Vec::new();
        for key in keys {
            let at = match self.outbox.get(u64_key(key.0))? {
                Some(at) => Some(split_address(&at)),
                None => self.flight_keys.address(*key),
            };
            if let Some((dialog, seq)) = at {
                if let Some(msg) = self.pages().get(dialog, seq)? {
                    waiting.push(msg);
                }
            }
        }
        Ok(waiting)
    }

    /// Cancels the messages with these keys that still wait to be sent.
    #[cfg(test)]
    fn cancel(&self, keys: &[IdempotencyKey], reason: &str) -> TxResult<()> {
        for m in self.still_waiting(keys)? {
            let why = Delivery::Cancelled {
                reason: reason.to_string(),
            };
            self.rewrite(&transition::settle(m, why, None))?;
        }
        Ok(())
    }

    /// A pending message of the outbox sent or cancelled (see
    /// [`transition::settle`]), taken out of the outbox.
    fn settle(
        &self,
        key: IdempotencyKey,
        delivery: Delivery,
        transport_id: Option<i64>,
    ) -> TxResult<Message> {
        let not_found = |what| {
            abort(StoreError::NotFound {
                what,
                id: key.to_string(),
            })
        };
        let Some(at) = self.outbox.get(u64_key(key.0))? else {
            return not_found("pending message with key");
        };
        let (dialog, seq) = split_address(&at);
        let Some(msg) = self.pages().get(dialog, seq)? else {
            return not_found("message with key");
        };
        let msg = transition::settle(msg, delivery, transport_id);
        self.rewrite(&msg)?;
        Ok(msg)
    }

    /// Writes a message again, out of the outbox.
    fn rewrite(&self, msg: &Message) -> TxResult<()> {
        if let Some(key) = msg.key {
            self.unqueue(key)?;
        }
        self.pages().put(msg)?;
        Ok(())
    }

    /// What `event` does to the dialog `id`, written; the dialog as it is
    /// now and the messages it added.
    fn change(&self, id: DialogId, event: Event<'_>) -> TxResult<(Dialog, Vec<Message>)> {
        let old = self.dialog(id)?;
        let mut change = refused(transition::apply(old.clone(), event))?;
        self.write(Some(&old), &mut change, Queue::Outbox, false)?;
        Ok((change.dialog, change.appended))
    }

    /// Moves a dialog in the quiet-dialogs index from `from` to `to` once
    /// the transaction committed.
    fn move_quiet(&self, id: DialogId, from: Option<Timestamp>, to: Option<Timestamp>) {
        self.quiet_moves.borrow_mut().push(QuietMove {
            from: from.map(|t| (t, id)),
            to: to.map(|t| (t, id)),
        });
    }

    /// Makes a contact pickable again in its audiences.
    fn relist_contact(&self, id: ContactId) -> TxResult<()> {
        if let Some(bytes) = self.contacts.get(u64_key(id))? {
            let contact = tx_read(decode_contact, &bytes)?;
            for audience in &contact.audiences {
                self.uncontacted
                    .insert(uncontacted_key(audience, contact.pick_key, id), &[])?;
            }
        }
        Ok(())
    }

    fn unlist_contact(&self, contact: &Contact) -> Result<(), UnabortableTransactionError> {
        for audience in &contact.audiences {
            self.uncontacted
                .remove(uncontacted_key(audience, contact.pick_key, contact.id))?;
        }
        Ok(())
    }
}

/// A contact first seen in `row`.
fn new_contact(id: ContactId, row: &ContactRow, pick_key: u64) -> Contact {
    let mut contact = Contact {
        id,
        identity: row.identity.clone(),
        username: None,
        phone: None,
        user_id: None,
        first_name: None,
        last_name: None,
        fields: Default::default(),
        audiences: Vec::new(),
        pick_key,
    };
    contact.take_row(row);
    contact
}

impl Contact {
    /// Takes the fields of an audience row of this contact.
    fn take_row(&mut self, row: &ContactRow) {
        self.username = row.username.clone();
        self.phone = row.phone.clone();
        self.user_id = row.user_id;
        self.first_name = row.first_name.clone();
        self.last_name = row.last_name.clone();
        self.fields = row.fields.clone();
    }
}

/// Where a live dialog is listed in the quiet-dialogs index.
fn listed_at(dialog: &Dialog) -> Timestamp {
    dialog.indexed_at.unwrap_or_else(|| dialog.last_activity())
}

/// Where a dialog belongs in the quiet-dialogs index: at its last activity
/// while live, nowhere once it ended.
fn index_time(dialog: &Dialog) -> Option<Timestamp> {
    dialog.status.is_live().then(|| dialog.last_activity())
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

/// A tree of records under string keys, for data the store keeps but does
/// not interpret (the Telegram transport's sessions, peers and send
/// journal).
#[derive(Clone)]
pub struct Records {
    tree: sled::Tree,
    what: &'static str,
    gate: Arc<std::sync::RwLock<()>>,
}

impl Records {
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        self.tree
            .get(key.as_bytes())?
            .map(|b| decode_json(self.what, &b))
            .transpose()
    }

    fn writing(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        let _writing = self.writing();
        self.tree.insert(key.as_bytes(), encode_json(value))?;
        Ok(())
    }

    pub fn remove(&self, key: &str) -> Result<(), StoreError> {
        let _writing = self.writing();
        self.tree.remove(key.as_bytes())?;
        Ok(())
    }

    /// Removes every record whose key starts with `prefix`.
    pub fn remove_prefix(&self, prefix: &str) -> Result<(), StoreError> {
        let _writing = self.writing();
        for k in self.tree.scan_prefix(prefix.as_bytes()).keys() {
            self.tree.remove(k?)?;
        }
        Ok(())
    }

    /// Every record whose key starts with `prefix`, in key order.
    pub fn scan<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<(String, T)>, StoreError> {
        self.tree
            .scan_prefix(prefix.as_bytes())
            .map(|e| {
                let (k, v) = e?;
                Ok((
                    String::from_utf8_lossy(&k).into_owned(),
                    decode_json(self.what, &v)?,
                ))
            })
            .collect()
    }
}

impl Store {
    /// The records tree `name` (created on first use).
    pub fn records(&self, name: &'static str) -> Result<Records, StoreError> {
        Ok(Records {
            tree: self.db.open_tree(name)?,
            what: name,
            gate: self.gate.clone(),
        })
    }

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
    fn identity(&self, dir: &Path) -> Result<String, StoreError> {
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
        let outbox_keys = batch::OutboxKeys::default();
        for key in t.outbox.iter().keys() {
            outbox_keys.inserted(IdempotencyKey(read_u64(&key?)));
        }
        let quiet = QuietDialogs::of(&t.dialogs)?;
        Ok(Store {
            db,
            t,
            quiet: Arc::new(quiet),
            accounts: Arc::default(),
            flight_keys: Arc::default(),
            outbox_keys: Arc::new(outbox_keys),
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

    /// The bytes of every key and value the store holds, in all its trees:
    /// what its files would take with no overhead and no garbage. O(n).
    pub fn live_bytes(&self) -> Result<u64, StoreError> {
        let mut total = 0;
        for name in self.db.tree_names() {
            for entry in self.db.open_tree(name)?.iter() {
                let (k, v) = entry?;
                total += (k.len() + v.len()) as u64;
            }
        }
        Ok(total)
    }

    /// Makes everything written so far durable.
    pub fn flush(&self) -> Result<(), StoreError> {
        let mark = self.mark();
        self.db.flush()?;
        if let Some(witness) = &self.witness {
            witness.saw(mark, true);
        }
        Ok(())
    }

    /// How far the store has got (see `witness.rs`).
    fn mark(&self) -> witness::Mark {
        mark(&self.accounts, &self.counts)
    }

    /// For tests on tokio's paused clock: while a flush is in progress (on
    /// the store's own thread) the clock must not auto-advance, or a
    /// shutdown's grace period would pass during one flush. A blocking
    /// task waiting for it holds the clock, as the engines' calls do.
    pub fn hold_paused_clock(&self, on: bool) {
        self.hold_clock.store(on, Ordering::Relaxed);
    }

    /// Makes everything written so far durable without blocking the
    /// runtime's thread. Called before anything leaves the host (a send) or
    /// is acknowledged to the transport (a received message), so a crash
    /// can never lose a record of something the outside world saw.
    pub async fn flush_async(&self) -> Result<(), StoreError> {
        self.start_flush().await
    }

    /// [`Store::flush_async`], asked for at once: what the caller does
    /// before awaiting the result runs while the disk syncs.
    pub fn start_flush(&self) -> impl std::future::Future<Output = Result<(), StoreError>> + '_ {
        let started = std::time::Instant::now();
        let asked = self.ask_flush();
        async move {
            let hold = self.hold_clock.load(Ordering::Relaxed);
            let answered = match asked {
                Some(rx) => crate::concurrent::receive(rx, hold).await,
                None => None,
            };
            let flushed = match answered {
                Some(Flushed::Done) => Ok(()),
                Some(Flushed::DiskFull) => Err(StoreError::DiskFull),
                Some(Flushed::Failed(e)) => Err(StoreError::Storage(e)),
                // No flusher (no thread could be started, or it is gone):
                // flush here.
                None => self.db.flush_async().await.map(|_| ()).map_err(Into::into),
            };
            crate::metrics::observe("colloquy_store_flush_seconds", &[], started.elapsed());
            flushed
        }
    }

    /// Queues a flush with the store's flusher; `None` when there is none.
    fn ask_flush(&self) -> Option<tokio::sync::oneshot::Receiver<Flushed>> {
        let queue = self.flusher.get_or_init(|| {
            let (accounts, counts) = (self.accounts.clone(), self.counts.clone());
            let mark = move || mark(&accounts, &counts);
            group_flush(self.db.clone(), mark, self.witness.clone()).ok()
        });
        let (tx, rx) = tokio::sync::oneshot::channel();
        queue.as_ref()?.send(tx).ok()?;
        Some(rx)
    }

    /// Held by every write, so that a backup can hold every write off
    /// (see [`Store::backup`]). Never held across another write.
    fn writing(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` over the dialog trees in one transaction, once: our
    /// writer runs transactions one at a time, so sled has no conflict to
    /// run one again for, and a second run is refused rather than let the
    /// records mirrored in memory follow two runs of it.
    fn transact<T>(&self, f: impl Fn(&Tx<'_>) -> TxResult<T>) -> Result<T, StoreError> {
        let _writing = self.writing();
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let t = &self.t;
        let trees = (
            &t.contacts,
            &t.uncontacted,
            &t.do_not_contact,
            &t.dialogs,
            &t.by_status,
            &t.dialog_of_contact,
            &t.messages,
            &t.outbox,
            &t.flights,
            &t.journal,
            &t.inbound,
            &t.unhandled,
            &t.accounts,
        );
        let ran = std::cell::Cell::new(false);
        let (out, removed, quiet_moves, deferred) =
            trees.transaction(|(c, u, dnc, d, s, doc, m, o, fl, j, i, un, acc)| {
                if ran.replace(true) {
                    return abort(StoreError::Storage(
                        "sled ran a transaction a second time, which the store's single writer rules out".into(),
                    ));
                }
                let tx = Tx {
                    contacts: c,
                    uncontacted: u,
                    do_not_contact: dnc,
                    dialogs: d,
                    by_status: s,
                    quiet_moves: Default::default(),
                    dialog_of_contact: doc,
                    messages: m,
                    outbox: o,
                    flights: fl,
                    journal: j,
                    flight_keys: &self.flight_keys,
                    outbox_keys: &self.outbox_keys,
                    outbox_removed: Default::default(),
                    deferred: &self.deferred,
                    local: Default::default(),
                    touched: &self.touched,
                    inbound: i,
                    unhandled: un,
                    accounts: acc,
                };
                let out = f(&tx)?;
                let deferred = tx.finish_deferred()?;
                Ok((
                    out,
                    tx.outbox_removed.take(),
                    tx.quiet_moves.take(),
                    deferred,
                ))
            })?;
        // What the transaction did to the records mirrored in memory, now
        // that it committed.
        self.deferred.apply(deferred);
        self.outbox_keys.removed(&removed);
        self.quiet.apply(quiet_moves);
        Ok(out)
    }

    // ----------------------------------------------------------------- contacts

    /// Imports an audience's rows. A known identity keeps its contact (fields
    /// updated, audience added); a new one gets a new contact listed as
    /// uncontacted in this audience. Importing the same file twice changes
    /// nothing the second time.
    pub fn import_audience(
        &self,
        audience: &str,
        rows: &[ContactRow],
        pick_keys: &mut dyn FnMut() -> u64,
    ) -> Result<ImportStats, StoreError> {
        let mut stats = ImportStats::default();
        for chunk in rows.chunks(IMPORT_CHUNK) {
            let s = self.import_chunk(audience, chunk, pick_keys)?;
            stats.added += s.added;
            stats.updated += s.updated;
            stats.unchanged += s.unchanged;
        }
        Ok(stats)
    }

    fn import_chunk(
        &self,
        audience: &str,
        rows: &[ContactRow],
        pick_keys: &mut dyn FnMut() -> u64,
    ) -> Result<ImportStats, StoreError> {
        let mut stats = ImportStats::default();
        let mut contacts = sled::Batch::default();
        let mut identities = sled::Batch::default();
        let mut uncontacted = sled::Batch::default();
        let mut fresh: std::collections::HashMap<String, ContactId> = Default::default();
        for row in rows {
            let ikey = row.identity.key();
            let existing = match fresh.get(&ikey) {
                Some(id) => Some(*id),
                None => self
                    .t
                    .identities
                    .get(ikey.as_bytes())?
                    .map(|v| read_u64(&v)),
            };
            let (mut contact, stored) = match existing {
                Some(id) if !fresh.contains_key(&ikey) => {
                    let stored = self.contact(id)?.ok_or(StoreError::NotFound {
                        what: "contact",
                        id: id.to_string(),
                    })?;
                    (stored.clone(), Some(stored))
                }
                Some(_) => {
                    // The same identity twice in one chunk: the first row wins.
                    continue;
                }
                None => {
                    let id = self.db.generate_id()? + 1;
                    fresh.insert(ikey.clone(), id);
                    identities.insert(ikey.as_bytes(), &u64_key(id));
                    (new_contact(id, row, pick_keys()), None)
                }
            };
            contact.take_row(row);
            if !contact.audiences.iter().any(|a| a == audience) {
                contact.audiences.push(audience.to_string());
                if self.is_contactable(contact.id)? {
                    uncontacted
                        .insert(uncontacted_key(audience, contact.pick_key, contact.id), &[]);
                }
            }
            match stored {
                None => stats.added += 1,
                Some(stored) if stored == contact => {
                    stats.unchanged += 1;
                    continue;
                }
                Some(_) => stats.updated += 1,
            }
            contacts.insert(&u64_key(contact.id), encode_contact(&contact));
        }
        // Contacts first: an identity or index entry never points at nothing.
        // Each batch holds the writer on its own: about 30 ms at 8,192 rows.
        let batches = [
            (&self.t.contacts, contacts),
            (&self.t.identities, identities),
            (&self.t.uncontacted, uncontacted),
        ];
        for (tree, batch) in batches {
            let _writing = self.writing();
            let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            tree.apply_batch(batch)?;
        }
        (self.counts.identities).fetch_add(fresh.len() as u64, Ordering::SeqCst);
        Ok(stats)
    }

    /// Neither claimed by a dialog nor on the do-not-contact set.
    fn is_contactable(&self, id: ContactId) -> Result<bool, StoreError> {
        Ok(!self.t.dialog_of_contact.contains_key(u64_key(id))?
            && !self.t.do_not_contact.contains_key(u64_key(id))?)
    }

    pub fn contact(&self, id: ContactId) -> Result<Option<Contact>, StoreError> {
        self.t
            .contacts
            .get(u64_key(id))?
            .map(|b| decode_contact(&b))
            .transpose()
    }

    /// Contacts whose stored record mentions `text`, case-insensitively
    /// (in a name, the identity or another column): a sieve over the raw
    /// records that decodes only the ones it keeps. Text JSON would escape
    /// (quotes, backslashes, control characters) passes every record, so
    /// callers check what they show against what the user typed.
    pub fn contacts_mentioning<'a>(
        &'a self,
        text: &str,
    ) -> impl Iterator<Item = Result<Contact, StoreError>> + 'a {
        let escaped = text.contains(['"', '\\']) || text.chars().any(char::is_control);
        let needle = regex::bytes::RegexBuilder::new(&regex::escape(text))
            .case_insensitive(true)
            .build()
            .ok()
            .filter(|_| !escaped);
        self.t
            .contacts
            .iter()
            .values()
            .filter_map(move |v| match v {
                Err(e) => Some(Err(e.into())),
                Ok(v) => needle
                    .as_ref()
                    .is_none_or(|n| n.is_match(&v))
                    .then(|| decode_contact(&v)),
            })
    }

    pub fn contact_by_identity(&self, identity: &Identity) -> Result<Option<Contact>, StoreError> {
        match self.t.identities.get(identity.key().as_bytes())? {
            Some(id) => self.contact(read_u64(&id)),
            None => Ok(None),
        }
    }

    /// A random uncontacted contact of an audience, or `None` when all have
    /// been contacted: seek to the random key `r` and take the next entry,
    /// wrapping around. O(log n).
    pub fn pick_uncontacted(
        &self,
        audience: &str,
        r: u64,
    ) -> Result<Option<ContactId>, StoreError> {
        let prefix = audience_prefix(audience);
        let mut start = prefix.clone();
        start.extend_from_slice(&r.to_be_bytes());
        let mut end = prefix.clone();
        *end.last_mut().expect("prefix ends with 0") = 1;
        let found = match self.t.uncontacted.range(start..end.clone()).next() {
            Some(entry) => Some(entry?),
            None => self.t.uncontacted.range(prefix..end).next().transpose()?,
        };
        Ok(found.map(|(k, _)| read_u64(&k[k.len() - 8..])))
    }

    /// How many contacts of an audience are still uncontacted. O(n).
    pub fn uncontacted_count(&self, audience: &str) -> usize {
        self.t
            .uncontacted
            .scan_prefix(audience_prefix(audience))
            .count()
    }

    /// Puts a contact on the do-not-contact set; no campaign picks it again.
    pub fn add_do_not_contact(&self, id: ContactId, why: DoNotContact) -> Result<(), StoreError> {
        self.transact(|tx| {
            if let Some(bytes) = tx.contacts.get(u64_key(id))? {
                let contact: Contact = tx_read(decode_contact, &bytes)?;
                tx.unlist_contact(&contact)?;
            }
            tx.do_not_contact.insert(&u64_key(id), encode(&why))?;
            Ok(())
        })
    }

    /// Takes a contact off the do-not-contact set; one never claimed by a
    /// dialog becomes pickable again in its audiences. Returns whether it
    /// was on the set.
    pub fn remove_do_not_contact(&self, id: ContactId) -> Result<bool, StoreError> {
        self.transact(|tx| {
            let key = u64_key(id);
            if tx.do_not_contact.remove(&key)?.is_none() {
                return Ok(false);
            }
            if tx.dialog_of_contact.get(key)?.is_none() {
                tx.relist_contact(id)?;
            }
            Ok(true)
        })
    }

    /// Notes a change to the do-not-contact set in its audit (records tree
    /// `dnc_audit`, in time order).
    pub fn audit_do_not_contact(&self, change: &crate::model::DncChange) -> Result<(), StoreError> {
        let key = format!(
            "{:020}-{:020}-{}",
            change.at.0.max(0),
            change.contact,
            change.action
        );
        self.records("dnc_audit")?.put(&key, change)
    }

    /// The do-not-contact audit, oldest first.
    pub fn do_not_contact_audit(&self) -> Result<Vec<crate::model::DncChange>, StoreError> {
        Ok(self
            .records("dnc_audit")?
            .scan("")?
            .into_iter()
            .map(|(_, c)| c)
            .collect())
    }

    /// Every contact on the do-not-contact set, with why.
    pub fn do_not_contact_list(&self) -> Result<Vec<(ContactId, DoNotContact)>, StoreError> {
        self.t
            .do_not_contact
            .iter()
            .map(|e| {
                let (k, v) = e?;
                Ok((read_u64(&k), decode("do-not-contact", &v)?))
            })
            .collect()
    }

    pub fn do_not_contact(&self, id: ContactId) -> Result<Option<DoNotContact>, StoreError> {
        self.t
            .do_not_contact
            .get(u64_key(id))?
            .map(|b| decode("do-not-contact", &b))
            .transpose()
    }

    // ------------------------------------------------------------------ dialogs

    /// Claims a contact and creates its dialog in one transaction, together
    /// with the opening (recorded as pending) and the account's reservation:
    /// `reserve` may update the account record or refuse. Fails with
    /// [`StoreError::Claimed`] if the contact already has a dialog or is on
    /// the do-not-contact set.
    pub fn open_dialog(
        &self,
        new: &NewDialog,
        opening: Option<&Outbound>,
        reserve: &dyn Fn(&mut AccountRecord) -> Result<(), String>,
    ) -> Result<(Dialog, Option<Message>), StoreError> {
        let id = self.db.generate_id()? + 1;
        let opened = self.transact_with_account(&new.account, |tx, account| {
            let ck = u64_key(new.contact);
            if tx.dialog_of_contact.get(ck)?.is_some() || tx.do_not_contact.get(ck)?.is_some() {
                return abort(StoreError::Claimed(new.contact));
            }
            let Some(bytes) = tx.contacts.get(ck)? else {
                return abort(StoreError::NotFound {
                    what: "contact",
                    id: new.contact.to_string(),
                });
            };
            let contact: Contact = tx_read(decode_contact, &bytes)?;
            if let Err(why) = reserve(account) {
                return abort(StoreError::Refused(why));
            }
            tx.unlist_contact(&contact)?;
            tx.dialog_of_contact.insert(&ck, &u64_key(id))?;
            let mut change = transition::open(id, new, opening);
            tx.write(None, &mut change, Queue::Outbox, false)?;
            Ok((change.dialog, change.appended.pop()))
        })?;
        self.counts.claims.fetch_add(1, Ordering::SeqCst);
        Ok(opened)
    }

    pub fn dialog(&self, id: DialogId) -> Result<Option<Dialog>, StoreError> {
        let deferred = self.deferred.get(id).map(|e| e.dialog);
        let stored = self.t.dialogs.get(u64_key(id))?;
        deferred::newer_dialog(deferred.as_deref(), stored.as_deref())
    }

    /// The dialog that claimed a contact, if any.
    pub fn dialog_of_contact(&self, contact: ContactId) -> Result<Option<DialogId>, StoreError> {
        Ok(self
            .t
            .dialog_of_contact
            .get(u64_key(contact))?
            .map(|v| read_u64(&v)))
    }

    /// Moves a dialog to a new status through the transition table.
    pub fn set_dialog_status(
        &self,
        id: DialogId,
        next: DialogStatus,
    ) -> Result<Dialog, StoreError> {
        self.transact(|tx| Ok(tx.change(id, Event::Status(&next))?.0))
    }

    /// Ids of the dialogs with a status, in id order.
    pub fn dialogs_with_status(&self, status_label: &str) -> Result<Vec<DialogId>, StoreError> {
        let Some(tag) = DialogStatus::tag_of(status_label) else {
            return Ok(Vec::new());
        };
        let mut ids = self
            .t
            .by_status
            .scan_prefix([tag])
            .map(|e| Ok(status_key_dialog(&e?.0)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        ids.sort_unstable();
        Ok(ids)
    }

    /// Dialog counts per status label.
    pub fn dialog_counts(&self) -> Result<Vec<(&'static str, usize)>, StoreError> {
        DialogStatus::TAGS
            .iter()
            .enumerate()
            .map(|(tag, label)| Ok((*label, self.t.by_status.scan_prefix([tag as u8]).count())))
            .collect()
    }

    /// Puts back a contact whose dialog ended in error before any message was
    /// written to it (what a broken engine's openings left behind): the
    /// dialog goes, the contact is pickable again in its audiences. Returns
    /// whether it did; any other dialog is left as it is.
    pub fn release_unreached(&self, id: DialogId) -> Result<bool, StoreError> {
        let released = self.transact(|tx| {
            let d = tx.dialog(id)?;
            if !matches!(d.status, DialogStatus::Error { .. }) || d.next_seq != 0 {
                return Ok(false);
            }
            tx.dialogs.remove(&u64_key(id))?;
            tx.by_status.remove(&status_key(d.status.tag(), id))?;
            tx.move_quiet(id, d.indexed_at, None);
            let ck = u64_key(d.contact);
            tx.dialog_of_contact.remove(&ck)?;
            if tx.do_not_contact.get(ck)?.is_none() {
                tx.relist_contact(d.contact)?;
            }
            Ok(true)
        })?;
        if released {
            self.counts.claims.fetch_sub(1, Ordering::SeqCst);
        }
        Ok(released)
    }

    /// Every dialog's summary (no engine state), newest first when `rev`:
    /// for lists and counts, several times cheaper to read than dialogs.
    pub fn dialog_summaries(
        &self,
        newest_first: bool,
    ) -> Box<dyn Iterator<Item = Result<DialogSummary, StoreError>> + '_> {
        let read = move |e: sled::Result<(sled::IVec, sled::IVec)>| {
            let (k, v) = e?;
            let stored = decode_dialog_summary(&v)?;
            Ok(match self.deferred.get(read_u64(&k)).map(|e| e.dialog) {
                Some(d) if d.next_seq > stored.next_seq => DialogSummary::from(&*d),
                _ => stored,
            })
        };
        match newest_first {
            true => Box::new(self.t.dialogs.iter().rev().map(read)),
            false => Box::new(self.t.dialogs.iter().map(read)),
        }
    }

    /// Every dialog, in id order.
    pub fn all_dialogs(&self) -> impl Iterator<Item = Result<Dialog, StoreError>> + '_ {
        self.t.dialogs.iter().map(|e| {
            let (k, v) = e?;
            let deferred = self.deferred.get(read_u64(&k)).map(|e| e.dialog);
            deferred::newer_than_stored(deferred.as_deref(), &v)
        })
    }

    /// The active dialog that has been quiet the longest, if any: the
    /// reviver's next.
    pub fn quietest_dialog(&self) -> Result<Option<(Timestamp, DialogId)>, StoreError> {
        Ok(self.quiet.first())
    }

    // ----------------------------------------------------------------- messages

    /// Records an outbound message as pending before it is sent. The
    /// operator may write in a dialog handed off to them.
    pub fn record_outbound(
        &self,
        dialog: DialogId,
        out: &Outbound,
        at: Timestamp,
    ) -> Result<Message, StoreError> {
        self.transact(|tx| {
            let (_, mut appended) = tx.change(dialog, Event::Outbound { out, at })?;
            Ok(appended.remove(0))
        })
    }

    /// Stores an incoming message once: a transport id seen before returns
    /// `None`.
    pub fn record_inbound(
        &self,
        dialog: DialogId,
        account: &str,
        transport_id: i64,
        text: &str,
        at: Timestamp,
    ) -> Result<Option<Message>, StoreError> {
        self.transact(|tx| {
            let old = tx.dialog(dialog)?;
            if tx.seen_incoming(&old, account, transport_id)? {
                return Ok(None);
            }
            let message = Incoming {
                transport_id,
                text,
                at,
            };
            Ok(Some(tx.unhandled_incoming(&old, account, message, false)?))
        })
    }

    /// Applies what came of handling an event of a dialog, in one
    /// transaction: the incoming message is marked handled, the engine's
    /// state stored, its messages recorded as pending, and the ending (or
    /// review) noted. A dialog that is no longer live only gets the
    /// incoming message marked handled.
    pub fn apply(
        &self,
        dialog: DialogId,
        a: &Apply<'_>,
    ) -> Result<(Dialog, Vec<Message>), StoreError> {
        self.transact(|tx| tx.change(dialog, Event::Handled(a)))
    }

    /// Takes the status the dialog was waiting to take once its messages
    /// were sent.
    pub fn complete_ending(&self, dialog: DialogId) -> Result<Dialog, StoreError> {
        self.transact(|tx| Ok(tx.change(dialog, Event::EndingReached)?.0))
    }

    /// The contact opted out: the dialog ends as opted out, the contact goes
    /// on the do-not-contact set, and every message still waiting to be sent
    /// in the dialog is cancelled, all at once.
    pub fn opt_out(&self, dialog: DialogId) -> Result<Dialog, StoreError> {
        let waiting = self.pending_keys(dialog)?;
        let unhandled: Vec<u64> = self
            .t
            .unhandled
            .scan_prefix(u64_key(dialog))
            .keys()
            .map(|k| k.map(|k| split_address(&k).1))
            .collect::<Result<_, _>>()?;
        self.transact(|tx| {
            let waiting = tx.still_waiting(&waiting)?;
            let event = Event::OptedOut {
                waiting: &waiting,
                unhandled: &unhandled,
            };
            Ok(tx.change(dialog, event)?.0)
        })
    }

    /// Stores an incoming message from a contact without a dialog; a transport
    /// id seen before is ignored.
    pub fn record_orphan(
        &self,
        account: &str,
        transport_id: i64,
        contact: &str,
        text: &str,
        at: Timestamp,
    ) -> Result<bool, StoreError> {
        let key = inbound_key(account, transport_id);
        let record =
            serde_json::json!({"account": account, "contact": contact, "text": text, "at": at});
        let prev =
            self.t
                .orphans
                .compare_and_swap(key, None as Option<&[u8]>, Some(encode(&record)))?;
        Ok(prev.is_ok())
    }

    /// Incoming messages stored and not yet handled, by dialog, in order.
    pub fn unhandled(&self) -> Result<Vec<(DialogId, u64)>, StoreError> {
        self.t
            .unhandled
            .iter()
            .keys()
            .map(|k| {
                let k = k?;
                Ok((read_u64(&k[..8]), read_u64(&k[8..])))
            })
            .collect()
    }

    /// The first unhandled incoming message of a dialog.
    pub fn next_unhandled(&self, dialog: DialogId) -> Result<Option<Message>, StoreError> {
        match self.t.unhandled.scan_prefix(u64_key(dialog)).keys().next() {
            Some(k) => {
                let (dialog, seq) = split_address(&k?);
                self.message_at(dialog, seq)
            }
            None => Ok(None),
        }
    }

    /// A dialog's outbound messages still waiting to be sent, in order.
    pub fn pending_of(&self, dialog: DialogId) -> Result<Vec<Message>, StoreError> {
        Ok(self
            .messages(dialog)?
            .into_iter()
            .filter(|m| m.delivery == Some(Delivery::Pending))
            .collect())
    }

    /// Marks a pending outbound message sent, or cancelled, and takes it out
    /// of the outbox.
    pub fn settle_outbound(
        &self,
        key: IdempotencyKey,
        delivery: Delivery,
        transport_id: Option<i64>,
    ) -> Result<Message, StoreError> {
        self.transact(|tx| tx.settle(key, delivery.clone(), transport_id))
    }

    /// Marks a pending message sent and updates its account's record (the
    /// send's real time) in the same transaction: a crash keeps both or
    /// neither, so a sent message is never counted at the wrong time.
    pub fn settle_sent(
        &self,
        key: IdempotencyKey,
        transport_id: i64,
        account: &str,
        update: &dyn Fn(&mut AccountRecord),
    ) -> Result<Message, StoreError> {
        self.transact_with_account(account, |tx, record| {
            let msg = tx.settle(key, Delivery::Sent, Some(transport_id))?;
            update(record);
            Ok(msg)
        })
    }

    /// Outbound messages recorded but not yet confirmed, in key order.
    pub fn pending_outbound(&self) -> Result<Vec<Message>, StoreError> {
        let mut out = Vec::new();
        for entry in self.t.outbox.iter() {
            let (_, at) = entry?;
            let (dialog, seq) = split_address(&at);
            if let Some(msg) = self.message_at(dialog, seq)? {
                out.push(msg);
            }
        }
        Ok(out)
    }

    /// A dialog's messages, oldest first.
    pub fn messages(&self, dialog: DialogId) -> Result<Vec<Message>, StoreError> {
        let mut out = Vec::new();
        self.walk_pages(dialog, &mut |page| {
            for msg in pages::read_all(page)? {
                out.push(self.settled(msg)?);
            }
            Ok(true)
        })?;
        Ok(out)
    }

    /// The transport id of a dialog's first message that has one: its
    /// first on the wire. Reads pages only as far as that message.
    pub fn first_transport_id(&self, dialog: DialogId) -> Result<Option<i64>, StoreError> {
        let mut first = None;
        self.walk_pages(dialog, &mut |page| {
            first = pages::read_all(page)?.iter().find_map(|m| m.transport_id);
            Ok(first.is_none())
        })?;
        Ok(first)
    }

    /// Gives `each` a dialog's pages in order, as they stand (a deferred
    /// page newer than its stored version instead of it), while it says
    /// to go on.
    fn walk_pages(
        &self,
        dialog: DialogId,
        each: &mut dyn FnMut(&[u8]) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let mut deferred = self.deferred.get(dialog).and_then(|e| e.page);
        for entry in self.t.messages.scan_prefix(u64_key(dialog)) {
            let (key, page) = entry?;
            let newer = match deferred.take_if(|(k, _)| key == k[..]) {
                Some((_, d)) => deferred::newer_page(Some(d), Some(page))?.unwrap_or_default(),
                None => page,
            };
            if !each(&newer)? {
                return Ok(());
            }
        }
        // A page started since the last checkpoint.
        if let Some((_, page)) = deferred {
            each(&page)?;
        }
        Ok(())
    }

    /// The message at `(dialog, seq)`.
    fn message_at(&self, dialog: DialogId, seq: u64) -> Result<Option<Message>, StoreError> {
        let key = page_key(dialog, seq);
        let deferred = self
            .deferred
            .get(dialog)
            .and_then(|e| e.page)
            .filter(|(k, _)| *k == key);
        let stored = self.t.messages.get(key)?;
        match deferred::newer_page(deferred.map(|(_, p)| p), stored)? {
            Some(page) => pages::read(&page, seq)?
                .map(|m| self.settled(m))
                .transpose(),
            None => Ok(None),
        }
    }

    /// A message as read back: the answer pipeline confirms a reply by
    /// taking it out of the outbox only (which spares rewriting its page),
    /// so a message recorded as pending that is no longer in the outbox
    /// was sent. (A cancelled one is rewritten as cancelled.)
    fn settled(&self, mut msg: Message) -> Result<Message, StoreError> {
        if let (Some(Delivery::Pending), Some(key)) = (&msg.delivery, msg.key) {
            if !self.flight_keys.holds(key) && !self.t.outbox.contains_key(u64_key(key.0))? {
                msg.delivery = Some(Delivery::Sent);
            }
        }
        Ok(msg)
    }

    // ----------------------------------------------------------------- accounts

    /// Blocks every active or handed-off dialog of an account; returns their
    /// ids.
    pub fn block_dialogs_of(&self, account: &str) -> Result<Vec<DialogId>, StoreError> {
        let mut blocked = Vec::new();
        for label in ["active", "handoff"] {
            for id in self.dialogs_with_status(label)? {
                if self.dialog(id)?.is_none_or(|d| d.account != account) {
                    continue;
                }
                // Nothing more goes out of the account: what waits is
                // cancelled with the block. (The caller reports the loss
                // holding the account's lock, so nothing is in flight.)
                let waiting = self.pending_keys(id)?;
                let reason = format!("account {account} is out of service");
                let done = self.transact(|tx| {
                    let waiting = tx.still_waiting(&waiting)?;
                    let event = Event::Blocked {
                        waiting: &waiting,
                        reason: &reason,
                    };
                    match tx.change(id, event) {
                        Err(ConflictableTransactionError::Abort(StoreError::Transition(_))) => {
                            Ok(false)
                        }
                        done => done.map(|_| true),
                    }
                })?;
                if done {
                    blocked.push(id);
                }
            }
        }
        Ok(blocked)
    }

    /// The keys of a dialog's messages waiting to be sent.
    fn pending_keys(&self, dialog: DialogId) -> Result<Vec<IdempotencyKey>, StoreError> {
        Ok(self
            .pending_of(dialog)?
            .into_iter()
            .filter_map(|m| m.key)
            .collect())
    }
}

#[cfg(test)]
mod tests;
