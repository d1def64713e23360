//! The simulated Telegram (SPEC section 6): contacts answer through a Lua
//! persona, faults are injected on request, and everything on the simulated
//! wire is appended to `data_dir/sim/wire.jsonl`.
//!
//! The world behaves like an external service: each line of the wire log
//! and of its journal (`data_dir/sim/world.jsonl`) is written straight to
//! the OS, so a killed host finds the world as it left it. On start the
//! world is rebuilt from both files: which keys were delivered (from the
//! wire, the truth for invariant 4), which replies are pending, who is
//! banned or unreachable, and the persona state of every contact.

mod world;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify};

use crate::clock::{BoxFuture, Clock, SeededRng, Timestamp, TokioClock};
use crate::config::{Config, Sim};
use crate::engine::ctx::{AccountView, ContactView, HistoryEntry};
use crate::engine::library::Dirs;
use crate::engine::{Call, Ctx, EngineRuntime};
use crate::model::{IdempotencyKey, Identity, MessageKind};
use crate::transport::{
    Delivered, Inbound, IncomingMessage, OutgoingMessage, SendError, Transport,
};
use world::{Journal, Pending, World};

/// Where a new simulated world's clock starts: Monday 2026-01-05 08:00 UTC.
pub const WORLD_START: Timestamp = Timestamp(1_767_600_000_000);

/// What the simulated clock reads for a command run beside the host (the
/// `1h` of `export --since 1h`): where the world's wire log left off, or
/// where a new world starts.
pub fn clock_reading(config: &Config) -> Timestamp {
    resumed_at(config, world::last_seen(&config.data_dir().join("sim")))
}

/// Where the world's clock goes on from: the last time it saw, or where
/// the config starts it, whichever is later.
fn resumed_at(config: &Config, last_seen: Option<Timestamp>) -> Timestamp {
    let first = config.file.sim.start.map_or(WORLD_START, |m| m.0);
    last_seen.map_or(first, |t| t.max(first))
}

/// The simulated transport. Cheap to clone.
#[derive(Clone)]
pub struct SimTransport {
    inner: Arc<Inner>,
}

struct Inner {
    clock: Arc<TokioClock>,
    rng: SeededRng,
    cfg: Sim,
    files: world::Files,
    world: Mutex<World>,
    /// A reply was scheduled: the delivery loop may have to wake earlier.
    scheduled: Notify,
    /// The persona engine and its name, if a persona is configured.
    persona: Option<(EngineRuntime, String)>,
    /// Contacts as the audience files describe them, by identity.
    contacts: HashMap<Identity, ContactView>,
}

impl SimTransport {
    /// Opens (or creates) the world under `data_dir/sim`.
    pub fn open(config: &Config) -> Result<SimTransport, String> {
        let dir = config.data_dir().join("sim");
        let (files, world) = world::open(&dir)?;
        let start = resumed_at(config, world.last_time);
        let clock = Arc::new(TokioClock::new(start, config.file.sim.time_scale));
        let persona = match &config.file.sim.persona {
            Some(p) => Some(start_persona(config, &config.resolve(p), clock.clone())?),
            None => None,
        };
        let mut contacts = HashMap::new();
        for a in &config.file.audiences {
            for row in crate::audience::read(&config.resolve(&a.file)).rows {
                contacts
                    .entry(row.identity.clone())
                    .or_insert_with(|| ContactView::from(row));
            }
        }
        Ok(SimTransport {
            inner: Arc::new(Inner {
                clock,
                rng: SeededRng::new(
                    config.file.sim.seed ^ world.restarts.wrapping_mul(0x9e37_79b9),
                ),
                cfg: config.file.sim.clone(),
                files,
                world: Mutex::new(world),
                scheduled: Notify::new(),
                persona,
                contacts,
            }),
        })
    }

    /// The world's clock: the host runs on simulated time.
    pub fn clock(&self) -> Arc<TokioClock> {
        self.inner.clock.clone()
    }

    /// See [`EngineRuntime::hold_paused_clock`]; for the persona's calls.
    pub fn hold_paused_clock(&self, on: bool) {
        if let Some((rt, _)) = &self.inner.persona {
            rt.hold_paused_clock(on);
        }
    }

    /// The wire log's path.
    pub fn wire_path(dir: &Path) -> std::path::PathBuf {
        dir.join("sim").join("wire.jsonl")
    }
}

fn start_persona(
    config: &Config,
    path: &Path,
    clock: Arc<TokioClock>,
) -> Result<(EngineRuntime, String), String> {
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| format!("{}: not a Lua file name", path.display()))?
        .to_string();
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let (rt, problems) = EngineRuntime::start_with(config, Dirs::for_dir(config, dir), clock, 1);
    if !rt.engines().contains(&name) {
        return Err(format!(
            "the persona {} cannot be loaded: {}",
            path.display(),
            problems.join("; ")
        ));
    }
    Ok((rt, name))
}

