//! Batched writes of the answer pipeline (`host::answer`): a batch of
//! incoming messages and the engine's answers in one transaction, the slots
//! of a batch's replies in one, and their confirmations in one. Each writes
//! exactly the records the one-at-a-time operations write, so a dialog can
//! move between the pipeline and its conductor at any point.
//!
//! Replies in flight: a reply the pipeline sends at once is recorded as
//! pending in its page like any other, but its key goes in one `flights`
//! record for the whole batch instead of an outbox entry each, and its
//! confirmation takes that record out again: two writes a batch rather than
//! two a reply. While the batch is out the keys are held in memory
//! ([`FlightKeys`]), where every question about a pending key looks too; a
//! reply not sent moves to the outbox when the batch settles, and a store
//! opened after a crash moves every reply of a flight still recorded there
//! (see [`Store::flights_to_outbox`]), so after a crash an unconfirmed reply is
//! reconciled as any other.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use rustc_hash::{FxHashMap, FxHashSet};
use sled::IVec;

use super::keys::*;
use super::*;

/// A pending reply's key and place: in a flight, or on its way to the
/// outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlightReply {
    pub key: IdempotencyKey,
    pub dialog: DialogId,
    pub seq: u64,
}

/// The replies of one answer batch in flight; see [`Store::answer_batch`]
/// and [`Store::settle_batch`].
#[derive(Debug, Default)]
pub struct Flight {
    id: u64,
    pub(super) replies: Vec<FlightReply>,
}

/// The keys of the replies in flight, with their places.
#[derive(Debug, Default)]
pub(super) struct FlightKeys {
    keys: Mutex<FxHashMap<IdempotencyKey, (DialogId, u64)>>,
    /// The next flight's id (the `flights` tree is empty when the store
    /// opens: see [`Store::flights_to_outbox`]).
    next_id: AtomicU64,
}

impl FlightKeys {
    fn lock(&self) -> std::sync::MutexGuard<'_, FxHashMap<IdempotencyKey, (DialogId, u64)>> {
        self.keys.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn holds(&self, key: IdempotencyKey) -> bool {
        self.lock().contains_key(&key)
    }

    pub(super) fn address(&self, key: IdempotencyKey) -> Option<(DialogId, u64)> {
        self.lock().get(&key).copied()
    }

    fn add(&self, replies: &[FlightReply]) {
        let mut map = self.lock();
        for r in replies {
            let earlier = map.insert(r.key, (r.dialog, r.seq));
            debug_assert!(earlier.is_none(), "reply {} is in two flights", r.key);
        }
    }

    fn remove(&self, keys: impl Iterator<Item = IdempotencyKey>) {
        let mut map = self.lock();
        for key in keys {
            map.remove(&key);
        }
    }
}

fn encode_flight(replies: &[FlightReply]) -> Vec<u8> {
    let mut out = Vec::with_capacity(replies.len() * 24);
    for r in replies {
        out.extend_from_slice(&r.key.0.to_be_bytes());
        out.extend_from_slice(&r.dialog.to_be_bytes());
        out.extend_from_slice(&r.seq.to_be_bytes());
    }
    out
}

fn decode_flight(bytes: &[u8]) -> Result<Vec<FlightReply>, StoreError> {
    if bytes.len() % 24 != 0 {
        return Err(StoreError::Corrupt {
            what: "flight",
            reason: format!("{} bytes is not a whole number of replies", bytes.len()),
        });
    }
    Ok(bytes
        .chunks_exact(24)
        .map(|c| FlightReply {
            key: IdempotencyKey(read_u64(&c[..8])),
            dialog: read_u64(&c[8..16]),
            seq: read_u64(&c[16..]),
        })
        .collect())
}

/// An incoming message of a dialog with the engine's answer to it; see
/// [`Store::answer_batch`].
#[derive(Debug)]
pub struct Answer<'a> {
    pub dialog: DialogId,
    /// The dialog as the engine saw it. If the stored one differs, the
    /// answer is stale: the message is stored unanswered instead.
    pub seen: &'a Dialog,
    pub account: &'a str,
    pub transport_id: i64,
    pub text: &'a str,
    pub at: Timestamp,
    /// When the answer is recorded.
    pub now: Timestamp,
    /// What the engine answered; `None` when it failed (the message is
    /// stored unanswered, for the dialog's conductor, as a stale one is).
    pub reply: Option<EngineAnswer<'a>>,
    /// The replies may take their slots now (the caller holds the
    /// account's lock and the dialog's gate).
    pub reserve: bool,
    /// The answer worked out ahead (see [`plan`]), written as planned if
    /// the dialog and its last page are still as the plan found them. The
    /// transaction takes the plan it writes (a rerun of the transaction
    /// then works the answer out itself).
    pub plan: Option<&'a PlanCell>,
}

