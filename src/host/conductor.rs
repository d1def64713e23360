//! DialogConductor: one task per dialog with work, started on demand and
//! gone when idle. It sends what is pending, takes a waiting ending, and
//! answers incoming messages one at a time, in order.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::Host;
use crate::clock::Timestamp;
use crate::config::SendWindow;
use crate::engine::Call;
use crate::model::{
    Contact, Delivery, Dialog, DialogId, DialogStatus, IdempotencyKey, Identity, Message,
    MessageKind,
};
use crate::safety::alerts::{Alert, AlertKind};
use crate::safety::reaction::Reaction;
use crate::safety::{Failure, Gate, Sent, Slot};
use crate::store::StoreError;
use crate::transition::Apply;
use crate::transport::{Delivered, SendError};

pub async fn run(host: Arc<Host>, dialog: DialogId, dirty: Arc<AtomicBool>) {
    // Keys this process has tried to send: any other pending key may have
    // reached Telegram before a crash, and is reconciled before it is sent.
    let mut tried = HashSet::new();
    loop {
        dirty.store(false, Ordering::SeqCst);
        if host.shutdown.is_cancelled() {
            break;
        }
        match step(&host, dialog, &mut tried).await {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => {
                tracing::error!(dialog, "dialog work failed: {e}");
                break;
            }
        }
        if host.conductor_may_stop(dialog, &dirty) {
            return;
        }
    }
    host.conductor_may_stop(dialog, &AtomicBool::new(false));
}

/// Does one piece of work; false when there is none left.
async fn step(
    host: &Arc<Host>,
    id: DialogId,
    tried: &mut HashSet<u64>,
) -> Result<bool, StoreError> {
    let Some(dialog) = host.store.dialog(id)? else {
        return Ok(false);
    };
    let pending = host.store.pending_of(id)?;
    if let Some(m) = pending.first() {
        send(host, m, tried).await?;
        return Ok(!host.shutdown.is_cancelled());
    }
    if let Some(ending) = &dialog.ending {
        let done = host.store.complete_ending(id)?;
        tracing::info!(
            dialog = id,
            campaign = done.campaign,
            account = done.account,
            "the dialog ended: {}",
            crate::report::status_text(&done.status)
        );
        if *ending == DialogStatus::Handoff {
            host.alerts.raise(
                Alert::new(
                    AlertKind::Handoff,
                    host.clock.now(),
                    format!("dialog {id} was handed to a human"),
                )
                .campaign(&done.campaign)
                .account(&done.account)
                .dialog(id),
            );
        }
        return Ok(true);
    }
    let Some(msg) = host.store.next_unhandled(id)? else {
        return Ok(false);
    };
    answer(host, &dialog, &msg).await?;
    Ok(true)
}

/// Answers one incoming message after the human-like reply delay.
async fn answer(
    host: &Arc<Host>,
    dialog: &crate::model::Dialog,
    msg: &Message,
) -> Result<(), StoreError> {
    let handled_only = |host: &Arc<Host>| {
        host.store.apply(
            dialog.id,
            &Apply {
                at: host.clock.now(),
                handled: Some(msg.seq),
                ..Apply::default()
            },
        )
    };
    if !dialog.status.is_live() || dialog.ending.is_some() {
        handled_only(host)?;
        return Ok(());
    }
    let safety = host.config().account_safety(&dialog.account);
    let delay = host
        .rng
        .duration_between(safety.reply_delay.lo, safety.reply_delay.hi);
    if !host.sleep_until(msg.at.saturating_add(delay)).await {
        return Ok(());
    }
    let Some(dialog) = host.store.dialog(dialog.id)? else {
        return Ok(());
    };
    if !dialog.status.is_live() {
        handled_only(host)?;
        return Ok(());
    }
    let Some(contact) = host.store.contact(dialog.contact)? else {
        return Ok(());
    };
    let ctx = host.ctx(&dialog, &contact)?;
    let engine = host
        .config()
        .runs_on(&dialog.campaign, dialog.variant.as_ref())
        .engine;
    let call = Call::Response {
        text: msg.text.clone(),
        at: msg.at.as_secs_f64(),
    };
    match host.engines.call(&engine, call, ctx).await {
        Ok(reply) => {
            let outbound = host.outbound(MessageKind::Reply, &reply.output.messages);
            let ending = ending_of(&reply.output);
            host.store.apply(
                dialog.id,
                &Apply {
                    at: host.clock.now(),
                    handled: Some(msg.seq),
                    state: Some(&reply.state),
                    outbound: &outbound,
                    ending,
                    reviewed: false,
                },
            )?;
        }
        Err(e) => {
            // The message stays unanswered, not lost: the dialog waits for
            // the engine to be fixed (a reload) or the config to change,
            // then tries again.
            let changed = host.changed.notified();
            let reloaded = host.engines.reloaded();
            engine_stumbled(host, &dialog, &e.to_string());
            tokio::select! {
                _ = changed => {}
                _ = reloaded => {}
                _ = host.shutdown.cancelled() => {}
            }
        }
    }
    Ok(())
}

