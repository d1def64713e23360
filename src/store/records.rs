//! The binary layout of the store's most numerous and most written
//! records: dialogs and contacts (a store of a million idle dialogs is
//! mostly these) and account records (a batch of answers rewrites the
//! record of every account it sends from). Each is written in about a
//! third of its JSON or less (integers as varints, field names left out,
//! absent fields one bit).
//!
//! A record is [`BINARY`] followed by its body; a record of the first
//! layout ([`JSON`], dialogs and contacts before store layout 2, account
//! records before layout 3) is read as JSON and rewritten in binary the
//! next time it changes.
//!
//! Dialog: `flags u8 ++ id ++ contact ++ next_seq ++ follow_ups_sent ++
//! started_at ++ [last_inbound_at] [last_outbound_at] [reviewed_at]
//! [indexed_at] [max_incoming_id] ++ campaign ++ account ++ status ++
//! [ending] ++ [variant name ++ engine] ++ [state JSON to the end]`, the
//! bracketed parts present when their flag is set. The state comes last so
//! that a listing reads a dialog without it.
//!
//! Contact: `flags u8 ++ id ++ pick_key u64 LE ++ identity ++ [username]
//! [phone] [user_id] [first_name] [last_name] ++ audiences ++ fields`.
//!
//! Account record: `flags u8 ++ status ++ next_send_at ++ [first_send_at]`,
//! the status its tag with `until` or `reason` for the three that carry
//! one. The name is the record's key; the sends are stored beside it (see
//! `accounts.rs`).
//!
//! Unsigned integers are LEB128 varints, signed ones (times, Telegram ids)
//! zigzag varints; a string is its length as a varint and its UTF-8 bytes;
//! a list is its length and its items.

use std::collections::BTreeMap;

use super::StoreError;
use crate::clock::Timestamp;
use crate::model::{
    AccountRecord, AccountStatus, Contact, Dialog, DialogStatus, DialogSummary, DialogVariant,
    Identity,
};

/// The version byte of a JSON record.
pub(super) const JSON: u8 = 1;
/// The version byte of a binary record.
const BINARY: u8 = 2;

const LAST_INBOUND: u8 = 1;
const LAST_OUTBOUND: u8 = 1 << 1;
const REVIEWED: u8 = 1 << 2;
const INDEXED: u8 = 1 << 3;
const MAX_INCOMING: u8 = 1 << 4;
const ENDING: u8 = 1 << 5;
const VARIANT: u8 = 1 << 6;
const STATE: u8 = 1 << 7;

const USERNAME: u8 = 1;
const PHONE: u8 = 1 << 1;
const USER_ID: u8 = 1 << 2;
const FIRST_NAME: u8 = 1 << 3;
const LAST_NAME: u8 = 1 << 4;

const FIRST_SEND: u8 = 1;

pub(super) fn encode_dialog(d: &Dialog) -> Vec<u8> {
    let has_state = d.state.as_object().is_none_or(|o| !o.is_empty());
    let flags = flags([
        (d.last_inbound_at.is_some(), LAST_INBOUND),
        (d.last_outbound_at.is_some(), LAST_OUTBOUND),
        (d.reviewed_at.is_some(), REVIEWED),
        (d.indexed_at.is_some(), INDEXED),
        (d.max_incoming_id.is_some(), MAX_INCOMING),
        (d.ending.is_some(), ENDING),
        (d.variant.is_some(), VARIANT),
        (has_state, STATE),
    ]);
    let mut w = Writer(Vec::with_capacity(64 + d.campaign.len() + d.account.len()));
    w.0.extend_from_slice(&[BINARY, flags]);
    w.uint(d.id);
    w.uint(d.contact);
    w.uint(d.next_seq);
    w.uint(d.follow_ups_sent.into());
    w.int(d.started_at.0);
    let times = [
        d.last_inbound_at,
        d.last_outbound_at,
        d.reviewed_at,
        d.indexed_at,
    ];
    for t in times.into_iter().flatten() {
        w.int(t.0);
    }
    if let Some(id) = d.max_incoming_id {
        w.int(id);
    }
    w.str(&d.campaign);
    w.str(&d.account);
    w.status(&d.status);
    if let Some(ending) = &d.ending {
        w.status(ending);
    }
    if let Some(v) = &d.variant {
        w.str(&v.name);
        w.str(&v.engine);
    }
    if has_state {
        // Serializing a JSON value cannot fail.
        serde_json::to_writer(&mut w.0, &d.state).expect("state serializes");
    }
    w.0
}

