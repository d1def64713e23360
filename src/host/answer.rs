//! The answer pipeline: the inbound dispatcher answers the messages of
//! dialogs with nothing else going on in batches. A batch is every message
//! that arrived while the previous one ran; for it:
//!
//! 1. each message is routed: an idle dialog's first message of the batch
//!    is answered here; the dialog's later ones wait for the next batch (so
//!    each sees the reply before it in its history); everything else (no
//!    dialog, an opt-out, a conductor at work, a reply delay to wait, an
//!    unsent message, an ending) goes the one-at-a-time way, through
//!    [`Host::receive`] and the dialog's conductor;
//! 2. the engines answer, concurrently across the engine workers, from a
//!    ctx kept per recently answered dialog rather than rebuilt from the
//!    store (its history ends with the message, as a conductor's does),
//!    and the answers are planned (their records worked out without the
//!    store, see [`store::plan`](crate::store::plan)) on a task of their
//!    own, from the records this path wrote last or, for a dialog it did
//!    not, read with its ctx parts while no transaction runs
//!    ([`Store::latest_dialogs`](crate::store::Store::latest_dialogs));
//! 3. the messages, answers and the replies' slots are stored in one
//!    transaction (a planned answer as planned, unless its dialog was
//!    touched since), and one flush makes it durable;
//! 4. the transport hears that its messages are stored, the replies go
//!    out (one dialog's in order, dialogs concurrently), and their
//!    confirmations are written in one transaction.
//!
//! Steps 1 and 2 of a batch run while steps 3 and 4 of the batch before it
//! do, on a task of their own (see [`dispatch`]), so on both cores.
//!
//! Planned answers are deferred in the store (a journal record per batch;
//! see `store/deferred.rs`); when no message came for [`QUIET`], and at
//! shutdown, the dispatcher writes them to their trees, [`WRITE_OUT`] at a
//! time so that a message arriving meanwhile waits little.
//!
//! Each step writes what the one-at-a-time operations write, so whatever
//! this path leaves undone (a slot not free yet, a failed send, an ending to
//! take) is left in the store as pending work, and the dialog's conductor
//! takes it from there. Sends hold the accounts' locks and the dialogs'
//! gates as a conductor's do.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rustc_hash::{FxHashMap, FxHashSet};
use tokio::sync::{mpsc, oneshot, MutexGuard, OwnedMutexGuard};

use super::conductor::{self, ending_of};
use super::{contact_view, dialog_view, history_of, Host};
use crate::clock::Timestamp;
use crate::concurrent::run_all;
use crate::config::Config;
use crate::engine::ctx::{AccountView, ContactView, HistoryEntry};
use crate::engine::{Call, Ctx, EngineError, Reply};
use crate::model::{Delivery, Dialog, DialogId, Identity, Message, MessageKind};
use crate::safety::{Failure, OutcomeWithSlots, Slot};
use crate::store::{
    self, Answer, AnswerOutcome, EngineAnswer, Flight, PlanCell, Settle, StoreError, Written,
};
use crate::transition::Outbound;
use crate::transport::{Inbound, IncomingMessage, SendError};

/// The most messages in one batch.
const BATCH: usize = 4096;
/// The most dialogs whose ctx is kept between batches (about 2.2 KB each
/// in the throughput benchmark). A dialog not kept is read back from the
/// store for its next answer: at 100,000 dialogs, keeping 16,384 of them
/// made a message cost 45 µs of CPU, keeping 131,072 31 µs (peak resident
/// 917 MB against 1,131 MB).
const RECENT: usize = 131_072;
/// How long the pipeline waits for a message before writing out the
/// store's deferred records.
const QUIET: Duration = Duration::from_millis(20);
/// Deferred dialogs written out per transaction.
const WRITE_OUT: usize = 256;
/// Answers in a batch from which its leftovers are freed on another thread.
const FREE_ELSEWHERE: usize = 256;

