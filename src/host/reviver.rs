//! DialogReviver: follows up on dialogs that went quiet for `stuck_after`,
//! or ends them as dead. It sleeps until the quietest dialog is due.

use std::sync::Arc;

use super::conductor::{ending_of, engine_stumbled};
use super::Host;
use crate::clock::Timestamp;
use crate::engine::Call;
use crate::model::{Contact, Dialog, DialogStatus, MessageKind};
use crate::store::StoreError;
use crate::transition::Apply;
use crate::transport::SendError;

pub async fn run(host: Arc<Host>) {
    loop {
        let woken = host.activity.notified();
        let changed = host.changed.notified();
        let next = match host.store.quietest_dialog() {
            Ok(n) => n,
            Err(e) => {
                tracing::error!("the reviver cannot read the store: {e}");
                None
            }
        };
        let Some((quiet_since, id)) = next else {
            tokio::select! {
                _ = woken => continue,
                _ = changed => continue,
                _ = host.shutdown.cancelled() => return,
            }
        };
        let dialog = match host.store.dialog(id) {
            Ok(Some(d)) => d,
            _ => continue,
        };
        if dialog.status.is_live() && dialog.last_activity() > quiet_since {
            // The answer pipeline left the index behind: catch it up.
            if let Err(e) = host.store.reindex(id) {
                tracing::error!(
                    dialog = id,
                    "the quiet-dialogs index cannot be updated: {e}"
                );
            }
            continue;
        }
        let stuck_after = host.config().account_safety(&dialog.account).stuck_after.0;
        let due = quiet_since.saturating_add(stuck_after);
        if due > host.clock.now() {
            tokio::select! {
                _ = host.clock.sleep_until(due) => {}
                _ = woken => {}
                _ = changed => {}
                _ = host.shutdown.cancelled() => return,
            }
            continue;
        }
        if let Err(e) = revive(&host, &dialog).await {
            tracing::error!(dialog = id, "reviving the dialog failed: {e}");
            let _ = host.store.apply(
                id,
                &Apply {
                    at: host.clock.now(),
                    reviewed: true,
                    ..Apply::default()
                },
            );
        }
        if host.shutdown.is_cancelled() {
            return;
        }
    }
}

async fn revive(host: &Arc<Host>, dialog: &Dialog) -> Result<(), StoreError> {
    let now = host.clock.now();
    let reviewed = reviewed(now);
    // A dialog with work in hand is not quiet: look again later.
    if host.has_conductor(dialog.id)
        || dialog.ending.is_some()
        || !host.store.pending_of(dialog.id)?.is_empty()
        || host.store.next_unhandled(dialog.id)?.is_some()
    {
        host.store.apply(dialog.id, &reviewed)?;
        return Ok(());
    }
    let Some(contact) = host.store.contact(dialog.contact)? else {
        host.store.apply(dialog.id, &reviewed)?;
        return Ok(());
    };
    match caught_up(host, dialog, &contact).await {
        // The dialog was not quiet: its replies are being answered.
        Ok(true) => return Ok(()),
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(
                dialog = dialog.id,
                account = dialog.account,
                "no follow-up yet: the chat could not be checked for replies ({e}); it is looked at again after stuck_after"
            );
            host.store.apply(dialog.id, &reviewed)?;
            return Ok(());
        }
    }
    let config = host.config();
    let engine = config
        .runs_on(&dialog.campaign, dialog.variant.as_ref())
        .engine;
    let allowance = config
        .account_safety(&dialog.account)
        .max_follow_ups
        .saturating_sub(dialog.follow_ups_sent);
    if allowance > 0 && follow_up(host, dialog, &contact, &engine, allowance, now).await? {
        return Ok(());
    }
    let dialog = host
        .store
        .dialog(dialog.id)?
        .unwrap_or_else(|| dialog.clone());
    ask_if_dead(host, &dialog, &contact, &engine, now).await
}

