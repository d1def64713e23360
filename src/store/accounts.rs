//! Account records. The record itself (status, pauses, next send) is one
//! small key in `accounts`; the sends that still count against a limit sit
//! beside it in buckets of a tenth of a second (`name ++ 0x01 ++ bucket`,
//! a list of 17-byte marks), so a burst of sends rewrites a few small values
//! instead of adding a key each, and an account sending thousands a second
//! still rewrites a few dozen marks a batch. Records are read through a
//! cache whose lock also orders the writers of an account.
//!
//! A transaction does not write an account's keys itself: it writes one
//! record of the account log (`0xFF ++ sequence ++ chunk`, every key it
//! changed with its new value, in chunks of at most [`CHUNK`] bytes), and
//! the log's newest values wait in memory. Past
//! [`LOG_MOST`] records the writer then retires the oldest few, in one
//! sled batch of the `accounts` tree after its transaction: the keys whose
//! newest value they hold get that value in place, and they go (see
//! [`Store::retire`]). A batch that sends from a hundred accounts then
//! adds one key instead of two hundred, a key written in a hundred batches
//! is written to its place about once, and no write holds the whole log.
//! Opening the store writes out the log left behind (in one transaction,
//! so a crash then changes nothing), and so does a read of an account not
//! cached yet, so the trees are complete whenever they are read. An older
//! layout kept one key per mark (`name ++ 0x00 ++ idempotency key`), a
//! later one buckets of ten minutes; their marks are moved into the
//! current buckets on first read.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use rustc_hash::FxHashMap;
use sled::transaction::{TransactionalTree, UnabortableTransactionError};

use super::records::{decode_account, encode_account, Reader};
use super::{Store, StoreError, Tx, TxResult, CHUNK};
use crate::clock::Timestamp;
use crate::model::{AccountRecord, IdempotencyKey, SendMark, SendMarks};

/// The cached account records, complete with their send marks, and the
/// account log.
#[derive(Default)]
pub(super) struct AccountCache(Mutex<Accounts>);

impl AccountCache {
    fn lock(&self) -> MutexGuard<'_, Accounts> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many writes to account records the store holds, ever: every
    /// send is one. Only grows; the witness checks the store against it.
    pub(super) fn writes(&self) -> u64 {
        self.lock().log.next
    }
}

#[derive(Default)]
pub(super) struct Accounts {
    records: HashMap<String, AccountRecord>,
    log: AccountLog,
}

/// Writes to the `accounts` tree: each key with its new value, `None` to
/// remove it.
type Writes = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// The first byte of a key of the account log: no account's name starts
/// with it (UTF-8 never holds 0xFF).
const LOG: u8 = 0xFF;
/// The key that keeps the log's next sequence number while the log is
/// written out (empty), so the sequence only ever grows: it counts every
/// write to an account record, sends included, and the store's witness
/// compares it (see `witness.rs`).
const LOG_NEXT: [u8; 1] = [LOG];
/// Log records at most: past it the oldest are retired (a few in unit
/// tests, so that they retire records often).
const LOG_MOST: usize = if cfg!(test) { 4 } else { 128 };
/// Bytes of logged writes at most: past it the oldest records are retired
/// (at 1,000 accounts a record is about 221 KB: see ARCHITECTURE.md, "What
/// the store's mechanisms pay").
const LOG_BYTES_MOST: usize = 16 << 20;
/// A log past its bounds is retired down to a sixteenth below them, so
/// that one batch retires several records (a batch each transaction made
/// small ones slower: see [`Store::retire`]).
const LOG_RETIRED_TO: (usize, usize) = (
    LOG_MOST - LOG_MOST / 16,
    LOG_BYTES_MOST - LOG_BYTES_MOST / 16,
);

/// The account log as this process wrote it: the newest logged value of
/// each key, and the log's records.
#[derive(Default)]
struct AccountLog {
    values: FxHashMap<Vec<u8>, LoggedValue>,
    /// The log's records in the tree, oldest first.
    records: VecDeque<LogRecord>,
    /// Bytes of the records' writes.
    bytes: usize,
    /// The next record's sequence number.
    next: u64,
}

/// A key's newest logged value (`None`: removed) and the record holding it.
struct LoggedValue {
    value: Option<Vec<u8>>,
    seq: u64,
}

/// A record of the account log: the keys it wrote, and its chunks in the
/// tree.
struct LogRecord {
    seq: u64,
    keys: Vec<Vec<u8>>,
    bytes: usize,
    chunks: Chunks,
}

/// How a record of the account log is keyed.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Chunks {
    /// `0xFF ++ sequence ++ chunk` for chunks `0..n`.
    Of(u32),
    /// `0xFF ++ sequence`, one value: as layouts before 3 wrote it.
    Whole,
}

fn log_keys(seq: u64, chunks: Chunks) -> impl Iterator<Item = Vec<u8>> {
    let key = move |chunk: Option<u32>| {
        let mut k = Vec::with_capacity(13);
        k.push(LOG);
        k.extend_from_slice(&seq.to_be_bytes());
        if let Some(c) = chunk {
            k.extend_from_slice(&c.to_be_bytes());
        }
        k
    };
    let (whole, n) = match chunks {
        Chunks::Whole => (Some(key(None)), 0),
        Chunks::Of(n) => (None, n),
    };
    whole.into_iter().chain((0..n).map(move |c| key(Some(c))))
}

