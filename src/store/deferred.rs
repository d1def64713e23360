//! Deferred records: the answer pipeline's planned writes, kept in memory
//! and in one journal record per batch instead of in the `dialogs` and
//! `message_pages` trees, then written there in bulk (a checkpoint).
//!
//! A planned answer (see `batch.rs`) writes a dialog's record and its last
//! page, two sled inserts each reading the old value first under sled's
//! global transaction lock. Deferred, the batch's transaction writes one
//! `journal` record holding every planned dialog and last page of the
//! batch, and the records themselves wait here: a dialog answered ten
//! times before the next checkpoint is written to its trees once. The
//! journal record is in the same transaction as the batch's flight and
//! account marks, so it is durable before any reply of the batch is sent.
//!
//! The rules that keep this invisible to every other reader and writer:
//! - A transaction that touches a deferred dialog any other way (reads it,
//!   writes it, reads or writes a page of it) first writes the deferred
//!   records into its own trees ([`Tx::materialize`]); when its closure
//!   succeeds the dialog leaves the deferred set. sled runs transactions
//!   one at a time under one lock, and only transactions change this set,
//!   so every transaction sees the newest version of every record.
//! - A read outside a transaction takes the newer of the deferred version
//!   and the tree's (see [`newer_dialog`], [`newer_page`]).
//! - Versions are ordered without timestamps: each planned version of a
//!   dialog adds messages, so a newer dialog record has a higher `next_seq`
//!   and a newer last page more entries; anything written over a deferred
//!   version was built on it (it was materialized first), so it is at
//!   least as far on. Equal means the same or the tree's is newer.
//! - A journal record goes once no deferred dialog holds its version
//!   there; opening the store replays the journal by the same rule
//!   ([`Store::replay_journal`]), so a record written twice or a replay
//!   interrupted by a crash changes nothing.
//!
//! A dialog's full pages never wait: a planned answer that fills its last
//! page writes that page at once, so the deferred set holds at most a
//! dialog record and one page per dialog.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use sled::IVec;

use super::keys::*;
use super::*;

/// Dialogs deferred at most, before the oldest are written out with the
/// next batch.
pub(super) const MOST: usize = 16_384;

/// Bytes of journal per key: sled keeps a value above a few hundred KiB in
/// a file of its own.
const CHUNK: usize = 7 * 1024;

/// A dialog's last page: its key and value.
pub(super) type LastPage = ([u8; 16], IVec);

/// A deferred dialog: its record and last page as planned, and the journal
/// record holding this version.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    journal: u64,
    pub(super) dialog: IVec,
    pub(super) page: Option<LastPage>,
}

#[derive(Debug, Default)]
struct Journal {
    chunks: u32,
    /// Dialogs whose newest version this record holds (some may have moved
    /// on: see `live`).
    members: Vec<DialogId>,
    live: usize,
}

#[derive(Debug, Default)]
struct Inner {
    dialogs: HashMap<DialogId, Entry>,
    journals: BTreeMap<u64, Journal>,
    next_journal: u64,
}

/// The deferred set; see the module documentation.
#[derive(Debug, Default)]
pub(super) struct Deferred(Mutex<Inner>);

impl Deferred {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn get(&self, dialog: DialogId) -> Option<Entry> {
        self.lock().dialogs.get(&dialog).cloned()
    }

    /// `f` of a deferred dialog's last page, without copying the entry.
    fn page_if<T>(
        &self,
        dialog: DialogId,
        f: impl FnOnce(&Option<LastPage>) -> Option<T>,
    ) -> Option<T> {
        self.lock().dialogs.get(&dialog).and_then(|e| f(&e.page))
    }

    pub(super) fn len(&self) -> usize {
        self.lock().dialogs.len()
    }
}

/// What one transaction did to the deferred set, applied when its closure
/// succeeds ([`Tx::finish_deferred`]).
#[derive(Debug, Default)]
pub(super) struct Local {
    /// Planned this transaction: dialog record and last page.
    staged: HashMap<DialogId, (IVec, Option<LastPage>)>,
    /// Written into this transaction's trees: no longer deferred.
    materialized: HashSet<DialogId>,
}