/// An engine call failed and the dialog goes on (a message waits for an
/// answer, a follow-up comes later): logged and alerted, nothing else.
pub fn engine_stumbled(host: &Host, dialog: &crate::model::Dialog, error: &str) {
    tracing::error!(
        dialog = dialog.id,
        campaign = dialog.campaign,
        "{error}; the dialog waits for a working engine"
    );
    host.alerts.raise(
        Alert::new(
            AlertKind::EngineError,
            host.clock.now(),
            format!("{error}; dialog {} waits for a working engine", dialog.id),
        )
        .campaign(&dialog.campaign)
        .account(&dialog.account)
        .dialog(dialog.id),
    );
}

/// The status an engine's output asks for.
pub fn ending_of(out: &crate::engine::Output) -> Option<DialogStatus> {
    if let Some(outcome) = &out.finish {
        Some(DialogStatus::Finished {
            outcome: outcome.clone(),
        })
    } else if out.handoff {
        Some(DialogStatus::Handoff)
    } else {
        None
    }
}

pub(super) fn cancel(host: &Host, m: &Message, reason: String) -> Result<(), StoreError> {
    if let Some(key) = m.key {
        match host
            .store
            .settle_outbound(key, Delivery::Cancelled { reason }, None)
        {
            Ok(_) | Err(StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub(super) fn fail(host: &Host, dialog: DialogId, status: DialogStatus) -> Result<(), StoreError> {
    match host.store.set_dialog_status(dialog, status) {
        Ok(_) | Err(StoreError::Transition(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Why a message can no longer go to its dialog's contact, if so.
fn why_not_live(
    host: &Host,
    dialog: DialogId,
    kind: MessageKind,
) -> Result<Option<String>, StoreError> {
    Ok(match host.store.dialog(dialog)? {
        Some(d)
            if d.status.is_live()
                || d.ending.is_some()
                || (kind == MessageKind::Human && d.status == DialogStatus::Handoff) =>
        {
            if host.store.do_not_contact(d.contact)?.is_some() {
                Some("the contact must not be contacted".into())
            } else {
                None
            }
        }
        Some(d) => Some(format!("the dialog is {}", d.status.label())),
        None => Some("the dialog is gone".into()),
    })
}

/// What a failed send's reaction does to its message and dialog when it
/// ends them: the one table of those reactions, for the conductor and the
/// answer pipeline. True if it ended them; the other reactions (wait,
/// reconcile, the account lost) are the caller's.
pub(super) fn end_on(host: &Host, m: &Message, reaction: &Reaction) -> Result<bool, StoreError> {
    let status = match reaction {
        Reaction::FailDialog(why) => {
            cancel(host, m, why.clone())?;
            DialogStatus::Error {
                reason: why.clone(),
            }
        }
        Reaction::Unreachable(why) => {
            cancel(host, m, why.clone())?;
            DialogStatus::Error {
                reason: format!("unreachable: {why}"),
            }
        }
        Reaction::RetryAt(_) | Reaction::Reconcile | Reaction::AccountLost => return Ok(false),
    };
    fail(host, m.dialog, status)?;
    Ok(true)
}

/// Sends one pending message through the safety gate, reacting to every
/// failure as the reaction table says, until it is sent or cancelled.
async fn send(host: &Arc<Host>, m: &Message, tried: &mut HashSet<u64>) -> Result<(), StoreError> {
    let Some(key) = m.key else { return Ok(()) };
    let kind = m.kind.unwrap_or(MessageKind::Reply);
    let Some(dialog) = host.store.dialog(m.dialog)? else {
        return Ok(());
    };
    let Some(contact) = host.store.contact(dialog.contact)? else {
        return cancel(host, m, "the contact is gone".into());
    };
    let settle_sent =
        |host: &Host, d: Delivered| settled(host.safety.settle_sent(&dialog.account, key, d));
    if tried.insert(key.0) {
        // Possibly sent before a crash: ask before sending again.
        if let Ok(Some(d)) = host
            .transport()
            .was_delivered(&dialog.account, &contact.identity, key)
            .await
        {
            return settle_sent(host, d);
        }
    }
    let window = if kind.answers() {
        None
    } else {
        host.window(&dialog.campaign, &contact)
    };
    let mut attempt = 0u32;
    loop {
        let Some((slot, account_lock)) = take_slot(host, m, &dialog, window.as_ref()).await? else {
            return Ok(());
        };
        let error = match send_on_slot(host, m, slot, window.as_ref(), &contact.identity).await? {
            None => return Ok(()),
            Some(Sent::WindowClosed) => continue,
            Some(Sent::Delivered(d)) => {
                if kind != MessageKind::Opening {
                    tracing::info!(
                        dialog = m.dialog,
                        campaign = dialog.campaign,
                        account = dialog.account,
                        "sent a {}",
                        kind.label().replace('_', "-")
                    );
                }
                return settle_sent(host, d);
            }
            Some(Sent::Failed(e)) => e,
        };
        let reaction = host.safety.report(&Failure {
            account: &dialog.account,
            campaign: &dialog.campaign,
            dialog: Some(m.dialog),
            contact: Some(dialog.contact),
            key,
            attempt,
            error: &error,
        })?;
        // What the failure changed (a pause, a block) is durable before
        // anything else is tried.
        host.store.flush_async().await?;
        drop(account_lock);
        attempt += 1;
        let Some(retry_at) =
            after_failure(host, (m, key), &dialog, &contact, reaction, &error).await?
        else {
            return Ok(());
        };
        if !host.sleep_until(retry_at).await {
            return Ok(());
        }
    }
}

/// Waits for `m`'s slot and returns it with its account's lock held: the
/// slot is taken, used and confirmed under that lock, so that the limits
/// see every send at its real time. `None` when `m` is not to be sent: its
/// dialog is no longer live or its account is denied (both cancel it), or
/// the host stops.
async fn take_slot(
    host: &Host,
    m: &Message,
    dialog: &Dialog,
    window: Option<&SendWindow>,
) -> Result<Option<(Slot, tokio::sync::OwnedMutexGuard<()>)>, StoreError> {
    let (Some(key), kind) = (m.key, m.kind.unwrap_or(MessageKind::Reply)) else {
        return Ok(None);
    };
    loop {
        if let Some(why) = why_not_live(host, m.dialog, kind)? {
            cancel(host, m, why)?;
            return Ok(None);
        }
        let account_lock = tokio::select! {
            g = host.account_lock(&dialog.account).lock_owned() => g,
            _ = host.shutdown.cancelled() => return Ok(None),
        };
        match host
            .safety
            .reserve_now(&dialog.account, kind, window, key)?
        {
            Gate::Open(slot) => return Ok(Some((slot, account_lock))),
            Gate::NotBefore(t) => {
                crate::metrics::count(
                    "colloquy_safety_waits_total",
                    &[("account", &dialog.account)],
                );
                drop(account_lock);
                tokio::select! {
                    _ = host.safety.wait_until(t) => {}
                    _ = host.shutdown.cancelled() => return Ok(None),
                }
            }
            Gate::Deny(d) => {
                drop(account_lock);
                cancel(host, m, d.to_string())?;
                fail(host, m.dialog, DialogStatus::Blocked)?;
                return Ok(None);
            }
        }
    }
}

/// What follows a failed send once its reaction is durable: the dialog
/// ended, the message settled as delivered after all or cancelled
/// (`None`), or the time to try again.
async fn after_failure(
    host: &Host,
    (m, key): (&Message, IdempotencyKey),
    dialog: &Dialog,
    contact: &Contact,
    reaction: Reaction,
    error: &SendError,
) -> Result<Option<Timestamp>, StoreError> {
    if end_on(host, m, &reaction)? {
        return Ok(None);
    }
    match reaction {
        Reaction::RetryAt(t) => Ok(Some(t)),
        Reaction::Reconcile => {
            let asked = host
                .transport()
                .was_delivered(&dialog.account, &contact.identity, key);
            if let Ok(Some(d)) = asked.await {
                settled(host.safety.settle_sent(&dialog.account, key, d))?;
                return Ok(None);
            }
            Ok(Some(
                host.clock.now().saturating_add(Duration::from_secs(2)),
            ))
        }
        _ => {
            cancel(host, m, error.to_string())?;
            Ok(None)
        }
    }
}

/// A confirmation of a send that found its message gone is no failure.
fn settled(confirmed: Result<(), StoreError>) -> Result<(), StoreError> {
    match confirmed {
        Ok(()) | Err(StoreError::NotFound { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Sends `m` on its slot once its claim, the message and the slot are
/// durable, under the dialog's gate; `None` when it is not to be sent by
/// this conductor after all (the answer pipeline sent it meanwhile, or the
/// dialog moved on, which cancels it).
async fn send_on_slot(
    host: &Host,
    m: &Message,
    slot: Slot,
    window: Option<&SendWindow>,
    contact: &Identity,
) -> Result<Option<Sent>, StoreError> {
    let kind = m.kind.unwrap_or(MessageKind::Reply);
    host.store.flush_async().await?;
    let _gate = host.gate(m.dialog).lock().await;
    if !host.store.is_pending(slot.key())? {
        // The answer pipeline sent it meanwhile: the slot (the same key's)
        // is that send's.
        drop(slot);
        return Ok(None);
    }
    if let Some(why) = why_not_live(host, m.dialog, kind)? {
        drop(_gate);
        host.safety.release(slot)?;
        cancel(host, m, why)?;
        return Ok(None);
    }
    let account = slot.account().to_string();
    let started = std::time::Instant::now();
    let message = (contact.clone(), m.text.clone(), kind);
    let sent = host
        .safety
        .send_in_window(host.transport(), slot, window, message)
        .await?;
    crate::metrics::observe("colloquy_send_seconds", &[], started.elapsed());
    if let Sent::Delivered(_) = sent {
        crate::metrics::count(
            "colloquy_messages_sent_total",
            &[("kind", kind.label()), ("account", &account)],
        );
    }
    Ok(Some(sent))
}