/// The writes in chunks of about [`CHUNK`] bytes (a single write above it
/// is a chunk of its own).
fn encode_writes(writes: &Writes) -> Vec<Vec<u8>> {
    let mut chunks = Vec::new();
    let mut out = Vec::new();
    for (k, v) in writes {
        let len = 9 + k.len() + v.as_ref().map_or(0, Vec::len);
        if !out.is_empty() && out.len() + len > CHUNK {
            chunks.push(std::mem::take(&mut out));
        }
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(k);
        match v {
            Some(v) => {
                out.push(1);
                out.extend_from_slice(&(v.len() as u32).to_be_bytes());
                out.extend_from_slice(v);
            }
            None => out.push(0),
        }
    }
    if !out.is_empty() {
        chunks.push(out);
    }
    chunks
}

fn decode_writes(bytes: &[u8]) -> Result<Writes, StoreError> {
    let mut r = Reader::new("account log", bytes);
    let mut writes = Writes::new();
    while !r.is_empty() {
        let key = r.with_len_be()?.to_vec();
        let value = match r.u8()? {
            1 => Some(r.with_len_be()?.to_vec()),
            0 => None,
            _ => return Err(r.corrupt("a write is neither a value nor a removal")),
        };
        writes.push((key, value));
    }
    Ok(writes)
}

/// Writes each key's value (removes it for `None`).
fn apply<'a>(
    tree: &TransactionalTree,
    writes: impl IntoIterator<Item = (&'a Vec<u8>, &'a Option<Vec<u8>>)>,
) -> Result<(), UnabortableTransactionError> {
    for (key, value) in writes {
        match value {
            Some(v) => tree.insert(&key[..], &v[..])?,
            None => tree.remove(&key[..])?,
        };
    }
    Ok(())
}

impl AccountLog {
    /// How many of the oldest records to retire: none while the log is
    /// within [`LOG_MOST`] records and [`LOG_BYTES_MOST`] bytes, else
    /// enough to bring it to [`LOG_RETIRED_TO`].
    fn to_retire(&self) -> usize {
        let mut records = self.records.len();
        let mut bytes = self.bytes;
        if records <= LOG_MOST && bytes <= LOG_BYTES_MOST {
            return 0;
        }
        let mut n = 0;
        for r in &self.records {
            if records <= LOG_RETIRED_TO.0 && bytes <= LOG_RETIRED_TO.1 {
                break;
            }
            records -= 1;
            bytes -= r.bytes;
            n += 1;
        }
        n
    }

    /// Writes `writes` in a transaction as the log's next record (nothing
    /// for none); tell [`AccountLog::committed`] its chunks once the
    /// transaction committed.
    fn write(
        &self,
        tree: &TransactionalTree,
        writes: &Writes,
    ) -> Result<Chunks, UnabortableTransactionError> {
        let chunks = encode_writes(writes);
        let n = chunks.len() as u32;
        for (key, chunk) in log_keys(self.next, Chunks::Of(n)).zip(chunks) {
            tree.insert(key, chunk)?;
        }
        Ok(Chunks::Of(n))
    }

    /// The batch that retires the `n` oldest records: each key whose newest
    /// value one of them holds gets that value in place, and the records
    /// go. A key a newer record holds needs nothing: replaying the log ends
    /// at its newest value all the same.
    fn retiring(&self, n: usize) -> sled::Batch {
        let mut batch = sled::Batch::default();
        for r in self.records.iter().take(n) {
            for key in &r.keys {
                let newest = &self.values[key];
                if newest.seq == r.seq {
                    match &newest.value {
                        Some(v) => batch.insert(&key[..], &v[..]),
                        None => batch.remove(&key[..]),
                    }
                }
            }
            for key in log_keys(r.seq, r.chunks) {
                batch.remove(key);
            }
        }
        batch
    }

    /// The `n` oldest records, retired (see [`AccountLog::retiring`]).
    fn retired(&mut self, n: usize) {
        for _ in 0..n {
            let Some(r) = self.records.pop_front() else {
                break;
            };
            self.bytes -= r.bytes;
            for key in r.keys {
                if self.values.get(&key).is_some_and(|v| v.seq == r.seq) {
                    self.values.remove(&key);
                }
            }
        }
    }

    /// Writes every logged value to its key and drops the log's records.
    fn write_out(&self, tree: &TransactionalTree) -> Result<(), UnabortableTransactionError> {
        apply(tree, self.values.iter().map(|(k, v)| (k, &v.value)))?;
        for r in &self.records {
            for key in log_keys(r.seq, r.chunks) {
                tree.remove(key)?;
            }
        }
        tree.insert(&LOG_NEXT, &self.next.to_be_bytes())?;
        Ok(())
    }

    /// What [`AccountLog::write`] wrote, now committed.
    fn committed(&mut self, writes: Writes, chunks: Chunks) {
        let seq = self.next;
        self.next += 1;
        self.add(seq, writes, chunks);
    }