/// Receives incoming messages until shutdown, in batches, two at a time:
/// while one batch is stored and sent, the engines answer the next (whose
/// messages to the first batch's dialogs wait for the one after).
pub(super) async fn dispatch(host: Arc<Host>, mut rx: mpsc::Receiver<Inbound>) {
    let mut pipeline = Pipeline::default();
    let mut batch = Vec::with_capacity(BATCH);
    let mut answered: Option<Prepared> = None;
    // Writing out deferred records: the pipeline was quiet for `QUIET`.
    let mut writing_out = false;
    loop {
        pipeline.open_with_carried(&mut batch);
        if batch.is_empty() && answered.is_none() {
            match wait_for_messages(&host, &mut rx, &mut batch, writing_out).await {
                Waited::Stop => break,
                Waited::WroteOut => {
                    writing_out = true;
                    continue;
                }
                Waited::Messages => {}
            }
        }
        writing_out = false;
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        if host.shutdown.is_cancelled() {
            break;
        }
        let batch = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
        match step(&host, &mut pipeline, batch, answered.take()).await {
            Some(prepared) => answered = prepared,
            None => break,
        }
    }
    // AnswerOutcome, not yet stored: finish it (nothing of it was acknowledged,
    // so dropping it would be safe too, but it is ready).
    if let Some(p) = answered {
        if let Err(e) = commit(&host, p).await {
            tracing::error!("incoming messages could not be stored: {e}");
        }
    }
    // Not needed for safety (the journal holds them), but the next start
    // then has nothing to replay.
    while host.store.deferred() > 0 {
        if let Err(e) = host.store.write_out_deferred(4 * WRITE_OUT) {
            tracing::error!("answered dialogs could not be written out: {e}");
            break;
        }
    }
}

/// What came of waiting for messages.
enum Waited {
    Messages,
    /// No message came for `QUIET`: some deferred records were written out.
    WroteOut,
    /// Shutdown, or the transport's channel closed.
    Stop,
}

/// Waits for messages into `batch`; while none come, writes the store's
/// deferred records out, [`WRITE_OUT`] dialogs at a time.
async fn wait_for_messages(
    host: &Host,
    rx: &mut mpsc::Receiver<Inbound>,
    batch: &mut Vec<Inbound>,
    writing_out: bool,
) -> Waited {
    let deferred = host.store.deferred() > 0;
    let quiet = if writing_out { Duration::ZERO } else { QUIET };
    tokio::select! {
        biased;
        _ = host.shutdown.cancelled() => Waited::Stop,
        n = rx.recv_many(batch, BATCH) => if n == 0 { Waited::Stop } else { Waited::Messages },
        _ = tokio::time::sleep(quiet), if deferred => {
            if let Err(e) = host.store.write_out_deferred(WRITE_OUT) {
                tracing::error!("answered dialogs could not be written out: {e}");
            }
            tokio::task::yield_now().await;
            Waited::WroteOut
        }
    }
}

/// One step of the pipeline: the batch before (`answered`) is stored and
/// sent on a task of its own while another routes `batch` and asks the
/// engines. Returns `batch` prepared, or `None` once the runtime is going
/// away.
async fn step(
    host: &Arc<Host>,
    pipeline: &mut Pipeline,
    batch: Vec<Inbound>,
    answered: Option<Prepared>,
) -> Option<Option<Prepared>> {
    let busy: FxHashSet<DialogId> = answered.iter().flat_map(Prepared::dialogs).collect();
    let warmed = pipeline.warm(host, &batch, &busy).unwrap_or_else(|e| {
        tracing::error!("incoming messages could not be routed: {e}");
        Warmed::default()
    });
    // Spawned second, the routing takes this worker's next turn and leaves
    // the commit to the other worker, so the two run on both cores.
    // Whatever routing reads from the store is read first (`warm`): a read
    // waits for the commit's transaction.
    let committing = answered.map(|p| {
        let host = host.clone();
        tokio::spawn(async move { commit(&host, p).await })
    });
    let committing = async move {
        match committing {
            Some(task) => match task.await {
                Ok(kept) => kept,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                // The runtime is going away: what the batch stored is in
                // the store, and its dialogs' conductors take it.
                Err(_) => Ok(FxHashMap::default()),
            },
            None => Ok(FxHashMap::default()),
        }
    };
    let preparing = {
        let host = host.clone();
        // The pipeline goes with the task and comes back with its answer.
        let mut taken = std::mem::take(pipeline);
        tokio::spawn(async move {
            let prepared = taken.prepare(&host, batch, &busy, warmed).await;
            (taken, prepared)
        })
    };
    let (preparing, committed) = tokio::join!(preparing, committing);
    let prepared = match preparing {
        Ok((taken, prepared)) => {
            *pipeline = taken;
            prepared
        }
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // The runtime is going away: what of the batch was not stored is
        // not acknowledged, and the transport offers it again.
        Err(_) => return None,
    };
    match committed {
        Ok(kept) => pipeline.lately.keep(kept),
        Err(e) => tracing::error!("incoming messages could not be stored: {e}"),
    }
    match prepared {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::error!("incoming messages could not be stored: {e}");
            Some(None)
        }
    }
}

