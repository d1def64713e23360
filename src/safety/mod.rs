//! AccountSafety: the only gate between the host and the transport.
//!
//! - [`decide`] is the pure core: limits, windows, pauses, warm-up.
//! - [`reaction`] is the one table from transport errors to reactions.
//! - [`alerts`] raises alerts to the log and a webhook.
//! - [`slot`]: the [`Slot`] a send needs, which only AccountSafety makes.
//! - [`AccountSafety`] (this file) puts them on the store: reservations are
//!   atomic store transactions, waiting is sleeping until the exact
//!   moment a send becomes possible, and [`AccountSafety::send`] is the one
//!   place a message goes to the transport, on its slot.

pub mod alerts;
pub mod decide;
pub mod reaction;
pub mod slot;

pub use decide::{Decision, Denied, Limits, SendRequest};
pub use slot::Slot;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustc_hash::FxHashMap;
use tokio::sync::Notify;

use crate::clock::{Clock, SeededRng, Timestamp};
use crate::config::{Config, SendWindow};
use crate::model::{
    AccountStatus, ContactId, DialogId, DoNotContact, IdempotencyKey, Identity, MessageKind,
};
use crate::store::{Answer, AnswerOutcome, Flight, Store, StoreError};
use crate::transport::{Delivered, OutgoingMessage, SendError, Transport};
use alerts::{Alert, AlertKind, Alerts};
use reaction::{AccountEffect, Outcome, Reaction, Situation};

/// Why the gate could not let a send through.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error(transparent)]
    Denied(#[from] Denied),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The failed send that [`AccountSafety::report`] reacts to.
#[derive(Debug, Clone)]
pub struct Failure<'a> {
    pub account: &'a str,
    pub campaign: &'a str,
    pub dialog: Option<DialogId>,
    pub contact: Option<ContactId>,
    pub key: IdempotencyKey,
    /// How many times this message failed before, from 0.
    pub attempt: u32,
    pub error: &'a SendError,
}

/// An answer of a batch as stored, with the slots its first replies took
/// ([`AccountSafety::answer_batch`]).
pub type OutcomeWithSlots = (AnswerOutcome, Vec<Slot>);

/// Whether a message may go now: its slot, or when to ask again, or why
/// never.
#[derive(Debug)]
pub enum Gate {
    Open(Slot),
    NotBefore(Timestamp),
    Deny(Denied),
}

/// What became of a send.
#[derive(Debug)]
pub enum Sent {
    Delivered(Delivered),
    Failed(SendError),
    /// The send window closed while the send waited for its turn (a flush,
    /// the dialog's gate): the slot went back and nothing was sent.
    WindowClosed,
}

/// The safety gate of every account. Cheap to clone.
#[derive(Clone)]
pub struct AccountSafety {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    clock: Arc<dyn Clock>,
    rng: Arc<SeededRng>,
    alerts: Alerts,
    /// Limits per account, replaced when the config is reloaded. A std
    /// `RwLock` is enough: it is held only to clone a value, never across an
    /// await.
    config: RwLock<Arc<Config>>,
    /// Wakes every waiter when something that can shorten a wait changes
    /// (a config reload, an account re-enabled).
    changed: Notify,
}

impl AccountSafety {
    pub fn new(
        store: Store,
        config: Arc<Config>,
        clock: Arc<dyn Clock>,
        rng: Arc<SeededRng>,
        alerts: Alerts,
    ) -> Self {
        AccountSafety {
            inner: Arc::new(Inner {
                store,
                clock,
                rng,
                alerts,
                config: RwLock::new(config),
                changed: Notify::new(),
            }),
        }
    }

    /// Applies a reloaded config; waiting sends re-check their limits.
    pub fn set_config(&self, config: Arc<Config>) {
        *self.inner.config.write().unwrap_or_else(|e| e.into_inner()) = config;
        self.inner.changed.notify_waiters();
    }

