//! Deferred records: the answer pipeline's planned writes, kept in memory
//! and in the store's journal instead of in the `dialogs` and
//! `message_pages` trees, then written there in bulk (a checkpoint).
//!
//! A planned answer (see `batch.rs`) writes a dialog's record and its last
//! page, two sled inserts each reading the old value first under sled's
//! global transaction lock. Deferred, the batch's transaction writes one
//! `journal` record holding every planned answer of the batch — the dialog,
//! the message and the replies, the engine's state and ending: what the
//! answer adds, not the records it makes — and the records themselves wait
//! here: a dialog answered ten times before the next checkpoint is written
//! to its trees once. The journal record is in the same transaction as the
//! batch's flight and account marks, so it is durable before any reply of
//! the batch is sent.
//!
//! The rules that keep this invisible to every other reader and writer:
//! - A transaction that touches a deferred dialog any other way (reads it,
//!   writes it, reads or writes a page of it) first writes the deferred
//!   records into its own trees ([`Tx::write_out_dialog`]); once it
//!   committed the dialog leaves the deferred set. Transactions run one at
//!   a time (each holds the store's writer), only transactions change this
//!   set, and only once they committed ([`Deferred::apply`], still holding
//!   the writer), so every transaction sees the newest version of every
//!   record, and one that fails changes nothing here.
//! - A read outside a transaction takes the newer of the deferred version
//!   and the tree's (see [`newer_dialog`], [`newer_page`]): a dialog
//!   planned by a transaction not yet committed reads as stored, one
//!   written out by it as deferred until the set lets it go, and after
//!   that as its tree holds it, which is at least as far on.
//! - Versions are ordered without timestamps: each planned version of a
//!   dialog adds messages, so a newer dialog record has a higher `next_seq`
//!   and a newer last page more entries; anything written over a deferred
//!   version was built on it (it was written out first), so it is at
//!   least as far on. Equal means the same or the tree's is newer.
//! - A deferred dialog's answers since its records were last written are
//!   its chain of journal records; a record goes once no deferred dialog's
//!   chain holds it. Opening the store replays the journal in order
//!   ([`Store::replay_journal`]): an answer that goes on from where the
//!   stored dialog is is worked out again ([`batch::answered`], the step
//!   the plan took) and written, one the stored dialog is past is skipped,
//!   so a record replayed twice, or a replay interrupted by a crash,
//!   changes nothing.
//! - The journal is bounded: past [`JOURNAL_MOST`] bytes the dialogs of
//!   the oldest record are written out with the next batch.
//!
//! A dialog's full pages never wait: a planned answer that fills its last
//! page writes that page at once, so the deferred set holds at most a
//! dialog record and one page per dialog.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use rustc_hash::{FxHashMap, FxHashSet};
use sled::IVec;

use super::keys::*;
use super::records::Reader;
use super::*;

/// Dialogs deferred at most, before the oldest are written out with the
/// next batch: enough for every dialog of a 100,000-dialog burst to take
/// several answers before it is written (see ARCHITECTURE.md, "What the
/// store's mechanisms pay"); a few in unit tests, so that they write out
/// often.
pub(super) const MOST: usize = if cfg!(test) { 4 } else { 131_072 };

/// Journal bytes at most before the dialogs of the oldest record are
/// written out with the next batch (a few KiB in unit tests, so that they
/// trim it often). A burst writes each deferred dialog out about once per
/// this many bytes of answers (some 1.6 million at 256 MiB), and a kill
/// leaves at most this much to replay (1.6 million answers took 10.9 s):
/// see ARCHITECTURE.md, "What the store's mechanisms pay".
pub(super) const JOURNAL_MOST: usize = if cfg!(test) { 8 << 10 } else { 256 << 20 };

/// Dialogs written per transaction when the journal is replayed.
const REPLAY_BATCH: usize = 256;