/// What the pipeline keeps of a dialog it answered, to build the next ctx
/// without reading the dialog or its messages again. Valid while the stored
/// dialog is the one noted: any change made elsewhere (a message added, the
/// state or status changed) shows there, and the store then takes the
/// answer as stale.
#[derive(Clone)]
struct Recent {
    dialog: Dialog,
    /// The dialog's records as last written, to plan its next answer.
    written: Option<Box<Written>>,
    identity: Identity,
    contact: ContactView,
    history: Arc<Vec<HistoryEntry>>,
}

#[derive(Default)]
struct Pipeline {
    /// Messages held for the next batch, in arrival order; they open it.
    carry: Vec<Inbound>,
    /// How many of the batch being routed were held from the one before.
    carried: usize,
    /// The dialogs among whose held messages is an opt-out: a message is
    /// read for one once, as it first arrives, not again each time it waits.
    carried_opt_outs: FxHashSet<DialogId>,
    lately: Lately,
}

/// What the pipeline keeps of the dialogs it answered lately, across
/// batches: each one's ctx parts, and the dialog of each contact that
/// wrote. It starts over once either holds [`RECENT`] entries.
#[derive(Default)]
struct Lately {
    recent: FxHashMap<DialogId, Box<Recent>>,
    dialogs: FxHashMap<Identity, DialogId>,
}

impl Lately {
    /// Keeps what a committed batch gives back.
    fn keep(&mut self, kept: FxHashMap<DialogId, Box<Recent>>) {
        self.recent.extend(kept);
        self.bound();
    }

    /// Notes the dialog of a contact (which never changes once claimed).
    fn note_dialog(&mut self, contact: &Identity, dialog: DialogId) {
        self.dialogs.insert(contact.clone(), dialog);
        self.bound();
    }

    fn bound(&mut self) {
        if self.recent.len() > RECENT || self.dialogs.len() > RECENT {
            self.recent.clear();
            self.dialogs.clear();
        }
    }
}

/// Ctx parts of a batch's dialogs that [`Lately`] does not hold, read from
/// the store by [`Pipeline::warm`] for that batch only.
#[derive(Default)]
struct Warmed(FxHashMap<DialogId, Box<Recent>>);

/// What routing one batch looks up once: the ctx parts read ahead, and
/// whether each account's replies wait for a reply delay under the
/// batch's config (which may change between batches).
struct Routing<'c> {
    config: &'c Config,
    warmed: Warmed,
    delayed: FxHashMap<String, bool>,
}

impl Routing<'_> {
    fn delayed(&mut self, account: &str) -> bool {
        if let Some(d) = self.delayed.get(account) {
            return *d;
        }
        let d = self.config.account_safety(account).reply_delay.hi > Duration::ZERO;
        self.delayed.insert(account.to_string(), d);
        d
    }
}

/// A message answered in this batch.
struct Job {
    message: IncomingMessage,
    /// Told once the batch is durable.
    stored: Option<oneshot::Sender<()>>,
    /// The dialog (as the engine sees it) and its ctx parts.
    recent: Box<Recent>,
}

/// The replies of one dialog to send, and what became of them.
struct Sending {
    /// The dialog and its ctx parts, kept for its next ctx if every reply
    /// goes out.
    recent: Box<Recent>,
    /// The replies that took a slot, each with its slot.
    replies: Vec<(Message, Slot)>,
    /// Some replies (or an ending) are left to the dialog's conductor.
    rest: bool,
}

/// A batch routed and answered by the engines, to be stored and sent.
struct Prepared {
    jobs: Vec<Job>,
    replies: Vec<Result<Reply, EngineError>>,
    /// Each reply's messages with their keys.
    outbound: Vec<Vec<Outbound>>,
    /// Each answer worked out ahead, where it could be.
    plans: Vec<PlanCell>,
    /// When the answers are recorded.
    now: Timestamp,
    /// Told once the batch is durable.
    acks: Vec<oneshot::Sender<()>>,
}

