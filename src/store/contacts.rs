//! Contacts: audience imports, lookups, the pick of an uncontacted
//! contact, the do-not-contact set.

use super::*;

/// Rows written per batch of an import. sled rewrites each leaf a batch
/// touches once, so larger batches leave less of its log behind: at 8,192
/// rows an idle dialog's file took 888–1,003 bytes, at 1,024 1,106–1,170
/// (its contact's three keys are most of the difference); a batch holds
/// the store's writer about 30 ms, and 100,000 rows import in 2.9 s
/// instead of 2.2.
const IMPORT_CHUNK: usize = 8192;

/// Counts of what an audience import did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ImportStats {
    pub added: usize,
    /// Known contacts whose row changed something (a field, a new audience).
    pub updated: usize,
    /// Known contacts whose row changed nothing: not written again.
    pub unchanged: usize,
}

/// A contact first seen in `row`.
fn new_contact(id: ContactId, row: &ContactRow, pick_key: u64) -> Contact {
    let mut contact = Contact {
        id,
        identity: row.identity.clone(),
        username: None,
        phone: None,
        user_id: None,
        first_name: None,
        last_name: None,
        fields: Default::default(),
        audiences: Vec::new(),
        pick_key,
    };
    contact.take_row(row);
    contact
}

impl Contact {
    /// Takes the fields of an audience row of this contact.
    fn take_row(&mut self, row: &ContactRow) {
        self.username = row.username.clone();
        self.phone = row.phone.clone();
        self.user_id = row.user_id;
        self.first_name = row.first_name.clone();
        self.last_name = row.last_name.clone();
        self.fields = row.fields.clone();
    }
}

impl Store {
    /// Imports an audience's rows. A known identity keeps its contact (fields
    /// updated, audience added); a new one gets a new contact listed as
    /// uncontacted in this audience. Importing the same file twice changes
    /// nothing the second time.
    pub fn import_audience(
        &self,
        audience: &str,
        rows: &[ContactRow],
        pick_keys: &mut dyn FnMut() -> u64,
    ) -> Result<ImportStats, StoreError> {
        let mut stats = ImportStats::default();
        for chunk in rows.chunks(IMPORT_CHUNK) {
            let s = self.import_chunk(audience, chunk, pick_keys)?;
            stats.added += s.added;
            stats.updated += s.updated;
            stats.unchanged += s.unchanged;
        }
        Ok(stats)
    }

    fn import_chunk(
        &self,
        audience: &str,
        rows: &[ContactRow],
        pick_keys: &mut dyn FnMut() -> u64,
    ) -> Result<ImportStats, StoreError> {
        let mut stats = ImportStats::default();
        let mut contacts = sled::Batch::default();
        let mut identities = sled::Batch::default();
        let mut uncontacted = sled::Batch::default();
        let mut fresh: std::collections::HashMap<String, ContactId> = Default::default();
        for row in rows {
            let ikey = row.identity.key();
            let existing = match fresh.get(&ikey) {
                Some(id) => Some(*id),
                None => self
                    .t
                    .identities
                    .get(ikey.as_bytes())?
                    .map(|v| read_u64(&v)),
            };
            let (mut contact, stored) = match existing {
                Some(id) if !fresh.contains_key(&ikey) => {
                    let stored = self.contact(id)?.ok_or(StoreError::NotFound {
                        what: "contact",
                        id: id.to_string(),
                    })?;
                    (stored.clone(), Some(stored))
                }
                Some(_) => {
                    // The same identity twice in one chunk: the first row wins.
                    continue;
                }
                None => {
                    let id = self.db.generate_id()? + 1;
                    fresh.insert(ikey.clone(), id);
                    identities.insert(ikey.as_bytes(), &u64_key(id));
                    (new_contact(id, row, pick_keys()), None)
                }
            };
            contact.take_row(row);
            if !contact.audiences.iter().any(|a| a == audience) {
                contact.audiences.push(audience.to_string());
                if self.is_contactable(contact.id)? {
                    uncontacted
                        .insert(uncontacted_key(audience, contact.pick_key, contact.id), &[]);
                }
            }
            match stored {
                None => stats.added += 1,
                Some(stored) if stored == contact => {
                    stats.unchanged += 1;
                    continue;
                }
                Some(_) => stats.updated += 1,
            }
            contacts.insert(&u64_key(contact.id), encode_contact(&contact));
        }
        // Contacts first: an identity or index entry never points at nothing.
        // Each batch holds the writer on its own: about 30 ms at 8,192 rows.
        let batches = [
            (&self.t.contacts, contacts),
            (&self.t.identities, identities),
            (&self.t.uncontacted, uncontacted),
        ];
        for (tree, batch) in batches {
            let _writing = self.writing();
            let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            tree.apply_batch(batch)?;
        }
        (self.counts.identities).fetch_add(fresh.len() as u64, Ordering::SeqCst);
        Ok(stats)
    }

    /// Neither claimed by a dialog nor on the do-not-contact set.
    fn is_contactable(&self, id: ContactId) -> Result<bool, StoreError> {
        Ok(!self.t.dialog_of_contact.contains_key(u64_key(id))?
            && !self.t.do_not_contact.contains_key(u64_key(id))?)
    }