/// The journal's answers folded by dialog: each dialog as stored, and what
/// its answers since do to it.
type Folded = FxHashMap<DialogId, (Dialog, Change)>;

/// The first byte of a journal chunk of answers. A chunk without it holds
/// whole dialog records and pages, as an earlier version wrote them.
const ANSWERS: u8 = 0xFF;

/// A dialog's last page: its key and value.
pub(super) type LastPage = ([u8; 16], IVec);

/// A deferred dialog's records, as planned. The dialog is kept as it is
/// and encoded only when written out: a dialog answered ten times before
/// then is encoded once, and a read of it decodes nothing.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub(super) dialog: Arc<Dialog>,
    pub(super) page: Option<LastPage>,
}

/// A deferred dialog: its records and its chain.
#[derive(Debug)]
struct DeferredDialog {
    /// The journal records holding the dialog's answers since its records
    /// were last written, oldest first.
    chain: Vec<u64>,
    entry: Entry,
}

#[derive(Debug, Default)]
struct Journal {
    chunks: u32,
    bytes: usize,
    /// Dialogs with an answer in this record (some may have been written
    /// out since: see `live`).
    members: Vec<DialogId>,
    /// Deferred dialogs whose chain holds this record.
    live: usize,
}

#[derive(Debug, Default)]
struct Inner {
    dialogs: FxHashMap<DialogId, DeferredDialog>,
    journals: BTreeMap<u64, Journal>,
    next_journal: u64,
    /// Bytes of every journal record.
    bytes: usize,
}

/// The deferred set; see the module documentation.
#[derive(Debug, Default)]
pub(super) struct Deferred(Mutex<Inner>);

impl Inner {
    /// Takes the ended dialogs out, and the journal records no chain holds
    /// (`left`: see [`Tx::end_chains`]).
    fn forget(&mut self, ended: &FxHashSet<DialogId>, left: HashMap<u64, usize>) {
        for d in ended {
            self.dialogs.remove(d);
        }
        for (journal, live) in left {
            if live == 0 {
                if let Some(gone) = self.journals.remove(&journal) {
                    self.bytes -= gone.bytes;
                }
            } else if let Some(j) = self.journals.get_mut(&journal) {
                j.live = live;
            }
        }
    }

    /// Holds what a transaction planned, its chains going on with the
    /// journal record `id`.
    fn defer(
        &mut self,
        id: u64,
        chunks: u32,
        bytes: usize,
        deferring: FxHashMap<DialogId, Deferring>,
    ) {
        debug_assert!(
            !self.journals.contains_key(&id),
            "journal record {id} is deferred twice"
        );
        self.next_journal += 1;
        let members: Vec<DialogId> = deferring.keys().copied().collect();
        self.bytes += bytes;
        self.journals.insert(
            id,
            Journal {
                chunks,
                bytes,
                live: members.len(),
                members,
            },
        );
        for (dialog_id, planned) in deferring {
            match self.dialogs.get_mut(&dialog_id) {
                Some(kept) => {
                    // Replay folds a dialog's answers in this order.
                    debug_assert!(kept.chain.last().is_none_or(|&last| last < id));
                    kept.chain.push(id);
                    kept.entry = planned.entry;
                }
                None => {
                    let (chain, entry) = (vec![id], planned.entry);
                    self.dialogs
                        .insert(dialog_id, DeferredDialog { chain, entry });
                }
            }
        }
    }
}

