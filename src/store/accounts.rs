//! Account records. The record itself (status, pauses, next send) is one
//! small key in `accounts`; the sends that still count against a limit sit
//! beside it in buckets of a tenth of a second (`name ++ 0x01 ++ bucket`,
//! a list of 17-byte marks), so a burst of sends rewrites a few small values
//! instead of adding a key each, and an account sending thousands a second
//! still rewrites a few dozen marks a batch. Records are read through a
//! cache whose lock also orders the writers of an account. An older layout
//! kept one key per mark (`name ++ 0x00 ++ idempotency key`), a later one
//! buckets of ten minutes; their marks are moved into the current buckets
//! on first read.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use serde::Serialize;
use sled::transaction::{TransactionalTree, UnabortableTransactionError};

use super::{decode, encode, Store, StoreError, Tx, TxResult};
use crate::clock::Timestamp;
use crate::model::{AccountRecord, AccountStatus, IdempotencyKey, SendMark, SendMarks};

/// The cached account records, complete with their send marks.
#[derive(Default)]
pub(super) struct AccountCache(Mutex<HashMap<String, AccountRecord>>);

impl AccountCache {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, AccountRecord>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The record as stored: everything but the send marks.
#[derive(Serialize)]
struct StoredRecord<'a> {
    name: &'a str,
    status: &'a AccountStatus,
    first_send_at: Option<Timestamp>,
    next_send_at: Timestamp,
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

/// Writes what changed from `old` to `new`: the record (a few bytes), and
/// every bucket in which a mark was added, moved or dropped. `new` is `old`
/// changed through [`SendMarks`]' methods since its base was `old`'s marks,
/// so the marks before `new.sends.changed_from()` are `old`'s; from there,
/// the account operations only drop marks, change them in place and
/// append, so one ordered pass over the rest finds the difference.
fn write_diff(
    accounts: &TransactionalTree,
    old: &AccountRecord,
    new: &AccountRecord,
) -> Result<(), UnabortableTransactionError> {
    accounts.insert(
        new.name.as_bytes(),
        encode(&StoredRecord {
            name: &new.name,
            status: &new.status,
            first_send_at: new.first_send_at,
            next_send_at: new.next_send_at,
        }),
    )?;
    let same = new.sends.changed_from();
    debug_assert!(old.sends.len() >= same && old.sends[..same] == new.sends[..same]);
    let mut touched: Vec<u64> = Vec::new();
    let (mut i, mut j) = (same, same);
    while i < old.sends.len() && j < new.sends.len() {
        let (o, n) = (&old.sends[i], &new.sends[j]);
        if o.key == n.key {
            if o != n {
                touched.extend([bucket_of(o), bucket_of(n)]);
            }
            i += 1;
            j += 1;
        } else {
            touched.push(bucket_of(o));
            i += 1;
        }
    }
    touched.extend(old.sends[i..].iter().map(bucket_of));
    touched.extend(new.sends[j..].iter().map(bucket_of));
    touched.sort_unstable();
    touched.dedup();
    // Every touched bucket's marks in one pass over the account's marks;
    // most marks are older than any touched bucket.
    let mut values: Vec<Vec<u8>> = vec![Vec::new(); touched.len()];
    let since = match touched.first() {
        // Bucket 0 holds every mark before 1970 too.
        Some(0) => i64::MIN,
        Some(b) => *b as i64 * BUCKET_MS,
        None => i64::MAX,
    };
    for m in new.sends.iter() {
        if m.at.0 < since {
            continue;
        }
        if let Ok(i) = touched.binary_search(&bucket_of(m)) {
            let value = &mut values[i];
            value.extend_from_slice(&m.key.0.to_be_bytes());
            value.extend_from_slice(&m.at.0.to_be_bytes());
            value.push(u8::from(m.opening));
        }
    }
    for (bucket, value) in touched.into_iter().zip(values) {
        let key = bucket_key(&new.name, bucket);
        if value.is_empty() {
            accounts.remove(key)?;
        } else {
            accounts.insert(key, value)?;
        }
    }
    Ok(())
}

impl Tx<'_> {
    /// Writes an account record changed inside this transaction.
    pub(super) fn write_account(
        &self,
        old: &AccountRecord,
        new: &AccountRecord,
    ) -> Result<(), UnabortableTransactionError> {
        write_diff(self.accounts, old, new)
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
            Some(b) => decode::<AccountRecord>("account", &b)?,
            None => AccountRecord::new(name),
        };
        let mut old_keys = Vec::new();
        for e in self.t.accounts.scan_prefix(prefix(name, OLD_MARK)) {
            let (k, v) = e?;
            let mark = read_old_mark(&k, &v)?;
            if !record.sends.iter().any(|s| s.key == mark.key) {
                record.sends.push(mark);
            }
            old_keys.push(k);
        }
        let mut migrate = !record.sends.is_empty();
        for e in self.t.accounts.scan_prefix(prefix(name, BUCKET)) {
            let (k, v) = e?;
            let marks = read_bucket(&v)?;
            // A bucket of another length: its marks move to their own.
            if marks
                .iter()
                .any(|m| bucket_key(name, bucket_of(m)) != k[..])
            {
                migrate = true;
                old_keys.push(k);
            }
            for mark in marks {
                if !record.sends.iter().any(|s| s.key == mark.key) {
                    record.sends.push(mark);
                }
            }
        }
        record.sends.sort_by_time();
        if migrate {
            let stripped = AccountRecord {
                sends: SendMarks::default(),
                ..record.clone()
            };
            self.t
                .accounts
                .transaction(|accounts| {
                    for k in &old_keys {
                        accounts.remove(k)?;
                    }
                    write_diff(accounts, &stripped, &record).map_err(Into::into)
                })
                .map_err(StoreError::from)?;
        }
        Ok(stored(record))
    }

    fn cached_account<'a>(
        &self,
        cache: &'a mut HashMap<String, AccountRecord>,
        name: &str,
    ) -> Result<&'a mut AccountRecord, StoreError> {
        if !cache.contains_key(name) {
            let record = self.load_account(name)?;
            cache.insert(name.to_string(), record);
        }
        Ok(cache.get_mut(name).expect("just inserted"))
    }

    /// An account's record; a new one if the account never sent.
    pub fn account(&self, name: &str) -> Result<AccountRecord, StoreError> {
        let mut cache = self.accounts.lock();
        Ok(self.cached_account(&mut cache, name)?.clone())
    }

    /// Reads, changes and writes an account's record; written only if `f`
    /// changed it.
    pub fn update_account<T>(
        &self,
        name: &str,
        f: &dyn Fn(&mut AccountRecord) -> T,
    ) -> Result<T, StoreError> {
        let mut cache = self.accounts.lock();
        let cached = self.cached_account(&mut cache, name)?;
        let mut record = cached.clone();
        let out = f(&mut record);
        if record.differs_from(cached) {
            let before: &AccountRecord = cached;
            self.t
                .accounts
                .transaction(|accounts| write_diff(accounts, before, &record).map_err(Into::into))
                .map_err(StoreError::from)?;
            *cached = stored(record);
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

    /// [`Store::transact_with_account`] over several accounts: `f` gets
    /// their records in the order of `names`.
    pub(super) fn transact_with_accounts<T>(
        &self,
        names: &[&str],
        f: impl Fn(&Tx<'_>, &mut [AccountRecord]) -> TxResult<T>,
    ) -> Result<T, StoreError> {
        let mut cache = self.accounts.lock();
        for name in names {
            self.cached_account(&mut cache, name)?;
        }
        let before: Vec<&AccountRecord> = names.iter().map(|n| &cache[*n]).collect();
        let (out, after) = self.transact(|tx| {
            let mut records: Vec<AccountRecord> = before.iter().map(|r| (*r).clone()).collect();
            let out = f(tx, &mut records)?;
            for (old, new) in before.iter().zip(&records) {
                if new.differs_from(old) {
                    tx.write_account(old, new)?;
                }
            }
            Ok((out, records))
        })?;
        for (name, record) in names.iter().zip(after) {
            cache.insert((*name).to_string(), stored(record));
        }
        Ok(out)
    }

    /// Every stored account record.
    pub fn accounts(&self) -> Result<Vec<AccountRecord>, StoreError> {
        let mut names = Vec::new();
        for k in self.t.accounts.iter().keys() {
            let k = k?;
            if !k.contains(&OLD_MARK) && !k.contains(&BUCKET) {
                names.push(String::from_utf8_lossy(&k).into_owned());
            }
        }
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
        Take { at: i64 },
        Drop(usize),
        Move(usize, i64),
        Reload,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0i64..2_000).prop_map(|at| Op::Take { at }),
            1 => any::<usize>().prop_map(Op::Drop),
            2 => (any::<usize>(), 0i64..2_000).prop_map(|(i, at)| Op::Move(i, at)),
            1 => Just(Op::Reload),
        ]
    }

    proptest::proptest! {
        /// Whatever the account operations do to the marks, writing only
        /// the changed tail stores them all: read back from the trees they
        /// are the marks the operations left.
        #[test]
        fn the_marks_read_back_are_the_marks_written(ops in proptest::collection::vec(op(), 1..40)) {
            let store = Store::temporary().unwrap();
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
                    Op::Reload => store.accounts.lock().clear(),
                    _ => {}
                }
            }
            store.accounts.lock().clear();
            let mut read: Vec<SendMark> = store.account("a").unwrap().sends.to_vec();
            read.sort_by_key(|m| m.key);
            model.sort_by_key(|m| m.key);
            proptest::prop_assert_eq!(read, model);
        }
    }

    #[test]
    fn tracked_marks_know_where_they_changed() {
        let mut marks = SendMarks::from(vec![mark(1, 1), mark(2, 2), mark(3, 3)]);
        marks.rebase();
        assert!(!marks.changed());
        marks.set_at(1, Timestamp(5));
        assert_eq!(marks.changed_from(), 1);
        marks.rebase();
        marks.retain(|m| m.key != IdempotencyKey(3));
        assert!(marks.changed(), "the last mark dropped");
        assert_eq!(marks.changed_from(), 2);
        marks.rebase();
        marks.push(mark(9, 9));
        assert_eq!(marks.changed_from(), 2);
        marks.retain(|_| true);
        assert_eq!(marks.changed_from(), 2);
        // Made from scratch, they replace whatever was there.
        let mut fresh = SendMarks::default();
        assert!(fresh.changed());
        fresh.rebase();
        assert!(!fresh.changed());
    }

    #[test]
    fn a_record_of_the_older_layout_keeps_its_marks() {
        let store = Store::temporary().unwrap();
        let mut old = AccountRecord::new("a");
        old.sends = vec![mark(1, 1), mark(2, 2)].into();
        store.t.accounts.insert("a", encode(&old)).unwrap();
        assert_eq!(store.account("a").unwrap().sends, old.sends);
        // The next change moves them out of the record.
        store
            .update_account("a", &|r| r.sends.push(mark(3, 3)))
            .unwrap();
        store.accounts.lock().clear();
        assert_eq!(store.account("a").unwrap().sends.len(), 3);
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
