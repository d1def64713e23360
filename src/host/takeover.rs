//! A human takes over a dialog: the operator answers (in the console or
//! with `colloquy reply`), hands the dialog back to the engine, or
//! finishes it. A human's message is an outbound message like any other:
//! recorded as pending with its idempotency key, then sent by the
//! dialog's conductor through AccountSafety, so no limit is broken.

use std::sync::Arc;

use super::Host;
use crate::model::{DialogId, DialogStatus, MessageKind};

impl Host {
    /// Queues the operator's message in the dialog; its conductor sends it
    /// when the account's limits allow.
    pub fn reply_as_human(self: &Arc<Self>, id: DialogId, text: &str) -> Result<(), String> {
        if text.is_empty() {
            return Err("the message is empty".into());
        }
        let out = self.outbound(MessageKind::Human, &[text.to_string()]);
        self.store
            .record_outbound(id, &out[0], self.clock.now())
            .map_err(|e| e.to_string())?;
        tracing::info!(dialog = id, "a human reply was queued in dialog {id}");
        self.activate(id);
        Ok(())
    }

    /// A handed-off dialog goes back to the engine.
    pub fn hand_back(self: &Arc<Self>, id: DialogId) -> Result<(), String> {
        let d = self
            .store
            .set_dialog_status(id, DialogStatus::Active)
            .map_err(|e| e.to_string())?;
        tracing::info!(
            dialog = id,
            campaign = d.campaign,
            "dialog {id} was handed back to the engine"
        );
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
            outcome,
            "dialog {id} was finished by hand: {outcome}"
        );
        Ok(())
    }
}
