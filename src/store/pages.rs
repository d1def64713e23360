//! A dialog's messages, [`PAGE`] to a key: `message_pages` maps
//! `(dialog id, seq / PAGE)` to the page holding those messages in seq
//! order. Appending a message rewrites one small value instead of adding a
//! key (in sled a new key costs several times an overwrite), and a dialog's
//! transcript is a handful of reads.
//!
//! A page is [`PAGE_FORMAT`] followed by entries, each
//! `len: u32 LE ++ incoming: u8 ++ transport id: i64 LE ++ record`, where
//! `record` is the message as every record is stored (see `encode`) and
//! the transport id is set for incoming messages only. The header lets the
//! dedupe of incoming messages read a page without decoding its records.
//!
//! Messages are addressed as before by `(dialog id, seq)` (the outbox,
//! `inbound` and `unhandled` hold such addresses): `seq % PAGE` is the
//! entry's place in its page, since a dialog's seqs are dense.

use sled::transaction::ConflictableTransactionError::Abort;
use sled::transaction::TransactionalTree;

use super::keys::{pair, read_u64, u64_key};
use super::{decode, encode, StoreError, TxResult};
use crate::model::{DialogId, Direction, Message};

/// Messages per page.
pub const PAGE: u64 = 16;
/// The first byte of every page.
const PAGE_FORMAT: u8 = 1;
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
    let Some((&PAGE_FORMAT, mut rest)) = page.split_first() else {
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

fn write_entry(out: &mut Vec<u8>, msg: &Message) {
    let record = encode(msg);
    out.extend_from_slice(&(record.len() as u32).to_le_bytes());
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
    out.extend_from_slice(&record);
}

/// `page` with `msg` put in its place: appended if it is the next seq,
/// replacing the entry otherwise.
fn put(page: Option<&[u8]>, msg: &Message) -> Result<Vec<u8>, StoreError> {
    let index = (msg.seq % PAGE) as usize;
    let Some(page) = page else {
        if index != 0 {
            return Err(corrupt("a message after a missing page"));
        }
        let mut out = vec![PAGE_FORMAT];
        write_entry(&mut out, msg);
        return Ok(out);
    };
    let list = entries(page)?;
    let mut out = Vec::with_capacity(page.len() + msg.text.len() + 160);
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
        Some(e) => Ok(Some(decode("message", e.record)?)),
        None => Ok(None),
    }
}

/// Every message of a page.
pub fn read_all(page: &[u8]) -> Result<Vec<Message>, StoreError> {
    entries(page)?
        .iter()
        .map(|e| decode("message", e.record))
        .collect()
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

/// Message pages inside a transaction.
pub(super) struct Pages<'a>(pub &'a TransactionalTree);

impl Pages<'_> {
    /// The message at `(dialog, seq)`.
    pub fn get(&self, dialog: DialogId, seq: u64) -> TxResult<Option<Message>> {
        match self.0.get(page_key(dialog, seq))? {
            Some(page) => read(&page, seq).map_err(Abort),
            None => Ok(None),
        }
    }

    /// Writes a message at its place: the next seq of its dialog, or one
    /// already stored.
    pub fn put(&self, msg: &Message) -> TxResult<()> {
        let key = page_key(msg.dialog, msg.seq);
        let page = self.0.get(key)?;
        let next = put(page.as_deref(), msg).map_err(Abort)?;
        self.0.insert(&key, next)?;
        Ok(())
    }

    /// Whether the first `count` messages of a dialog hold an incoming one
    /// with this transport id; newest pages first, headers only.
    pub fn has_incoming(&self, dialog: DialogId, count: u64, transport_id: i64) -> TxResult<bool> {
        let mut page = count.div_ceil(PAGE);
        while page > 0 {
            page -= 1;
            if let Some(bytes) = self.0.get(pair(u64_key(dialog), u64_key(page)))? {
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