impl Prepared {
    fn dialogs(&self) -> impl Iterator<Item = DialogId> + '_ {
        self.jobs.iter().map(|j| j.recent.dialog.id)
    }
}

impl Pipeline {
    /// Routes a batch and asks the engines; `busy` dialogs (of the batch
    /// being committed) wait for the next batch.
    async fn prepare(
        &mut self,
        host: &Arc<Host>,
        batch: Vec<Inbound>,
        busy: &FxHashSet<DialogId>,
        warmed: Warmed,
    ) -> Result<Option<Prepared>, StoreError> {
        let config = host.config();
        let routing = Routing {
            config: &config,
            warmed,
            delayed: FxHashMap::default(),
        };
        let mut jobs = self.route(host, routing, batch, busy).await?;
        if jobs.is_empty() {
            return Ok(None);
        }
        let acks: Vec<_> = jobs.iter_mut().filter_map(|j| j.stored.take()).collect();
        // The engine sees the message in the history, as a conductor's
        // engine does (the message is stored before it is asked).
        for job in &mut jobs {
            let m = &job.message;
            Arc::make_mut(&mut job.recent.history).push(HistoryEntry {
                direction: "in".into(),
                text: m.text.clone(),
                at: m.at.as_secs_f64(),
            });
        }
        let replies = ask_engines(host, &config, &jobs).await;
        let now = host.clock.now();
        let outbound: Vec<Vec<Outbound>> = replies
            .iter()
            .map(|r| match r {
                Ok(r) => host.outbound(MessageKind::Reply, &r.output.messages),
                Err(_) => Vec::new(),
            })
            .collect();
        // Planned on a task of its own, so on another thread while this
        // one stores the batch before.
        let planning = tokio::spawn(async move {
            let plans = plan_all(&mut jobs, &replies, &outbound, now);
            extend_histories(&mut jobs, &replies, &outbound, now);
            (jobs, replies, outbound, plans)
        });
        let (jobs, replies, outbound, plans) = match planning.await {
            Ok(done) => done,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // The runtime is going away: nothing of the batch was stored or
            // acknowledged, so the transport offers it again.
            Err(_) => return Ok(None),
        };
        Ok(Some(Prepared {
            jobs,
            replies,
            outbound,
            plans,
            now,
            acks,
        }))
    }
}

/// Works out ahead the answers of the dialogs whose records are known (see
/// [`store::plan`](crate::store::plan)).
fn plan_all(
    jobs: &mut [Job],
    replies: &[Result<Reply, EngineError>],
    outbound: &[Vec<Outbound>],
    now: Timestamp,
) -> Vec<PlanCell> {
    let written: Vec<_> = jobs.iter_mut().map(|j| j.recent.written.take()).collect();
    answers(jobs, replies, outbound, now, &[], &[])
        .iter()
        .zip(written)
        .map(|(a, w)| PlanCell::new(w.and_then(|w| store::plan(a, *w))))
        .collect()
}

/// Adds each answer's replies to its dialog's history, ahead: the history
/// is kept for the dialog's next ctx only if the answer is stored and
/// every reply of it sent, and then it reads just so.
fn extend_histories(
    jobs: &mut [Job],
    replies: &[Result<Reply, EngineError>],
    outbound: &[Vec<Outbound>],
    now: Timestamp,
) {
    let now = now.as_secs_f64();
    for ((job, reply), out) in jobs.iter_mut().zip(replies).zip(outbound) {
        if reply.is_ok() && !out.is_empty() {
            let history = Arc::make_mut(&mut job.recent.history);
            history.extend(out.iter().map(|o| HistoryEntry {
                direction: "out".into(),
                text: o.text.clone(),
                at: now,
            }));
        }
    }
}