impl Deferred {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What a committed transaction did to the set (see
    /// [`Tx::finish_deferred`]): the chains of what it wrote out end, and
    /// what it planned is deferred with its journal record.
    pub(super) fn apply(&self, c: SetChange) {
        if c.deferring.is_empty() && c.ended.is_empty() {
            return;
        }
        let mut inner = self.lock();
        inner.forget(&c.ended, c.left);
        if !c.deferring.is_empty() {
            inner.defer(c.id, c.chunks, c.bytes, c.deferring);
        }
        if inner.dialogs.is_empty() && inner.dialogs.capacity() > 1024 {
            // Idle again: give the memory back.
            inner.dialogs = FxHashMap::default();
        }
    }

    pub(super) fn get(&self, dialog: DialogId) -> Option<Entry> {
        self.lock().dialogs.get(&dialog).map(|h| h.entry.clone())
    }

    /// `f` of a deferred dialog's last page, without copying the entry.
    fn page_if<T>(
        &self,
        dialog: DialogId,
        f: impl FnOnce(&Option<LastPage>) -> Option<T>,
    ) -> Option<T> {
        self.lock()
            .dialogs
            .get(&dialog)
            .and_then(|h| f(&h.entry.page))
    }

    pub(super) fn len(&self) -> usize {
        self.lock().dialogs.len()
    }

    /// Bytes of journal the deferred dialogs hold.
    #[cfg(test)]
    pub(super) fn journal_bytes(&self) -> usize {
        self.lock().bytes
    }
}

/// An answer planned in one transaction, not yet in the deferred set.
#[derive(Debug)]
struct Deferring {
    entry: Entry,
    /// Its journal entries (see [`journal_entry`]).
    journal: Vec<u8>,
}

/// What one transaction does to the deferred set, while it runs.
#[derive(Debug, Default)]
pub(super) struct Local {
    /// Planned this transaction.
    deferring: FxHashMap<DialogId, Deferring>,
    /// Written into this transaction's trees: no longer deferred.
    written_out: FxHashSet<DialogId>,
    /// Written into this transaction's trees at some point: their chains
    /// end here (a dialog planned again after starts a new one).
    ended: FxHashSet<DialogId>,
}

/// What a transaction does to the deferred set, applied once it committed
/// ([`Deferred::apply`]).
#[derive(Debug, Default)]
pub(super) struct SetChange {
    /// Its journal record: id, chunks and bytes.
    id: u64,
    chunks: u32,
    bytes: usize,
    deferring: FxHashMap<DialogId, Deferring>,
    ended: FxHashSet<DialogId>,
    /// What is left of each journal record the ended chains held.
    left: HashMap<u64, usize>,
}

impl Tx<'_> {
    /// A dialog's records not in this transaction's trees: planned here, or
    /// deferred before (and not written out here).
    fn deferred_in(
        &self,
        local: &Local,
        dialog: DialogId,
    ) -> Option<(Arc<Dialog>, Option<LastPage>)> {
        if local.written_out.contains(&dialog) {
            return None;
        }
        match local.deferring.get(&dialog) {
            Some(deferring) => Some((deferring.entry.dialog.clone(), deferring.entry.page.clone())),
            None => self.deferred.get(dialog).map(|e| (e.dialog, e.page)),
        }
    }

    /// A dialog's record not in this transaction's trees (see
    /// [`Tx::deferred_records`]).
    pub(super) fn deferred_dialog(&self, dialog: DialogId) -> Option<Dialog> {
        self.deferred_records(dialog).map(|(d, _)| (*d).clone())
    }

    /// A dialog's record and last page not in this transaction's trees:
    /// deferred before, or deferred by it.
    fn deferred_records(&self, dialog: DialogId) -> Option<(Arc<Dialog>, Option<LastPage>)> {
        self.deferred_in(&self.local.borrow(), dialog)
    }

    /// Writes a dialog's deferred records (planned by this transaction or
    /// before) into this transaction's trees, before anything else reads
    /// or writes them here.
    pub(super) fn write_out_dialog(
        &self,
        dialog: DialogId,
    ) -> Result<(), UnabortableTransactionError> {
        let mut local = self.local.borrow_mut();
        let Some((record, page)) = self.deferred_in(&local, dialog) else {
            return Ok(());
        };
        local.deferring.remove(&dialog);
        self.dialogs
            .insert(&u64_key(dialog), encode_dialog(&record))?;
        if let Some((key, page)) = page {
            self.messages.insert(&key, page)?;
        }
        local.written_out.insert(dialog);
        local.ended.insert(dialog);
        Ok(())
    }