impl Tx<'_> {
    /// A dialog's records not in this transaction's trees: planned here, or
    /// deferred before (and not materialized here).
    fn unwritten(&self, local: &Local, dialog: DialogId) -> Option<(IVec, Option<LastPage>)> {
        if local.materialized.contains(&dialog) {
            return None;
        }
        match local.staged.get(&dialog) {
            Some(staged) => Some(staged.clone()),
            None => self.deferred.get(dialog).map(|e| (e.dialog, e.page)),
        }
    }

    /// Writes a dialog's deferred records (planned by this transaction or
    /// before) into this transaction's trees, before anything else reads
    /// or writes them here.
    pub(super) fn materialize(&self, dialog: DialogId) -> Result<(), UnabortableTransactionError> {
        let mut local = self.local.borrow_mut();
        let Some((record, page)) = self.unwritten(&local, dialog) else {
            return Ok(());
        };
        local.staged.remove(&dialog);
        self.dialogs.insert(&u64_key(dialog), record)?;
        if let Some((key, page)) = page {
            self.messages.insert(&key, page)?;
        }
        local.materialized.insert(dialog);
        Ok(())
    }

    /// A dialog's record and the page at `key` as they stand for this
    /// transaction, without materializing them.
    pub(super) fn peek(
        &self,
        dialog: DialogId,
        key: &[u8; 16],
    ) -> TxResult<(Option<IVec>, Option<IVec>)> {
        let found = self.unwritten(&self.local.borrow(), dialog);
        match found {
            Some((record, page)) => {
                let page = match page {
                    Some((k, p)) if k == *key => Some(p),
                    _ => self.messages.get(key)?,
                };
                Ok((Some(record), page))
            }
            None => Ok((self.dialogs.get(u64_key(dialog))?, self.messages.get(key)?)),
        }
    }

    /// Defers a planned answer's records: the dialog and its last page;
    /// full pages before it are written now.
    pub(super) fn defer(
        &self,
        dialog: DialogId,
        record: &[u8],
        pages: &[([u8; 16], Vec<u8>)],
    ) -> Result<(), UnabortableTransactionError> {
        let Some(((last_key, last), full)) = pages.split_last() else {
            return Ok(());
        };
        for (key, page) in full {
            self.messages.insert(key, &page[..])?;
        }
        let mut local = self.local.borrow_mut();
        // The page deferred before, when this answer starts a new one: it
        // is full, and goes to its tree now.
        let starts_page = |page: &Option<LastPage>| {
            page.as_ref()
                .filter(|(key, _)| key != last_key && !full.iter().any(|(k, _)| k == key))
                .cloned()
        };
        let before = if local.materialized.contains(&dialog) {
            None
        } else {
            match local.staged.get(&dialog) {
                Some((_, page)) => starts_page(page),
                None => self.deferred.page_if(dialog, starts_page),
            }
        };
        if let Some((key, page)) = before {
            self.messages.insert(&key, page)?;
        }
        // Materialized here before: the plan extends what this transaction
        // wrote, and its version is the newest again.
        local.materialized.remove(&dialog);
        local.staged.insert(
            dialog,
            (IVec::from(record), Some((*last_key, IVec::from(&last[..])))),
        );
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
                    inner.dialogs.get(d).is_some_and(|e| e.journal == *id)
                        && !local.staged.contains_key(d)
                        && !local.materialized.contains(d)
                })
                .map(|(_, d)| d)
                .take(most)
                .collect()
        };
        for d in &oldest {
            self.materialize(*d)?;
        }
        Ok(oldest.len())
    }

    /// The end of a transaction's closure that succeeded: journals what it
    /// planned, drops what it materialized from the deferred set, adds what
    /// it planned, and removes journal records no longer needed. Runs under
    /// sled's transaction lock, before the commit.
    pub(super) fn finish_deferred(&self) -> Result<(), UnabortableTransactionError> {
        let local = std::mem::take(&mut *self.local.borrow_mut());
        if local.staged.is_empty() && local.materialized.is_empty() {
            return Ok(());
        }
        let mut inner = self.deferred.lock();
        let id = inner.next_journal;
        let mut chunks = 0u32;
        if !local.staged.is_empty() {
            let mut chunk = Vec::with_capacity(CHUNK + 4096);
            for (dialog, (record, page)) in &local.staged {
                encode_entry(&mut chunk, *dialog, record, page.as_ref());
                if chunk.len() >= CHUNK {
                    self.journal
                        .insert(&journal_key(id, chunks), std::mem::take(&mut chunk))?;
                    chunks += 1;
                }
            }
            if !chunk.is_empty() {
                self.journal.insert(&journal_key(id, chunks), chunk)?;
                chunks += 1;
            }
        }
        // The records the leaving dialogs held, with how many stay live;
        // a record none does goes.
        let leaving: Vec<DialogId> = local
            .materialized
            .iter()
            .chain(local.staged.keys())
            .copied()
            .collect();
        let mut left: HashMap<u64, usize> = HashMap::new();
        for d in &leaving {
            if let Some(e) = inner.dialogs.get(d) {
                let live = left
                    .entry(e.journal)
                    .or_insert(inner.journals[&e.journal].live);
                *live -= 1;
            }
        }
        for (&journal, &live) in &left {
            if live == 0 {
                for c in 0..inner.journals[&journal].chunks {
                    self.journal.remove(&journal_key(journal, c))?;
                }
            }
        }
        // Nothing fails past this point: the set follows the transaction.
        for d in &leaving {
            inner.dialogs.remove(d);
        }
        for (journal, live) in left {
            if live == 0 {
                inner.journals.remove(&journal);
            } else if let Some(j) = inner.journals.get_mut(&journal) {
                j.live = live;
            }
        }
        if !local.staged.is_empty() {
            inner.next_journal += 1;
            let members: Vec<DialogId> = local.staged.keys().copied().collect();
            inner.journals.insert(
                id,
                Journal {
                    chunks,
                    live: members.len(),
                    members,
                },
            );
            for (dialog, (record, page)) in local.staged {
                inner.dialogs.insert(
                    dialog,
                    Entry {
                        journal: id,
                        dialog: record,
                        page,
                    },
                );
            }
        }
        if inner.dialogs.is_empty() && inner.dialogs.capacity() > 1024 {
            // Idle again: give the memory back.
            inner.dialogs = HashMap::new();
        }
        Ok(())
    }
}

