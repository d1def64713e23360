//! The Telegram transport: real user accounts through grammers, with the
//! guarantees of the simulated one.
//!
//! - One [`Connection`] per account, kept by a supervisor task that
//!   reconnects with backoff, account by account; an account without a
//!   session is unauthorized and the others run on.
//! - Sends carry our idempotency key as Telegram's `random_id`; a journal
//!   (`tg_sent`) written before each send lets `was_delivered` answer after
//!   a crash from the chat's recent history.
//! - Incoming messages are handed to the host and the update state is
//!   saved only after the host has stored them (catch-up loses nothing).
//! - Every library error is classified in [`errors`]; a panic in the
//!   library becomes an error of that account.
//!
//! The network side is behind [`Connector`] and [`api::Api`], so the whole
//! transport runs in tests against a fake of grammers' shape.

pub mod api;
pub mod errors;
mod grammers;
pub mod login;
pub mod resolve;
pub mod session;
pub mod string_session;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::clock::{BoxFuture, Clock, Timestamp};
use crate::config::Config;
use crate::model::{IdempotencyKey, Identity, MessageKind};
use crate::store::{Records, Store, StoreError};
use crate::transport::{
    hand_over, Delivered, Inbound, IncomingMessage, OutgoingMessage, SendError, Transport,
};
use api::Api;
pub use grammers::{client as grammers_client, GrammersConnector};
use resolve::Resolver;

/// After a login or import: an account marked unauthorized may send again.
pub fn logged_in(store: &Store, account: &str) -> Result<(), StoreError> {
    store.update_account(account, &|r| {
        if r.status == crate::model::AccountStatus::Unauthorized {
            r.status = crate::model::AccountStatus::Active;
        }
    })?;
    store.flush()
}

/// How long a send may take before its outcome counts as unknown.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(120);
/// How long a send waits for its account to connect before it counts as
/// a failed attempt: as long as the longest wait between reconnections, so
/// that a restart or a short outage costs no attempt.
const LINK_WAIT: Duration = MAX_BACKOFF;
/// Messages of history searched to reconcile a send or catch up on a chat.
const HISTORY: i32 = 50;
/// How long a catch-up waits for a chat's history.
const HISTORY_TIMEOUT: Duration = Duration::from_secs(10);

/// An incoming private message from a user, as a connection delivers it.
#[derive(Debug)]
pub struct Incoming {
    pub user_id: i64,
    pub id: i32,
    pub text: String,
    /// Unix seconds.
    pub date: i64,
    /// Sent once the host has stored the message; the connection saves
    /// its update state only then.
    pub stored: oneshot::Sender<()>,
}

/// A live link to Telegram for one account.
pub struct Connection {
    pub api: Arc<dyn Api>,
    /// Closed when the link is lost.
    pub incoming: mpsc::Receiver<Incoming>,
}

/// Opens connections; the real one is [`GrammersConnector`].
pub trait Connector: Send + Sync + 'static {
    fn connect(&self, account: &str) -> BoxFuture<'_, Result<Connection, SendError>>;
    /// Whether the account has a session at all (no network).
    fn has_session(&self, account: &str) -> bool;
}

/// Behaviour toward contacts, from `[telegram]`.
#[derive(Debug, Clone)]
pub struct Manners {
    /// Show "typing…" before each reply, for a time proportional to it.
    pub typing: bool,
    pub typing_chars_per_second: f64,
    /// Mark incoming messages read once they are stored.
    pub read_marks: bool,
}

impl Manners {
    pub fn from_config(config: &Config) -> Manners {
        let t = config.file.telegram.clone().unwrap_or_default();
        Manners {
            typing: t.typing,
            typing_chars_per_second: t.typing_chars_per_second,
            read_marks: t.read_marks,
        }
    }

    fn typing_time(&self, text: &str) -> Duration {
        let secs = text.chars().count() as f64 / self.typing_chars_per_second.max(1.0);
        Duration::from_secs_f64(secs.min(10.0))
    }
}

/// Where an account's link stands.
#[derive(Clone)]
enum Link {
    Connecting,
    Ready(Arc<dyn Api>),
    Unauthorized,
}

/// A send attempt, journaled before the call.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SentRecord {
    text: String,
    at: Timestamp,
    /// Telegram's message id, once known.
    id: Option<i32>,
}

