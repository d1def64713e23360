//! A transaction over the dialog trees ([`Store::transact`]) and [`Tx`],
//! the one way a transaction changes a dialog ([`Tx::write`]).

use super::*;

/// Where [`Tx::write`] puts the keys of the messages a change records as
/// pending.
pub(super) enum Queue<'f> {
    /// In the outbox.
    Outbox,
    /// The first `n` among a batch's replies in flight, the rest in the
    /// outbox.
    Flight(&'f mut Vec<FlightReply>, usize),
    /// Nowhere: they were queued when the journal's answer was first
    /// written.
    Journaled,
}

/// The trees a dialog change touches, inside one transaction.
pub(super) struct Tx<'a> {
    pub(super) contacts: &'a TransactionalTree,
    pub(super) uncontacted: &'a TransactionalTree,
    pub(super) do_not_contact: &'a TransactionalTree,
    pub(super) dialogs: &'a TransactionalTree,
    pub(super) by_status: &'a TransactionalTree,
    /// The moves in the quiet-dialogs index this transaction made, to make
    /// once it committed (see [`Tx::move_quiet`]).
    pub(super) quiet_moves: std::cell::RefCell<Vec<QuietMove>>,
    pub(super) dialog_of_contact: &'a TransactionalTree,
    pub(super) messages: &'a TransactionalTree,
    pub(super) outbox: &'a TransactionalTree,
    pub(super) flights: &'a TransactionalTree,
    pub(super) journal: &'a TransactionalTree,
    /// The replies in flight (see [`FlightKeys`]).
    pub(super) flight_keys: &'a FlightKeys,
    /// The answer pipeline's deferred records (see `deferred.rs`), and
    /// what this transaction did to them.
    pub(super) deferred: &'a Deferred,
    pub(super) local: std::cell::RefCell<deferred::Local>,
    pub(super) touched: &'a Touched,
    pub(super) inbound: &'a TransactionalTree,
    pub(super) unhandled: &'a TransactionalTree,
    pub(super) accounts: &'a TransactionalTree,
}

impl Tx<'_> {
    pub(super) fn pages(&self) -> Pages<'_, '_> {
        Pages(self)
    }

    /// Whether an incoming message was stored before: among the dialog's
    /// own messages when it came to the dialog's account, else in the
    /// `inbound` index.
    pub(super) fn seen_incoming(
        &self,
        dialog: &Dialog,
        account: &str,
        transport_id: i64,
    ) -> TxResult<bool> {
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
    pub(super) fn note_incoming(
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

    pub(super) fn dialog(&self, id: DialogId) -> TxResult<Dialog> {
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
    pub(super) fn put_dialog(
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
    pub(super) fn write(
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
            if self.is_pending(key)? {
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
    pub(super) fn unhandled_incoming(
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
    pub(super) fn still_waiting(&self, keys: &[IdempotencyKey]) -> TxResult<Vec<Message>> {
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
    pub(super) fn cancel(&self, keys: &[IdempotencyKey], reason: &str) -> TxResult<()> {
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
    pub(super) fn settle(
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
    pub(super) fn change(
        &self,
        id: DialogId,
        event: Event<'_>,
    ) -> TxResult<(Dialog, Vec<Message>)> {
        let old = self.dialog(id)?;
        let mut change = refused(transition::apply(old.clone(), event))?;
        self.write(Some(&old), &mut change, Queue::Outbox, false)?;
        Ok((change.dialog, change.appended))
    }

    /// Moves a dialog in the quiet-dialogs index from `from` to `to` once
    /// the transaction committed.
    pub(super) fn move_quiet(&self, id: DialogId, from: Option<Timestamp>, to: Option<Timestamp>) {
        self.quiet_moves.borrow_mut().push(QuietMove {
            from: from.map(|t| (t, id)),
            to: to.map(|t| (t, id)),
        });
    }

    /// Makes a contact pickable again in its audiences.
    pub(super) fn relist_contact(&self, id: ContactId) -> TxResult<()> {
        if let Some(bytes) = self.contacts.get(u64_key(id))? {
            let contact = tx_read(decode_contact, &bytes)?;
            for audience in &contact.audiences {
                self.uncontacted
                    .insert(uncontacted_key(audience, contact.pick_key, id), &[])?;
            }
        }
        Ok(())
    }

    pub(super) fn unlist_contact(
        &self,
        contact: &Contact,
    ) -> Result<(), UnabortableTransactionError> {
        for audience in &contact.audiences {
            self.uncontacted
                .remove(uncontacted_key(audience, contact.pick_key, contact.id))?;
        }
        Ok(())
    }
}

impl Store {
    /// Runs `f` over the dialog trees in one transaction, once: our
    /// writer runs transactions one at a time, so sled has no conflict to
    /// run one again for, and a second run is refused rather than let the
    /// records mirrored in memory follow two runs of it.
    pub(super) fn transact<T>(&self, f: impl Fn(&Tx<'_>) -> TxResult<T>) -> Result<T, StoreError> {
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
        let (out, quiet_moves, deferred) =
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
                    deferred: &self.deferred,
                    local: Default::default(),
                    touched: &self.touched,
                    inbound: i,
                    unhandled: un,
                    accounts: acc,
                };
                let out = f(&tx)?;
                let deferred = tx.finish_deferred()?;
                Ok((out, tx.quiet_moves.take(), deferred))
            })?;
        // What the transaction did to the records mirrored in memory, now
        // that it committed.
        self.deferred.apply(deferred);
        self.quiet.apply(quiet_moves);
        Ok(out)
    }
}
