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
mod contacts;
mod deferred;
mod dialogs;
mod flush;
mod keys;
mod open;
mod pages;
mod records;
mod tx;
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
pub use contacts::ImportStats;
use deferred::Deferred;
use flush::FlushQueue;
use keys::*;
use open::OpenHere;
use pages::{page_key, split_address, Pages};
use records::{
    decode_contact, decode_dialog, decode_dialog_summary, encode_contact, encode_dialog,
};
use tx::{Queue, Tx};

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

/// The host's store. Cheap to clone: all clones share one database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    t: Trees,
    accounts: Arc<accounts::AccountCache>,
    /// Replies the answer pipeline is sending, by key (see `batch.rs`).
    flight_keys: Arc<FlightKeys>,
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
    /// (the replies in flight, the deferred set, the
    /// counts of writes) change in the order the trees do.
    writer: Arc<std::sync::Mutex<()>>,
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
                let was = listed.remove(&from);
                debug_assert!(was, "dialog {} moved from where it was not listed", from.1);
            }
            if let Some(to) = to {
                let new = listed.insert(to);
                debug_assert!(new, "dialog {} listed twice at one time", to.1);
            }
        }
    }

    fn first(&self) -> Option<(Timestamp, DialogId)> {
        self.lock().first().copied()
    }
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

/// Where a live dialog is listed in the quiet-dialogs index.
fn listed_at(dialog: &Dialog) -> Timestamp {
    dialog.indexed_at.unwrap_or_else(|| dialog.last_activity())
}

/// Where a dialog belongs in the quiet-dialogs index: at its last activity
/// while live, nowhere once it ended.
fn index_time(dialog: &Dialog) -> Option<Timestamp> {
    dialog.status.is_live().then(|| dialog.last_activity())
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

    /// Held by every write, so that a backup can hold every write off
    /// (see [`Store::backup`]). Never held across another write.
    fn writing(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests;