/// Counts the writes to dialogs' records (the dialog and its pages) other
/// than the answer pipeline's planned ones, by dialog id modulo its size:
/// a plan made from what the pipeline wrote holds as long as its count did
/// not move (a write to another dialog of the same slot only sends the
/// answer the slower way). Counted inside the writing transaction, under
/// its lock.
#[derive(Debug)]
pub(super) struct Touched(Vec<AtomicU64>);

const TOUCHED_SLOTS: usize = 16_384;

impl Touched {
    pub(super) fn new() -> Touched {
        Touched((0..TOUCHED_SLOTS).map(|_| AtomicU64::new(0)).collect())
    }

    fn slot(&self, dialog: DialogId) -> &AtomicU64 {
        &self.0[(dialog % TOUCHED_SLOTS as u64) as usize]
    }

    pub(super) fn touch(&self, dialog: DialogId) {
        self.slot(dialog).fetch_add(1, Ordering::Relaxed);
    }

    fn count(&self, dialog: DialogId) -> u64 {
        self.slot(dialog).load(Ordering::Relaxed)
    }
}

/// A dialog's record and its last page as the answer pipeline last wrote
/// them, kept to work out its next answer without the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    /// The dialog's count of writes (see [`Touched`]) just after.
    touched: u64,
    /// The key and value of the page holding the dialog's last message.
    page: Option<([u8; 16], IVec)>,
}

/// A page's key and value.
type KeyedIVec = ([u8; 16], IVec);

impl Written {
    /// A dialog's records as they stand: `touched` its count of writes,
    /// `page` reads the page at a key.
    fn of<E>(
        dialog: &Dialog,
        touched: u64,
        page: impl FnOnce([u8; 16]) -> Result<Option<IVec>, E>,
    ) -> Result<Box<Written>, E> {
        let page = match dialog.next_seq.checked_sub(1) {
            Some(seq) => {
                let key = pages::page_key(dialog.id, seq);
                page(key)?.map(|p| (key, p))
            }
            None => None,
        };
        Ok(Box::new(Written { touched, page }))
    }
}

/// A dialog as it stands and its records to plan its next answer from.
pub type AsWritten = (Dialog, Box<Written>);

/// An answer worked out ahead of its transaction (see [`plan`]): the
/// records to write, and what they replace.
#[derive(Debug)]
pub struct Plan {
    /// The dialog's count of writes the plan was made at.
    touched: u64,
    /// The page the plan adds to (none when the answer starts a new
    /// page): kept in debug builds, which check that the transaction finds
    /// it so, and the dialog as the answer saw it.
    expect: Option<Option<KeyedIVec>>,
    /// The answer's first message goes into the page the dialog's last
    /// one is in.
    extends: bool,
    dialog: Dialog,
    /// The same, for the store's deferred set.
    deferred: Arc<Dialog>,
    /// The pages to write, in order (the last holds the last message).
    pages: Vec<([u8; 16], IVec)>,
    /// The answer as the store's journal keeps it (see `deferred.rs`).
    journal: Vec<u8>,
    incoming: Message,
    replies: Vec<Message>,
}

/// A plan for [`Answer::plan`], taken by the transaction that writes it.
pub type PlanCell = std::cell::RefCell<Option<Plan>>;

