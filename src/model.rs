//! The domain: campaigns, accounts, contacts, dialogs and messages, and the
//! one table of allowed status transitions.
//!
//! Every status change in the host goes through [`DialogStatus::transition`]
//! or [`AccountStatus::transition`]; an illegal change is an error, never a
//! silent overwrite.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;

/// Store-assigned contact id.
pub type ContactId = u64;
/// Store-assigned dialog id.
pub type DialogId = u64;

/// How a contact is reached on Telegram, as written in the audience file.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "by", content = "value", rename_all = "snake_case")]
pub enum Identity {
    /// A username without the leading `@`, lower-cased.
    Username(String),
    /// A phone number in E.164 form (`+` and digits).
    Phone(String),
    /// A numeric Telegram user id.
    UserId(i64),
}

impl Identity {
    /// The stable key the store indexes contacts by.
    pub fn key(&self) -> String {
        match self {
            Identity::Username(u) => format!("u:{u}"),
            Identity::Phone(p) => format!("p:{p}"),
            Identity::UserId(id) => format!("i:{id}"),
        }
    }

    /// `@Name` → `name`; Telegram usernames are 4 to 32 letters, digits and `_`.
    pub fn normalize_username(raw: &str) -> Result<String, String> {
        let u = raw.trim().trim_start_matches('@');
        let ok = (4..=32).contains(&u.len())
            && u.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && u.starts_with(|c: char| c.is_ascii_alphabetic());
        if ok {
            Ok(u.to_ascii_lowercase())
        } else {
            Err(format!(
                "username \"{raw}\" is not a Telegram username (4 to 32 letters, digits or _)"
            ))
        }
    }

    /// A phone number in international form to E.164: `+1 (555) 000-0001` →
    /// `+15550000001`. The country code is required: a leading `+` or `00`, or a
    /// bare digit string that starts with its country code.
    ///
    /// ```
    /// use colloquy::model::Identity;
    /// assert_eq!(Identity::normalize_phone("+1 (555) 000-0001").unwrap(), "+15550000001");
    /// assert_eq!(Identity::normalize_phone("0049 30 1234567").unwrap(), "+49301234567");
    /// assert!(Identity::normalize_phone("555-0001").is_err());
    /// ```
    pub fn normalize_phone(raw: &str) -> Result<String, String> {
        let t = raw.trim();
        let body = t
            .strip_prefix('+')
            .or_else(|| t.strip_prefix("00"))
            .unwrap_or(t);
        let mut digits = String::with_capacity(16);
        for c in body.chars() {
            match c {
                '0'..='9' => digits.push(c),
                ' ' | '-' | '(' | ')' | '.' => {}
                _ => {
                    return Err(format!(
                        "phone \"{raw}\" has a character that is not a digit: '{c}'"
                    ))
                }
            }
        }
        if !(8..=15).contains(&digits.len()) || digits.starts_with('0') {
            return Err(format!(
                "phone \"{raw}\" is not an international number (country code and 8 to 15 digits, like +15550000001)"
            ));
        }
        Ok(format!("+{digits}"))
    }

    /// A contact as an operator types it: `+phone`, a numeric user id, or a
    /// username (with or without `@`).
    pub fn parse(text: &str) -> Option<Identity> {
        let text = text.trim();
        if text.starts_with('+') {
            return Identity::normalize_phone(text).ok().map(Identity::Phone);
        }
        if let Ok(id) = text.parse::<i64>() {
            return (id > 0).then_some(Identity::UserId(id));
        }
        Identity::normalize_username(text)
            .ok()
            .map(Identity::Username)
    }
}

impl fmt::Display for Identity {
    /// The identity as the wire log and humans see it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Username(u) => write!(f, "{u}"),
            Identity::Phone(p) => write!(f, "{p}"),
            Identity::UserId(id) => write!(f, "{id}"),
        }
    }
}

/// A person an audience lists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Contact {
    pub id: ContactId,
    pub identity: Identity,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_name: Option<String>,
    /// Every other column of the audience file.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, String>,
    /// Audiences that list this contact.
    pub audiences: Vec<String>,
    /// Random key of the contact in the uncontacted index; fixed at creation.
    pub pick_key: u64,
}