    pub fn contact(&self, id: ContactId) -> Result<Option<Contact>, StoreError> {
        self.t
            .contacts
            .get(u64_key(id))?
            .map(|b| decode_contact(&b))
            .transpose()
    }

    /// Contacts whose stored record mentions `text`, case-insensitively
    /// (in a name, the identity or another column): a sieve over the raw
    /// records that decodes only the ones it keeps. Text JSON would escape
    /// (quotes, backslashes, control characters) passes every record, so
    /// callers check what they show against what the user typed.
    pub fn contacts_mentioning<'a>(
        &'a self,
        text: &str,
    ) -> impl Iterator<Item = Result<Contact, StoreError>> + 'a {
        let escaped = text.contains(['"', '\\']) || text.chars().any(char::is_control);
        let needle = regex::bytes::RegexBuilder::new(&regex::escape(text))
            .case_insensitive(true)
            .build()
            .ok()
            .filter(|_| !escaped);
        self.t
            .contacts
            .iter()
            .values()
            .filter_map(move |v| match v {
                Err(e) => Some(Err(e.into())),
                Ok(v) => needle
                    .as_ref()
                    .is_none_or(|n| n.is_match(&v))
                    .then(|| decode_contact(&v)),
            })
    }

    pub fn contact_by_identity(&self, identity: &Identity) -> Result<Option<Contact>, StoreError> {
        match self.t.identities.get(identity.key().as_bytes())? {
            Some(id) => self.contact(read_u64(&id)),
            None => Ok(None),
        }
    }

    /// A random uncontacted contact of an audience, or `None` when all have
    /// been contacted: seek to the random key `r` and take the next entry,
    /// wrapping around. O(log n).
    pub fn pick_uncontacted(
        &self,
        audience: &str,
        r: u64,
    ) -> Result<Option<ContactId>, StoreError> {
        let prefix = audience_prefix(audience);
        let mut start = prefix.clone();
        start.extend_from_slice(&r.to_be_bytes());
        let mut end = prefix.clone();
        *end.last_mut().expect("prefix ends with 0") = 1;
        let found = match self.t.uncontacted.range(start..end.clone()).next() {
            Some(entry) => Some(entry?),
            None => self.t.uncontacted.range(prefix..end).next().transpose()?,
        };
        Ok(found.map(|(k, _)| read_u64(&k[k.len() - 8..])))
    }

    /// How many contacts of an audience are still uncontacted. O(n).
    pub fn uncontacted_count(&self, audience: &str) -> usize {
        self.t
            .uncontacted
            .scan_prefix(audience_prefix(audience))
            .count()
    }

    /// Puts a contact on the do-not-contact set; no campaign picks it again.
    pub fn add_do_not_contact(&self, id: ContactId, why: DoNotContact) -> Result<(), StoreError> {
        self.transact(|tx| {
            if let Some(bytes) = tx.contacts.get(u64_key(id))? {
                let contact: Contact = tx_read(decode_contact, &bytes)?;
                tx.unlist_contact(&contact)?;
            }
            tx.do_not_contact.insert(&u64_key(id), encode(&why))?;
            Ok(())
        })
    }

    /// Takes a contact off the do-not-contact set; one never claimed by a
    /// dialog becomes pickable again in its audiences. Returns whether it
    /// was on the set.
    pub fn remove_do_not_contact(&self, id: ContactId) -> Result<bool, StoreError> {
        self.transact(|tx| {
            let key = u64_key(id);
            if tx.do_not_contact.remove(&key)?.is_none() {
                return Ok(false);
            }
            if tx.dialog_of_contact.get(key)?.is_none() {
                tx.relist_contact(id)?;
            }
            Ok(true)
        })
    }

    /// Notes a change to the do-not-contact set in its audit (records tree
    /// `dnc_audit`, in time order).
    pub fn audit_do_not_contact(&self, change: &crate::model::DncChange) -> Result<(), StoreError> {
        let key = format!(
            "{:020}-{:020}-{}",
            change.at.0.max(0),
            change.contact,
            change.action
        );
        self.records("dnc_audit")?.put(&key, change)
    }

    /// The do-not-contact audit, oldest first.
    pub fn do_not_contact_audit(&self) -> Result<Vec<crate::model::DncChange>, StoreError> {
        Ok(self
            .records("dnc_audit")?
            .scan("")?
            .into_iter()
            .map(|(_, c)| c)
            .collect())
    }

    /// Every contact on the do-not-contact set, with why.
    pub fn do_not_contact_list(&self) -> Result<Vec<(ContactId, DoNotContact)>, StoreError> {
        self.t
            .do_not_contact
            .iter()
            .map(|e| {
                let (k, v) = e?;
                Ok((read_u64(&k), decode("do-not-contact", &v)?))
            })
            .collect()
    }

    pub fn do_not_contact(&self, id: ContactId) -> Result<Option<DoNotContact>, StoreError> {
        self.t
            .do_not_contact
            .get(u64_key(id))?
            .map(|b| decode("do-not-contact", &b))
            .transpose()
    }
}
