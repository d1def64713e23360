//! A dialog's messages, [`PAGE`] to a key: `message_pages` maps
//! `(dialog id, seq / PAGE)` to the page holding those messages in seq
//! order. Appending a message rewrites one small value instead of adding a
//! key (in sled a new key costs several times an overwrite), and a dialog's
//! transcript is a handful of reads.
//!
//! A page is [`PAGE_FORMAT`] followed by entries, each
//! `len: u32 LE ++ incoming: u8 ++ transport id: i64 LE ++ record`, where
//! the transport id is set for incoming messages only. The header lets the
//! dedupe of incoming messages read a page without decoding its records.
//! A record is the message in a fixed binary layout (see [`write_record`]):
//! pages are the store's hottest values, rewritten on every message, and
//! binary keeps them a third of the JSON size and quick to decode. Pages
//! of the first format hold the message as every record is stored (see
//! `encode`); they are read as they are and rewritten in the current
//! format when a message is put in them.
//!
//! Messages are addressed as before by `(dialog id, seq)` (the outbox,
//! `inbound` and `unhandled` hold such addresses): `seq % PAGE` is the
//! entry's place in its page, since a dialog's seqs are dense.

use sled::transaction::ConflictableTransactionError::Abort;
use sled::transaction::TransactionalTree;

use super::keys::{pair, read_u64, u64_key};
use super::records::Reader;
use super::{decode, StoreError, Tx, TxResult};
use crate::clock::Timestamp;
use crate::model::{Delivery, DialogId, Direction, IdempotencyKey, Message, MessageKind};

/// Messages per page.
pub const PAGE: u64 = 16;
/// The first byte of every page written now: binary records.
const PAGE_FORMAT: u8 = 2;
/// The first byte of a page of JSON records.
const JSON_PAGE: u8 = 1;
const HEADER: usize = 4 + 1 + 8;

/// The key of the page holding `(dialog, seq)`.
pub fn page_key(dialog: DialogId, seq: u64) -> [u8; 16] {
    pair(u64_key(dialog), u64_key(seq / PAGE))
}

/// An entry of a page, undecoded.
struct Entry<'a> {
    /// The transport id of an incoming message.
    incoming: Option<i64>,
    record: &'a [u8],
    /// Where the entry starts and ends in the page.
    span: (usize, usize),
}

fn corrupt(reason: &str) -> StoreError {
    StoreError::Corrupt {
        what: "message page",
        reason: reason.to_string(),
    }
}

/// The entries of a page, in seq order.
fn entries(page: &[u8]) -> Result<Vec<Entry<'_>>, StoreError> {
    let Some((&(PAGE_FORMAT | JSON_PAGE), mut rest)) = page.split_first() else {
        return Err(corrupt("unknown page format"));
    };
    let mut out = Vec::with_capacity(PAGE as usize);
    let mut at = 1;
    while !rest.is_empty() {
        if rest.len() < HEADER {
            return Err(corrupt("truncated entry header"));
        }
        let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        let incoming = (rest[4] == 1)
            .then(|| i64::from_le_bytes(rest[5..HEADER].try_into().expect("8 bytes")));
        let end = HEADER + len;
        let record = rest
            .get(HEADER..end)
            .ok_or_else(|| corrupt("truncated entry"))?;
        out.push(Entry {
            incoming,
            record,
            span: (at, at + end),
        });
        at += end;
        rest = &rest[end..];
    }
    Ok(out)
}

/// How many entries a page holds, without listing them.
fn entry_count(page: &[u8]) -> Result<usize, StoreError> {
    let mut rest = &page[1..];
    let mut n = 0;
    while !rest.is_empty() {
        if rest.len() < HEADER {
            return Err(corrupt("truncated entry header"));
        }
        let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        rest = rest
            .get(HEADER + len..)
            .ok_or_else(|| corrupt("truncated entry"))?;
        n += 1;
    }
    Ok(n)
}

fn write_entry(out: &mut Vec<u8>, msg: &Message) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    match (msg.direction, msg.transport_id) {
        (Direction::In, Some(id)) => {
            out.push(1);
            out.extend_from_slice(&id.to_le_bytes());
        }
        _ => {
            out.push(0);
            out.extend_from_slice(&[0; 8]);
        }
    }
    write_record(out, msg);
    let len = (out.len() - start - HEADER) as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