pub(super) fn decode_dialog(bytes: &[u8]) -> Result<Dialog, StoreError> {
    match bytes.split_first() {
        Some((&BINARY, body)) => read_dialog(&mut Reader::new("dialog", body), true),
        _ => super::decode_json("dialog", bytes),
    }
}

/// A dialog's record without its state, for listings.
pub(super) fn decode_dialog_summary(bytes: &[u8]) -> Result<DialogSummary, StoreError> {
    Ok(DialogSummary::from(&decode_dialog_listing(bytes)?))
}

/// A dialog without its state (an empty one instead).
pub(super) fn decode_dialog_listing(bytes: &[u8]) -> Result<Dialog, StoreError> {
    match bytes.split_first() {
        Some((&BINARY, body)) => read_dialog(&mut Reader::new("dialog", body), false),
        _ => super::decode_json("dialog", bytes),
    }
}

fn read_dialog(r: &mut Reader<'_>, with_state: bool) -> Result<Dialog, StoreError> {
    let flags = r.u8()?;
    let (id, contact, next_seq) = (r.uint()?, r.uint()?, r.uint()?);
    let follow_ups_sent = u32::try_from(r.uint()?).map_err(|_| r.corrupt("follow-ups overflow"))?;
    let started_at = Timestamp(r.int()?);
    let mut time = |bit| r.when(flags & bit != 0, |r| Ok(Timestamp(r.int()?)));
    let (last_inbound_at, last_outbound_at) = (time(LAST_INBOUND)?, time(LAST_OUTBOUND)?);
    let (reviewed_at, indexed_at) = (time(REVIEWED)?, time(INDEXED)?);
    let max_incoming_id = r.when(flags & MAX_INCOMING != 0, Reader::int)?;
    let (campaign, account) = (r.str()?, r.str()?);
    let status = r.status()?;
    let ending = r.when(flags & ENDING != 0, Reader::status)?;
    let variant = r.when(flags & VARIANT != 0, |r| {
        Ok(DialogVariant {
            name: r.str()?,
            engine: r.str()?,
        })
    })?;
    let state = match (flags & STATE != 0, with_state) {
        (true, true) => {
            serde_json::from_slice(r.rest()).map_err(|e| r.corrupt(&format!("state: {e}")))?
        }
        (false, _) => {
            r.end()?;
            serde_json::Value::Object(Default::default())
        }
        // A listing leaves the state unread.
        (true, false) => serde_json::Value::Object(Default::default()),
    };
    Ok(Dialog {
        id,
        campaign,
        account,
        contact,
        status,
        started_at,
        follow_ups_sent,
        last_inbound_at,
        last_outbound_at,
        state,
        next_seq,
        reviewed_at,
        ending,
        indexed_at,
        max_incoming_id,
        variant,
    })
}

pub(super) fn encode_contact(c: &Contact) -> Vec<u8> {
    let flags = flags([
        (c.username.is_some(), USERNAME),
        (c.phone.is_some(), PHONE),
        (c.user_id.is_some(), USER_ID),
        (c.first_name.is_some(), FIRST_NAME),
        (c.last_name.is_some(), LAST_NAME),
    ]);
    let mut w = Writer(Vec::with_capacity(64));
    w.0.extend_from_slice(&[BINARY, flags]);
    w.uint(c.id);
    w.0.extend_from_slice(&c.pick_key.to_le_bytes());
    match &c.identity {
        Identity::Username(u) => {
            w.0.push(0);
            w.str(u);
        }
        Identity::Phone(p) => {
            w.0.push(1);
            w.str(p);
        }
        Identity::UserId(id) => {
            w.0.push(2);
            w.int(*id);
        }
    }
    for s in [&c.username, &c.phone].into_iter().flatten() {
        w.str(s);
    }
    if let Some(id) = c.user_id {
        w.int(id);
    }
    for s in [&c.first_name, &c.last_name].into_iter().flatten() {
        w.str(s);
    }
    w.uint(c.audiences.len() as u64);
    for a in &c.audiences {
        w.str(a);
    }
    w.uint(c.fields.len() as u64);
    for (k, v) in &c.fields {
        w.str(k);
        w.str(v);
    }
    w.0
}

