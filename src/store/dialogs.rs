//! Dialogs and their messages: opening, the conductor's and reviver's
//! changes (each one [`transition`] written by [`Tx::write`]), reads, and
//! blocking an account's dialogs.

use super::*;

impl Store {
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
    pub(super) fn message_at(
        &self,
        dialog: DialogId,
        seq: u64,
    ) -> Result<Option<Message>, StoreError> {
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