/// A message's record: `dialog u64 ++ seq u64 ++ at i64 ++ direction u8
/// ++ kind u8 ++ key (u8 present ++ u64) ++ transport id (u8 present ++
/// i64) ++ delivery u8 ++ [reason len u32 ++ reason] ++ text`, integers
/// little-endian. Kind: 0 none, 1 opening, 2 reply, 3 follow-up; delivery:
/// 0 none, 1 pending, 2 sent, 3 cancelled (with its reason).
pub(super) fn write_record(out: &mut Vec<u8>, msg: &Message) {
    out.reserve(48 + msg.text.len());
    out.extend_from_slice(&msg.dialog.to_le_bytes());
    out.extend_from_slice(&msg.seq.to_le_bytes());
    out.extend_from_slice(&msg.at.0.to_le_bytes());
    out.push(match msg.direction {
        Direction::In => 0,
        Direction::Out => 1,
    });
    out.push(match msg.kind {
        None => 0,
        Some(MessageKind::Opening) => 1,
        Some(MessageKind::Reply) => 2,
        Some(MessageKind::FollowUp) => 3,
        Some(MessageKind::Human) => 4,
    });
    out.push(msg.key.is_some() as u8);
    out.extend_from_slice(&msg.key.map_or(0, |k| k.0).to_le_bytes());
    out.push(msg.transport_id.is_some() as u8);
    out.extend_from_slice(&msg.transport_id.unwrap_or(0).to_le_bytes());
    match &msg.delivery {
        None => out.push(0),
        Some(Delivery::Pending) => out.push(1),
        Some(Delivery::Sent) => out.push(2),
        Some(Delivery::Cancelled { reason }) => {
            out.push(3);
            out.extend_from_slice(&(reason.len() as u32).to_le_bytes());
            out.extend_from_slice(reason.as_bytes());
        }
    }
    out.extend_from_slice(msg.text.as_bytes());
}

/// Reads what [`write_record`] wrote.
pub(super) fn read_record(record: &[u8]) -> Result<Message, StoreError> {
    let mut r = Reader::new("message page", record);
    let dialog = r.u64()?;
    let seq = r.u64()?;
    let at = Timestamp(r.u64()? as i64);
    let direction = match r.u8()? {
        0 => Direction::In,
        1 => Direction::Out,
        _ => return Err(r.corrupt("unknown message direction")),
    };
    let kind = match r.u8()? {
        0 => None,
        1 => Some(MessageKind::Opening),
        2 => Some(MessageKind::Reply),
        3 => Some(MessageKind::FollowUp),
        4 => Some(MessageKind::Human),
        _ => return Err(r.corrupt("unknown message kind")),
    };
    let key = (r.u8()? == 1, r.u64()?);
    let transport_id = (r.u8()? == 1, r.u64()? as i64);
    let delivery = match r.u8()? {
        0 => None,
        1 => Some(Delivery::Pending),
        2 => Some(Delivery::Sent),
        3 => {
            let len = r.u32()? as usize;
            Some(Delivery::Cancelled {
                reason: r.text(len)?,
            })
        }
        _ => return Err(r.corrupt("unknown delivery state")),
    };
    let rest = r.rest();
    let text =
        String::from_utf8(rest.to_vec()).map_err(|_| corrupt("message text is not UTF-8"))?;
    Ok(Message {
        dialog,
        seq,
        direction,
        kind,
        text,
        at,
        key: key.0.then_some(IdempotencyKey(key.1)),
        delivery,
        transport_id: transport_id.0.then_some(transport_id.1),
    })
}

/// A page's message from its entry.
fn message(format: u8, e: &Entry<'_>) -> Result<Message, StoreError> {
    if format == JSON_PAGE {
        decode("message", e.record)
    } else {
        read_record(e.record)
    }
}

/// `page` with `msg` put in its place: appended if it is the next seq,
/// replacing the entry otherwise.
pub(super) fn put(page: Option<&[u8]>, msg: &Message) -> Result<Vec<u8>, StoreError> {
    let index = (msg.seq % PAGE) as usize;
    let Some(page) = page else {
        if index != 0 {
            return Err(corrupt("a message after a missing page"));
        }
        let mut out = Vec::with_capacity(1 + HEADER + 64 + msg.text.len());
        out.push(PAGE_FORMAT);
        write_entry(&mut out, msg);
        return Ok(out);
    };
    if page[0] == JSON_PAGE {
        // Rewritten whole in the current format.
        let mut out = vec![PAGE_FORMAT];
        for old in read_all(page)? {
            write_entry(&mut out, &old);
        }
        return put(Some(&out), msg);
    }
    // Appending, the common case: the page is copied once, in one go.
    if page[0] == PAGE_FORMAT && entry_count(page)? == index {
        let mut out = Vec::with_capacity(page.len() + HEADER + 64 + msg.text.len());
        out.extend_from_slice(page);
        write_entry(&mut out, msg);
        return Ok(out);
    }
    let list = entries(page)?;
    let mut out = Vec::with_capacity(page.len() + msg.text.len() + 64);
    match list.get(index) {
        Some(e) => {
            out.extend_from_slice(&page[..e.span.0]);
            write_entry(&mut out, msg);
            out.extend_from_slice(&page[e.span.1..]);
        }
        None if index == list.len() => {
            out.extend_from_slice(page);
            write_entry(&mut out, msg);
        }
        None => return Err(corrupt("a message after a gap")),
    }
    Ok(out)
}