/// Works out what [`Store::answer_batch`] writes for an answer to a
/// dialog whose records are known (`written`, which `a.seen` decodes: as
/// the pipeline wrote them last, or as [`Store::latest_dialogs`] read
/// them):
/// exactly the records the transaction itself would write, computed
/// without the store, so the transaction only checks that nothing changed
/// and writes them. `None` when the answer is not the plain case (a
/// message to another account, a transport id not above the dialog's
/// highest, no reply, an ending without a message, a dialog not live).
pub fn plan(a: &Answer<'_>, written: Written) -> Option<Plan> {
    let old = a.seen;
    let reply = a.reply.as_ref()?;
    if a.account != old.account
        || !old.is_newer_incoming(a.transport_id)
        || !old.status.is_live()
        || old.ending.is_some()
        || (reply.ending.is_some() && reply.outbound.is_empty())
    {
        return None;
    }
    let change = transition::answer(old.clone(), a.incoming(), &reply.apply(a.now)).ok()?;
    let Change {
        dialog: mut new,
        appended: mut replies,
        ..
    } = change;
    // Written lazily: see `Tx::put_dialog_lazily`.
    new.indexed_at = Some(listed_at(old));
    let incoming = replies.remove(0);
    let Written { touched, page } = written;
    let mut extends = false;
    let mut pages: Vec<([u8; 16], Vec<u8>)> = Vec::with_capacity(1);
    for m in std::iter::once(&incoming).chain(&replies) {
        let key = pages::page_key(m.dialog, m.seq);
        match pages.last_mut() {
            Some((k, p)) if *k == key => *p = pages::put(Some(p), m).ok()?,
            _ => {
                // The dialog's last page, or a new one.
                let base = page.as_ref().filter(|(k, _)| *k == key);
                extends |= base.is_some();
                let base = base.map(|(_, p)| p.as_ref());
                pages.push((key, pages::put(base, m).ok()?));
            }
        }
    }
    let expect = cfg!(debug_assertions).then(|| page.filter(|_| extends));
    let journal =
        deferred::journal_entry(old, &incoming, &replies, reply.state, reply.ending.as_ref());
    Some(Plan {
        touched,
        expect,
        extends,
        journal,
        // Copied here, on the planning thread, rather than under the
        // transaction's lock.
        deferred: Arc::new(new.clone()),
        dialog: new,
        pages: pages.into_iter().map(|(k, p)| (k, IVec::from(p))).collect(),
        incoming,
        replies,
    })
}

/// The engine's answer to be recorded.
#[derive(Debug)]
pub struct EngineAnswer<'a> {
    pub state: &'a serde_json::Value,
    pub outbound: &'a [Outbound],
    /// The status to take once the replies are sent.
    pub ending: Option<DialogStatus>,
}

impl Answer<'_> {
    fn incoming(&self) -> Incoming<'_> {
        Incoming {
            transport_id: self.transport_id,
            text: self.text,
            at: self.at,
        }
    }
}

impl EngineAnswer<'_> {
    /// The answer, as a dialog takes it.
    fn apply(&self, at: Timestamp) -> Apply<'_> {
        Apply {
            at,
            state: Some(self.state),
            outbound: self.outbound,
            ending: self.ending.clone(),
            ..Apply::default()
        }
    }
}