    /// A dialog's record and the page at `key` as they stand for this
    /// transaction, without writing them out.
    pub(super) fn latest_with_page(
        &self,
        dialog: DialogId,
        key: &[u8; 16],
    ) -> TxResult<(Option<Dialog>, Option<IVec>)> {
        let (record, last) = match self.latest(dialog)? {
            Some((record, last)) => (Some(record), last),
            None => (None, None),
        };
        Ok((record, self.page_at(key, last)?))
    }

    /// A dialog's record as it stands for this transaction, with its last
    /// page if that is deferred too, without writing them out.
    pub(super) fn latest(&self, dialog: DialogId) -> TxResult<Option<(Dialog, Option<LastPage>)>> {
        if let Some((record, last)) = self.deferred_records(dialog) {
            return Ok(Some(((*record).clone(), last)));
        }
        match self.dialogs.get(u64_key(dialog))? {
            Some(bytes) => Ok(Some((tx_read(decode_dialog, &bytes)?, None))),
            None => Ok(None),
        }
    }

    /// The page at `key`: `last` (a deferred last page) if it is that one,
    /// else the tree's.
    pub(super) fn page_at(&self, key: &[u8; 16], last: Option<LastPage>) -> TxResult<Option<IVec>> {
        match last {
            Some((k, page)) if k == *key => Ok(Some(page)),
            _ => Ok(self.messages.get(key)?),
        }
    }

    /// Defers a planned answer's records: the dialog and its last page,
    /// with its journal entry; full pages before it are written now.
    /// `extends` says the answer's first message went into the page the
    /// dialog's last one is in (else that page, full, goes to its tree).
    pub(super) fn defer(
        &self,
        dialog: DialogId,
        record: Arc<Dialog>,
        full: Vec<([u8; 16], IVec)>,
        last: Option<LastPage>,
        journal: Vec<u8>,
        extends: bool,
    ) -> Result<(), UnabortableTransactionError> {
        let Some((last_key, _)) = &last else {
            return Ok(());
        };
        let mut local = self.local.borrow_mut();
        if !extends {
            // The page deferred before, full: it goes to its tree now.
            let starts_page = |page: &Option<LastPage>| {
                page.as_ref()
                    .filter(|(key, _)| key != last_key && !full.iter().any(|(k, _)| k == key))
                    .cloned()
            };
            let before = if local.written_out.contains(&dialog) {
                None
            } else {
                match local.deferring.get(&dialog) {
                    Some(deferring) => starts_page(&deferring.entry.page),
                    None => self.deferred.page_if(dialog, starts_page),
                }
            };
            if let Some((key, page)) = before {
                self.messages.insert(&key, page)?;
            }
        }
        for (key, page) in full {
            self.messages.insert(&key, page)?;
        }
        // Materialized here before: the plan extends what this transaction
        // wrote, and its version is the newest again.
        local.written_out.remove(&dialog);
        let entry = Entry {
            dialog: record,
            page: last,
        };
        match local.deferring.get_mut(&dialog) {
            Some(deferring) => {
                deferring.entry = entry;
                deferring.journal.extend_from_slice(&journal);
            }
            None => {
                local.deferring.insert(dialog, Deferring { entry, journal });
            }
        }
        Ok(())
    }

    /// Writes out up to `most` of the dialogs deferred longest.
    pub(super) fn write_out(&self, most: usize) -> Result<usize, UnabortableTransactionError> {
        let oldest: Vec<DialogId> = {
            let inner = self.deferred.lock();
            let local = self.local.borrow();
            inner
                .journals
                .iter()
                .flat_map(|(id, j)| j.members.iter().map(move |d| (*id, *d)))
                .filter(|(id, d)| {
                    inner
                        .dialogs
                        .get(d)
                        .is_some_and(|h| h.chain.first() == Some(id))
                        && !local.deferring.contains_key(d)
                        && !local.written_out.contains(d)
                })
                .map(|(_, d)| d)
                .take(most)
                .collect()
        };
        for d in &oldest {
            self.write_out_dialog(*d)?;
        }
        Ok(oldest.len())
    }