/// Why a contact must never be messaged again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "reason", rename_all = "snake_case")]
pub enum DoNotContact {
    /// The contact asked to stop.
    OptedOut,
    /// Telegram refuses messages to the contact (privacy, invalid peer, ...).
    Unreachable(String),
}

/// A change to the do-not-contact set, for its audit: when, who, what and
/// why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DncChange {
    pub at: Timestamp,
    pub contact: ContactId,
    pub identity: String,
    /// `added` or `removed`.
    pub action: String,
    pub why: String,
}

/// The state of a sending account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum AccountStatus {
    Active,
    /// Telegram asked the account to wait.
    FloodWait {
        until: Timestamp,
    },
    /// PEER_FLOOD: no new dialogs until then; replies continue.
    SpamLimited {
        until: Timestamp,
    },
    /// Banned or deactivated by Telegram; never used again.
    Blocked {
        reason: String,
    },
    /// The session is missing or revoked: `colloquy login NAME` fixes it.
    Unauthorized,
    /// Taken out of service by the operator.
    Disabled,
}

impl AccountStatus {
    pub fn label(&self) -> &'static str {
        match self {
            AccountStatus::Active => "active",
            AccountStatus::FloodWait { .. } => "flood_wait",
            AccountStatus::SpamLimited { .. } => "spam_limited",
            AccountStatus::Blocked { .. } => "blocked",
            AccountStatus::Unauthorized => "unauthorized",
            AccountStatus::Disabled => "disabled",
        }
    }

    /// The account-status table. Blocked is final; everything else can return
    /// to active (a wait ends, a login succeeds, the operator re-enables).
    pub fn can_become(&self, next: &AccountStatus) -> bool {
        use AccountStatus::*;
        match (self, next) {
            (Blocked { .. }, _) => false,
            (_, Blocked { .. }) | (_, Unauthorized) | (_, Disabled) => true,
            (Active, FloodWait { .. } | SpamLimited { .. }) => true,
            (FloodWait { .. }, Active | FloodWait { .. } | SpamLimited { .. }) => true,
            (SpamLimited { .. }, Active | FloodWait { .. } | SpamLimited { .. }) => true,
            (Unauthorized | Disabled, Active) => true,
            _ => false,
        }
    }

    pub fn transition(&self, next: AccountStatus) -> Result<AccountStatus, TransitionError> {
        if self.can_become(&next) {
            Ok(next)
        } else {
            Err(TransitionError {
                entity: "account",
                from: self.label(),
                to: next.label(),
            })
        }
    }
}

/// The state of a dialog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum DialogStatus {
    /// The host talks in it.
    Active,
    /// A human took over; the host sends nothing more.
    Handoff,
    /// The engine ended it with an outcome label.
    Finished { outcome: String },
    /// The reviver gave up on it.
    Dead,
    /// Its account was banned or logged out.
    Blocked,
    /// An engine or transport error ended it.
    Error { reason: String },
    /// The contact asked to stop.
    OptedOut,
}

impl DialogStatus {
    /// All status tags, in the order the store indexes them.
    pub const TAGS: [&'static str; 7] = [
        "active",
        "handoff",
        "finished",
        "dead",
        "blocked",
        "error",
        "opted_out",
    ];