impl Inner {
    fn world(&self) -> std::sync::MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Logs a fault on the wire.
    fn fault(&self, account: &str, contact: &Identity, event: &str, seconds: Option<f64>) {
        let mut line = serde_json::json!({
            "at": self.clock.now().as_secs_f64(),
            "account": account,
            "contact": contact.to_string(),
            "event": event,
        });
        if let Some(s) = seconds {
            line["seconds"] = s.into();
        }
        self.files.wire(&line);
    }

    /// Rolls the configured faults for one send attempt, in a fixed order.
    fn roll_faults(&self, world: &mut World, msg: &OutgoingMessage) -> Result<bool, SendError> {
        let f = &self.cfg.faults;
        if world.banned.contains(&msg.account) {
            return Err(SendError::AccountBanned);
        }
        // Like Telegram, the world refuses an account's sends while it is
        // told to wait.
        let now = self.clock.now();
        if let Some(until) = world
            .flood_until
            .get(&msg.account)
            .copied()
            .filter(|u| *u > now)
        {
            let left = Duration::from_secs(until.since(now).as_secs().max(1));
            self.fault(
                &msg.account,
                &msg.contact,
                "flood_wait",
                Some(left.as_secs() as f64),
            );
            return Err(SendError::FloodWait(left));
        }
        if self.rng.chance(f.ban) {
            world.banned.insert(msg.account.clone());
            self.files.journal(&Journal::Ban {
                account: msg.account.clone(),
            });
            self.fault(&msg.account, &msg.contact, "ban", None);
            return Err(SendError::AccountBanned);
        }
        if self.rng.chance(f.flood_wait) {
            let d = self
                .rng
                .duration_between(f.flood_wait_duration.lo, f.flood_wait_duration.hi);
            let d = Duration::from_secs(d.as_secs().max(1));
            let until = now.saturating_add(d);
            world.flood_until.insert(msg.account.clone(), until);
            self.files.journal(&Journal::FloodWait {
                account: msg.account.clone(),
                until,
            });
            self.fault(
                &msg.account,
                &msg.contact,
                "flood_wait",
                Some(d.as_secs() as f64),
            );
            return Err(SendError::FloodWait(d));
        }
        if msg.kind == MessageKind::Opening && self.rng.chance(f.peer_flood) {
            self.fault(&msg.account, &msg.contact, "peer_flood", None);
            return Err(SendError::PeerFlood);
        }
        let restricted = match world.restricted.get(&msg.contact) {
            Some(r) => *r,
            None => {
                let r = self.rng.chance(f.privacy_restricted);
                world.restricted.insert(msg.contact.clone(), r);
                self.files.journal(&Journal::Restricted {
                    contact: msg.contact.clone(),
                    value: r,
                });
                r
            }
        };
        if restricted {
            self.fault(&msg.account, &msg.contact, "privacy_restricted", None);
            return Err(SendError::PrivacyRestricted);
        }
        if self.rng.chance(f.transient) {
            self.fault(&msg.account, &msg.contact, "transient", None);
            return Err(SendError::Transient("simulated network error".into()));
        }
        Ok(self.rng.chance(f.timeout_delivered))
    }

    async fn send(self: Arc<Self>, msg: OutgoingMessage) -> Result<Delivered, SendError> {
        let (delivered, timed_out) = {
            let mut world = self.world();
            if world.delivered.contains_key(&msg.key.0) {
                return Err(SendError::Duplicate);
            }
            let timed_out = self.roll_faults(&mut world, &msg)?;
            let now = self.clock.now();
            let id = world.next_id();
            let d = Delivered {
                transport_id: id,
                at: now,
            };
            world.delivered.insert(msg.key.0, d);
            // The wire line is the truth of delivery: written first.
            self.files.wire(&serde_json::json!({
                "at": now.as_secs_f64(),
                "account": msg.account,
                "contact": msg.contact.to_string(),
                "direction": "out",
                "text": msg.text,
                "kind": msg.kind.label(),
                "key": msg.key.to_string(),
            }));
            self.files.journal(&Journal::Sent {
                key: msg.key.0,
                id,
                at: now,
                contact: msg.contact.clone(),
                text: msg.text.clone(),
            });
            world.history_of(&msg.contact).push(HistoryEntry {
                direction: "in".into(),
                text: msg.text.clone(),
                at: now.as_secs_f64(),
            });
            (d, timed_out)
        };
        if timed_out {
            self.fault(&msg.account, &msg.contact, "timeout_delivered", None);
        }
        if self.rng.chance(self.cfg.reply_probability_of(&msg.text)) {
            self.schedule_reply(&msg, delivered.at).await;
        }
        if timed_out {
            Err(SendError::TimedOutAfterSend)
        } else {
            Ok(delivered)
        }
    }