pub(super) fn decode_contact(bytes: &[u8]) -> Result<Contact, StoreError> {
    let Some((&BINARY, body)) = bytes.split_first() else {
        return super::decode_json("contact", bytes);
    };
    let r = &mut Reader::new("contact", body);
    let flags = r.u8()?;
    let id = r.uint()?;
    let pick_key = r.u64()?;
    let identity = match r.u8()? {
        0 => Identity::Username(r.str()?),
        1 => Identity::Phone(r.str()?),
        2 => Identity::UserId(r.int()?),
        _ => return Err(r.corrupt("unknown identity kind")),
    };
    let username = r.when(flags & USERNAME != 0, Reader::str)?;
    let phone = r.when(flags & PHONE != 0, Reader::str)?;
    let user_id = r.when(flags & USER_ID != 0, Reader::int)?;
    let first_name = r.when(flags & FIRST_NAME != 0, Reader::str)?;
    let last_name = r.when(flags & LAST_NAME != 0, Reader::str)?;
    let audiences = (0..r.uint()?).map(|_| r.str()).collect::<Result<_, _>>()?;
    let mut fields = BTreeMap::new();
    for _ in 0..r.uint()? {
        fields.insert(r.str()?, r.str()?);
    }
    r.end()?;
    Ok(Contact {
        id,
        identity,
        username,
        phone,
        user_id,
        first_name,
        last_name,
        fields,
        audiences,
        pick_key,
    })
}

/// The flag byte: the bits whose fields are present.
fn flags<const N: usize>(fields: [(bool, u8); N]) -> u8 {
    fields
        .iter()
        .filter(|(present, _)| *present)
        .fold(0, |flags, (_, bit)| flags | bit)
}

struct Writer(Vec<u8>);

impl Writer {
    fn uint(&mut self, mut n: u64) {
        while n >= 0x80 {
            self.0.push(n as u8 | 0x80);
            n >>= 7;
        }
        self.0.push(n as u8);
    }

    fn int(&mut self, n: i64) {
        self.uint(((n << 1) ^ (n >> 63)) as u64);
    }

    fn str(&mut self, s: &str) {
        self.uint(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
    }

    /// A status as its index in [`DialogStatus::TAGS`], with the outcome or
    /// reason of the two that carry one.
    fn status(&mut self, status: &DialogStatus) {
        self.0.push(status.tag());
        if let DialogStatus::Finished { outcome: text } | DialogStatus::Error { reason: text } =
            status
        {
            self.str(text);
        }
    }
}

/// Reads a record front to back; every error names the record.
pub(super) struct Reader<'a> {
    what: &'static str,
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(super) fn new(what: &'static str, bytes: &'a [u8]) -> Self {
        Reader { what, bytes }
    }

    pub(super) fn corrupt(&self, reason: &str) -> StoreError {
        StoreError::Corrupt {
            what: self.what,
            reason: reason.to_string(),
        }
    }

    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.bytes.len() < n {
            return Err(self.corrupt("truncated record"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Bytes after their length, a little-endian u32.
    pub(super) fn with_len(&mut self) -> Result<&'a [u8], StoreError> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    /// Bytes after their length, a big-endian u32 (as the account log
    /// writes it).
    pub(super) fn with_len_be(&mut self) -> Result<&'a [u8], StoreError> {
        let n = u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes"));
        self.take(n as usize)
    }

    pub(super) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    pub(super) fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }

    /// A little-endian u32.
    pub(super) fn u32(&mut self) -> Result<u32, StoreError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    /// A little-endian u64.
    pub(super) fn u64(&mut self) -> Result<u64, StoreError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    pub(super) fn text(&mut self, n: usize) -> Result<String, StoreError> {
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.corrupt("text is not UTF-8"))
    }

    fn uint(&mut self) -> Result<u64, StoreError> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            n |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(n);
            }
        }
        Err(self.corrupt("varint too long"))
    }

    fn int(&mut self) -> Result<i64, StoreError> {
        let n = self.uint()?;
        Ok((n >> 1) as i64 ^ -((n & 1) as i64))
    }

    fn str(&mut self) -> Result<String, StoreError> {
        let n = usize::try_from(self.uint()?).map_err(|_| self.corrupt("length overflow"))?;
        self.text(n)
    }

    /// What [`Writer::status`] wrote.
    fn status(&mut self) -> Result<DialogStatus, StoreError> {
        Ok(match self.u8()? {
            0 => DialogStatus::Active,
            1 => DialogStatus::Handoff,
            2 => DialogStatus::Finished {
                outcome: self.str()?,
            },
            3 => DialogStatus::Dead,
            4 => DialogStatus::Blocked,
            5 => DialogStatus::Error {
                reason: self.str()?,
            },
            6 => DialogStatus::OptedOut,
            _ => return Err(self.corrupt("unknown status")),
        })
    }

    /// Refuses bytes after the last field.
    fn end(&self) -> Result<(), StoreError> {
        match self.bytes.is_empty() {
            true => Ok(()),
            false => Err(self.corrupt("bytes after the last field")),
        }
    }

    /// `read` when `present`.
    fn when<T>(
        &mut self,
        present: bool,
        read: impl FnOnce(&mut Self) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        present.then(|| read(self)).transpose()
    }
}

