//! The boundary to Telegram: what the host needs from a transport, and the
//! classified errors the safety core reacts to.
//!
//! The simulated transport and the Telegram transport both implement
//! [`Transport`]; nothing above this boundary knows which one runs.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::clock::{BoxFuture, Timestamp};
use crate::model::{IdempotencyKey, Identity, MessageKind};
use crate::safety::slot::Granted;

/// A message to send. The key is reused on every retry of the same message,
/// so a transport can refuse a duplicate (Telegram's `random_id`). Only
/// AccountSafety makes one, from the slot the account's limits gave it
/// (see [`Granted`]).
#[derive(Debug, Clone)]
pub struct OutgoingMessage {
    pub account: String,
    pub contact: Identity,
    pub text: String,
    pub kind: MessageKind,
    pub key: IdempotencyKey,
    pub granted: Granted,
}

/// The transport's receipt for a delivered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    pub transport_id: i64,
    pub at: Timestamp,
}

/// A message a contact sent to one of our accounts.
#[derive(Debug, Clone, PartialEq)]
pub struct IncomingMessage {
    pub account: String,
    pub contact: Identity,
    /// Unique per account; the store dedupes on it.
    pub transport_id: i64,
    pub text: String,
    pub at: Timestamp,
}

/// Why a send failed, classified for the safety core's reaction table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("Telegram asks the account to wait {}", humantime::format_duration(*.0))]
    FloodWait(Duration),
    #[error("Telegram limits the account for spam (PEER_FLOOD)")]
    PeerFlood,
    #[error("the contact's privacy settings refuse the message")]
    PrivacyRestricted,
    #[error("the contact cannot be reached (invalid or deleted peer)")]
    PeerInvalid,
    /// The contact cannot be written to; the text says why (no such
    /// username, paid messages, Premium only).
    #[error("{0}")]
    Unreachable(String),
    #[error("the account is banned")]
    AccountBanned,
    #[error("the account is logged out; run `colloquy login` for it")]
    Unauthorized,
    #[error("a transient transport error: {0}")]
    Transient(String),
    /// The send timed out: it may or may not have been delivered.
    #[error("the send timed out; delivery is unknown")]
    TimedOutAfterSend,
    /// The key was used before: the message was already sent (Telegram's
    /// RANDOM_ID_DUPLICATE).
    #[error("a message with this key was already sent")]
    Duplicate,
    #[error("the transport failed: {0}")]
    Other(String),
}

/// An incoming message handed to the host, with the receipt the host sends
/// back once the message is stored: a transport records delivery only then.
#[derive(Debug)]
pub struct Inbound {
    pub message: IncomingMessage,
    pub stored: tokio::sync::oneshot::Sender<()>,
}

/// Hands one incoming message to the host's `sink` and waits until it is
/// stored; false when the host stopped listening.
pub async fn hand_over(sink: &mpsc::Sender<Inbound>, message: IncomingMessage) -> bool {
    let (stored, done) = tokio::sync::oneshot::channel();
    sink.send(Inbound { message, stored }).await.is_ok() && done.await.is_ok()
}

/// A way to reach Telegram.
pub trait Transport: Send + Sync + 'static {
    /// Sends one message.
    fn send(&self, msg: OutgoingMessage) -> BoxFuture<'_, Result<Delivered, SendError>>;

    /// Whether a message with this key reached the contact; used to
    /// reconcile sends whose outcome is unknown (after a timeout or a crash).
    fn was_delivered(
        &self,
        account: &str,
        contact: &Identity,
        key: IdempotencyKey,
    ) -> BoxFuture<'_, Result<Option<Delivered>, SendError>>;

    /// Delivers the contact's messages to the account newer than `after`
    /// (a transport id) that the chat holds, the way `subscribe`'s sink
    /// gets every incoming message, and returns once the host stored them.
    /// The reviver asks before a follow-up, so that a reply whose delivery
    /// was lost (a gap in Telegram's updates, a session imported again) is
    /// answered rather than talked over. A transport that cannot lose a
    /// delivery has nothing to do.
    fn catch_up(
        &self,
        _account: &str,
        _contact: &Identity,
        _after: i64,
    ) -> BoxFuture<'_, Result<(), SendError>> {
        Box::pin(async { Ok(()) })
    }

    /// Starts delivering incoming messages of every account to `sink`.
    fn subscribe(&self, sink: mpsc::Sender<Inbound>) -> BoxFuture<'_, Result<(), SendError>>;

    /// Each account's connection, for status (`ready`, `connecting`,
    /// `unauthorized`); empty when the transport has no connections.
    fn links(&self) -> Vec<(String, &'static str)> {
        Vec::new()
    }
}