    /// Asks the persona what the contact answers, and schedules it.
    async fn schedule_reply(&self, msg: &OutgoingMessage, at: Timestamp) {
        let Some((rt, persona)) = &self.persona else {
            return;
        };
        let (history, state) = {
            let mut world = self.world();
            let history = world.history_of(&msg.contact).clone();
            let state = world
                .persona_state
                .get(&msg.contact)
                .cloned()
                .unwrap_or_else(|| serde_json::json!({}));
            (history, state)
        };
        let mut contact = self.contacts.get(&msg.contact).cloned().unwrap_or_default();
        match &msg.contact {
            Identity::Username(u) => contact.username = Some(u.clone()),
            Identity::Phone(p) => contact.phone = Some(p.clone()),
            Identity::UserId(i) => contact.user_id = Some(*i),
        }
        let ctx = Ctx {
            contact,
            account: AccountView {
                name: msg.account.clone(),
            },
            history: Arc::new(history),
            now: at.as_secs_f64(),
            state,
            ..Ctx::default()
        };
        let call = Call::Response {
            text: msg.text.clone(),
            at: at.as_secs_f64(),
        };
        let reply = match rt.call(persona, call, ctx).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("simulated contact {} did not answer: {e}", msg.contact);
                return;
            }
        };
        let mut world = self.world();
        world
            .persona_state
            .insert(msg.contact.clone(), reply.state.clone());
        self.files.journal(&Journal::State {
            contact: msg.contact.clone(),
            state: reply.state,
        });
        let mut due = at;
        for text in reply.output.messages {
            due = due.saturating_add(
                self.rng
                    .duration_between(self.cfg.reply_delay.lo, self.cfg.reply_delay.hi),
            );
            let p = Pending {
                id: world.next_id(),
                due,
                account: msg.account.clone(),
                contact: msg.contact.clone(),
                text,
            };
            self.files.journal(&Journal::Pending(p.clone()));
            world.pending.insert((p.due, p.id), p);
        }
        drop(world);
        self.scheduled.notify_one();
    }

    /// Hands due replies to the host, one at a time, each after the host
    /// confirmed the one before was stored.
    async fn deliver(self: Arc<Self>, sink: mpsc::Sender<Inbound>) {
        loop {
            let next = self
                .world()
                .pending
                .first_key_value()
                .map(|(k, p)| (*k, p.clone()));
            let Some((k, p)) = next else {
                self.scheduled.notified().await;
                continue;
            };
            if p.due > self.clock.now() {
                let wake = self.scheduled.notified();
                tokio::select! {
                    _ = self.clock.sleep_until(p.due) => {}
                    _ = wake => {}
                }
                continue;
            }
            let (tx, rx) = oneshot::channel();
            let message = IncomingMessage {
                account: p.account.clone(),
                contact: p.contact.clone(),
                transport_id: p.id,
                text: p.text.clone(),
                at: self.clock.now(),
            };
            if sink
                .send(Inbound {
                    message,
                    stored: tx,
                })
                .await
                .is_err()
                || rx.await.is_err()
            {
                return; // The host is gone; the reply stays pending for its next start.
            }
            let now = self.clock.now();
            let mut world = self.world();
            world.pending.remove(&k);
            self.files.journal(&Journal::Received { id: p.id });
            self.files.wire(&serde_json::json!({
                "at": now.as_secs_f64(),
                "account": p.account,
                "contact": p.contact.to_string(),
                "direction": "in",
                "text": p.text,
            }));
            world.history_of(&p.contact).push(HistoryEntry {
                direction: "out".into(),
                text: p.text.clone(),
                at: now.as_secs_f64(),
            });
        }
    }
}

impl Transport for SimTransport {
    fn send(&self, msg: OutgoingMessage) -> BoxFuture<'_, Result<Delivered, SendError>> {
        Box::pin(self.inner.clone().send(msg))
    }

    fn was_delivered(
        &self,
        _account: &str,
        _contact: &Identity,
        key: IdempotencyKey,
    ) -> BoxFuture<'_, Result<Option<Delivered>, SendError>> {
        let found = self.inner.world().delivered.get(&key.0).copied();
        Box::pin(async move { Ok(found) })
    }

    fn subscribe(&self, sink: mpsc::Sender<Inbound>) -> BoxFuture<'_, Result<(), SendError>> {
        tokio::spawn(self.inner.clone().deliver(sink));
        Box::pin(async { Ok(()) })
    }
}
