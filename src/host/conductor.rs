//! DialogConductor: one task per dialog with work, started on demand and
//! gone when idle. It sends what is pending, takes a waiting ending, and
//! answers incoming messages one at a time, in order.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::Host;
use crate::engine::Call;
use crate::model::{Delivery, DialogId, DialogStatus, Message, MessageKind};
use crate::safety::alerts::{Alert, AlertKind};
use crate::safety::reaction::Reaction;
use crate::safety::{Failure, Gate, Sent};
use crate::store::StoreError;
use crate::transition::Apply;

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
    let settle_sent = |host: &Host, d: crate::transport::Delivered| -> Result<(), StoreError> {
        match host.safety.settle_sent(&dialog.account, key, d) {
            Ok(()) | Err(StoreError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    };
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
        let still_live = |host: &Host| -> Result<Option<String>, StoreError> {
            let d = host.store.dialog(m.dialog)?;
            Ok(match d {
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
        };
        if let Some(why) = still_live(host)? {
            return cancel(host, m, why);
        }
        // The slot is taken, used and confirmed under the account's lock,
        // so that the limits see every send at its real time.
        let account_lock = host.account_lock(&dialog.account);
        let _account = tokio::select! {
            g = account_lock.lock() => g,
            _ = host.shutdown.cancelled() => return Ok(()),
        };
        let slot = match host
            .safety
            .reserve_now(&dialog.account, kind, window.as_ref(), key)?
        {
            Gate::Open(slot) => slot,
            Gate::NotBefore(t) => {
                crate::metrics::count(
                    "colloquy_safety_waits_total",
                    &[("account", &dialog.account)],
                );
                drop(_account);
                tokio::select! {
                    _ = host.safety.wait_until(t) => {}
                    _ = host.shutdown.cancelled() => return Ok(()),
                }
                continue;
            }
            Gate::Deny(d) => {
                drop(_account);
                cancel(host, m, d.to_string())?;
                return fail(host, m.dialog, DialogStatus::Blocked);
            }
        };
        // The claim, the message and its slot are durable before it leaves.
        host.store.flush_async().await?;
        let gate = host.gate(m.dialog).lock().await;
        if !host.store.is_pending(key)? {
            // The answer pipeline sent it meanwhile: the slot (the same
            // key's) is that send's.
            drop(slot);
            return Ok(());
        }
        if let Some(why) = still_live(host)? {
            drop(gate);
            host.safety.release(slot)?;
            return cancel(host, m, why);
        }
        let started = std::time::Instant::now();
        let message = (contact.identity.clone(), m.text.clone(), kind);
        let sent = host
            .safety
            .send_in_window(host.transport(), slot, window.as_ref(), message)
            .await?;
        drop(gate);
        crate::metrics::observe("colloquy_send_seconds", &[], started.elapsed());
        let error = match sent {
            Sent::WindowClosed => {
                drop(_account);
                continue;
            }
            Sent::Delivered(d) => {
                crate::metrics::count(
                    "colloquy_messages_sent_total",
                    &[("kind", kind.label()), ("account", &dialog.account)],
                );
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
            Sent::Failed(e) => e,
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
        drop(_account);
        attempt += 1;
        match reaction {
            Reaction::RetryAt(t) => {
                if !host.sleep_until(t).await {
                    return Ok(());
                }
            }
            Reaction::Reconcile => {
                match host
                    .transport()
                    .was_delivered(&dialog.account, &contact.identity, key)
                    .await
                {
                    Ok(Some(d)) => return settle_sent(host, d),
                    _ => {
                        let backoff = host.clock.now().saturating_add(Duration::from_secs(2));
                        if !host.sleep_until(backoff).await {
                            return Ok(());
                        }
                    }
                }
            }
            Reaction::FailDialog(why) => {
                cancel(host, m, why.clone())?;
                return fail(host, m.dialog, DialogStatus::Error { reason: why });
            }
            Reaction::Unreachable(why) => {
                cancel(host, m, why.clone())?;
                return fail(
                    host,
                    m.dialog,
                    DialogStatus::Error {
                        reason: format!("unreachable: {why}"),
                    },
                );
            }
            Reaction::AccountLost => {
                return cancel(host, m, error.to_string());
            }
        }
    }
}