/// Has the transport deliver the contact's replies that the chat holds
/// and the store lacks (their delivery was lost); true when there were
/// any, which the dialog's conductor now answers.
async fn caught_up(host: &Host, dialog: &Dialog, contact: &Contact) -> Result<bool, SendError> {
    let stored = |e: StoreError| SendError::Other(e.to_string());
    // What came before the dialog's first message on the wire is not a
    // reply to it; a dialog with none has nothing to look for.
    let Some(first) = host.store.first_transport_id(dialog.id).map_err(stored)? else {
        return Ok(false);
    };
    let after = dialog.max_incoming_id.map_or(first, |max| max.max(first));
    host.transport()
        .catch_up(&dialog.account, &contact.identity, after)
        .await?;
    let now = host.store.dialog(dialog.id).map_err(stored)?;
    let missed = now.is_some_and(|d| d.last_inbound_at != dialog.last_inbound_at);
    if missed {
        tracing::warn!(
            dialog = dialog.id,
            account = dialog.account,
            "a reply that never arrived was found in the chat; answering it instead of following up"
        );
    }
    Ok(missed)
}

/// Asks the engine for a follow-up (at most `allowance` messages, recorded
/// at `now`); true
/// when that settled the dialog for this review (a follow-up, an ending,
/// a handoff, or an engine that failed).
async fn follow_up(
    host: &Arc<Host>,
    dialog: &Dialog,
    contact: &Contact,
    engine: &str,
    allowance: u32,
    now: Timestamp,
) -> Result<bool, StoreError> {
    let ctx = host.ctx(dialog, contact)?;
    match host.engines.call(engine, Call::FollowUp, ctx).await {
        Ok(reply)
            if !reply.output.messages.is_empty()
                || reply.output.finish.is_some()
                || reply.output.handoff =>
        {
            let messages = &reply.output.messages;
            let allowed = &messages[..messages.len().min(allowance as usize)];
            let outbound = host.outbound(MessageKind::FollowUp, allowed);
            host.store.apply(
                dialog.id,
                &Apply {
                    at: now,
                    state: Some(&reply.state),
                    outbound: &outbound,
                    ending: ending_of(&reply.output),
                    reviewed: true,
                    ..Apply::default()
                },
            )?;
            host.activate(dialog.id);
            Ok(true)
        }
        Ok(reply) => {
            host.store.apply(
                dialog.id,
                &Apply {
                    at: now,
                    state: Some(&reply.state),
                    ..Apply::default()
                },
            )?;
            Ok(false)
        }
        Err(e) => {
            // No follow-up this time; the dialog stays and is looked at
            // again after another stuck_after.
            engine_stumbled(host, dialog, &e.to_string());
            host.store.apply(dialog.id, &reviewed(now))?;
            Ok(true)
        }
    }
}

/// Asks the engine whether a quiet dialog is dead, and closes it if so.
async fn ask_if_dead(
    host: &Arc<Host>,
    dialog: &Dialog,
    contact: &Contact,
    engine: &str,
    now: Timestamp,
) -> Result<(), StoreError> {
    let ctx = host.ctx(dialog, contact)?;
    match host.engines.call(engine, Call::IsDead, ctx).await {
        Ok(reply) if reply.output.dead => {
            host.store
                .set_dialog_status(dialog.id, DialogStatus::Dead)?;
            tracing::info!(
                dialog = dialog.id,
                campaign = dialog.campaign,
                "the dialog went quiet for good: dead"
            );
        }
        Ok(reply) => {
            host.store.apply(
                dialog.id,
                &Apply {
                    at: now,
                    state: Some(&reply.state),
                    reviewed: true,
                    ..Apply::default()
                },
            )?;
        }
        Err(e) => {
            engine_stumbled(host, dialog, &e.to_string());
            host.store.apply(dialog.id, &reviewed(now))?;
        }
    }
    Ok(())
}

/// The change that marks a dialog reviewed at `now` and nothing else.
fn reviewed(now: Timestamp) -> Apply<'static> {
    Apply {
        at: now,
        reviewed: true,
        ..Apply::default()
    }
}