    /// Past [`JOURNAL_MOST`] bytes of journal, writes out every dialog
    /// whose chain holds the oldest record, so that the record goes.
    pub(super) fn trim_journal(&self) -> Result<(), UnabortableTransactionError> {
        let holding: Vec<DialogId> = {
            let inner = self.deferred.lock();
            if inner.bytes <= JOURNAL_MOST {
                return Ok(());
            }
            let Some((id, oldest)) = inner.journals.iter().next() else {
                return Ok(());
            };
            oldest
                .members
                .iter()
                .filter(|d| inner.dialogs.get(d).is_some_and(|h| h.chain.contains(id)))
                .copied()
                .collect()
        };
        for d in holding {
            self.write_out_dialog(d)?;
        }
        Ok(())
    }

    /// The end of a transaction's closure that succeeded: journals what it
    /// planned and removes the journal records no chain holds once the
    /// chains of what it wrote out end. Returns what this does to the
    /// deferred set, for [`Deferred::apply`] once the transaction
    /// committed: until then the set is as the last commit left it, so a
    /// transaction that fails changes nothing in it. Runs holding the
    /// store's writer, which `apply` still holds.
    pub(super) fn finish_deferred(&self) -> Result<SetChange, UnabortableTransactionError> {
        let local = std::mem::take(&mut *self.local.borrow_mut());
        if local.deferring.is_empty() && local.ended.is_empty() {
            return Ok(SetChange::default());
        }
        let inner = self.deferred.lock();
        let id = inner.next_journal;
        let (chunks, bytes) = self.journal_deferring(id, &local.deferring)?;
        let left = self.end_chains(&inner, &local.ended)?;
        Ok(SetChange {
            id,
            chunks,
            bytes,
            deferring: local.deferring,
            ended: local.ended,
            left,
        })
    }

    /// Writes the journal record `id` of what this transaction planned, in
    /// chunks; how many, and their bytes.
    fn journal_deferring(
        &self,
        id: u64,
        deferring: &FxHashMap<DialogId, Deferring>,
    ) -> Result<(u32, usize), UnabortableTransactionError> {
        let (mut chunks, mut bytes) = (0u32, 0usize);
        if deferring.is_empty() {
            return Ok((chunks, bytes));
        }
        let fresh = || {
            let mut chunk = Vec::with_capacity(CHUNK + 1024);
            chunk.push(ANSWERS);
            chunk
        };
        let mut chunk = fresh();
        for d in deferring.values() {
            chunk.extend_from_slice(&d.journal);
            if chunk.len() >= CHUNK {
                bytes += chunk.len();
                let full = std::mem::replace(&mut chunk, fresh());
                self.journal.insert(&journal_key(id, chunks), full)?;
                chunks += 1;
            }
        }
        if chunk.len() > 1 {
            bytes += chunk.len();
            self.journal.insert(&journal_key(id, chunks), chunk)?;
            chunks += 1;
        }
        Ok((chunks, bytes))
    }

    /// The chains that end here: each journal record they held loses one,
    /// and a record no chain holds goes. The records' counts left.
    fn end_chains(
        &self,
        inner: &Inner,
        ended: &FxHashSet<DialogId>,
    ) -> Result<HashMap<u64, usize>, UnabortableTransactionError> {
        let mut left: HashMap<u64, usize> = HashMap::new();
        for d in ended {
            if let Some(kept) = inner.dialogs.get(d) {
                for j in &kept.chain {
                    let live = left.entry(*j).or_insert(inner.journals[j].live);
                    *live -= 1;
                }
            }
        }
        for (&journal, &live) in &left {
            if live == 0 {
                for c in 0..inner.journals[&journal].chunks {
                    self.journal.remove(&journal_key(journal, c))?;
                }
            }
        }
        Ok(left)
    }
}

