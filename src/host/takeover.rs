//! A human takes over a dialog: the operator answers (in the console or
//! with `colloquy reply`), hands the dialog back to the engine, or
//! finishes it. A human's message is an outbound message like any other:
//! recorded as pending with its idempotency key, then sent by the
//! dialog's conductor through AccountSafety, so no limit is broken. With
//! no host running, the message waits in the store and goes out when one
//! starts (it resumes every pending message).

use std::sync::Arc;

use super::Host;
use crate::clock::Timestamp;
use crate::model::{DialogId, DialogStatus, IdempotencyKey, MessageKind};
use crate::store::Store;
use crate::transition::Outbound;

/// Records the operator's message in the dialog as pending.
pub fn queue_human(
    store: &Store,
    id: DialogId,
    text: &str,
    key: IdempotencyKey,
    at: Timestamp,
) -> Result<(), String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("the message is empty".into());
    }
    let out = Outbound {
        kind: MessageKind::Human,
        text: text.to_string(),
        key,
    };
    store
        .record_outbound(id, &out, at)
        .map_err(|e| e.to_string())?;
    tracing::info!(dialog = id, "a human reply was queued in dialog {id}");
    Ok(())
}

/// A handed-off dialog goes back to the engine.
pub fn hand_back(store: &Store, id: DialogId) -> Result<(), String> {
    let d = store
        .set_dialog_status(id, DialogStatus::Active)
        .map_err(|e| e.to_string())?;
    tracing::info!(
        dialog = id,
        campaign = d.campaign,
        account = d.account,
        "dialog {id} was handed back to the engine"
    );
    Ok(())
}

impl Host {
    /// Queues the operator's message in the dialog; its conductor sends it
    /// when the account's limits allow.
    pub fn reply_as_human(self: &Arc<Self>, id: DialogId, text: &str) -> Result<(), String> {
        queue_human(&self.store, id, text, self.new_key(), self.clock.now())?;
        self.activate(id);
        Ok(())
    }

    /// A handed-off dialog goes back to the engine.
    pub fn hand_back(self: &Arc<Self>, id: DialogId) -> Result<(), String> {
        hand_back(&self.store, id)?;
        self.activate(id);
        Ok(())
    }

    /// The operator ends the dialog with an outcome label.
    pub fn finish_by_hand(self: &Arc<Self>, id: DialogId, outcome: &str) -> Result<(), String> {
        if outcome.is_empty() || outcome.contains(char::is_whitespace) {
            return Err("an outcome is one word, like booked or not_interested".into());
        }
        let d = self
            .store
            .set_dialog_status(
                id,
                DialogStatus::Finished {
                    outcome: outcome.to_string(),
                },
            )
            .map_err(|e| e.to_string())?;
        tracing::info!(
            dialog = id,
            campaign = d.campaign,
            account = d.account,
            outcome,
            "dialog {id} was finished by hand: {outcome}"
        );
        Ok(())
    }
}