/// What [`Store::answer_batch`] did with one answer.
#[derive(Debug)]
pub enum AnswerOutcome {
    /// The transport id was stored before: nothing was written.
    Duplicate,
    /// The dialog changed since the engine was asked: the message is stored
    /// unhandled, for the dialog's conductor.
    Stale,
    /// Stored and answered; `replies` are recorded as pending, and the
    /// first `slots` of them hold a slot of their account. `written` is
    /// for planning the dialog's next answer.
    Done {
        dialog: Box<Dialog>,
        incoming: Message,
        replies: Vec<Message>,
        slots: usize,
        written: Box<Written>,
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
        Ok(self.flight_keys.holds(key) || self.t.outbox.contains_key(u64_key(key.0))?)
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
    /// handled, and the engine's state, replies (pending) and ending
    /// recorded, as [`Store::record_inbound`] followed by [`Store::apply`]
    /// would. A dialog that is no longer live, or moved on since its engine
    /// was asked, gets its message stored unhandled.
    ///
    /// `reserve` takes a reply's slot on its account's record, or says no;
    /// `accounts` (sorted) names every account it may be asked for. The
    /// replies that got a slot are the batch's flight, to be sent and then
    /// settled with [`Store::settle_batch`]; the others go in the outbox.
    /// The quiet-dialogs index is left behind (see [`Dialog::indexed_at`]).
    pub fn answer_batch(
        &self,
        answers: &[Answer<'_>],
        accounts: &[&str],
        reserve: &dyn Fn(&mut AccountRecord, IdempotencyKey) -> bool,
    ) -> Result<(Vec<AnswerOutcome>, Flight), StoreError> {
        // `Slots` finds an account by a binary search.
        assert!(
            accounts.windows(2).all(|w| w[0] < w[1]),
            "answer_batch takes its accounts sorted, each once"
        );
        let id = self.flight_keys.next_id.fetch_add(1, Ordering::Relaxed);
        let result = self.transact_with_accounts(accounts, |tx, records| {
            let mut out = Vec::with_capacity(answers.len());
            let mut flight = Vec::new();
            for a in answers {
                let mut slots = Slots {
                    accounts,
                    records: &mut *records,
                    reserve,
                };
                out.push(tx.answer(a, &mut slots, &mut flight)?);
            }
            // Deferred records beyond the bound go to their trees with
            // this batch, the longest deferred first.
            let deferred = tx.deferred.len() + answers.len();
            if deferred > deferred::MOST {
                tx.write_out(deferred - deferred::MOST)?;
            }
            tx.trim_journal()?;
            if !flight.is_empty() {
                tx.flights.insert(&u64_key(id), encode_flight(&flight))?;
                // Under the transaction's lock, so no reader sees a reply
                // of the batch outside both the outbox and the flight.
                tx.flight_keys.add(&flight);
            }
            Ok((out, flight))
        });
        match result {
            Ok((out, replies)) => Ok((out, Flight { id, replies })),
            Err(e) => {
                // The transaction may have noted its flight before failing:
                // the batch's keys are its own.
                let keys = answers
                    .iter()
                    .filter_map(|a| a.reply.as_ref())
                    .flat_map(|r| r.outbound.iter().map(|o| o.key));
                self.flight_keys.remove(keys);
                Err(e)
            }
        }
    }

    /// Settles a batch's flight: its sent replies read back as sent and
    /// their slots are confirmed at the transport's times, in one
    /// transaction (as [`Store::settle_sent`] does for one); a reply of the
    /// flight not sent (and not cancelled meanwhile) moves to the outbox,
    /// for its dialog's conductor. A sent message of the outbox (not of the
    /// flight) leaves the outbox; a key in neither is skipped.
    pub fn settle_batch(
        &self,
        flight: &Flight,
        sent: &[Settle],
        confirm: &dyn Fn(&mut AccountRecord, &Settle),
    ) -> Result<(), StoreError> {
        let mut accounts: Vec<&str> = sent.iter().map(|s| s.account.as_str()).collect();
        accounts.sort_unstable();
        accounts.dedup();
        let flying: FxHashSet<IdempotencyKey> = flight.replies.iter().map(|r| r.key).collect();
        let done: FxHashSet<IdempotencyKey> = sent.iter().map(|s| s.key).collect();
        self.transact_with_accounts(&accounts, |tx, records| {
            if !flight.replies.is_empty() {
                tx.flights.remove(&u64_key(flight.id))?;
            }
            for r in flight.replies.iter().filter(|r| !done.contains(&r.key)) {
                tx.to_outbox(r)?;
            }
            for s in sent {
                // Out of the outbox (or the flight) is sent: the page keeps
                // the message as recorded (see `Store::settled`).
                if !flying.contains(&s.key) && tx.unqueue(s.key)?.is_none() {
                    continue;
                }
                if let Ok(i) = accounts.binary_search(&s.account.as_str()) {
                    confirm(&mut records[i], s);
                }
            }
            Ok(())
        })?;
        self.flight_keys
            .remove(flight.replies.iter().map(|r| r.key));
        Ok(())
    }

    /// Dialogs as they stand, each with its records to plan its next answer
    /// from (see [`plan`]); `None` for a dialog not found. For the answer
    /// pipeline's first answer to a dialog it did not write last.
    ///
    /// Read holding the store's writer, so that no transaction is half
    /// done (its writes in the trees, the deferred set not yet told) and a
    /// plan made from them holds only if nothing wrote the dialog since.
    /// Not in a sled transaction: sled's commit seals its log buffer twice,
    /// two writes to the file, even for a transaction that wrote nothing
    /// (see ARCHITECTURE.md, "What the store's mechanisms pay").
    pub fn latest_dialogs(&self, ids: &[DialogId]) -> Result<Vec<Option<AsWritten>>, StoreError> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        ids.iter().map(|&id| self.as_written(id)).collect()
    }

    /// A dialog as it stands, with its records to plan its next answer
    /// from; `None` if there is no such dialog. The caller holds the
    /// writer: the deferred set and the trees agree.
    fn as_written(&self, id: DialogId) -> Result<Option<AsWritten>, StoreError> {
        let (dialog, last) = match self.deferred.get(id) {
            Some(entry) => ((*entry.dialog).clone(), entry.page),
            None => match self.t.dialogs.get(u64_key(id))? {
                Some(bytes) => (decode_dialog(&bytes)?, None),
                None => return Ok(None),
            },
        };
        let written = Written::of(&dialog, self.touched.count(id), |key| match last {
            Some((k, page)) if k == key => Ok(Some(page)),
            _ => self.t.messages.get(key),
        })?;
        Ok(Some((dialog, written)))
    }

    /// Moves the replies of every flight still recorded (a batch that was
    /// out when the host stopped) to the outbox, to be reconciled with the
    /// transport like any unconfirmed message. Run when the store opens.
    pub(super) fn flights_to_outbox(&self) -> Result<(), StoreError> {
        let mut flights = Vec::new();
        for entry in self.t.flights.iter() {
            let (id, bytes) = entry?;
            flights.push((id, decode_flight(&bytes)?));
        }
        if flights.is_empty() {
            return Ok(());
        }
        self.transact(|tx| {
            for (id, replies) in &flights {
                tx.flights.remove(id)?;
                for r in replies {
                    tx.to_outbox(r)?;
                }
            }
            Ok(())
        })?;
        self.db.flush()?;
        Ok(())
    }
}

/// The slots a batch's replies take on their accounts' records (see
/// [`Store::answer_batch`]).
struct Slots<'a> {
    /// The batch's accounts, sorted; `records` are theirs.
    accounts: &'a [&'a str],
    records: &'a mut [AccountRecord],
    reserve: &'a dyn Fn(&mut AccountRecord, IdempotencyKey) -> bool,
}