struct Inner {
    links: Mutex<HashMap<String, Link>>,
    /// Woken whenever a link changes.
    link_changed: tokio::sync::Notify,
    accounts: Vec<String>,
    connector: Arc<dyn Connector>,
    resolver: Resolver,
    sent: Records,
    manners: Manners,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
    /// Where incoming messages go, once the host subscribed.
    sink: Mutex<Option<mpsc::Sender<Inbound>>>,
}

/// The transport; cheap to clone.
#[derive(Clone)]
pub struct TelegramTransport(Arc<Inner>);

impl TelegramTransport {
    pub fn new(
        accounts: Vec<String>,
        store: &Store,
        connector: Arc<dyn Connector>,
        manners: Manners,
        clock: Arc<dyn Clock>,
        shutdown: CancellationToken,
    ) -> Result<TelegramTransport, StoreError> {
        let links = accounts
            .iter()
            .map(|a| (a.clone(), Link::Connecting))
            .collect();
        Ok(TelegramTransport(Arc::new(Inner {
            links: Mutex::new(links),
            link_changed: tokio::sync::Notify::new(),
            accounts,
            connector,
            resolver: Resolver::new(store)?,
            sent: store.records("tg_sent")?,
            manners,
            clock,
            shutdown,
            sink: Mutex::new(None),
        })))
    }

    /// Accounts without a session: they need `colloquy login`.
    pub fn unauthorized(&self) -> Vec<String> {
        self.0
            .accounts
            .iter()
            .filter(|a| !self.0.connector.has_session(a))
            .cloned()
            .collect()
    }

    fn link_states(&self) -> Vec<(String, &'static str)> {
        let links = self.0.links.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = links
            .iter()
            .map(|(a, l)| {
                let s = match l {
                    Link::Connecting => "connecting",
                    Link::Ready(_) => "ready",
                    Link::Unauthorized => "unauthorized",
                };
                (a.clone(), s)
            })
            .collect();
        out.sort();
        out
    }

    fn set_link(&self, account: &str, link: Link) {
        self.0
            .links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(account.to_string(), link);
        self.0.link_changed.notify_waiters();
    }

    /// The account's link once it is ready. While it connects, a send
    /// waits (up to [`LINK_WAIT`]) instead of spending an attempt.
    async fn api(&self, account: &str) -> Result<Arc<dyn Api>, SendError> {
        self.api_within(account, LINK_WAIT).await
    }

