//! Batched writes of the answer pipeline (`host::answer`): a batch of
//! incoming messages and the engine's answers in one transaction, the slots
//! of a batch's replies in one, and their confirmations in one. Each writes
//! exactly the records the one-at-a-time operations write, so a dialog can
//! move between the pipeline and its conductor at any point.

use super::keys::*;
use super::*;

/// An incoming message of a dialog with the engine's answer to it; see
/// [`Store::answer_batch`].
#[derive(Debug)]
pub struct Answer<'a> {
    pub dialog: DialogId,
    /// The dialog's `next_seq` when the engine was asked. If it moved on,
    /// the answer is stale: the message is stored unanswered instead.
    pub seen_seq: u64,
    pub account: &'a str,
    pub transport_id: i64,
    pub text: &'a str,
    pub at: Timestamp,
    /// When the answer is recorded.
    pub now: Timestamp,
    /// What the engine answered; `None` when it failed (the message is
    /// stored as handled, and the caller fails the dialog).
    pub reply: Option<Replied<'a>>,
    /// The replies may take their slots now (the caller holds the
    /// account's lock and the dialog's gate).
    pub reserve: bool,
}

/// The engine's answer to be recorded.
#[derive(Debug)]
pub struct Replied<'a> {
    pub state: &'a serde_json::Value,
    pub outbound: &'a [Outbound],
    /// The status to take once the replies are sent.
    pub ending: Option<DialogStatus>,
}

/// What [`Store::answer_batch`] did with one answer.
#[derive(Debug)]
pub enum Answered {
    /// The transport id was stored before: nothing was written.
    Duplicate,
    /// The dialog changed since the engine was asked: the message is stored
    /// unhandled, for the dialog's conductor.
    Stale,
    /// Stored and answered; `replies` are recorded as pending, and the
    /// first `slots` of them hold a slot of their account.
    Done {
        dialog: Box<Dialog>,
        incoming: Message,
        replies: Vec<Message>,
        slots: usize,
    },
}

/// A reply the transport took, to confirm; see [`Store::settle_batch`].
#[derive(Debug, Clone)]
pub struct Settle {
    pub account: String,
    pub key: IdempotencyKey,
    pub delivered: crate::transport::Delivered,
}

impl Store {
    /// The contact id of an identity, without reading the contact.
    pub fn contact_id_of(&self, identity: &Identity) -> Result<Option<ContactId>, StoreError> {
        Ok(self
            .t
            .identities
            .get(identity.key().as_bytes())?
            .map(|id| read_u64(&id)))
    }

    /// Catches a dialog's place in the quiet-dialogs index up with its last
    /// activity.
    pub fn reindex(&self, dialog: DialogId) -> Result<(), StoreError> {
        self.transact(|tx| {
            let d = tx.dialog(dialog)?;
            tx.put_dialog(Some(&d), &d)?;
            Ok(())
        })
    }

    /// Whether a message is recorded and not yet sent or cancelled.
    pub fn is_pending(&self, key: IdempotencyKey) -> Result<bool, StoreError> {
        Ok(self.t.outbox.contains_key(u64_key(key.0))?)
    }

    /// Whether a dialog has incoming messages stored and not yet handled.
    pub fn has_unhandled(&self, dialog: DialogId) -> Result<bool, StoreError> {
        Ok(self
            .t
            .unhandled
            .scan_prefix(u64_key(dialog))
            .next()
            .transpose()?
            .is_some())
    }

    /// Stores a batch of incoming messages with their answers in one
    /// transaction: each message is stored (once per transport id), marked
    /// handled, and the engine's state, replies (pending, in the outbox)
    /// and ending recorded, as [`Store::record_inbound`] followed by
    /// [`Store::apply`] would. A dialog that is no longer live, or moved on
    /// since its engine was asked, gets its message stored unhandled.
    ///
    /// `reserve` takes a reply's slot on its account's record, or says no;
    /// `accounts` (sorted) names every account it may be asked for. The
    /// quiet-dialogs index is left behind (see [`Dialog::indexed_at`]).
    pub fn answer_batch(
        &self,
        answers: &[Answer<'_>],
        accounts: &[&str],
        reserve: &dyn Fn(&mut AccountRecord, IdempotencyKey) -> bool,
    ) -> Result<Vec<Answered>, StoreError> {
        self.transact_with_accounts(accounts, |tx, records| {
            let mut out = Vec::with_capacity(answers.len());
            for a in answers {
                let old = tx.dialog(a.dialog)?;
                if tx.seen_incoming(&old, a.account, a.transport_id)? {
                    out.push(Answered::Duplicate);
                    continue;
                }
                let mut new = old.clone();
                let incoming = tx.append(
                    &mut new,
                    Message {
                        dialog: a.dialog,
                        seq: 0,
                        direction: Direction::In,
                        kind: None,
                        text: a.text.to_string(),
                        at: a.at,
                        key: None,
                        delivery: None,
                        transport_id: Some(a.transport_id),
                    },
                )?;
                tx.note_incoming(&old, a.account, a.transport_id, incoming.seq)?;
                let at_key = pair(u64_key(a.dialog), u64_key(incoming.seq));
                let fresh =
                    old.next_seq == a.seen_seq && old.status.is_live() && old.ending.is_none();
                let Some(reply) = a.reply.as_ref().filter(|_| fresh) else {
                    if !fresh {
                        tx.unhandled.insert(&at_key, &[])?;
                    }
                    tx.put_dialog_lazily(&old, &new)?;
                    out.push(if fresh {
                        Answered::Done {
                            dialog: Box::new(new),
                            incoming,
                            replies: Vec::new(),
                            slots: 0,
                        }
                    } else {
                        Answered::Stale
                    });
                    continue;
                };
                let replies = tx.record_answer(
                    &mut new,
                    Some(reply.state),
                    reply.outbound,
                    reply.ending.as_ref(),
                    a.now,
                )?;
                tx.put_dialog_lazily(&old, &new)?;
                let mut slots = 0;
                if let (true, Ok(i)) = (a.reserve, accounts.binary_search(&new.account.as_str())) {
                    slots = replies
                        .iter()
                        .take_while(|m| m.key.is_some_and(|k| reserve(&mut records[i], k)))
                        .count();
                }
                out.push(Answered::Done {
                    dialog: Box::new(new),
                    incoming,
                    replies,
                    slots,
                });
            }
            Ok(out)
        })
    }

    /// Marks a batch of sent messages sent and confirms their slots at the
    /// transport's time, in one transaction (as [`Store::settle_sent`] does
    /// for one): each leaves the outbox, and reads back as sent without its
    /// page being rewritten (the transport's id of a reply is not kept). A
    /// key no longer in the outbox is skipped.
    pub fn settle_batch(
        &self,
        sent: &[Settle],
        confirm: &dyn Fn(&mut AccountRecord, &Settle),
    ) -> Result<(), StoreError> {
        let mut accounts: Vec<&str> = sent.iter().map(|s| s.account.as_str()).collect();
        accounts.sort_unstable();
        accounts.dedup();
        self.transact_with_accounts(&accounts, |tx, records| {
            for s in sent {
                // Out of the outbox is sent: the page keeps the message
                // as recorded (see `Store::settled`).
                if tx.outbox.remove(&u64_key(s.key.0))?.is_none() {
                    continue;
                }
                if let Ok(i) = accounts.binary_search(&s.account.as_str()) {
                    confirm(&mut records[i], s);
                }
            }
            Ok(())
        })
    }
}