    pub fn label(&self) -> &'static str {
        Self::TAGS[self.tag() as usize]
    }

    /// A one-byte tag for the by-status index.
    pub fn tag(&self) -> u8 {
        match self {
            DialogStatus::Active => 0,
            DialogStatus::Handoff => 1,
            DialogStatus::Finished { .. } => 2,
            DialogStatus::Dead => 3,
            DialogStatus::Blocked => 4,
            DialogStatus::Error { .. } => 5,
            DialogStatus::OptedOut => 6,
        }
    }

    pub fn tag_of(label: &str) -> Option<u8> {
        Self::TAGS.iter().position(|t| *t == label).map(|i| i as u8)
    }

    /// Whether the host may still send in this dialog.
    pub fn is_live(&self) -> bool {
        matches!(self, DialogStatus::Active)
    }

    /// The dialog-status table. Only an active dialog moves, except that a
    /// handed-off dialog can be returned to the host, finished by its human,
    /// opted out by its contact or blocked with its account.
    pub fn can_become(&self, next: &DialogStatus) -> bool {
        use DialogStatus::*;
        match (self, next) {
            (Active, Active) => false,
            (Active, _) => true,
            (Handoff, Active | Finished { .. } | OptedOut | Blocked) => true,
            _ => false,
        }
    }

    pub fn transition(&self, next: DialogStatus) -> Result<DialogStatus, TransitionError> {
        if self.can_become(&next) {
            Ok(next)
        } else {
            Err(TransitionError {
                entity: "dialog",
                from: self.label(),
                to: next.label(),
            })
        }
    }
}

/// An illegal status change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a {entity} cannot go from {from} to {to}")]
pub struct TransitionError {
    pub entity: &'static str,
    pub from: &'static str,
    pub to: &'static str,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn empty_state() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

fn is_empty_state(state: &serde_json::Value) -> bool {
    state.as_object().is_some_and(|o| o.is_empty())
}

/// One conversation between an account and a contact within a campaign.
/// Fields at their default are left out of its stored record (and of a
/// contact's): an idle dialog's records are most of a large store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dialog {
    pub id: DialogId,
    pub campaign: String,
    pub account: String,
    pub contact: ContactId,
    pub status: DialogStatus,
    pub started_at: Timestamp,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub follow_ups_sent: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_inbound_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_outbound_at: Option<Timestamp>,
    /// The engine's `ctx.state`, as JSON.
    #[serde(default = "empty_state", skip_serializing_if = "is_empty_state")]
    pub state: serde_json::Value,
    /// Sequence number of the next message of this dialog.
    pub next_seq: u64,
    /// When the reviver last looked at the dialog and left it as it was; a
    /// quiet dialog is looked at again `stuck_after` later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reviewed_at: Option<Timestamp>,
    /// The status the dialog takes once its pending messages are sent (the
    /// engine finished or handed off with a last message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ending: Option<DialogStatus>,
    /// The time under which the dialog is listed in the store's
    /// quiet-dialogs index: its last activity, or an earlier one when the
    /// answer pipeline left the index behind (the reviver catches it up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub indexed_at: Option<Timestamp>,
    /// The highest transport id among the dialog's incoming messages, so
    /// that a newer message is known to be new without reading its pages.
    /// `None` until the first one, and in a dialog stored before this was
    /// kept (which then always reads its pages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_incoming_id: Option<i64>,
    /// The variant assigned at the opening, in a campaign with variants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<DialogVariant>,
}

/// The variant a dialog was assigned at its opening, with the engine it
/// ran on then: a variant later removed from the config keeps its dialogs
/// on that engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DialogVariant {
    pub name: String,
    pub engine: String,
}

impl Dialog {
    /// Whether an incoming message with this transport id (to the dialog's
    /// account) is certainly not stored yet: it is above the highest seen,
    /// or none came yet.
    pub fn is_newer_incoming(&self, transport_id: i64) -> bool {
        match self.max_incoming_id {
            Some(max) => transport_id > max,
            // Every incoming message sets the time of the last one.
            None => self.last_inbound_at.is_none(),
        }
    }

    /// The later of the last inbound and last outbound message, or the start.
    pub fn last_activity(&self) -> Timestamp {
        last_activity(
            self.started_at,
            self.last_inbound_at,
            self.last_outbound_at,
            self.reviewed_at,
        )
    }
}

fn last_activity(
    started_at: Timestamp,
    last_inbound_at: Option<Timestamp>,
    last_outbound_at: Option<Timestamp>,
    reviewed_at: Option<Timestamp>,
) -> Timestamp {
    last_inbound_at
        .into_iter()
        .chain(last_outbound_at)
        .chain(reviewed_at)
        .max()
        .unwrap_or(started_at)
        .max(started_at)
}