/// The store's view of a batch's answers; `may_send` and `plans` by job,
/// none where short.
fn answers<'a>(
    jobs: &'a [Job],
    replies: &'a [Result<Reply, EngineError>],
    outbound: &'a [Vec<Outbound>],
    now: Timestamp,
    may_send: &[bool],
    plans: &'a [PlanCell],
) -> Vec<Answer<'a>> {
    jobs.iter()
        .zip(replies)
        .zip(outbound)
        .enumerate()
        .map(|(i, ((j, r), out))| Answer {
            dialog: j.recent.dialog.id,
            seen: &j.recent.dialog,
            account: &j.message.account,
            transport_id: j.message.transport_id,
            text: &j.message.text,
            at: j.message.at,
            now,
            reply: r.as_ref().ok().map(|r| EngineAnswer {
                state: &r.state,
                outbound: out,
                ending: ending_of(&r.output),
            }),
            reserve: may_send.get(i).copied().unwrap_or(false),
            plan: plans.get(i).filter(|p| p.borrow().is_some()),
        })
        .collect()
}

/// Stores a prepared batch (messages, answers and slots in one
/// transaction, one flush), acknowledges its messages, sends the replies
/// and settles them; returns what to keep of each dialog for its next ctx.
async fn commit(
    host: &Arc<Host>,
    prepared: Prepared,
) -> Result<FxHashMap<DialogId, Box<Recent>>, StoreError> {
    let Prepared {
        mut jobs,
        replies,
        outbound,
        plans,
        now,
        acks,
    } = prepared;
    let held = Held::take(host, &jobs, &replies);
    let (answered, flight) = {
        let answers = answers(&jobs, &replies, &outbound, now, &held.may_send, &plans);
        host.safety.answer_batch(&answers, &held.accounts())?
    };
    // Durable, then acknowledged, then sent; the batch is sorted while
    // the disk syncs.
    let flushed = host.store.start_flush();
    let mut sorted = Sorted::of(&mut jobs, answered);
    flushed.await?;
    for ack in acks {
        let _ = ack.send(());
    }
    send_and_settle(host, &flight, &mut sorted).await?;
    drop(held);
    for dialog in sorted.later {
        host.activate(dialog);
    }
    // A large batch is freed on another thread: the next batch waits for
    // this one to end. A small one costs less than the hand-over.
    let leftovers = (jobs, replies, outbound, plans);
    if leftovers.0.len() >= FREE_ELSEWHERE {
        tokio::task::spawn_blocking(move || drop(leftovers));
    }
    Ok(sorted.kept)
}

/// The accounts' locks and the dialogs' gates a batch holds, as a
/// conductor holds them from taking a slot until the send is confirmed. A
/// dialog whose lock or gate is busy takes no slot: its conductor sends.
struct Held<'h> {
    locks: FxHashMap<String, Option<OwnedMutexGuard<()>>>,
    gates: FxHashMap<usize, Option<MutexGuard<'h, ()>>>,
    /// Per job: whether its replies may be sent here.
    may_send: Vec<bool>,
}