/// The message with this seq, from its page.
pub fn read(page: &[u8], seq: u64) -> Result<Option<Message>, StoreError> {
    match entries(page)?.get((seq % PAGE) as usize) {
        Some(e) => Ok(Some(message(page[0], e)?)),
        None => Ok(None),
    }
}

/// How many messages a page holds.
pub fn count(page: &[u8]) -> Result<usize, StoreError> {
    match page.first() {
        Some(&PAGE_FORMAT) => entry_count(page),
        _ => Ok(entries(page)?.len()),
    }
}

/// Every message of a page.
pub fn read_all(page: &[u8]) -> Result<Vec<Message>, StoreError> {
    entries(page)?.iter().map(|e| message(page[0], e)).collect()
}

/// The `(dialog, seq)` of an address as the outbox and indexes hold it.
pub fn split_address(at: &[u8]) -> (DialogId, u64) {
    (read_u64(&at[..8]), read_u64(&at[8..16]))
}

/// A page's key and value.
pub type KeyedPage = ([u8; 16], Vec<u8>);

/// Builds pages from messages given in (dialog, seq) order: the
/// migration from one key per message.
pub fn paged(messages: impl Iterator<Item = Message>) -> Result<Vec<KeyedPage>, StoreError> {
    let mut out: Vec<KeyedPage> = Vec::new();
    for msg in messages {
        let key = page_key(msg.dialog, msg.seq);
        match out.last_mut() {
            Some((k, page)) if *k == key => *page = put(Some(page), &msg)?,
            _ => out.push((key, put(None, &msg)?)),
        }
    }
    Ok(out)
}

/// Message pages inside a transaction: a dialog's deferred records are
/// written out before its pages are read or written, and a write is
/// noted in `touched`.
pub(super) struct Pages<'t, 'a>(pub &'t Tx<'a>);

impl Pages<'_, '_> {
    fn tree(&self, dialog: DialogId) -> TxResult<&TransactionalTree> {
        self.0.write_out_dialog(dialog)?;
        Ok(self.0.messages)
    }

    /// The message at `(dialog, seq)`.
    pub fn get(&self, dialog: DialogId, seq: u64) -> TxResult<Option<Message>> {
        match self.tree(dialog)?.get(page_key(dialog, seq))? {
            Some(page) => read(&page, seq).map_err(Abort),
            None => Ok(None),
        }
    }

    /// Writes a message at its place: the next seq of its dialog, or one
    /// already stored.
    pub fn put(&self, msg: &Message) -> TxResult<()> {
        let key = page_key(msg.dialog, msg.seq);
        let tree = self.tree(msg.dialog)?;
        let page = tree.get(key)?;
        let next = put(page.as_deref(), msg).map_err(Abort)?;
        tree.insert(&key, next)?;
        self.0.touched.touch(msg.dialog);
        Ok(())
    }