/// What lists and counts need of a dialog, read without its engine state
/// (which can be large): the console's pages and the funnel.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DialogSummary {
    pub id: DialogId,
    pub campaign: String,
    pub account: String,
    pub contact: ContactId,
    pub status: DialogStatus,
    pub started_at: Timestamp,
    #[serde(default)]
    pub follow_ups_sent: u32,
    pub last_inbound_at: Option<Timestamp>,
    pub last_outbound_at: Option<Timestamp>,
    #[serde(default)]
    pub reviewed_at: Option<Timestamp>,
    pub next_seq: u64,
    #[serde(default)]
    pub variant: Option<DialogVariant>,
}

impl DialogSummary {
    pub fn last_activity(&self) -> Timestamp {
        last_activity(
            self.started_at,
            self.last_inbound_at,
            self.last_outbound_at,
            self.reviewed_at,
        )
    }
}

impl From<&Dialog> for DialogSummary {
    fn from(d: &Dialog) -> DialogSummary {
        DialogSummary {
            id: d.id,
            campaign: d.campaign.clone(),
            account: d.account.clone(),
            contact: d.contact,
            status: d.status.clone(),
            started_at: d.started_at,
            follow_ups_sent: d.follow_ups_sent,
            last_inbound_at: d.last_inbound_at,
            last_outbound_at: d.last_outbound_at,
            reviewed_at: d.reviewed_at,
            next_seq: d.next_seq,
            variant: d.variant.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    In,
    Out,
}

/// Why an outbound message was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    Opening,
    Reply,
    FollowUp,
    /// Written by the operator in the console or with `colloquy reply`.
    Human,
}

impl MessageKind {
    pub fn label(self) -> &'static str {
        match self {
            MessageKind::Opening => "opening",
            MessageKind::Reply => "reply",
            MessageKind::FollowUp => "follow_up",
            MessageKind::Human => "human",
        }
    }

    /// An answer to a contact who wrote: sent at any hour, outside the
    /// campaign's send window.
    pub fn answers(self) -> bool {
        matches!(self, MessageKind::Reply | MessageKind::Human)
    }
}

/// Where an outbound message is in the outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Delivery {
    /// Recorded, not yet confirmed by the transport.
    Pending,
    /// The transport confirmed it.
    Sent,
    /// It will never be sent; the reason says why.
    Cancelled { reason: String },
}

/// The idempotency key of an outbound message: reused on every retry, and
/// Telegram's `random_id` on the real transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IdempotencyKey(pub u64);

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// One message of a dialog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub dialog: DialogId,
    /// Position in the dialog, from 0.
    pub seq: u64,
    pub direction: Direction,
    /// Set for outbound messages.
    pub kind: Option<MessageKind>,
    pub text: String,
    pub at: Timestamp,
    /// Set for outbound messages.
    pub key: Option<IdempotencyKey>,
    /// Set for outbound messages.
    pub delivery: Option<Delivery>,
    /// The transport's id of the message, once known.
    pub transport_id: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dialog_transitions_follow_the_table() {
        use DialogStatus::*;
        let done = Finished {
            outcome: "booked".into(),
        };
        assert!(Active.transition(done.clone()).is_ok());
        assert!(Active.transition(Handoff).is_ok());
        assert!(Handoff.transition(Active).is_ok());
        assert!(Active.transition(Active).is_err());
        for terminal in [done, Dead, Blocked, OptedOut, Error { reason: "x".into() }] {
            for next in [Active, Handoff, Dead, OptedOut] {
                let err = terminal.transition(next.clone()).unwrap_err();
                assert_eq!(err.from, terminal.label());
            }
        }
        assert_eq!(
            Dead.transition(Active).unwrap_err().to_string(),
            "a dialog cannot go from dead to active"
        );
    }

    #[test]
    fn account_transitions_follow_the_table() {
        use AccountStatus::*;
        let wait = FloodWait {
            until: Timestamp(5),
        };
        assert!(Active.transition(wait.clone()).is_ok());
        assert!(wait.transition(Active).is_ok());
        assert!(Unauthorized.transition(Active).is_ok());
        let blocked = Blocked {
            reason: "banned".into(),
        };
        assert!(Active.transition(blocked.clone()).is_ok());
        assert!(blocked.transition(Active).is_err());
        assert!(Disabled
            .transition(SpamLimited {
                until: Timestamp(1)
            })
            .is_err());
    }

    #[test]
    fn status_tags_round_trip() {
        for (i, label) in DialogStatus::TAGS.iter().enumerate() {
            assert_eq!(DialogStatus::tag_of(label), Some(i as u8));
        }
        assert_eq!(DialogStatus::OptedOut.label(), "opted_out");
    }
}

