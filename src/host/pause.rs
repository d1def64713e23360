//! A campaign that pauses itself: after `[engines] pause_after_failures`
//! engine failures in a row at its openings. The pause is written into
//! config.toml (`status = "paused"`), so it survives restarts and the
//! operator resumes it the way they pause it; the reason is kept in the
//! store for `status`, and dropped once the campaign runs again.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::Host;
use crate::clock::Timestamp;
use crate::config::CampaignStatus;
use crate::safety::alerts::{Alert, AlertKind};
use crate::store::{Store, StoreError};

/// Records tree: campaign name → [`Paused`].
const PAUSES: &str = "campaign_pauses";

/// Why and when a campaign paused itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Paused {
    pub reason: String,
    pub at: Timestamp,
}

/// The reason a campaign paused itself, if it did and has not run since.
pub fn reason(store: &Store, campaign: &str) -> Result<Option<Paused>, StoreError> {
    store.records(PAUSES)?.get(campaign)
}

/// The campaign runs again: its pause reason goes.
pub fn resumed(store: &Store, campaign: &str) -> Result<(), StoreError> {
    let pauses = store.records(PAUSES)?;
    if pauses.get::<Paused>(campaign)?.is_some() {
        pauses.remove(campaign)?;
        tracing::info!(campaign, "campaign {campaign} resumed");
    }
    Ok(())
}

/// Pauses the campaign at once: in the running config, in config.toml
/// (when it cannot be written, the next reload of the file resumes it), its
/// reason in the store, one alert.
pub fn pause_itself(host: &Arc<Host>, campaign: &str, reason: &str) {
    let paused = Paused {
        reason: reason.to_string(),
        at: host.clock.now(),
    };
    let stored = host
        .store
        .records(PAUSES)
        .and_then(|r| r.put(campaign, &paused))
        .and_then(|()| host.store.flush());
    if let Err(e) = stored {
        tracing::error!(
            campaign,
            "the pause of campaign {campaign} cannot be stored: {e}"
        );
    }
    let mut config = (*host.config()).clone();
    for c in &mut config.file.campaigns {
        if c.name == campaign {
            c.status = CampaignStatus::Paused;
        }
    }
    let path = config.path.clone();
    host.set_config(Arc::new(config));
    let written = crate::config::edit::set_campaign_status(&path, campaign, CampaignStatus::Paused);
    let how = match &written {
        Ok(()) => format!(
            "{} now says status = \"paused\"; fix the engine, then set it to \"active\"",
            path.display()
        ),
        Err(e) => format!("{e}; it stays paused until config.toml is saved again"),
    };
    host.alerts.raise(
        Alert::new(
            AlertKind::CampaignPaused,
            host.clock.now(),
            format!("campaign {campaign} paused itself: {reason}; {how}"),
        )
        .campaign(campaign),
    );
}