fn journal_key(id: u64, chunk: u32) -> [u8; 12] {
    let mut key = [0u8; 12];
    key[..8].copy_from_slice(&id.to_be_bytes());
    key[8..].copy_from_slice(&chunk.to_be_bytes());
    key
}

fn encode_entry(
    out: &mut Vec<u8>,
    dialog: DialogId,
    record: &[u8],
    page: Option<&([u8; 16], IVec)>,
) {
    out.extend_from_slice(&dialog.to_be_bytes());
    out.extend_from_slice(&(record.len() as u32).to_le_bytes());
    out.extend_from_slice(record);
    match page {
        Some((key, page)) => {
            out.push(1);
            out.extend_from_slice(key);
            out.extend_from_slice(&(page.len() as u32).to_le_bytes());
            out.extend_from_slice(page);
        }
        None => out.push(0),
    }
}

/// One entry of a journal record.
struct JournalEntry<'a> {
    dialog: DialogId,
    record: &'a [u8],
    page: Option<(&'a [u8], &'a [u8])>,
}

fn decode_entries(mut bytes: &[u8]) -> Result<Vec<JournalEntry<'_>>, StoreError> {
    fn take<'b>(bytes: &mut &'b [u8], n: usize) -> Result<&'b [u8], StoreError> {
        if bytes.len() < n {
            return Err(StoreError::Corrupt {
                what: "journal",
                reason: "a record ends inside an entry".to_string(),
            });
        }
        let (head, rest) = bytes.split_at(n);
        *bytes = rest;
        Ok(head)
    }
    fn len(bytes: &mut &[u8]) -> Result<usize, StoreError> {
        let b = take(bytes, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let dialog = read_u64(take(&mut bytes, 8)?);
        let n = len(&mut bytes)?;
        let record = take(&mut bytes, n)?;
        let page = match take(&mut bytes, 1)?[0] {
            0 => None,
            _ => {
                let key = take(&mut bytes, 16)?;
                let n = len(&mut bytes)?;
                Some((key, take(&mut bytes, n)?))
            }
        };
        out.push(JournalEntry {
            dialog,
            record,
            page,
        });
    }
    Ok(out)
}

/// Whether dialog record `a` is further on than `b` (see the module
/// documentation).
fn dialog_ahead(a: &[u8], b: &[u8]) -> Result<bool, StoreError> {
    let a: Dialog = decode("dialog", a)?;
    let b: Dialog = decode("dialog", b)?;
    Ok(a.next_seq > b.next_seq)
}

/// The newer of a dialog's deferred record and its stored one.
pub(super) fn newer_dialog(
    deferred: Option<IVec>,
    stored: Option<IVec>,
) -> Result<Option<IVec>, StoreError> {
    Ok(match (deferred, stored) {
        (Some(d), Some(s)) if !dialog_ahead(&d, &s)? => Some(s),
        (Some(d), _) => Some(d),
        (None, s) => s,
    })
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
    /// dialogs deferred, then removes them. Run when the store opens.
    pub(super) fn replay_journal(&self) -> Result<(), StoreError> {
        let journal = &self.t.journal;
        if journal.is_empty() {
            return Ok(());
        }
        let (mut keys, mut replayed) = (Vec::new(), 0usize);
        for item in journal.iter() {
            let (key, bytes) = item?;
            for e in decode_entries(&bytes)? {
                replayed += 1;
                let dialog_key = u64_key(e.dialog);
                let stored = self.t.dialogs.get(dialog_key)?;
                if newer_dialog(Some(IVec::from(e.record)), stored.clone())? != stored {
                    self.t.dialogs.insert(dialog_key, e.record)?;
                }
                if let Some((page_key, page)) = e.page {
                    let stored = self.t.messages.get(page_key)?;
                    if newer_page(Some(IVec::from(page)), stored.clone())? != stored {
                        self.t.messages.insert(page_key, page)?;
                    }
                }
            }
            keys.push(key);
        }
        // The records first, durable, then the journal that held them.
        self.db.flush()?;
        for key in keys {
            journal.remove(key)?;
        }
        self.db.flush()?;
        tracing::info!("replayed {replayed} answered dialogs from the store's journal");
        Ok(())
    }
}