/// One outbound send counted against an account's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    into = "(Timestamp, bool, IdempotencyKey)",
    from = "(Timestamp, bool, IdempotencyKey)"
)]
pub struct SendMark {
    pub at: Timestamp,
    /// Openings also count against `max_new_dialogs_per_day`.
    pub opening: bool,
    /// The message the send was reserved for, so a failed send can return
    /// its slot.
    pub key: IdempotencyKey,
}

/// What the host remembers about an account between restarts: its status and
/// the sends that still count against a sliding window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountRecord {
    pub name: String,
    pub status: AccountStatus,
    /// Sends of the last day, oldest first. Stored apart from the record,
    /// in buckets of time (see the store's `accounts` tree).
    #[serde(default)]
    pub sends: SendMarks,
    /// The account's first send ever; warm-up counts from it.
    pub first_send_at: Option<Timestamp>,
    /// No send before this: the last send plus `min_interval` and jitter.
    pub next_send_at: Timestamp,
}

impl AccountRecord {
    /// Whether this record differs from `base`, which it was cloned from
    /// (then [`SendMarks::rebase`]d) and changed since: without comparing
    /// every mark.
    pub fn differs_from(&self, base: &AccountRecord) -> bool {
        self.sends.changed()
            || self.status != base.status
            || self.first_send_at != base.first_send_at
            || self.next_send_at != base.next_send_at
            || self.name != base.name
    }
}

/// An account's send marks in time order (oldest first; equal times in
/// the order taken), which also keep their base: the version last stored.
/// The base is the marks before [`SendMarks::changed_from`] followed by
/// [`SendMarks::base_rest`]: a change saves the base's marks from the
/// position it changes before it changes them, so a record changed in
/// place still knows what to write back, and what it was, without a copy
/// of all its marks. Read as a slice; changed only through these methods,
/// which keep the order and the base.
#[derive(Debug, Clone)]
pub struct SendMarks {
    marks: Vec<SendMark>,
    /// Marks before this position are as in the base.
    same_up_to: usize,
    /// The base's marks from `same_up_to` on.
    base_rest: Vec<SendMark>,
    /// Whether the base is known: marks made from scratch have none, and
    /// count as changed whatever was stored (they replace it).
    based: bool,
    /// The mark taken last, and the base's (see [`SendMarks::latest`]).
    latest: Option<IdempotencyKey>,
    base_latest: Option<IdempotencyKey>,
}

impl Default for SendMarks {
    fn default() -> SendMarks {
        SendMarks::from(Vec::new())
    }
}

impl SendMarks {
    /// Takes the marks as they are now as the base.
    pub fn rebase(&mut self) {
        self.same_up_to = self.marks.len();
        self.base_rest.clear();
        self.based = true;
        self.base_latest = self.latest;
    }

    /// The key of the mark taken last (the latest in time for marks read
    /// from the store): a later confirmation can move another mark past
    /// it in time.
    pub fn latest(&self) -> Option<IdempotencyKey> {
        self.latest
    }

    /// Where the marks may differ from the base: before this position they
    /// are the base's.
    pub fn changed_from(&self) -> usize {
        self.same_up_to
    }

    /// The base's marks from [`SendMarks::changed_from`] on; `None` when the
    /// base is not known.
    pub fn base_rest(&self) -> Option<&[SendMark]> {
        self.based.then_some(&self.base_rest[..])
    }

    /// Whether anything changed since the base.
    pub fn changed(&self) -> bool {
        !self.based || self.same_up_to != self.marks.len() || !self.base_rest.is_empty()
    }