/// An account record without its sends (they are stored apart).
pub(super) fn encode_account(a: &AccountRecord) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(24));
    w.0.extend_from_slice(&[BINARY, flags([(a.first_send_at.is_some(), FIRST_SEND)])]);
    match &a.status {
        AccountStatus::Active => w.0.push(0),
        AccountStatus::FloodWait { until } => {
            w.0.push(1);
            w.int(until.0);
        }
        AccountStatus::SpamLimited { until } => {
            w.0.push(2);
            w.int(until.0);
        }
        AccountStatus::Blocked { reason } => {
            w.0.push(3);
            w.str(reason);
        }
        AccountStatus::Unauthorized => w.0.push(4),
        AccountStatus::Disabled => w.0.push(5),
    }
    w.int(a.next_send_at.0);
    if let Some(t) = a.first_send_at {
        w.int(t.0);
    }
    w.0
}

/// The record of account `name` (its key), without its sends; a record of
/// the first layout may hold sends of its own, kept.
pub(super) fn decode_account(name: &str, bytes: &[u8]) -> Result<AccountRecord, StoreError> {
    let Some((&BINARY, body)) = bytes.split_first() else {
        return super::decode_json("account", bytes);
    };
    let r = &mut Reader::new("account", body);
    let flags = r.u8()?;
    let status = match r.u8()? {
        0 => AccountStatus::Active,
        1 => AccountStatus::FloodWait {
            until: Timestamp(r.int()?),
        },
        2 => AccountStatus::SpamLimited {
            until: Timestamp(r.int()?),
        },
        3 => AccountStatus::Blocked { reason: r.str()? },
        4 => AccountStatus::Unauthorized,
        5 => AccountStatus::Disabled,
        _ => return Err(r.corrupt("unknown account status")),
    };
    let next_send_at = Timestamp(r.int()?);
    let first_send_at = r.when(flags & FIRST_SEND != 0, |r| Ok(Timestamp(r.int()?)))?;
    r.end()?;
    Ok(AccountRecord {
        name: name.to_string(),
        status,
        sends: Default::default(),
        first_send_at,
        next_send_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dialog() -> Dialog {
        Dialog {
            id: 1 << 40,
            campaign: "spring".into(),
            account: "acc-1".into(),
            contact: 77,
            status: DialogStatus::Active,
            started_at: Timestamp(1_733_443_200_123),
            follow_ups_sent: 0,
            last_inbound_at: None,
            last_outbound_at: None,
            state: serde_json::json!({}),
            next_seq: 1,
            reviewed_at: None,
            ending: None,
            indexed_at: None,
            max_incoming_id: None,
            variant: None,
        }
    }

    fn contact() -> Contact {
        Contact {
            id: 12,
            identity: Identity::Username("ann".into()),
            username: Some("ann".into()),
            phone: None,
            user_id: None,
            first_name: Some("Ann".into()),
            last_name: None,
            fields: BTreeMap::new(),
            audiences: vec!["leads".into()],
            pick_key: u64::MAX - 3,
        }
    }

    #[test]
    fn every_dialog_field_survives_the_round_trip() {
        let plain = dialog();
        let full = Dialog {
            status: DialogStatus::Finished {
                outcome: "booked ✓".into(),
            },
            follow_ups_sent: 3,
            last_inbound_at: Some(Timestamp(-5)),
            last_outbound_at: Some(Timestamp(i64::MAX)),
            state: serde_json::json!({"step": 2, "notes": ["a\"b"]}),
            reviewed_at: Some(Timestamp(i64::MIN)),
            ending: Some(DialogStatus::Error {
                reason: "engine threw".into(),
            }),
            indexed_at: Some(Timestamp(0)),
            max_incoming_id: Some(-1),
            variant: Some(DialogVariant {
                name: "b".into(),
                engine: "e.lua".into(),
            }),
            ..dialog()
        };
        for d in [plain, full] {
            let bytes = encode_dialog(&d);
            assert_eq!(decode_dialog(&bytes).unwrap(), d);
            let summary = decode_dialog_summary(&bytes).unwrap();
            assert_eq!(summary, DialogSummary::from(&d));
        }
        use DialogStatus::*;
        let error = Error {
            reason: String::new(),
        };
        for status in [Active, Handoff, Dead, Blocked, OptedOut, error] {
            let d = Dialog { status, ..dialog() };
            assert_eq!(decode_dialog(&encode_dialog(&d)).unwrap(), d);
        }
    }

    #[test]
    fn every_contact_field_survives_the_round_trip() {
        let full = Contact {
            identity: Identity::UserId(-42),
            phone: Some("+15551234".into()),
            user_id: Some(i64::MAX),
            last_name: Some("O'Neil \"x\"".into()),
            fields: BTreeMap::from([("city".into(), "Kyiv".into()), ("".into(), "".into())]),
            audiences: vec![],
            ..contact()
        };
        for c in [
            contact(),
            full,
            Contact {
                identity: Identity::Phone("+1".into()),
                ..contact()
            },
        ] {
            assert_eq!(decode_contact(&encode_contact(&c)).unwrap(), c);
        }
    }

    #[test]
    fn every_account_field_survives_the_round_trip() {
        let plain = AccountRecord::new("acc-1");
        let t = Timestamp(1_733_443_200_123);
        let statuses = [
            AccountStatus::Active,
            AccountStatus::FloodWait { until: t },
            AccountStatus::SpamLimited {
                until: Timestamp(-1),
            },
            AccountStatus::Blocked {
                reason: "USER_DEACTIVATED_BAN ✓".into(),
            },
            AccountStatus::Unauthorized,
            AccountStatus::Disabled,
        ];
        for status in statuses {
            let a = AccountRecord {
                status,
                first_send_at: Some(Timestamp(i64::MIN)),
                next_send_at: Timestamp(i64::MAX),
                ..plain.clone()
            };
            assert_eq!(decode_account("acc-1", &encode_account(&a)).unwrap(), a);
        }
        assert_eq!(
            decode_account("acc-1", &encode_account(&plain)).unwrap(),
            plain
        );
        let json = [
            &[JSON][..],
            serde_json::to_string(&plain).unwrap().as_bytes(),
        ]
        .concat();
        assert_eq!(decode_account("acc-1", &json).unwrap(), plain);
        assert!(encode_account(&plain).len() * 10 <= json.len());
        let bytes = encode_account(&AccountRecord {
            first_send_at: Some(t),
            ..plain
        });
        for cut in 1..bytes.len() {
            assert!(
                decode_account("acc-1", &bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn records_of_the_first_layout_are_read_as_json() {
        let d = dialog();
        let json = [&[JSON][..], serde_json::to_string(&d).unwrap().as_bytes()].concat();
        assert_eq!(decode_dialog(&json).unwrap(), d);
        assert_eq!(
            decode_dialog_summary(&json).unwrap(),
            DialogSummary::from(&d)
        );
        let c = contact();
        let json = [&[JSON][..], serde_json::to_string(&c).unwrap().as_bytes()].concat();
        assert_eq!(decode_contact(&json).unwrap(), c);
    }

    #[test]
    fn binary_records_are_a_third_of_the_json() {
        let d = dialog();
        let json = serde_json::to_vec(&d).unwrap().len() + 1;
        assert!(
            encode_dialog(&d).len() * 3 <= json,
            "{} vs {json}",
            encode_dialog(&d).len()
        );
        let c = contact();
        let json = serde_json::to_vec(&c).unwrap().len() + 1;
        assert!(
            encode_contact(&c).len() * 3 <= json,
            "{} vs {json}",
            encode_contact(&c).len()
        );
    }

    #[test]
    fn a_damaged_record_is_refused_not_misread() {
        let bytes = encode_dialog(&Dialog {
            state: serde_json::json!({"k": 1}),
            ..dialog()
        });
        for cut in 2..bytes.len() - 1 {
            let err = decode_dialog(&bytes[..cut]);
            assert!(err.is_err(), "cut at {cut} read as {err:?}");
        }
        let mut bad = encode_contact(&contact());
        bad[11] = 9; // the identity kind
        assert!(decode_contact(&bad)
            .unwrap_err()
            .to_string()
            .contains("identity"));
    }
}