impl<'h> Held<'h> {
    fn take(host: &'h Host, jobs: &[Job], replies: &[Result<Reply, EngineError>]) -> Held<'h> {
        let mut held = Held {
            locks: FxHashMap::default(),
            gates: FxHashMap::default(),
            may_send: Vec::with_capacity(jobs.len()),
        };
        for (job, reply) in jobs.iter().zip(replies) {
            let d = &job.recent.dialog;
            let wants = reply.as_ref().is_ok_and(|r| !r.output.messages.is_empty());
            if wants && !held.locks.contains_key(d.account.as_str()) {
                let lock = host.account_lock(&d.account).try_lock_owned().ok();
                held.locks.insert(d.account.clone(), lock);
            }
            let free = wants
                && held.locks[d.account.as_str()].is_some()
                && held
                    .gates
                    .entry(host.gate_index(d.id))
                    .or_insert_with(|| host.gate(d.id).try_lock().ok())
                    .is_some();
            held.may_send.push(free);
        }
        held
    }

    /// The accounts whose locks are held, sorted.
    fn accounts(&self) -> Vec<&str> {
        let mut accounts: Vec<&str> = self
            .locks
            .iter()
            .filter(|(_, g)| g.is_some())
            .map(|(a, _)| a.as_str())
            .collect();
        accounts.sort_unstable();
        accounts
    }
}

/// A stored batch sorted by what comes next for each dialog.
#[derive(Default)]
struct Sorted {
    /// Dialogs with replies to send here.
    sending: Vec<Sending>,
    /// Dialogs with something left to their conductors.
    later: Vec<DialogId>,
    /// Dialogs done, with their ctx parts for their next answer.
    kept: FxHashMap<DialogId, Box<Recent>>,
}

impl Sorted {
    /// A message the engine failed to answer was stored unanswered, as a
    /// stale one is: its conductor tries again, and waits for a working
    /// engine if it fails too.
    fn of(jobs: &mut [Job], answered: Vec<OutcomeWithSlots>) -> Sorted {
        let mut sorted = Sorted {
            sending: Vec::with_capacity(jobs.len()),
            later: Vec::new(),
            kept: FxHashMap::with_capacity_and_hasher(jobs.len(), Default::default()),
        };
        for (job, (answered, slots)) in jobs.iter_mut().zip(answered) {
            let (dialog, replies, written) = match answered {
                AnswerOutcome::Duplicate => continue,
                AnswerOutcome::Stale => {
                    sorted.later.push(job.recent.dialog.id);
                    continue;
                }
                AnswerOutcome::Done {
                    dialog,
                    replies,
                    written,
                    ..
                } => (dialog, replies, written),
            };
            let rest = slots.len() < replies.len() || dialog.ending.is_some();
            // The job's ctx parts (their history holds the answer already,
            // see `extend_histories`) move on with the dialog to its next
            // ctx.
            let recent = Box::new(Recent {
                dialog: *dialog,
                written: Some(written),
                identity: job.recent.identity.clone(),
                contact: std::mem::take(&mut job.recent.contact),
                history: std::mem::take(&mut job.recent.history),
            });
            let replies: Vec<(Message, Slot)> = replies.into_iter().zip(slots).collect();
            if !replies.is_empty() {
                sorted.sending.push(Sending {
                    recent,
                    replies,
                    rest,
                });
            } else if rest {
                sorted.later.push(recent.dialog.id);
            } else {
                sorted.kept.insert(recent.dialog.id, recent);
            }
        }
        sorted
    }
}

/// Sends the batch's replies (one dialog's in order, dialogs
/// concurrently), reacts to failures, and confirms what went out in one
/// transaction.
async fn send_and_settle(
    host: &Host,
    flight: &Flight,
    sorted: &mut Sorted,
) -> Result<(), StoreError> {
    let mut sending = std::mem::take(&mut sorted.sending);
    let outcomes = run_all(sending.iter_mut().map(|s| send_in_order(host, s))).await;
    let mut settled = Vec::with_capacity(sending.len());
    let mut sent_by_account: FxHashMap<String, u64> = FxHashMap::default();
    for (s, (sent, failed)) in sending.into_iter().zip(outcomes) {
        if !sent.is_empty() {
            *sent_by_account
                .entry(s.recent.dialog.account.clone())
                .or_default() += sent.len() as u64;
        }
        settled.extend(sent);
        let id = s.recent.dialog.id;
        if let Some((m, error)) = failed {
            if react(host, &s.recent.dialog, &m, &error)? {
                sorted.later.push(id);
            }
        } else if s.rest {
            sorted.later.push(id);
        } else {
            sorted.kept.insert(id, s.recent);
        }
    }
    host.safety.settle_batch(flight, &settled)?;
    for (account, n) in &sent_by_account {
        let labels = [("kind", "reply"), ("account", account.as_str())];
        crate::metrics::add("colloquy_messages_sent_total", &labels, *n);
    }
    Ok(())
}

impl Pipeline {
    /// Opens the next batch with the messages held from the last one.
    fn open_with_carried(&mut self, batch: &mut Vec<Inbound>) {
        debug_assert!(batch.is_empty(), "held messages open a batch");
        self.carried = self.carry.len();
        batch.append(&mut self.carry);
    }