    fn written_out(&mut self) {
        self.values.clear();
        self.records.clear();
        self.bytes = 0;
    }

    /// Notes a record of the log, or a further chunk of the newest one.
    fn add(&mut self, seq: u64, writes: Writes, chunks: Chunks) {
        let bytes = writes_bytes(&writes);
        let mut keys = Vec::with_capacity(writes.len());
        for (k, value) in writes {
            keys.push(k.clone());
            self.values.insert(k, LoggedValue { value, seq });
        }
        self.bytes += bytes;
        match self.records.back_mut() {
            Some(r) if r.seq == seq => {
                r.keys.extend(keys);
                r.bytes += bytes;
                r.chunks = chunks;
            }
            _ => self.records.push_back(LogRecord {
                seq,
                keys,
                bytes,
                chunks,
            }),
        }
    }
}

fn writes_bytes(writes: &Writes) -> usize {
    writes
        .iter()
        .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
        .sum()
}

/// Milliseconds of sends per bucket.
const BUCKET_MS: i64 = 100;
/// Bytes per mark in a bucket: idempotency key, time, opening.
const MARK: usize = 17;

fn prefix(name: &str, tag: u8) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + 9);
    k.extend_from_slice(name.as_bytes());
    k.push(tag);
    k
}

/// The marks of the older layout: one key each.
const OLD_MARK: u8 = 0;
const BUCKET: u8 = 1;

fn bucket_of(m: &SendMark) -> u64 {
    m.at.0.div_euclid(BUCKET_MS).max(0) as u64
}

fn bucket_key(name: &str, bucket: u64) -> Vec<u8> {
    let mut k = prefix(name, BUCKET);
    k.extend_from_slice(&bucket.to_be_bytes());
    k
}

fn corrupt(len: usize) -> StoreError {
    StoreError::Corrupt {
        what: "send marks",
        reason: format!("{len} bytes"),
    }
}

fn read_bucket(value: &[u8]) -> Result<Vec<SendMark>, StoreError> {
    if value.len() % MARK != 0 {
        return Err(corrupt(value.len()));
    }
    Ok(value
        .chunks_exact(MARK)
        .map(|c| SendMark {
            key: IdempotencyKey(u64::from_be_bytes(c[..8].try_into().expect("8 bytes"))),
            at: Timestamp(i64::from_be_bytes(c[8..16].try_into().expect("8 bytes"))),
            opening: c[16] == 1,
        })
        .collect())
}

/// A mark of the older layout: the idempotency key ends the key, the
/// value is the time and the opening flag.
fn read_old_mark(key: &[u8], value: &[u8]) -> Result<SendMark, StoreError> {
    let id: [u8; 8] = key[key.len().saturating_sub(8)..]
        .try_into()
        .map_err(|_| corrupt(value.len()))?;
    let at: [u8; 8] = value
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| corrupt(value.len()))?;
    Ok(SendMark {
        at: Timestamp(i64::from_be_bytes(at)),
        opening: value.get(8) == Some(&1),
        key: IdempotencyKey(u64::from_be_bytes(id)),
    })
}

/// What changed in `new` since its base, as writes: the record (a few
/// bytes), and every bucket whose marks changed. The base's marks are
/// `new.sends[..from]` followed by `old_rest` (both in time order), so only
/// the buckets of the marks past `from`, old and new, can have changed;
/// each of those is compared and written if it did.
fn write_diff(writes: &mut Writes, new: &AccountRecord, from: usize, old_rest: &[SendMark]) {
    writes.push((new.name.as_bytes().to_vec(), Some(encode_account(new))));
    let (same, fresh) = new.sends.split_at(from);
    let mut touched: Vec<u64> = old_rest.iter().chain(fresh).map(bucket_of).collect();
    touched.sort_unstable();
    touched.dedup();
    // The marks from the first touched bucket on: most marks are older.
    let first = touched.first().map_or(new.sends.len(), |b| {
        partition_from_end(&new.sends, |m| bucket_of(m) < *b)
    });
    let (recent, same) = (&new.sends[first..], &same[first.min(from)..]);
    for bucket in touched {
        let now = in_bucket(recent, bucket);
        if in_bucket(same, bucket)
            .iter()
            .chain(in_bucket(old_rest, bucket))
            .eq(now)
        {
            continue;
        }
        let mut value = Vec::with_capacity(now.len() * MARK);
        for m in now {
            value.extend_from_slice(&m.key.0.to_be_bytes());
            value.extend_from_slice(&m.at.0.to_be_bytes());
            value.push(u8::from(m.opening));
        }
        let key = bucket_key(&new.name, bucket);
        writes.push((key, (!value.is_empty()).then_some(value)));
    }
}

/// `partition_point` for a predicate that fails only for the newest few
/// marks: it gallops back from the end, leaving the older, colder marks
/// untouched.
fn partition_from_end(sends: &[SendMark], pred: impl Fn(&SendMark) -> bool) -> usize {
    let mut hi = sends.len();
    let mut step = 1;
    while hi > 0 {
        let lo = hi.saturating_sub(step);
        if pred(&sends[lo]) {
            return lo + 1 + sends[lo + 1..hi].partition_point(&pred);
        }
        hi = lo;
        step *= 2;
    }
    0
}