    /// Whether the first `count` messages of a dialog hold an incoming one
    /// with this transport id; newest pages first, headers only.
    pub fn has_incoming(&self, dialog: DialogId, count: u64, transport_id: i64) -> TxResult<bool> {
        let tree = self.tree(dialog)?;
        let mut page = count.div_ceil(PAGE);
        while page > 0 {
            page -= 1;
            if let Some(bytes) = tree.get(pair(u64_key(dialog), u64_key(page)))? {
                let list = entries(&bytes).map_err(Abort)?;
                if list.iter().any(|e| e.incoming == Some(transport_id)) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Timestamp;
    use crate::model::{Delivery, IdempotencyKey, MessageKind};

    fn msg(seq: u64, incoming: bool) -> Message {
        Message {
            dialog: 7,
            seq,
            direction: if incoming {
                Direction::In
            } else {
                Direction::Out
            },
            kind: (!incoming).then_some(MessageKind::Reply),
            text: format!("m{seq}"),
            at: Timestamp(seq as i64),
            key: (!incoming).then_some(IdempotencyKey(seq)),
            delivery: (!incoming).then_some(Delivery::Pending),
            transport_id: incoming.then_some(100 + seq as i64),
        }
    }

    #[test]
    fn messages_are_appended_replaced_and_read_in_order() {
        let mut page: Option<Vec<u8>> = None;
        for seq in 0..PAGE {
            page = Some(put(page.as_deref(), &msg(seq, seq % 2 == 0)).unwrap());
        }
        let page = page.unwrap();
        let mut sent = msg(5, false);
        sent.delivery = Some(Delivery::Sent);
        sent.transport_id = Some(9);
        let page = put(Some(&page), &sent).unwrap();
        let all = read_all(&page).unwrap();
        assert_eq!(all.len(), PAGE as usize);
        assert_eq!(all[5], sent);
        assert_eq!(all[4], msg(4, true));
        assert_eq!(read(&page, 15).unwrap(), Some(msg(15, false)));
        let short = put(None, &msg(0, true)).unwrap();
        assert_eq!(read(&short, 1).unwrap(), None);
        let ids: Vec<_> = entries(&page).unwrap().iter().map(|e| e.incoming).collect();
        assert_eq!(ids[0], Some(100));
        assert_eq!(
            ids[5], None,
            "an outbound message's id is not an incoming one"
        );
    }

    #[test]
    fn a_gap_or_a_bad_page_is_an_error_not_a_guess() {
        assert!(put(None, &msg(3, true)).is_err());
        let page = put(None, &msg(0, true)).unwrap();
        assert!(put(Some(&page), &msg(2, true)).is_err());
        assert!(read_all(&page[..page.len() - 1]).is_err());
        assert!(read_all(&[9]).is_err());
    }

    #[test]
    fn records_keep_every_field() {
        let mut all = vec![msg(0, true), msg(1, false)];
        all.push(Message {
            kind: Some(MessageKind::FollowUp),
            text: "¿qué tal? 👋".into(),
            delivery: Some(Delivery::Cancelled {
                reason: "opted out".into(),
            }),
            at: Timestamp(-5),
            ..msg(2, false)
        });
        all.push(Message {
            kind: Some(MessageKind::Opening),
            text: String::new(),
            delivery: Some(Delivery::Sent),
            transport_id: Some(-1),
            ..msg(3, false)
        });
        let mut page = None;
        for m in &all {
            page = Some(put(page.as_deref(), m).unwrap());
        }
        assert_eq!(read_all(&page.unwrap()).unwrap(), all);
    }

    /// A page of the first format: each record the message's JSON.
    fn json_page(msgs: &[Message]) -> Vec<u8> {
        let mut out = vec![JSON_PAGE];
        for m in msgs {
            let record = super::super::encode(m);
            out.extend_from_slice(&(record.len() as u32).to_le_bytes());
            out.push(m.transport_id.is_some() as u8);
            out.extend_from_slice(&m.transport_id.unwrap_or(0).to_le_bytes());
            out.extend_from_slice(&record);
        }
        out
    }

    #[test]
    fn a_page_of_json_records_is_read_and_rewritten_in_binary() {
        let old: Vec<Message> = (0..3).map(|s| msg(s, s == 0)).collect();
        let page = json_page(&old);
        assert_eq!(read_all(&page).unwrap(), old);
        assert_eq!(read(&page, 1).unwrap(), Some(old[1].clone()));
        assert_eq!(entries(&page).unwrap()[0].incoming, Some(100));
        let next = put(Some(&page), &msg(3, true)).unwrap();
        assert_eq!(next[0], PAGE_FORMAT);
        let mut all = old;
        all.push(msg(3, true));
        assert_eq!(read_all(&next).unwrap(), all);
    }

    #[test]
    fn migration_groups_messages_by_page() {
        let all: Vec<Message> = (0..PAGE + 3).map(|s| msg(s, s % 3 == 0)).collect();
        let pages = paged(all.clone().into_iter()).unwrap();
        assert_eq!(pages.len(), 2);
        assert_eq!(pages[1].0, page_key(7, PAGE));
        let back: Vec<Message> = pages
            .iter()
            .flat_map(|(_, p)| read_all(p).unwrap())
            .collect();
        assert_eq!(back, all);
    }
}