    /// Splits a batch: returns the messages to answer here; hands the rest
    /// to [`Host::receive`] or keeps them for the next batch.
    async fn route(
        &mut self,
        host: &Arc<Host>,
        mut routing: Routing<'_>,
        batch: Vec<Inbound>,
        busy: &FxHashSet<DialogId>,
    ) -> Result<Vec<Job>, StoreError> {
        let opt_out = host.opt_out();
        // A dialog with an opt-out in the batch goes the one-at-a-time way
        // whole, so that nothing is answered after it.
        let mut opted_out = std::mem::take(&mut self.carried_opt_outs);
        let carried = std::mem::take(&mut self.carried);
        let mut routed = Vec::with_capacity(batch.len());
        for (i, inbound) in batch.into_iter().enumerate() {
            let dialog = self.dialog_of(host, &inbound.message.contact)?;
            if let Some(d) = dialog {
                if i >= carried && opt_out.matches(&inbound.message.text) {
                    opted_out.insert(d);
                }
            }
            routed.push((inbound, dialog));
        }
        let mut one_by_one = opted_out.clone();
        let mut jobs: Vec<Job> = Vec::with_capacity(routed.len());
        let mut answered: FxHashSet<DialogId> =
            FxHashSet::with_capacity_and_hasher(routed.len(), Default::default());
        for (inbound, dialog) in routed {
            let Some(d) = dialog else {
                host.receive(inbound).await?;
                continue;
            };
            if answered.contains(&d) || busy.contains(&d) {
                if opted_out.contains(&d) {
                    self.carried_opt_outs.insert(d);
                }
                self.carry.push(inbound);
                continue;
            }
            if !one_by_one.contains(&d) && !host.has_conductor(d) {
                if let Some(recent) = self.idle(host, &mut routing, d)? {
                    answered.insert(d);
                    jobs.push(Job {
                        message: inbound.message,
                        stored: Some(inbound.stored),
                        recent,
                    });
                    continue;
                }
            }
            one_by_one.insert(d);
            host.receive(inbound).await?;
        }
        Ok(jobs)
    }

    /// The dialog a message belongs to. A contact's dialog never changes
    /// once claimed, so the answer is kept.
    fn dialog_of(
        &mut self,
        host: &Host,
        contact: &Identity,
    ) -> Result<Option<DialogId>, StoreError> {
        if let Some(d) = self.lately.dialogs.get(contact) {
            return Ok(Some(*d));
        }
        let dialog = match host.store.contact_id_of(contact)? {
            Some(c) => host.store.dialog_of_contact(c)?,
            None => None,
        };
        if let Some(d) = dialog {
            self.lately.note_dialog(contact, d);
        }
        Ok(dialog)
    }

    /// Reads from the store what routing `batch` needs and no cache holds:
    /// the dialogs of contacts not seen lately, and the ctx parts of their
    /// dialogs (but those of `busy` ones, which wait anyway). Run before
    /// the batch before is stored, since a read waits for a transaction.
    fn warm(
        &mut self,
        host: &Host,
        batch: &[Inbound],
        busy: &FxHashSet<DialogId>,
    ) -> Result<Warmed, StoreError> {
        let mut ids = Vec::new();
        let mut seen = FxHashSet::default();
        for inbound in batch {
            let Some(d) = self.dialog_of(host, &inbound.message.contact)? else {
                continue;
            };
            if !busy.contains(&d) && !self.lately.recent.contains_key(&d) && seen.insert(d) {
                ids.push(d);
            }
        }
        let loaded = Self::load(host, &ids)?;
        let warmed = ids.into_iter().zip(loaded);
        Ok(Warmed(
            warmed.filter_map(|(id, r)| Some((id, r?))).collect(),
        ))
    }

    /// The dialog and its ctx parts if it can be answered here: live, no
    /// reply delay, nothing unhandled, nothing waiting to be sent.
    fn idle(
        &mut self,
        host: &Host,
        routing: &mut Routing<'_>,
        id: DialogId,
    ) -> Result<Option<Box<Recent>>, StoreError> {
        // The job takes the parts; the batch gives them back updated.
        let recent = match self.lately.recent.remove(&id) {
            Some(r) => r,
            None => match routing.warmed.0.remove(&id) {
                Some(r) => r,
                None => match Self::load(host, &[id])?.pop().flatten() {
                    Some(r) => r,
                    None => return Ok(None),
                },
            },
        };
        let dialog = &recent.dialog;
        if !dialog.status.is_live()
            || dialog.ending.is_some()
            || routing.config.campaign(&dialog.campaign).is_none()
            || routing.delayed(&dialog.account)
        {
            return Ok(None);
        }
        // Nothing was added since this path answered the dialog last (else
        // the store finds the answer stale), so nothing is unhandled or
        // unsent; one read from the store was checked by `load`.
        Ok(Some(recent))
    }