/// The marks of `bucket` among `sends` (in time order).
fn in_bucket(sends: &[SendMark], bucket: u64) -> &[SendMark] {
    let start = sends.partition_point(|m| bucket_of(m) < bucket);
    let len = sends[start..].partition_point(|m| bucket_of(m) == bucket);
    &sends[start..start + len]
}

/// [`write_diff`] of a record changed since `old` (its base when known, else
/// all of `old`'s marks).
fn write_changes(writes: &mut Writes, old: &AccountRecord, new: &AccountRecord) {
    match new.sends.base_rest() {
        Some(rest) => write_diff(writes, new, new.sends.changed_from(), rest),
        None => write_diff(writes, new, 0, &old.sends),
    }
}

/// A record without its marks: what a change in place can be undone to.
fn head(record: &AccountRecord) -> AccountRecord {
    AccountRecord {
        name: record.name.clone(),
        status: record.status.clone(),
        sends: SendMarks::default(),
        first_send_at: record.first_send_at,
        next_send_at: record.next_send_at,
    }
}

/// Puts records changed in place back as they were: their `heads`, and
/// their marks' bases.
fn roll_back(records: &mut [AccountRecord], heads: &[AccountRecord]) {
    for (record, head) in records.iter_mut().zip(heads) {
        record.status = head.status.clone();
        record.first_send_at = head.first_send_at;
        record.next_send_at = head.next_send_at;
        record.sends.roll_back();
    }
}

/// A record as the trees now hold it, for the cache: its marks' base is
/// what was stored, so a change made to a copy of it writes back only what
/// it changed (see [`write_diff`]).
fn stored(mut record: AccountRecord) -> AccountRecord {
    record.sends.rebase();
    record
}

impl Store {
    /// Reads an account from the trees: the record, its marks oldest
    /// first. Marks of an older layout (inside the record, or one key
    /// each) are moved into buckets.
    fn load_account(&self, name: &str) -> Result<AccountRecord, StoreError> {
        let mut record = match self.t.accounts.get(name.as_bytes())? {
            Some(b) => decode_account(name, &b)?,
            None => AccountRecord::new(name),
        };
        let mut marks = record.sends.to_vec();
        let mut old_keys = Vec::new();
        let mut seen: std::collections::HashSet<_> = marks.iter().map(|s| s.key).collect();
        for e in self.t.accounts.scan_prefix(prefix(name, OLD_MARK)) {
            let (k, v) = e?;
            let mark = read_old_mark(&k, &v)?;
            if seen.insert(mark.key) {
                marks.push(mark);
            }
            old_keys.push(k);
        }
        let mut migrate = !marks.is_empty();
        for e in self.t.accounts.scan_prefix(prefix(name, BUCKET)) {
            let (k, v) = e?;
            let bucket = read_bucket(&v)?;
            // A bucket of another length: its marks move to their own.
            if bucket
                .iter()
                .any(|m| bucket_key(name, bucket_of(m)) != k[..])
            {
                migrate = true;
                old_keys.push(k);
            }
            for mark in bucket {
                if seen.insert(mark.key) {
                    marks.push(mark);
                }
            }
        }
        marks.sort_by_key(|m| m.at);
        record.sends = marks.into();
        if migrate {
            let mut writes: Writes = old_keys.into_iter().map(|k| (k.to_vec(), None)).collect();
            write_diff(&mut writes, &record, 0, &[]);
            let _writing = self.writing();
            self.t
                .accounts
                .transaction(|tree| {
                    apply(tree, writes.iter().map(|(k, v)| (k, v))).map_err(Into::into)
                })
                .map_err(StoreError::from)?;
        }
        Ok(stored(record))
    }

