//! The operator's hand on the do-not-contact set: add a contact, remove
//! one, and the audit of both (records tree `dnc_audit`, oldest first).

use serde::{Deserialize, Serialize};

use super::Host;
use crate::clock::Timestamp;
use crate::model::{ContactId, DoNotContact, Identity};
use crate::store::{Store, StoreError};

const AUDIT: &str = "dnc_audit";

/// One change to the set.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Change {
    pub at: Timestamp,
    pub contact: ContactId,
    pub identity: String,
    /// `added` or `removed`.
    pub action: String,
    pub why: String,
}

/// Every change, oldest first.
pub fn audit(store: &Store) -> Result<Vec<Change>, StoreError> {
    Ok(store
        .records(AUDIT)?
        .scan::<Change>("")?
        .into_iter()
        .map(|(_, c)| c)
        .collect())
}

fn record(host: &Host, change: &Change) -> Result<(), StoreError> {
    // Keys sort by time, then by a random tail so two at one instant stay.
    let key = format!("{:020}-{:016x}", change.at.0.max(0), host.rng.next_u64());
    host.store.records(AUDIT)?.put(&key, change)?;
    host.store.flush()
}

/// Puts a contact of the store on the set, by hand.
pub fn add(host: &Host, identity: &Identity, why: &str) -> Result<(), String> {
    let contact = host
        .store
        .contact_by_identity(identity)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no contact {identity} is in any audience"))?;
    let why = if why.is_empty() { "added by hand" } else { why };
    host.store
        .add_do_not_contact(contact.id, DoNotContact::Unreachable(why.to_string()))
        .map_err(|e| e.to_string())?;
    record(
        host,
        &Change {
            at: host.clock.now(),
            contact: contact.id,
            identity: identity.to_string(),
            action: "added".into(),
            why: why.to_string(),
        },
    )
    .map_err(|e| e.to_string())?;
    tracing::info!(contact = %identity, "{identity} was put on the do-not-contact list by hand: {why}");
    Ok(())
}

/// Takes a contact off the set; it may be written to again.
pub fn remove(host: &Host, contact: ContactId) -> Result<(), String> {
    let was = host
        .store
        .do_not_contact(contact)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("contact {contact} is not on the do-not-contact list"))?;
    let identity = host
        .store
        .contact(contact)
        .map_err(|e| e.to_string())?
        .map_or_else(|| contact.to_string(), |c| c.identity.to_string());
    host.store
        .remove_do_not_contact(contact)
        .map_err(|e| e.to_string())?;
    let why = match was {
        DoNotContact::OptedOut => "had opted out".to_string(),
        DoNotContact::Unreachable(r) => format!("was unreachable: {r}"),
    };
    record(
        host,
        &Change {
            at: host.clock.now(),
            contact,
            identity: identity.clone(),
            action: "removed".into(),
            why,
        },
    )
    .map_err(|e| e.to_string())?;
    tracing::info!(
        contact = identity,
        "{identity} was taken off the do-not-contact list by hand"
    );
    Ok(())
}
