//! The slot a send needs. AccountSafety makes a [`Slot`] when an account's
//! limits let a message go now, and nothing else can: its fields are
//! private and its maker is this module's parent's. A transport's
//! outgoing message holds a [`Granted`], which only a slot turns into (in
//! `AccountSafety::send`), so no message reaches a transport without the
//! slot its account's limits gave it.

use crate::model::IdempotencyKey;

/// Leave to send one message of `account` under `key` now: the slot the
/// account's limits gave it, held in the account's record. A slot is sent
/// on (`AccountSafety::send`) or given back (`AccountSafety::release`).
#[derive(Debug)]
#[must_use = "a slot is sent on or given back"]
pub struct Slot {
    account: String,
    key: IdempotencyKey,
}

impl Slot {
    pub(super) fn new(account: &str, key: IdempotencyKey) -> Slot {
        Slot {
            account: account.to_string(),
            key,
        }
    }

    pub fn account(&self) -> &str {
        &self.account
    }

    pub fn key(&self) -> IdempotencyKey {
        self.key
    }

    /// The slot's account and key, as its message carries them, with the
    /// proof that the message holds a slot.
    pub(super) fn grant(self) -> (String, IdempotencyKey, Granted) {
        (self.account, self.key, Granted(()))
    }
}

/// The proof a transport's outgoing message carries that its slot was
/// taken: made only from a [`Slot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted(());