    fn config(&self) -> Arc<Config> {
        self.inner
            .config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn limits(&self, account: &str) -> Limits {
        Limits::from(&self.config().account_safety(account))
    }

    pub fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    /// May the account send this kind of message now? Reserves nothing.
    pub fn check(
        &self,
        account: &str,
        kind: MessageKind,
        window: Option<&SendWindow>,
    ) -> Result<Decision, StoreError> {
        let record = self.inner.store.account(account)?;
        let req = SendRequest {
            kind,
            now: self.now(),
            window,
        };
        Ok(decide::decide(&record, &self.limits(account), req))
    }

    /// Takes a slot for one send if the limits allow it now, in one store
    /// transaction: two callers can never both take the last slot. A slot
    /// the message already holds is kept.
    pub fn try_reserve(
        &self,
        account: &str,
        kind: MessageKind,
        window: Option<&SendWindow>,
        key: IdempotencyKey,
    ) -> Result<Decision, StoreError> {
        self.reserve(
            account,
            SendRequest {
                kind,
                now: self.now(),
                window,
            },
            key,
            false,
        )
    }

    /// Takes the slot for a send about to happen now: a slot the message
    /// already holds (an opening's, taken when its contact was claimed, or one
    /// kept from an earlier attempt) is given up and taken again at this
    /// moment, so the limits are checked against the real time of the send.
    /// Callers hold the account's lock from here until the send is confirmed.
    pub fn reserve_now(
        &self,
        account: &str,
        kind: MessageKind,
        window: Option<&SendWindow>,
        key: IdempotencyKey,
    ) -> Result<Gate, StoreError> {
        let decision = self.reserve(
            account,
            SendRequest {
                kind,
                now: self.now(),
                window,
            },
            key,
            true,
        )?;
        Ok(match decision {
            Decision::Allow => Gate::Open(Slot::new(account, key)),
            Decision::NotBefore(t) => Gate::NotBefore(t),
            Decision::Deny(d) => Gate::Deny(d),
        })
    }

    /// Sends a message on its slot: the one place a message goes to the
    /// transport.
    pub async fn send(
        &self,
        transport: &dyn Transport,
        slot: Slot,
        message: (Identity, String, MessageKind),
    ) -> Result<Delivered, SendError> {
        transport.send(outgoing(slot, message)).await
    }

    /// [`AccountSafety::send`] within a send window. The slot was taken
    /// inside the window, but the send may have waited since (for a flush,
    /// for the dialog's gate) long enough for the window to close: then the
    /// slot goes back and nothing is sent ([`Sent::WindowClosed`]).
    pub async fn send_in_window(
        &self,
        transport: &dyn Transport,
        slot: Slot,
        window: Option<&SendWindow>,
        message: (Identity, String, MessageKind),
    ) -> Result<Sent, StoreError> {
        if let Some(w) = window {
            let now = self.now();
            if decide::window_open_at(w, now) > now {
                self.release(slot)?;
                return Ok(Sent::WindowClosed);
            }
        }
        Ok(match self.send(transport, slot, message).await {
            Ok(d) => Sent::Delivered(d),
            Err(e) => Sent::Failed(e),
        })
    }

    /// Stores a batch of answers ([`Store::answer_batch`]), taking each new
    /// reply's slot now if the limits allow, as
    /// [`AccountSafety::reserve_now`] does; returns each answer with the
    /// slots of its first replies. Callers hold the accounts' locks until
    /// the sends are confirmed ([`AccountSafety::settle_batch`]).
    pub fn answer_batch(
        &self,
        answers: &[Answer<'_>],
        accounts: &[&str],
    ) -> Result<(Vec<OutcomeWithSlots>, Flight), StoreError> {
        let reserve = self.reply_reserver(accounts);
        let (answered, flight) = self.inner.store.answer_batch(answers, accounts, &reserve)?;
        let with_slots = answered
            .into_iter()
            .map(|a| {
                let slots = match &a {
                    AnswerOutcome::Done {
                        dialog,
                        replies,
                        slots,
                        ..
                    } => replies[..*slots]
                        .iter()
                        .filter_map(|m| m.key)
                        .map(|key| Slot::new(&dialog.account, key))
                        .collect(),
                    AnswerOutcome::Duplicate | AnswerOutcome::Stale => Vec::new(),
                };
                (a, slots)
            })
            .collect();
        Ok((with_slots, flight))
    }

    fn reserve(
        &self,
        account: &str,
        req: SendRequest<'_>,
        key: IdempotencyKey,
        again: bool,
    ) -> Result<Decision, StoreError> {
        let limits = self.limits(account);
        let jitter = self.jitter(&limits);
        self.inner.store.update_account(account, &|record| {
            if !again {
                return decide::reserve(record, &limits, req, key, jitter);
            }
            // The slot moves to now only if it is free now; otherwise the
            // message keeps the one it holds, which still counts.
            let mut moved = record.clone();
            decide::release(&mut moved, key);
            let decision = decide::reserve(&mut moved, &limits, req, key, jitter);
            if decision == Decision::Allow {
                *record = moved;
            }
            decision
        })
    }

    /// The reservation step of [`AccountSafety::answer_batch`]. The key is
    /// one drawn for the reply: it holds no slot yet.
    fn reply_reserver<'a>(
        &'a self,
        accounts: &[&'a str],
    ) -> impl Fn(&mut crate::model::AccountRecord, IdempotencyKey) -> bool + 'a {
        // Looked up once per reply: the batch's own accounts, hashed fast.
        let limits: FxHashMap<&str, Limits> =
            accounts.iter().map(|a| (*a, self.limits(a))).collect();
        let now = self.now();
        move |record, key| {
            let Some(limits) = limits.get(record.name.as_str()) else {
                return false;
            };
            let req = SendRequest {
                kind: MessageKind::Reply,
                now,
                window: None,
            };
            // The pipeline's replies carry keys drawn for them.
            decide::reserve_new(record, limits, req, key, self.jitter(limits)) == Decision::Allow
        }
    }

    /// Marks a batch of sends sent and their slots confirmed at the
    /// transport's times, in one store transaction.
    pub fn settle_batch(
        &self,
        flight: &crate::store::Flight,
        sent: &[crate::store::Settle],
    ) -> Result<(), StoreError> {
        let mut limits: FxHashMap<&str, Limits> = FxHashMap::default();
        for s in sent {
            limits
                .entry(s.account.as_str())
                .or_insert_with(|| self.limits(&s.account));
        }
        self.inner.store.settle_batch(flight, sent, &|r, s| {
            decide::confirm(r, s.key, s.delivered.at, &limits[s.account.as_str()]);
        })
    }

    /// A reservation step for [`Store::open_dialog`], so that claiming the
    /// contact, creating the dialog and taking the opening's slot are one
    /// transaction.
    pub fn opening_reserver(
        &self,
        account: &str,
        window: Option<SendWindow>,
        key: IdempotencyKey,
    ) -> impl Fn(&mut crate::model::AccountRecord) -> Result<(), String> {
        let limits = self.limits(account);
        let jitter = self.jitter(&limits);
        let now = self.now();
        move |record| {
            let req = SendRequest {
                kind: MessageKind::Opening,
                now,
                window: window.as_ref(),
            };
            match decide::reserve(record, &limits, req, key, jitter) {
                Decision::Allow => Ok(()),
                Decision::NotBefore(t) => Err(format!(
                    "account {} may open a dialog at {}",
                    record.name,
                    t.to_rfc3339()
                )),
                Decision::Deny(d) => Err(d.to_string()),
            }
        }
    }

    /// Waits until the account may send, then takes the slot. Sleeps until
    /// the exact moment the limits allow it, or until the config changes.
    pub async fn acquire(
        &self,
        account: &str,
        kind: MessageKind,
        window: Option<&SendWindow>,
        key: IdempotencyKey,
    ) -> Result<(), GateError> {
        loop {
            match self.try_reserve(account, kind, window, key)? {
                Decision::Allow => return Ok(()),
                Decision::Deny(d) => return Err(d.into()),
                Decision::NotBefore(t) => self.wait_until(t).await,
            }
        }
    }

    /// Sleeps until `t` or until something changes that may allow earlier.
    pub async fn wait_until(&self, t: Timestamp) {
        let changed = self.inner.changed.notified();
        tokio::select! {
            _ = self.inner.clock.sleep_until(t) => {}
            _ = changed => {}
        }
    }

    /// Marks a message sent and its slot confirmed at the transport's time,
    /// in one store transaction.
    pub fn settle_sent(
        &self,
        account: &str,
        key: IdempotencyKey,
        delivered: crate::transport::Delivered,
    ) -> Result<(), StoreError> {
        let limits = self.limits(account);
        self.inner
            .store
            .settle_sent(key, delivered.transport_id, account, &|r| {
                decide::confirm(r, key, delivered.at, &limits)
            })
            .map(|_| ())
    }

    /// Gives a slot back: the message is not sent on it.
    pub fn release(&self, slot: Slot) -> Result<(), StoreError> {
        let key = slot.key();
        self.inner.store.update_account(slot.account(), &|r| {
            decide::release(r, key);
        })
    }

    fn jitter(&self, limits: &Limits) -> Duration {
        self.inner
            .rng
            .duration_between(Duration::ZERO, limits.jitter)
    }

    /// Reacts to a failed send as the reaction table says: pauses or blocks
    /// the account, marks an unreachable contact, returns or keeps the slot,
    /// raises alerts. Returns what should happen to the message.
    pub fn report(&self, f: &Failure<'_>) -> Result<Reaction, StoreError> {
        if matches!(f.error, crate::transport::SendError::FloodWait(_)) {
            crate::metrics::count("colloquy_flood_waits_total", &[("account", f.account)]);
        }
        let config = self.config();
        let safety = config.account_safety(f.account);
        let now = self.now();
        let outcome: Outcome = reaction::react(
            f.error,
            Situation {
                now,
                attempt: f.attempt,
                safety: &safety,
                unit: self.inner.rng.unit(),
            },
        );
        let (release, effect) = (outcome.release_slot, &outcome.account);
        self.inner.store.update_account(f.account, &|r| {
            if release {
                decide::release(r, f.key);
            }
            account_effect(r, effect, f.error);
        })?;
        tracing::warn!(
            account = f.account,
            campaign = f.campaign,
            dialog = f.dialog,
            "send failed: {}",
            f.error
        );
        self.follow_through(f, &outcome, now)?;
        if let AccountEffect::SpamLimit(until) = outcome.account {
            self.spam_limited(f, until, now, &config)?;
        }
        Ok(outcome.reaction)
    }

    /// What a failure's reaction does beyond the account: a contact no
    /// account can reach goes on the do-not-contact list; a lost account
    /// blocks its dialogs; a failed dialog raises an alert.
    fn follow_through(
        &self,
        f: &Failure<'_>,
        outcome: &Outcome,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let store = &self.inner.store;
        match &outcome.reaction {
            Reaction::Unreachable(why) => {
                if let Some(c) = f.contact {
                    store.add_do_not_contact(c, DoNotContact::Unreachable(why.clone()))?;
                    let identity = store.contact(c)?.map(|c| c.identity.to_string());
                    store.audit_do_not_contact(&crate::model::DncChange {
                        at: now,
                        contact: c,
                        identity: identity.unwrap_or_else(|| c.to_string()),
                        action: "added".into(),
                        why: format!("unreachable: {why}"),
                    })?;
                }
            }
            Reaction::AccountLost => {
                let blocked = store.block_dialogs_of(f.account)?;
                let kind = if outcome.account == AccountEffect::Banned {
                    AlertKind::AccountBanned
                } else {
                    AlertKind::AccountUnauthorized
                };
                let message = format!(
                    "account {} is out of service ({}); {} dialogs blocked",
                    f.account,
                    f.error,
                    blocked.len()
                );
                self.inner
                    .alerts
                    .raise(failure_alert(f, kind, now, message));
            }
            Reaction::FailDialog(why) => {
                let message = format!("a dialog failed: {why}");
                self.inner
                    .alerts
                    .raise(failure_alert(f, AlertKind::DialogError, now, message));
            }
            Reaction::RetryAt(_) | Reaction::Reconcile => {}
        }
        Ok(())
    }

    /// An account limited for spam: an alert, and one for each of its
    /// campaigns that no account of can open dialogs any more.
    fn spam_limited(
        &self,
        f: &Failure<'_>,
        until: Timestamp,
        now: Timestamp,
        config: &Config,
    ) -> Result<(), StoreError> {
        let message = format!(
            "account {} may not open dialogs until {} ({})",
            f.account,
            until.to_rfc3339(),
            f.error
        );
        self.inner.alerts.raise(failure_alert(
            f,
            AlertKind::AccountSpamLimited,
            now,
            message,
        ));
        for c in config
            .file
            .campaigns
            .iter()
            .filter(|c| c.accounts.iter().any(|a| a == f.account))
        {
            if self.none_can_open(&c.accounts)? {
                self.inner.alerts.raise(
                    Alert::new(
                        AlertKind::CampaignPaused,
                        now,
                        format!(
                            "campaign {} paused itself: every account of it is limited for spam",
                            c.name
                        ),
                    )
                    .campaign(&c.name),
                );
            }
        }
        Ok(())
    }

    /// The account's session is missing or revoked: nothing is sent from
    /// it until `colloquy login` succeeds. Raises an alert.
    pub fn mark_unauthorized(&self, account: &str) -> Result<(), StoreError> {
        let changed = self.inner.store.update_account(account, &|r| {
            let next = r.status.transition(AccountStatus::Unauthorized);
            match next {
                Ok(s) if s != r.status => {
                    r.status = s;
                    true
                }
                _ => false,
            }
        })?;
        if changed {
            self.inner.alerts.raise(
                Alert::new(
                    AlertKind::AccountUnauthorized,
                    self.now(),
                    format!("account {account} is not logged in; run `colloquy login {account}`"),
                )
                .account(account),
            );
        }
        Ok(())
    }

    /// Whether every one of `accounts` is barred from opening dialogs now:
    /// a campaign with none left pauses itself.
    pub fn none_can_open(&self, accounts: &[String]) -> Result<bool, StoreError> {
        let now = self.now();
        for a in accounts {
            let r = self.inner.store.account(a)?;
            let barred = match r.status {
                AccountStatus::SpamLimited { until } => until > now,
                AccountStatus::Active | AccountStatus::FloodWait { .. } => false,
                _ => true,
            };
            if !barred {
                return Ok(false);
            }
        }
        Ok(true)
    }

    pub fn alerts(&self) -> &Alerts {
        &self.inner.alerts
    }

    /// Per-account view of the stored records, for `status`.
    pub fn accounts(&self) -> Result<HashMap<String, crate::model::AccountRecord>, StoreError> {
        Ok(self
            .inner
            .store
            .accounts()?
            .into_iter()
            .map(|r| (r.name.clone(), r))
            .collect())
    }
}

/// The message a slot sends: the slot's account and key, and the proof
/// that it holds one.
fn outgoing(slot: Slot, (contact, text, kind): (Identity, String, MessageKind)) -> OutgoingMessage {
    let (account, key, granted) = slot.grant();
    OutgoingMessage {
        account,
        contact,
        text,
        kind,
        key,
        granted,
    }
}

/// What a failed send does to its account's record.
fn account_effect(
    r: &mut crate::model::AccountRecord,
    effect: &AccountEffect,
    error: &crate::transport::SendError,
) {
    match effect {
        AccountEffect::None => {}
        AccountEffect::Pause(until) => decide::pause(r, *until),
        AccountEffect::SpamLimit(until) => decide::spam_limit(r, *until),
        AccountEffect::Banned => {
            if let Ok(s) = r.status.transition(AccountStatus::Blocked {
                reason: error.to_string(),
            }) {
                r.status = s;
            }
        }
        AccountEffect::Unauthorized => {
            if let Ok(s) = r.status.transition(AccountStatus::Unauthorized) {
                r.status = s;
            }
        }
    }
}

/// An alert about a failed send, naming its account, campaign and dialog.
fn failure_alert(f: &Failure<'_>, kind: AlertKind, now: Timestamp, message: String) -> Alert {
    let mut a = Alert::new(kind, now, message)
        .account(f.account)
        .campaign(f.campaign);
    if let Some(d) = f.dialog {
        a = a.dialog(d);
    }
    a
}

/// A message as a send on a slot makes it, for the transports' unit tests,
/// which send without a host.
#[cfg(test)]
pub(crate) fn outgoing_for_tests(
    account: &str,
    key: IdempotencyKey,
    message: (Identity, String, MessageKind),
) -> OutgoingMessage {
    outgoing(Slot::new(account, key), message)
}

#[cfg(test)]
mod tests;
