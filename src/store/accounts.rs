//! Account records. The record itself (status, pauses, next send) is one
//! small key in `accounts`; every send that still counts against a limit is
//! its own nine-byte key beside it (`name ++ 0x00 ++ idempotency key`), so a
//! send writes a few bytes instead of rewriting the day's list. Records are
//! read through a cache whose lock also orders the writers of an account.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use serde::Serialize;
use sled::transaction::{TransactionalTree, UnabortableTransactionError};

use super::{decode, encode, Store, StoreError, Tx, TxResult};
use crate::clock::Timestamp;
use crate::model::{AccountRecord, AccountStatus, IdempotencyKey, SendMark};

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

fn mark_prefix(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + 9);
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k
}

fn mark_key(name: &str, key: IdempotencyKey) -> Vec<u8> {
    let mut k = mark_prefix(name);
    k.extend_from_slice(&key.0.to_be_bytes());
    k
}

fn mark_value(m: &SendMark) -> [u8; 9] {
    let mut v = [0u8; 9];
    v[..8].copy_from_slice(&m.at.0.to_be_bytes());
    v[8] = u8::from(m.opening);
    v
}

fn read_mark(key: &[u8], value: &[u8]) -> Result<SendMark, StoreError> {
    let corrupt = || StoreError::Corrupt {
        what: "send mark",
        reason: format!("{} bytes", value.len()),
    };
    let id: [u8; 8] = key[key.len().saturating_sub(8)..]
        .try_into()
        .map_err(|_| corrupt())?;
    let at: [u8; 8] = value
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(corrupt)?;
    Ok(SendMark {
        at: Timestamp(i64::from_be_bytes(at)),
        opening: value.get(8) == Some(&1),
        key: IdempotencyKey(u64::from_be_bytes(id)),
    })
}

/// Writes what changed from `old` to `new`: the record (a few bytes), and
/// the marks added, moved or dropped. The account operations
/// only drop marks, change them in place and append, so one ordered pass
/// finds the difference.
fn write_diff(
    accounts: &TransactionalTree,
    old: &AccountRecord,
    new: &AccountRecord,
) -> Result<(), UnabortableTransactionError> {
    {
        accounts.insert(
            new.name.as_bytes(),
            encode(&StoredRecord {
                name: &new.name,
                status: &new.status,
                first_send_at: new.first_send_at,
                next_send_at: new.next_send_at,
            }),
        )?;
    }
    let (mut i, mut j) = (0, 0);
    while i < old.sends.len() && j < new.sends.len() {
        let (o, n) = (&old.sends[i], &new.sends[j]);
        if o.key == n.key {
            if o != n {
                accounts.insert(mark_key(&new.name, n.key), &mark_value(n))?;
            }
            i += 1;
            j += 1;
        } else {
            accounts.remove(mark_key(&old.name, o.key))?;
            i += 1;
        }
    }
    for o in &old.sends[i..] {
        accounts.remove(mark_key(&old.name, o.key))?;
    }
    for n in &new.sends[j..] {
        accounts.insert(mark_key(&new.name, n.key), &mark_value(n))?;
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

impl Store {
    /// Reads an account from the trees: the record (an older layout kept
    /// its marks inside it) and its marks, oldest first.
    fn load_account(&self, name: &str) -> Result<AccountRecord, StoreError> {
        let mut record = match self.t.accounts.get(name.as_bytes())? {
            Some(b) => decode::<AccountRecord>("account", &b)?,
            None => AccountRecord::new(name),
        };
        if !record.sends.is_empty() {
            // The older layout: move the marks out of the record.
            let stripped = AccountRecord {
                sends: Vec::new(),
                ..record.clone()
            };
            self.t
                .accounts
                .transaction(|accounts| {
                    write_diff(accounts, &stripped, &record).map_err(Into::into)
                })
                .map_err(StoreError::from)?;
        }
        for e in self.t.accounts.scan_prefix(mark_prefix(name)) {
            let (k, v) = e?;
            let mark = read_mark(&k, &v)?;
            if !record.sends.iter().any(|s| s.key == mark.key) {
                record.sends.push(mark);
            }
        }
        record.sends.sort_by_key(|s| s.at);
        Ok(record)
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
        if record != *cached {
            let before: &AccountRecord = cached;
            self.t
                .accounts
                .transaction(|accounts| write_diff(accounts, before, &record).map_err(Into::into))
                .map_err(StoreError::from)?;
            *cached = record;
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
                if new != *old {
                    tx.write_account(old, new)?;
                }
            }
            Ok((out, records))
        })?;
        for (name, record) in names.iter().zip(after) {
            cache.insert((*name).to_string(), record);
        }
        Ok(out)
    }

    /// Every stored account record.
    pub fn accounts(&self) -> Result<Vec<AccountRecord>, StoreError> {
        let mut names = Vec::new();
        for k in self.t.accounts.iter().keys() {
            let k = k?;
            if !k.contains(&0) {
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
                    r.sends = vec![mark(5, 9), mark(7, 2), mark(9, 4)];
                    r.next_send_at = Timestamp(10);
                })
                .unwrap();
            // Drop one, move one, add one.
            store
                .update_account("a", &|r| {
                    r.sends.remove(0);
                    r.sends[0].at = Timestamp(8);
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
        assert_eq!(a.sends, vec![mark(8, 2), mark(9, 4), mark(11, 1)]);
        assert_eq!(a.next_send_at, Timestamp(10));
        let names: Vec<String> = store
            .accounts()
            .unwrap()
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn a_record_of_the_older_layout_keeps_its_marks() {
        let store = Store::temporary().unwrap();
        let mut old = AccountRecord::new("a");
        old.sends = vec![mark(1, 1), mark(2, 2)];
        store.t.accounts.insert("a", encode(&old)).unwrap();
        assert_eq!(store.account("a").unwrap().sends, old.sends);
        // The next change moves them out of the record.
        store
            .update_account("a", &|r| r.sends.push(mark(3, 3)))
            .unwrap();
        store.accounts.lock().clear();
        assert_eq!(store.account("a").unwrap().sends.len(), 3);
    }
}