fn journal_key(id: u64, chunk: u32) -> [u8; 12] {
    let mut key = [0u8; 12];
    key[..8].copy_from_slice(&id.to_be_bytes());
    key[8..].copy_from_slice(&chunk.to_be_bytes());
    key
}

/// An answer as the journal keeps it: `dialog u64 ++ next_seq before u64
/// ++ state (len u32 ++ JSON) ++ ending (len u32 ++ JSON, none when 0) ++
/// messages u32 ++ each (len u32 ++ message record, see `pages.rs`)`,
/// integers little-endian. The incoming message comes first, placed.
pub(super) fn journal_entry(
    old: &Dialog,
    incoming: &Message,
    replies: &[Message],
    state: &serde_json::Value,
    ending: Option<&DialogStatus>,
) -> Vec<u8> {
    fn with_len(out: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        write(out);
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    }
    let mut out = Vec::with_capacity(96 + incoming.text.len() + 64 * replies.len());
    out.extend_from_slice(&old.id.to_le_bytes());
    out.extend_from_slice(&old.next_seq.to_le_bytes());
    // Serializing plain JSON values and our own types cannot fail.
    with_len(&mut out, |out| {
        serde_json::to_writer(out, state).expect("state serializes")
    });
    with_len(&mut out, |out| {
        if let Some(ending) = ending {
            serde_json::to_writer(out, ending).expect("statuses serialize")
        }
    });
    out.extend_from_slice(&(1 + replies.len() as u32).to_le_bytes());
    for m in std::iter::once(incoming).chain(replies) {
        with_len(&mut out, |out| pages::write_record(out, m));
    }
    out
}

/// One answer of the journal, as [`journal_entry`] wrote it.
struct JournalAnswer {
    dialog: DialogId,
    base: u64,
    state: serde_json::Value,
    ending: Option<DialogStatus>,
    incoming: Message,
    replies: Vec<Message>,
}

/// What a journal's answer does to the dialog it goes on from, worked
/// out again by [`transition::answer`]; it must place the very messages
/// the journal holds.
fn journal_change(old: Dialog, a: JournalAnswer) -> Result<Change, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        what: "journal",
        reason,
    };
    let dialog = a.dialog;
    let incoming = Incoming {
        transport_id: a.incoming.transport_id.unwrap_or_default(),
        text: &a.incoming.text,
        at: a.incoming.at,
    };
    let outbound: Vec<Outbound> = a
        .replies
        .iter()
        .map(|m| Outbound {
            kind: m.kind.unwrap_or(MessageKind::Reply),
            text: m.text.clone(),
            key: m.key.unwrap_or(IdempotencyKey(0)),
        })
        .collect();
    let apply = Apply {
        at: a.replies.first().map_or(a.incoming.at, |m| m.at),
        state: Some(&a.state),
        outbound: &outbound,
        ending: a.ending.clone(),
        ..Apply::default()
    };
    let change = transition::answer(old, incoming, &apply)
        .map_err(|e| corrupt(format!("an answer to dialog {dialog}: {e}")))?;
    let journaled = std::iter::once(&a.incoming).chain(&a.replies);
    if !change.appended.iter().eq(journaled) {
        return Err(corrupt(format!(
            "an answer to dialog {dialog} out of its order"
        )));
    }
    Ok(change)
}

fn journal_json<T: DeserializeOwned>(json: &[u8], field: &str) -> Result<T, StoreError> {
    serde_json::from_slice(json).map_err(|e| StoreError::Corrupt {
        what: "journal",
        reason: format!("{field}: {e}"),
    })
}