    /// The cached record of an account, read from the trees if not cached
    /// yet (the account log written out first, so that they are complete).
    fn cached_account<'a>(
        &self,
        accounts: &'a mut Accounts,
        name: &str,
    ) -> Result<&'a mut AccountRecord, StoreError> {
        if !accounts.records.contains_key(name) {
            self.write_out_log(&mut accounts.log)?;
            let record = self.load_account(name)?;
            accounts.records.insert(name.to_string(), record);
        }
        Ok(accounts.records.get_mut(name).expect("just inserted"))
    }

    /// Retires the log's oldest records it has no room for, in one batch
    /// (see [`AccountLog::retiring`]). A batch that fails leaves them in
    /// the log, and the next write tries again: whatever happens, the log
    /// holds every value its keys do not.
    fn retire(&self, log: &mut AccountLog) {
        let n = log.to_retire();
        if n == 0 {
            return;
        }
        let _writing = self.writing();
        match self.t.accounts.apply_batch(log.retiring(n)) {
            Ok(()) => log.retired(n),
            Err(e) => tracing::warn!("the account log could not be shortened: {e}"),
        }
    }

    /// Writes every logged value to its key and drops the log's records,
    /// in one transaction.
    fn write_out_log(&self, log: &mut AccountLog) -> Result<(), StoreError> {
        if log.records.is_empty() {
            return Ok(());
        }
        let written = &*log;
        let _writing = self.writing();
        self.t
            .accounts
            .transaction(|tree| written.write_out(tree).map_err(Into::into))
            .map_err(StoreError::from)?;
        log.written_out();
        Ok(())
    }

    /// Writes the account log a stopped host left to its keys (one
    /// transaction, so a crash meanwhile changes nothing). Run when the
    /// store opens, before any account is read.
    pub(super) fn replay_account_log(&self) -> Result<(), StoreError> {
        let mut guard = self.accounts.lock();
        let log = &mut guard.log;
        for e in self.t.accounts.scan_prefix([LOG]) {
            let (k, v) = e?;
            if k == LOG_NEXT[..] {
                let next = v[..].try_into().map(u64::from_be_bytes);
                log.next = log.next.max(next.map_err(|_| StoreError::Corrupt {
                    what: "account log",
                    reason: "its sequence number is cut short".into(),
                })?);
                continue;
            }
            let (seq, chunks) = match (k.get(1..9), k.get(9..)) {
                (Some(seq), Some([])) => (seq, Chunks::Whole),
                (Some(seq), Some(chunk)) if chunk.len() == 4 => {
                    let chunk = u32::from_be_bytes(chunk.try_into().expect("4 bytes"));
                    (seq, Chunks::Of(chunk + 1))
                }
                _ => {
                    return Err(StoreError::Corrupt {
                        what: "account log",
                        reason: "a key is not a sequence number and a chunk".into(),
                    })
                }
            };
            let seq = u64::from_be_bytes(seq.try_into().expect("8 bytes"));
            log.next = log.next.max(seq + 1);
            log.add(seq, decode_writes(&v)?, chunks);
        }
        self.write_out_log(log)
    }

    /// An account's record; a new one if the account never sent.
    pub fn account(&self, name: &str) -> Result<AccountRecord, StoreError> {
        let mut accounts = self.accounts.lock();
        Ok(self.cached_account(&mut accounts, name)?.clone())
    }

    /// An account's record if it has been read since the store opened:
    /// for views that must not wait for a cold read.
    pub fn account_if_read(&self, name: &str) -> Option<AccountRecord> {
        self.accounts.lock().records.get(name).cloned()
    }

    /// Reads, changes and writes an account's record; written only if `f`
    /// changed it.
    pub fn update_account<T>(
        &self,
        name: &str,
        f: &dyn Fn(&mut AccountRecord) -> T,
    ) -> Result<T, StoreError> {
        let mut guard = self.accounts.lock();
        let accounts = &mut *guard;
        let cached = self.cached_account(accounts, name)?;
        let mut record = cached.clone();
        let out = f(&mut record);
        if record.differs_from(cached) {
            let mut writes = Writes::new();
            write_changes(&mut writes, cached, &record);
            let log = &accounts.log;
            let chunks = {
                let _writing = self.writing();
                self.t
                    .accounts
                    .transaction(|tree| log.write(tree, &writes).map_err(Into::into))
                    .map_err(StoreError::from)?
            };
            accounts.log.committed(writes, chunks);
            accounts.records.insert(name.to_string(), stored(record));
            self.retire(&mut accounts.log);
        }
        Ok(out)
    }

    /// Runs `f` in a transaction over the dialog trees with the account's
    /// record to change; what `f` leaves in the record is written with the
    /// rest, and the cache updated once the transaction committed.
    pub(super) fn transact_with_account<T>(
        &self,
        name: &str,
        f: impl Fn(&Tx<'_>, &mut AccountRecord) -> TxResult<T>,
    ) -> Result<T, StoreError> {
        self.transact_with_accounts(&[name], |tx, records| f(tx, &mut records[0]))
    }

    /// [`Store::transact_with_account`] over several accounts (each named
    /// once): `f` gets their records in the order of `names`.
    ///
    /// `f` changes the cached records in place, not copies: their marks
    /// keep their base (see [`SendMarks`]), so what changed is written from
    /// them, and a run that fails puts each record back as it was first.
    /// A record whose base `f` replaced (new marks from scratch) cannot be
    /// put back: the cache forgets it, to read it again.
    pub(super) fn transact_with_accounts<T>(
        &self,
        names: &[&str],
        f: impl Fn(&Tx<'_>, &mut [AccountRecord]) -> TxResult<T>,
    ) -> Result<T, StoreError> {
        debug_assert!(
            names.iter().collect::<std::collections::HashSet<_>>().len() == names.len(),
            "an account named twice"
        );
        let mut guard = self.accounts.lock();
        let accounts = &mut *guard;
        let mut records = Vec::with_capacity(names.len());
        let mut heads = Vec::with_capacity(names.len());
        for name in names {
            self.cached_account(accounts, name)?;
            let record = accounts.records.remove(*name).expect("just cached");
            heads.push(head(&record));
            records.push(record);
        }
        let records = std::cell::RefCell::new(records);
        let log = &accounts.log;
        let result = self.transact(|tx| {
            let mut records = records.borrow_mut();
            let out = f(tx, &mut records)?;
            let mut writes = Writes::new();
            for (head, new) in heads.iter().zip(records.iter()) {
                debug_assert!(new.sends.base_rest().is_some(), "marks replaced in place");
                if new.differs_from(head) {
                    write_changes(&mut writes, head, new);
                }
            }
            let chunks = log.write(tx.accounts, &writes)?;
            Ok((out, writes, chunks))
        });
        let mut records = records.into_inner();
        let out = match result {
            Ok((out, writes, chunks)) => {
                if !writes.is_empty() {
                    accounts.log.committed(writes, chunks);
                    self.retire(&mut accounts.log);
                }
                Ok(out)
            }
            Err(e) => {
                roll_back(&mut records, &heads);
                Err(e)
            }
        };
        for record in records {
            if record.sends.base_rest().is_some() {
                accounts.records.insert(record.name.clone(), stored(record));
            }
        }
        out
    }

    /// Every stored account record.
    pub fn accounts(&self) -> Result<Vec<AccountRecord>, StoreError> {
        let is_record =
            |k: &[u8]| k.first() != Some(&LOG) && !k.contains(&OLD_MARK) && !k.contains(&BUCKET);
        // A record may be in the log only.
        let mut names: Vec<String> = (self.accounts.lock().log.values.keys())
            .filter(|k| is_record(k))
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect();
        for k in self.t.accounts.iter().keys() {
            let k = k?;
            if is_record(&k) {
                names.push(String::from_utf8_lossy(&k).into_owned());
            }
        }
        names.sort_unstable();
        names.dedup();
        names.into_iter().map(|n| self.account(&n)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn mark(at: i64, key: u64) -> SendMark {
        SendMark {
            at: Timestamp(at),
            opening: key % 2 == 0,
            key: IdempotencyKey(key),
        }
    }

    #[test]
    fn marks_survive_a_reopen_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .update_account("a", &|r| {
                    r.sends = vec![mark(5, 9), mark(7, 2), mark(9, 4)].into();
                    r.next_send_at = Timestamp(10);
                })
                .unwrap();
            // Drop one, move one, add one.
            store
                .update_account("a", &|r| {
                    r.sends.retain(|m| m.key != IdempotencyKey(9));
                    r.sends.set_at(0, Timestamp(8));
                    r.sends.push(mark(11, 1));
                })
                .unwrap();
            store
                .update_account("b", &|r| r.sends.push(mark(3, 3)))
                .unwrap();
            store.flush().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let a = store.account("a").unwrap();
        assert_eq!(a.sends[..], [mark(8, 2), mark(9, 4), mark(11, 1)]);
        assert_eq!(a.next_send_at, Timestamp(10));
        let names: Vec<String> = store
            .accounts()
            .unwrap()
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Take {
            at: i64,
        },
        Drop(usize),
        Move(usize, i64),
        /// The cache forgotten: read again from the trees.
        Reload,
        /// The store closed without a flush of the cache and opened again.
        Reopen,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0i64..2_000).prop_map(|at| Op::Take { at }),
            1 => any::<usize>().prop_map(Op::Drop),
            2 => (any::<usize>(), 0i64..2_000).prop_map(|(i, at)| Op::Move(i, at)),
            1 => Just(Op::Reload),
            1 => Just(Op::Reopen),
        ]
    }

    proptest::proptest! {
        /// Whatever the account operations do to the marks, writing only
        /// the changed tail stores them all: read back from the trees they
        /// are the marks the operations left.
        #[test]
        fn the_marks_read_back_are_the_marks_written(ops in proptest::collection::vec(op(), 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let mut store = Store::open(dir.path()).unwrap();
            let mut model: Vec<SendMark> = Vec::new();
            let mut next_key = 0u64;
            for op in ops {
                match op {
                    Op::Take { at } => {
                        next_key += 1;
                        let m = mark(at, next_key);
                        model.push(m);
                        store.update_account("a", &|r| r.sends.push(m)).unwrap();
                    }
                    Op::Drop(i) if !model.is_empty() => {
                        let key = model.remove(i % model.len()).key;
                        store.update_account("a", &|r| r.sends.retain(|m| m.key != key)).unwrap();
                    }
                    Op::Move(i, at) if !model.is_empty() => {
                        let i = i % model.len();
                        model[i].at = Timestamp(at);
                        let key = model[i].key;
                        store
                            .update_account("a", &|r| {
                                let j = r.sends.iter().position(|m| m.key == key).unwrap();
                                r.sends.set_at(j, Timestamp(at));
                            })
                            .unwrap();
                    }
                    Op::Reload => store.accounts.lock().records.clear(),
                    Op::Reopen => {
                        store.flush().unwrap();
                        drop(store);
                        store = Store::open(dir.path()).unwrap();
                        let log = store.t.accounts.scan_prefix(LOG_NEXT);
                        let records = log.keys().filter(|k| k.as_ref().unwrap().len() > 1);
                        proptest::prop_assert_eq!(records.count(), 0, "the log is written out on open");
                    }
                    _ => {}
                }
            }
            store.accounts.lock().records.clear();
            let mut read: Vec<SendMark> = store.account("a").unwrap().sends.to_vec();
            read.sort_by_key(|m| m.key);
            model.sort_by_key(|m| m.key);
            proptest::prop_assert_eq!(read, model);
        }
    }

    #[test]
    fn tracked_marks_know_where_they_changed() {
        let mut marks = SendMarks::from(vec![mark(3, 3), mark(1, 1), mark(2, 2)]);
        assert_eq!(
            marks[..],
            [mark(1, 1), mark(2, 2), mark(3, 3)],
            "in time order"
        );
        marks.rebase();
        assert!(!marks.changed());
        marks.set_at(1, Timestamp(5));
        assert_eq!(marks[..], [mark(1, 1), mark(3, 3), mark_at(5, 2)]);
        assert_eq!(marks.changed_from(), 1);
        assert_eq!(marks.base_rest(), Some(&[mark(2, 2), mark(3, 3)][..]));
        marks.rebase();
        marks.retain(|m| m.key != IdempotencyKey(2));
        assert!(marks.changed(), "the last mark dropped");
        assert_eq!(marks.changed_from(), 2);
        marks.rebase();
        marks.push(mark(9, 9));
        marks.push(mark(2, 4));
        assert_eq!(marks.changed_from(), 1);
        marks.retain(|_| true);
        assert_eq!(marks.changed_from(), 1);
        assert!(marks.roll_back());
        assert_eq!(marks[..], [mark(1, 1), mark(3, 3)]);
        assert!(!marks.changed());
        // Made from scratch, they replace whatever was there.
        let mut fresh = SendMarks::default();
        assert!(fresh.changed());
        assert!(!fresh.roll_back());
        fresh.rebase();
        assert!(!fresh.changed());
    }

    fn mark_at(at: i64, key: u64) -> SendMark {
        SendMark {
            at: Timestamp(at),
            ..mark(0, key)
        }
    }

    proptest::proptest! {
        /// Whatever changes the marks take, they stay in time order, their
        /// base is the marks as they were at the last rebase, rolling back
        /// gives those marks again, and they know which was taken last.
        #[test]
        fn marks_keep_their_order_and_their_base(ops in proptest::collection::vec(op(), 1..60)) {
            let mut marks = SendMarks::default();
            marks.rebase();
            let mut base: Vec<SendMark> = Vec::new();
            let (mut latest, mut base_latest) = (None, None);
            let mut next_key = 0;
            for op in ops {
                match op {
                    Op::Take { at } => {
                        next_key += 1;
                        marks.push(mark(at, next_key));
                        latest = Some(IdempotencyKey(next_key));
                    }
                    Op::Drop(i) if !marks.is_empty() => {
                        let key = marks[i % marks.len()].key;
                        marks.retain(|m| m.key != key);
                        if latest == Some(key) {
                            latest = marks.last().map(|m| m.key);
                        }
                    }
                    Op::Move(i, at) if !marks.is_empty() => marks.set_at(i % marks.len(), Timestamp(at)),
                    Op::Reload => {
                        marks.rebase();
                        base = marks.to_vec();
                        base_latest = latest;
                    }
                    Op::Reopen => {
                        proptest::prop_assert!(marks.roll_back());
                        proptest::prop_assert_eq!(&marks[..], &base[..]);
                        latest = base_latest;
                    }
                    _ => {}
                }
                proptest::prop_assert_eq!(marks.latest(), latest, "the mark taken last");
                proptest::prop_assert!(marks.windows(2).all(|w| w[0].at <= w[1].at));
                let from = marks.changed_from();
                let was: Vec<SendMark> = marks[..from].iter().chain(marks.base_rest().unwrap()).copied().collect();
                proptest::prop_assert_eq!(&was, &base);
            }
        }
    }

    proptest::proptest! {
        /// Galloping back from the end finds what a binary search finds.
        #[test]
        fn partition_from_end_is_partition_point(
            mut times in proptest::collection::vec(0i64..50, 0..80),
            cut in 0i64..52,
        ) {
            times.sort_unstable();
            let marks: Vec<SendMark> = times.iter().map(|&t| mark_at(t, 1)).collect();
            let before = |m: &SendMark| m.at.0 < cut;
            proptest::prop_assert_eq!(
                partition_from_end(&marks, before),
                marks.partition_point(before)
            );
        }
    }

    #[test]
    fn a_failed_transaction_leaves_its_accounts_as_they_were() {
        let store = Store::temporary().unwrap();
        store
            .update_account("a", &|r| r.sends.push(mark(1, 1)))
            .unwrap();
        let before = store.account("a").unwrap();
        let failed = store.transact_with_accounts(&["a", "b"], |_, records| {
            records[0].sends.push(mark(2, 2));
            records[0].sends.set_at(0, Timestamp(5));
            records[0].next_send_at = Timestamp(99);
            records[1].sends.push(mark(3, 3));
            super::super::abort::<()>(StoreError::Refused("no".into()))
        });
        assert!(failed.is_err());
        assert_eq!(store.account("a").unwrap(), before, "as cached");
        assert!(store.account("b").unwrap().sends.is_empty());
        store.accounts.lock().records.clear();
        assert_eq!(store.account("a").unwrap(), before, "as stored");
        store
            .transact_with_accounts(&["a"], |_, records| {
                records[0].sends.push(mark(3, 3));
                Ok(())
            })
            .unwrap();
        store.accounts.lock().records.clear();
        assert_eq!(
            store.account("a").unwrap().sends[..],
            [mark(1, 1), mark(3, 3)]
        );
    }

    #[test]
    fn a_log_record_of_many_accounts_is_chunked_and_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<String> = (0..400).map(|i| format!("account-{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .transact_with_accounts(&refs, |_, records| {
                    for (i, r) in records.iter_mut().enumerate() {
                        r.sends.push(mark(i as i64 * 1000, i as u64));
                        r.next_send_at = Timestamp(i as i64);
                    }
                    Ok(())
                })
                .unwrap();
            let log: Vec<_> = store.t.accounts.scan_prefix([LOG]).collect();
            assert!(log.len() > 3, "{} chunks", log.len());
            for e in &log {
                let (k, v) = e.as_ref().unwrap();
                assert!(v.len() <= CHUNK, "{} bytes under {k:?}", v.len());
            }
            store.flush().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        for (i, name) in names.iter().enumerate() {
            let r = store.account(name).unwrap();
            assert_eq!(r.sends[..], [mark(i as i64 * 1000, i as u64)]);
            assert_eq!(r.next_send_at, Timestamp(i as i64));
        }
        let left: Vec<_> = store.t.accounts.scan_prefix([LOG]).keys().collect();
        assert_eq!(left.len(), 1, "only the sequence number stays");
    }

    #[test]
    fn a_log_record_of_the_older_layout_is_replayed() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let mut record = AccountRecord::new("a");
            record.next_send_at = Timestamp(42);
            let mut writes = Writes::new();
            write_diff(&mut writes, &record, 0, &[]);
            let [whole] = &encode_writes(&writes)[..] else {
                panic!("one chunk")
            };
            let key = log_keys(7, Chunks::Whole).next().unwrap();
            store.t.accounts.insert(key, &whole[..]).unwrap();
            store.flush().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.account("a").unwrap().next_send_at, Timestamp(42));
        assert_eq!(store.t.accounts.scan_prefix([LOG]).count(), 1);
        assert_eq!(store.accounts.lock().log.next, 8);
    }

    #[test]
    fn a_record_of_the_older_layout_keeps_its_marks() {
        let store = Store::temporary().unwrap();
        let mut old = AccountRecord::new("a");
        old.sends = vec![mark(1, 1), mark(2, 2)].into();
        store
            .t
            .accounts
            .insert("a", super::super::encode_json(&old))
            .unwrap();
        assert_eq!(store.account("a").unwrap().sends, old.sends);
        // The next change moves them out of the record, and the record
        // into the binary layout.
        store
            .update_account("a", &|r| r.sends.push(mark(3, 3)))
            .unwrap();
        store.accounts.lock().records.clear();
        assert_eq!(store.account("a").unwrap().sends.len(), 3);
        store.flush().unwrap();
        let stored = store.t.accounts.get("a").unwrap().unwrap();
        assert_ne!(stored[0], super::super::records::JSON);
    }

    #[test]
    fn marks_of_one_key_each_move_into_buckets() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            for m in [mark(5, 9), mark(700_000, 2)] {
                let mut k = prefix("a", OLD_MARK);
                k.extend_from_slice(&m.key.0.to_be_bytes());
                let mut v = m.at.0.to_be_bytes().to_vec();
                v.push(u8::from(m.opening));
                store.t.accounts.insert(k, v).unwrap();
            }
            assert_eq!(
                store.account("a").unwrap().sends[..],
                [mark(5, 9), mark(700_000, 2)]
            );
            store.flush().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let keys: Vec<_> = store.t.accounts.iter().keys().map(|k| k.unwrap()).collect();
        assert!(
            keys.iter().all(|k| !k.starts_with(&prefix("a", OLD_MARK))),
            "{keys:?}"
        );
        assert_eq!(keys.len(), 3, "the record and two buckets");
        assert_eq!(
            store.account("a").unwrap().sends[..],
            [mark(5, 9), mark(700_000, 2)]
        );
    }

    #[test]
    fn marks_of_ten_minute_buckets_move_into_the_current_ones() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            // Two marks of one ten-minute bucket, as that layout wrote them.
            let mut value = Vec::new();
            for m in [mark(5, 9), mark(7_000, 2)] {
                value.extend_from_slice(&m.key.0.to_be_bytes());
                value.extend_from_slice(&m.at.0.to_be_bytes());
                value.push(u8::from(m.opening));
            }
            store.t.accounts.insert(bucket_key("a", 0), value).unwrap();
            assert_eq!(
                store.account("a").unwrap().sends[..],
                [mark(5, 9), mark(7_000, 2)]
            );
            store.flush().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let buckets: Vec<_> = store
            .t
            .accounts
            .scan_prefix(prefix("a", BUCKET))
            .map(|e| e.unwrap())
            .collect();
        assert_eq!(buckets.len(), 2, "one bucket per tenth of a second");
        for (k, v) in &buckets {
            for m in read_bucket(v).unwrap() {
                assert_eq!(bucket_key("a", bucket_of(&m)), k[..]);
            }
        }
        assert_eq!(
            store.account("a").unwrap().sends[..],
            [mark(5, 9), mark(7_000, 2)]
        );
    }
}
