//! The operator's hand on the do-not-contact set: add a contact, remove
//! one. Every change is audited (`Store::audit_do_not_contact`), opt-outs
//! and unreachable contacts as well.

use super::Host;
use crate::model::{ContactId, DncChange, DoNotContact, Identity};
use crate::store::{Store, StoreError};

/// Every change, oldest first.
pub fn audit(store: &Store) -> Result<Vec<DncChange>, StoreError> {
    store.do_not_contact_audit()
}

fn record(host: &Host, change: &DncChange) -> Result<(), StoreError> {
    host.store.audit_do_not_contact(change)?;
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
        &DncChange {
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
        &DncChange {
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