/// Reads a chunk of answers (after its first byte).
fn decode_answers(bytes: &[u8]) -> Result<Vec<JournalAnswer>, StoreError> {
    let mut r = Reader::new("journal", bytes);
    let mut out = Vec::new();
    while !r.is_empty() {
        let (dialog, base) = (r.u64()?, r.u64()?);
        let state = journal_json(r.with_len()?, "an answer's state")?;
        let ending = match r.with_len()? {
            [] => None,
            json => Some(journal_json(json, "an answer's ending")?),
        };
        let count = r.u32()?;
        // Not sized by `count`: a damaged one must be refused, not allocated.
        let mut messages = Vec::new();
        for _ in 0..count {
            messages.push(pages::read_record(r.with_len()?)?);
        }
        if messages.is_empty() {
            return Err(r.corrupt("an answer without its message"));
        }
        let incoming = messages.remove(0);
        out.push(JournalAnswer {
            dialog,
            base,
            state,
            ending,
            incoming,
            replies: messages,
        });
    }
    Ok(out)
}

/// One entry of a journal chunk of whole records (an earlier layout).
struct JournalEntry<'a> {
    dialog: DialogId,
    record: &'a [u8],
    page: Option<(&'a [u8], &'a [u8])>,
}

fn decode_entries(bytes: &[u8]) -> Result<Vec<JournalEntry<'_>>, StoreError> {
    let mut r = Reader::new("journal", bytes);
    let mut out = Vec::new();
    while !r.is_empty() {
        let dialog = read_u64(r.take(8)?);
        let record = r.with_len()?;
        let page = match r.u8()? {
            0 => None,
            _ => Some((r.take(16)?, r.with_len()?)),
        };
        out.push(JournalEntry {
            dialog,
            record,
            page,
        });
    }
    Ok(out)
}

/// The newer of a dialog's deferred record and its stored one (see the
/// module documentation).
pub(super) fn newer_dialog(
    deferred: Option<&Dialog>,
    stored: Option<&[u8]>,
) -> Result<Option<Dialog>, StoreError> {
    match stored {
        Some(s) => newer_than_stored(deferred, s).map(Some),
        None => Ok(deferred.cloned()),
    }
}

/// [`newer_dialog`] of a dialog that is stored.
pub(super) fn newer_than_stored(
    deferred: Option<&Dialog>,
    stored: &[u8],
) -> Result<Dialog, StoreError> {
    let stored = decode_dialog(stored)?;
    Ok(match deferred {
        Some(d) if further_on(d, &stored) => d.clone(),
        _ => stored,
    })
}

/// Whether version `a` of a dialog is further on than version `b`: each
/// planned version adds messages, and a version written over another was
/// built on it, so equal means the same or `b` newer.
fn further_on(a: &Dialog, b: &Dialog) -> bool {
    a.next_seq > b.next_seq
}

/// The newer of a deferred page and the stored one.
pub(super) fn newer_page(
    deferred: Option<IVec>,
    stored: Option<IVec>,
) -> Result<Option<IVec>, StoreError> {
    Ok(match (deferred, stored) {
        (Some(d), Some(s)) if pages::count(&d)? <= pages::count(&s)? => Some(s),
        (Some(d), _) => Some(d),
        (None, s) => s,
    })
}

impl Store {
    /// How many dialogs have records deferred.
    pub fn deferred(&self) -> usize {
        self.deferred.len()
    }

    /// Writes out up to `most` deferred dialogs (the longest deferred
    /// first); returns how many are still deferred.
    pub fn write_out_deferred(&self, most: usize) -> Result<usize, StoreError> {
        if self.deferred() == 0 {
            return Ok(0);
        }
        self.transact(|tx| Ok(tx.write_out(most)?))?;
        Ok(self.deferred())
    }