impl Slots<'_> {
    /// Takes a slot for each of `keys` in turn, up to the first refused;
    /// how many it took.
    fn take(&mut self, account: &str, keys: impl Iterator<Item = IdempotencyKey>) -> usize {
        let Ok(i) = self.accounts.binary_search(&account) else {
            return 0;
        };
        let record = &mut self.records[i];
        keys.take_while(|k| (self.reserve)(record, *k)).count()
    }
}

impl Tx<'_> {
    /// Stores one incoming message of a batch with its answer (see
    /// [`Store::answer_batch`]): as planned if the plan holds, else worked
    /// out here from the stored dialog.
    fn answer(
        &self,
        a: &Answer<'_>,
        slots: &mut Slots<'_>,
        flight: &mut Vec<FlightReply>,
    ) -> TxResult<AnswerOutcome> {
        if let Some(done) = self.as_planned(a, slots, flight)? {
            return Ok(done);
        }
        let old = self.dialog(a.dialog)?;
        if self.seen_incoming(&old, a.account, a.transport_id)? {
            return Ok(AnswerOutcome::Duplicate);
        }
        let fresh = old == *a.seen && old.status.is_live() && old.ending.is_none();
        let Some(reply) = a.reply.as_ref().filter(|_| fresh) else {
            // Not answered here (the dialog moved on, or the engine
            // failed): the message waits for the dialog's conductor.
            self.unhandled_incoming(&old, a.account, a.incoming(), true)?;
            return Ok(AnswerOutcome::Stale);
        };
        let keys = reply.outbound.iter().map(|o| o.key);
        let slots = if a.reserve {
            slots.take(&old.account, keys)
        } else {
            0
        };
        let answer = transition::answer(old.clone(), a.incoming(), &reply.apply(a.now));
        let mut change = refused(answer)?;
        self.write(Some(&old), &mut change, Queue::Flight(flight, slots), true)?;
        let Change {
            dialog,
            appended: mut replies,
            ..
        } = change;
        let incoming = replies.remove(0);
        self.note_incoming(&old, a.account, a.transport_id, incoming.seq)?;
        Ok(AnswerOutcome::Done {
            written: self.written(&dialog)?,
            dialog: Box::new(dialog),
            incoming,
            replies,
            slots,
        })
    }

    /// Whether a plan still holds: nothing wrote its dialog since, and its
    /// replies' keys are pending nowhere yet.
    fn plan_holds(&self, a: &Answer<'_>, plan: &Plan) -> TxResult<bool> {
        if self.touched.count(a.dialog) != plan.touched {
            return Ok(false);
        }
        // Unwritten since, so as the plan found them: checked in tests.
        if let Some(expect_page) = &plan.expect {
            let last = plan.pages.last().map_or([0; 16], |(k, _)| *k);
            let key = expect_page.as_ref().map_or(last, |(k, _)| *k);
            let (dialog, page) = self.latest_with_page(a.dialog, &key)?;
            assert_eq!(dialog.as_ref(), Some(a.seen));
            if let Some((_, expected)) = expect_page {
                assert_eq!(page.as_deref(), Some(&expected[..]));
            }
        }
        // Refused, if so, as the transaction itself refuses it.
        for key in plan.replies.iter().filter_map(|m| m.key) {
            if self.is_pending(key)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Writes a planned answer if the dialog and the page it adds to are
    /// still as the plan found them; `None` (nothing written) otherwise.
    fn as_planned(
        &self,
        a: &Answer<'_>,
        slots: &mut Slots<'_>,
        flight: &mut Vec<FlightReply>,
    ) -> TxResult<Option<AnswerOutcome>> {
        let Some(cell) = a.plan else { return Ok(None) };
        let slots = {
            let guard = cell.borrow();
            let Some(plan) = guard.as_ref() else {
                return Ok(None);
            };
            if !self.plan_holds(a, plan)? {
                return Ok(None);
            }
            let keys = plan.replies.iter().filter_map(|m| m.key);
            match a.reserve {
                true => slots.take(&plan.dialog.account, keys),
                false => 0,
            }
        };
        // Written as planned from here on: the plan's parts move into the
        // store and the answer.
        let Some(Plan {
            touched,
            extends,
            dialog,
            deferred,
            mut pages,
            journal,
            incoming,
            replies,
            ..
        }) = cell.borrow_mut().take()
        else {
            return Ok(None);
        };
        let last = pages.pop();
        self.defer(a.dialog, deferred, pages, last.clone(), journal, extends)?;
        for (i, m) in replies.iter().enumerate() {
            let Some(key) = m.key else { continue };
            let reply = FlightReply {
                key,
                dialog: m.dialog,
                seq: m.seq,
            };
            if i < slots {
                flight.push(reply);
            } else {
                self.enqueue(&reply)?;
            }
        }
        Ok(Some(AnswerOutcome::Done {
            dialog: Box::new(dialog),
            incoming,
            replies,
            slots,
            written: Box::new(Written {
                touched,
                page: last,
            }),
        }))
    }

    /// Puts a pending message's key in the outbox.
    pub(super) fn enqueue(&self, m: &FlightReply) -> Result<(), UnabortableTransactionError> {
        self.outbox
            .insert(&u64_key(m.key.0), &pair(u64_key(m.dialog), u64_key(m.seq)))?;
        Ok(())
    }

    /// Whether a message's key is pending already: in a flight or in the
    /// outbox.
    pub(super) fn is_pending(
        &self,
        key: IdempotencyKey,
    ) -> Result<bool, UnabortableTransactionError> {
        Ok(self.flight_keys.holds(key) || self.outbox.get(u64_key(key.0))?.is_some())
    }

    /// Takes a key out of the outbox; its address if it was there.
    pub(super) fn unqueue(
        &self,
        key: IdempotencyKey,
    ) -> Result<Option<IVec>, UnabortableTransactionError> {
        self.outbox.remove(&u64_key(key.0))
    }

    /// Moves a reply of a flight to the outbox, unless it is no longer
    /// pending (cancelled meanwhile).
    fn to_outbox(&self, r: &FlightReply) -> TxResult<()> {
        let still = self.pages().get(r.dialog, r.seq)?;
        if still.is_some_and(|m| m.delivery == Some(Delivery::Pending)) {
            self.enqueue(r)?;
        }
        Ok(())
    }

    /// What was just written of a dialog, for planning its next answer.
    fn written(&self, dialog: &Dialog) -> TxResult<Box<Written>> {
        self.write_out_dialog(dialog.id)?;
        let touched = self.touched.count(dialog.id);
        Ok(Written::of(dialog, touched, |key| self.messages.get(key))?)
    }
}