    /// Saves the base's marks from `i` on, before a change there.
    fn changing_from(&mut self, i: usize) {
        if i < self.same_up_to {
            let moved = &self.marks[i..self.same_up_to];
            self.base_rest.splice(0..0, moved.iter().copied());
            self.same_up_to = i;
        }
    }

    /// Adds a mark in its place in time.
    pub fn push(&mut self, mark: SendMark) {
        // Most marks are the latest: no search through cold marks then.
        let i = match self.marks.last() {
            Some(last) if last.at > mark.at => self.marks.partition_point(|m| m.at <= mark.at),
            _ => self.marks.len(),
        };
        self.changing_from(i);
        self.marks.insert(i, mark);
        self.latest = Some(mark.key);
    }

    /// Keeps the marks `keep` says to keep, in order.
    pub fn retain(&mut self, mut keep: impl FnMut(&SendMark) -> bool) {
        let Some(first) = self.marks.iter().position(|m| !keep(m)) else {
            return;
        };
        self.changing_from(first);
        let mut i = 0;
        self.marks.retain(|m| {
            i += 1;
            i <= first || keep(m)
        });
        if !self.marks.iter().any(|m| Some(m.key) == self.latest) {
            self.latest = self.marks.last().map(|m| m.key);
        }
    }

    /// Moves mark `i` to `at`, and into its place in time.
    pub fn set_at(&mut self, i: usize, at: Timestamp) {
        let mut mark = self.marks[i];
        mark.at = at;
        let rest = |m: &SendMark| m.at <= at;
        let to = if at >= self.marks[i].at {
            i + self.marks[i + 1..].partition_point(rest)
        } else {
            self.marks[..i].partition_point(rest)
        };
        self.changing_from(i.min(to));
        if to >= i {
            self.marks[i..=to].rotate_left(1);
        } else {
            self.marks[to..=i].rotate_right(1);
        }
        self.marks[to] = mark;
    }

    /// Puts the base back: undoes every change since the last
    /// [`SendMarks::rebase`]. Returns whether it could (the base of marks
    /// made from scratch is not known).
    pub fn roll_back(&mut self) -> bool {
        if !self.based {
            return false;
        }
        self.marks.truncate(self.same_up_to);
        self.marks.append(&mut self.base_rest);
        self.same_up_to = self.marks.len();
        self.latest = self.base_latest;
        true
    }
}

impl std::ops::Deref for SendMarks {
    type Target = [SendMark];

    fn deref(&self) -> &[SendMark] {
        &self.marks
    }
}

/// Equal marks, whatever their bases.
impl PartialEq for SendMarks {
    fn eq(&self, other: &SendMarks) -> bool {
        self.marks == other.marks
    }
}

impl Eq for SendMarks {}

/// Marks built from a list in the order they were taken (then put in
/// time order) are all changed.
impl From<Vec<SendMark>> for SendMarks {
    fn from(mut marks: Vec<SendMark>) -> SendMarks {
        let latest = marks.last().map(|m| m.key);
        marks.sort_by_key(|m| m.at);
        SendMarks {
            marks,
            same_up_to: 0,
            base_rest: Vec::new(),
            based: false,
            latest,
            base_latest: None,
        }
    }
}

impl Serialize for SendMarks {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.marks.serialize(s)
    }
}

impl<'de> Deserialize<'de> for SendMarks {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<SendMarks, D::Error> {
        Vec::<SendMark>::deserialize(d).map(SendMarks::from)
    }
}

impl From<SendMark> for (Timestamp, bool, IdempotencyKey) {
    fn from(m: SendMark) -> Self {
        (m.at, m.opening, m.key)
    }
}

impl From<(Timestamp, bool, IdempotencyKey)> for SendMark {
    fn from((at, opening, key): (Timestamp, bool, IdempotencyKey)) -> Self {
        SendMark { at, opening, key }
    }
}

impl AccountRecord {
    pub fn new(name: &str) -> AccountRecord {
        AccountRecord {
            name: name.to_string(),
            status: AccountStatus::Active,
            sends: SendMarks::default(),
            first_send_at: None,
            next_send_at: Timestamp::EPOCH,
        }
    }
}