    /// Applies every journal record left by a host that stopped with
    /// dialogs deferred, oldest first, then removes them. Run when the
    /// store opens. Each dialog's answers are folded into one change and
    /// written once, as the running host writes out a deferred dialog.
    pub(super) fn replay_journal(&self) -> Result<(), StoreError> {
        let journal = &self.t.journal;
        if journal.is_empty() {
            return Ok(());
        }
        let (mut keys, mut replayed) = (Vec::new(), 0usize);
        let mut folded = Folded::default();
        for item in journal.iter() {
            let (key, bytes) = item?;
            match bytes.split_first() {
                Some((&ANSWERS, answers)) => {
                    for a in decode_answers(answers)? {
                        replayed += usize::from(self.fold_answer(&mut folded, a)?);
                    }
                }
                _ => {
                    self.write_folded(std::mem::take(&mut folded))?;
                    replayed += self.replay_records(&bytes)?;
                }
            }
            keys.push(key);
        }
        self.write_folded(folded)?;
        // The records first, durable, then the journal that held them.
        self.db.flush()?;
        for key in keys {
            journal.remove(key)?;
        }
        self.db.flush()?;
        tracing::info!("replayed {replayed} answers from the store's journal");
        Ok(())
    }

    /// Folds one answer of the journal into what its dialog's answers do,
    /// unless the dialog is already past it; true when folded.
    fn fold_answer(&self, folded: &mut Folded, a: JournalAnswer) -> Result<bool, StoreError> {
        let id = a.dialog;
        let (old, earlier) = match folded.remove(&id) {
            Some((old, change)) => (old, Some(change)),
            None => match self.t.dialogs.get(u64_key(id))? {
                Some(stored) => (decode_dialog(&stored)?, None),
                None => {
                    return Err(StoreError::Corrupt {
                        what: "journal",
                        reason: format!("an answer to dialog {id}, which is not stored"),
                    })
                }
            },
        };
        let current = earlier.as_ref().map_or(&old, |c| &c.dialog);
        let next_seq = current.next_seq;
        if a.base > next_seq {
            return Err(StoreError::Corrupt {
                what: "journal",
                reason: format!(
                    "dialog {id} holds {next_seq} messages but its journal goes on from {}",
                    a.base
                ),
            });
        }
        let next = (a.base == next_seq)
            .then(|| journal_change(current.clone(), a))
            .transpose()?;
        let answered = next.is_some();
        let change = match (earlier, next) {
            (Some(earlier), Some(next)) => Some(earlier.and(next)),
            (earlier, next) => earlier.or(next),
        };
        if let Some(change) = change {
            folded.insert(id, (old, change));
        }
        Ok(answered)
    }

    /// Writes the folded answers, [`REPLAY_BATCH`] dialogs a transaction in
    /// the order of their keys.
    fn write_folded(&self, folded: Folded) -> Result<(), StoreError> {
        let mut changes: Vec<(Dialog, Change)> = folded.into_values().collect();
        changes.sort_unstable_by_key(|(old, _)| old.id);
        for batch in changes.chunks(REPLAY_BATCH) {
            self.transact(|tx| {
                for (old, change) in batch {
                    tx.write(Some(old), &mut change.clone(), Queue::Journaled, true)?;
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Applies a journal chunk of whole records (an earlier layout): each
    /// dialog record and page unless the stored one is as far on; returns
    /// how many dialogs it held.
    fn replay_records(&self, bytes: &[u8]) -> Result<usize, StoreError> {
        let entries = decode_entries(bytes)?;
        for e in &entries {
            let dialog_key = u64_key(e.dialog);
            let stored = self.t.dialogs.get(dialog_key)?;
            let record = decode_dialog(e.record)?;
            let ahead = match &stored {
                Some(s) => further_on(&record, &decode_dialog(s)?),
                None => true,
            };
            if ahead {
                self.t.dialogs.insert(dialog_key, e.record)?;
            }
            if let Some((page_key, page)) = e.page {
                let stored = self.t.messages.get(page_key)?;
                if newer_page(Some(IVec::from(page)), stored.clone())? != stored {
                    self.t.messages.insert(page_key, page)?;
                }
            }
        }
        Ok(entries.len())
    }
}