    /// Reads dialogs' ctx parts from the store (see [`Pipeline::ctx_parts`]),
    /// each with its records as they stand, to plan its answer from.
    fn load(host: &Host, ids: &[DialogId]) -> Result<Vec<Option<Box<Recent>>>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut loaded = Vec::with_capacity(ids.len());
        for found in host.store.latest_dialogs(ids)? {
            loaded.push(match found {
                Some((dialog, written)) => Self::ctx_parts(host, dialog, written)?,
                None => None,
            });
        }
        Ok(loaded)
    }

    /// A dialog's ctx parts, if nothing is unhandled or waiting to be sent.
    fn ctx_parts(
        host: &Host,
        dialog: Dialog,
        written: Box<Written>,
    ) -> Result<Option<Box<Recent>>, StoreError> {
        if host.store.has_unhandled(dialog.id)? {
            return Ok(None);
        }
        let messages = host.store.messages(dialog.id)?;
        if messages
            .iter()
            .any(|m| m.delivery == Some(Delivery::Pending))
        {
            return Ok(None);
        }
        let Some(contact) = host.store.contact(dialog.contact)? else {
            return Ok(None);
        };
        Ok(Some(Box::new(Recent {
            dialog,
            written: Some(written),
            identity: contact.identity.clone(),
            contact: contact_view(&contact),
            history: Arc::new(history_of(messages)),
        })))
    }
}

/// Asks every job's engine, concurrently.
async fn ask_engines(
    host: &Host,
    config: &Config,
    jobs: &[Job],
) -> Vec<Result<Reply, EngineError>> {
    // Campaign views by campaign and variant.
    let mut campaigns: HashMap<(&str, Option<&str>), _> = HashMap::new();
    let now = host.clock.now().as_secs_f64();
    let calls: Vec<_> = jobs
        .iter()
        .map(|j| {
            let d = &j.recent.dialog;
            let variant = d.variant.as_ref();
            let (campaign, template) = campaigns
                .entry((d.campaign.as_str(), variant.map(|v| v.name.as_str())))
                .or_insert_with(|| host.campaign_view(config, &d.campaign, variant))
                .clone();
            let engine = config.runs_on(&d.campaign, variant).engine;
            let ctx = Ctx {
                dialog: dialog_view(d),
                contact: j.recent.contact.clone(),
                account: AccountView {
                    name: d.account.clone(),
                },
                campaign,
                prompt_template: template,
                variant: variant.map(|v| v.name.clone()),
                now,
                state: d.state.clone(),
                history: j.recent.history.clone(),
            };
            let call = Call::Response {
                text: j.message.text.clone(),
                at: j.message.at.as_secs_f64(),
            };
            (engine, call, ctx)
        })
        .collect();
    host.engines.call_many(calls).await
}

/// Sends a dialog's replies in order, each on its slot; stops at the
/// first failure. The replies after it keep their slots in the store, held
/// by their pending messages, for the dialog's conductor.
async fn send_in_order(
    host: &Host,
    s: &mut Sending,
) -> (Vec<Settle>, Option<(Message, SendError)>) {
    let Recent {
        dialog, identity, ..
    } = &*s.recent;
    let mut sent = Vec::with_capacity(s.replies.len());
    for (m, slot) in s.replies.drain(..) {
        let key = slot.key();
        let message = (identity.clone(), m.text.clone(), MessageKind::Reply);
        match host.safety.send(host.transport(), slot, message).await {
            Ok(delivered) => sent.push(Settle {
                account: dialog.account.clone(),
                key,
                delivered,
            }),
            Err(e) => return (sent, Some((m, e))),
        }
    }
    (sent, None)
}

/// Reacts to a failed send as a conductor would on its first attempt;
/// true when the message stays pending for the dialog's conductor.
fn react(host: &Host, dialog: &Dialog, m: &Message, error: &SendError) -> Result<bool, StoreError> {
    let Some(key) = m.key else { return Ok(false) };
    let reaction = host.safety.report(&Failure {
        account: &dialog.account,
        campaign: &dialog.campaign,
        dialog: Some(dialog.id),
        contact: Some(dialog.contact),
        key,
        attempt: 0,
        error,
    })?;
    // The reactions that end the dialog are the conductor's table; the
    // others leave the message pending for the dialog's conductor.
    Ok(!conductor::end_on(host, m, &reaction)?)
}