    /// The account's link once it is ready, waiting up to `wait`.
    async fn api_within(&self, account: &str, wait: Duration) -> Result<Arc<dyn Api>, SendError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let changed = self.0.link_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let link = self
                .0
                .links
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(account)
                .cloned();
            match link {
                Some(Link::Ready(api)) => return Ok(api),
                Some(Link::Unauthorized) => return Err(SendError::Unauthorized),
                Some(Link::Connecting) => {}
                None => {
                    return Err(SendError::Other(format!(
                        "account {account} is not in config.toml"
                    )))
                }
            }
            let still_connecting =
                || SendError::Transient(format!("account {account} is connecting to Telegram"));
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(deadline) => return Err(still_connecting()),
                _ = self.0.shutdown.cancelled() => return Err(still_connecting()),
            }
        }
    }

    fn journal_key(account: &str, key: IdempotencyKey) -> String {
        format!("{account}\0{key}")
    }

    /// Keeps one account connected until shutdown, handing its incoming
    /// messages to the host.
    async fn supervise(self, account: String, sink: mpsc::Sender<Inbound>) {
        let mut backoff = Duration::from_secs(1);
        loop {
            if self.0.shutdown.is_cancelled() {
                return;
            }
            if !self.0.connector.has_session(&account) {
                // The host raises the alert that says so.
                self.set_link(&account, Link::Unauthorized);
                return;
            }
            self.set_link(&account, Link::Connecting);
            let attempt = tokio::time::timeout(CONNECT_TIMEOUT, self.0.connector.connect(&account));
            let result = tokio::select! {
                r = attempt => r.unwrap_or_else(|_| Err(SendError::Transient("connecting timed out".into()))),
                _ = self.0.shutdown.cancelled() => return,
            };
            match result {
                Ok(conn) => {
                    tracing::info!(account, "connected to Telegram");
                    backoff = Duration::from_secs(1);
                    self.set_link(&account, Link::Ready(conn.api.clone()));
                    self.receive(&account, conn, &sink).await;
                    if self.0.shutdown.is_cancelled() {
                        return;
                    }
                    tracing::warn!(account, "the connection to Telegram was lost; reconnecting");
                }
                Err(SendError::Unauthorized) | Err(SendError::AccountBanned) => {
                    self.set_link(&account, Link::Unauthorized);
                    tracing::error!(
                        account,
                        "Telegram refuses the session of account {account}; run `colloquy login {account}`"
                    );
                    return;
                }
                Err(e) => {
                    self.set_link(&account, Link::Connecting);
                    tracing::warn!(
                        account,
                        "cannot reach Telegram: {e}; retrying in {}",
                        login::short(backoff)
                    );
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.0.shutdown.cancelled() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Hands incoming messages to the host until the link is lost.
    async fn receive(&self, account: &str, mut conn: Connection, sink: &mpsc::Sender<Inbound>) {
        loop {
            let msg = tokio::select! {
                m = conn.incoming.recv() => m,
                _ = self.0.shutdown.cancelled() => None,
            };
            let Some(msg) = msg else { return };
            let contact = self.0.resolver.identity_of(account, msg.user_id);
            let message = incoming(account, &contact, msg.id, msg.text, msg.date);
            if !hand_over(sink, message).await {
                return;
            }
            // The update state moves on only once the host has the message.
            let _ = msg.stored.send(());
            self.mark_read(conn.api.as_ref(), account, &contact, msg.id)
                .await;
        }
    }

    /// Marks the chat read up to `id`, when the manners say so.
    async fn mark_read(&self, api: &dyn Api, account: &str, contact: &Identity, id: i32) {
        if !self.0.manners.read_marks {
            return;
        }
        if let Ok(Some(peer)) = self.0.resolver.cached(account, contact) {
            if let Err(e) = api.read(peer, id).await {
                tracing::debug!(account, "read mark failed: {}", errors::classify(&e));
            }
        }
    }

    /// Hands the host the contact's messages among the chat's latest that
    /// are newer than `after`, as [`Self::receive`] does.
    async fn catch_up_on(
        &self,
        account: &str,
        contact: &Identity,
        after: i64,
    ) -> Result<(), SendError> {
        let sink = self
            .0
            .sink
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(sink) = sink else { return Ok(()) };
        // The reviver asks for every quiet dialog: an account that is not
        // connected now is asked again at the next review.
        let api = self.api_within(account, Duration::ZERO).await?;
        // Resolved again when an import of the session dropped the cache.
        let peer = match self.0.resolver.peer(account, api.as_ref(), contact).await {
            Ok(peer) => peer,
            // No chat with a contact that cannot be found.
            Err(SendError::Unreachable(_) | SendError::PeerInvalid) => return Ok(()),
            Err(e) => return Err(e),
        };
        let history = tokio::time::timeout(HISTORY_TIMEOUT, api.history(peer, HISTORY))
            .await
            .map_err(|_| SendError::Transient("the chat's history did not come in time".into()))?
            .map_err(|e| errors::classify(&e))?;
        let missed = history
            .into_iter()
            .rev()
            .filter(|m| !m.out && i64::from(m.id) > after);
        let mut newest = None;
        for m in missed {
            let message = incoming(account, contact, m.id, m.text, m.date);
            if !hand_over(&sink, message).await {
                return Ok(());
            }
            newest = Some(m.id);
        }
        if let Some(id) = newest {
            self.mark_read(api.as_ref(), account, contact, id).await;
        }
        Ok(())
    }

    async fn send_now(&self, msg: OutgoingMessage) -> Result<Delivered, SendError> {
        let api = self.api(&msg.account).await?;
        let peer = self
            .0
            .resolver
            .peer(&msg.account, api.as_ref(), &msg.contact)
            .await?;
        if msg.kind == MessageKind::Opening {
            if let Some(why) = api
                .requirement(peer)
                .await
                .map_err(|e| errors::classify(&e))?
            {
                return Err(SendError::Unreachable(why));
            }
        }
        let journal = Self::journal_key(&msg.account, msg.key);
        let mut record = SentRecord {
            text: msg.text.clone(),
            at: self.0.clock.now(),
            id: None,
        };
        self.0
            .sent
            .put(&journal, &record)
            .map_err(|e| SendError::Other(e.to_string()))?;
        if msg.kind == MessageKind::Reply && self.0.manners.typing && api.typing(peer).await.is_ok()
        {
            let typing = self.0.manners.typing_time(&msg.text);
            self.0
                .clock
                .sleep_until(self.0.clock.now().saturating_add(typing))
                .await;
        }
        let (text, random_id) = (msg.text.clone(), msg.key.0 as i64);
        let call = tokio::spawn(async move { api.send(peer, &text, random_id).await });
        let id = match tokio::time::timeout(SEND_TIMEOUT, call).await {
            Err(_) => return Err(SendError::TimedOutAfterSend),
            Ok(Err(join)) if join.is_panic() => return Err(errors::from_panic(join.into_panic())),
            Ok(Err(_)) => return Err(SendError::TimedOutAfterSend),
            Ok(Ok(result)) => result.map_err(|e| errors::classify(&e))?,
        };
        record.id = Some(id);
        let _ = self.0.sent.put(&journal, &record);
        Ok(Delivered {
            transport_id: i64::from(id),
            at: record.at,
        })
    }

    async fn reconcile(
        &self,
        account: &str,
        contact: &Identity,
        key: IdempotencyKey,
    ) -> Result<Option<Delivered>, SendError> {
        let journal = Self::journal_key(account, key);
        let Some(mut record) = self
            .0
            .sent
            .get::<SentRecord>(&journal)
            .map_err(|e| SendError::Other(e.to_string()))?
        else {
            // Never attempted from this data_dir: not sent.
            return Ok(None);
        };
        if let Some(id) = record.id {
            return Ok(Some(Delivered {
                transport_id: i64::from(id),
                at: record.at,
            }));
        }
        let api = self.api(account).await?;
        let Some(peer) = self
            .0
            .resolver
            .cached(account, contact)
            .map_err(|e| SendError::Other(e.to_string()))?
        else {
            return Ok(None);
        };
        let since = record.at.0 / 1000 - 120;
        let recent = api
            .history(peer, HISTORY)
            .await
            .map_err(|e| errors::classify(&e))?;
        let Some(found) = recent
            .into_iter()
            .find(|m| m.out && m.text == record.text && m.date >= since)
        else {
            return Ok(None);
        };
        record.id = Some(found.id);
        let _ = self.0.sent.put(&journal, &record);
        Ok(Some(Delivered {
            transport_id: i64::from(found.id),
            at: Timestamp(found.date * 1000),
        }))
    }
}

impl Transport for TelegramTransport {
    fn send(&self, msg: OutgoingMessage) -> BoxFuture<'_, Result<Delivered, SendError>> {
        Box::pin(self.send_now(msg))
    }

    fn was_delivered(
        &self,
        account: &str,
        contact: &Identity,
        key: IdempotencyKey,
    ) -> BoxFuture<'_, Result<Option<Delivered>, SendError>> {
        let (account, contact) = (account.to_string(), contact.clone());
        Box::pin(async move { self.reconcile(&account, &contact, key).await })
    }

    fn catch_up(
        &self,
        account: &str,
        contact: &Identity,
        after: i64,
    ) -> BoxFuture<'_, Result<(), SendError>> {
        let (account, contact) = (account.to_string(), contact.clone());
        Box::pin(async move { self.catch_up_on(&account, &contact, after).await })
    }

    fn subscribe(&self, sink: mpsc::Sender<Inbound>) -> BoxFuture<'_, Result<(), SendError>> {
        *self.0.sink.lock().unwrap_or_else(|e| e.into_inner()) = Some(sink.clone());
        for account in &self.0.accounts {
            tokio::spawn(self.clone().supervise(account.clone(), sink.clone()));
        }
        Box::pin(async { Ok(()) })
    }

    fn links(&self) -> Vec<(String, &'static str)> {
        self.link_states()
    }
}

/// A message from `contact` to `account`, Telegram's id and date (Unix
/// seconds) as the host's.
fn incoming(
    account: &str,
    contact: &Identity,
    id: i32,
    text: String,
    date: i64,
) -> IncomingMessage {
    IncomingMessage {
        account: account.to_string(),
        contact: contact.clone(),
        transport_id: i64::from(id),
        text,
        at: Timestamp(date * 1000),
    }
}

#[cfg(test)]
mod tests;
