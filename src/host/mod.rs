//! The host: startup, the campaign runners, the dialog conductors, the
//! reviver, the inbound dispatcher and graceful shutdown (SPEC section 2).
//!
//! Everything a task does is recorded in the store first, so every task can
//! be rebuilt from the store: a conductor is just "do what the store says is
//! pending for this dialog" (messages to send, incoming messages to answer,
//! an ending to take), which is what startup runs for every dialog with work
//! left after a crash.

mod answer;
mod audiences;
mod conductor;
pub mod control;
mod disk;
pub mod dnc;
pub mod metrics;
pub mod optout;
pub mod pause;
mod reviver;
mod runner;
pub mod takeover;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::{Clock, SeededRng, SystemClock, Timestamp};
use crate::config::{Config, SendWindow, TransportKind};
use crate::engine::ctx::{AccountView, CampaignView, ContactView, DialogView, HistoryEntry};
use crate::engine::{Ctx, EngineRuntime};
use crate::model::{
    Contact, Delivery, Dialog, DialogId, DialogVariant, Direction, IdempotencyKey, Message,
    MessageKind,
};
use crate::safety::alerts::{Alert, AlertKind, Alerts};
use crate::safety::AccountSafety;
use crate::store::{Store, StoreError};
use crate::transition::Outbound;
use crate::transport::{Inbound, Transport};
pub use optout::OptOut;

/// How many dialogs share one send gate.
const GATES: usize = 1024;

/// The host's shared state. Tasks hold an `Arc` of it.
pub struct Host {
    pub store: Store,
    pub safety: AccountSafety,
    pub engines: EngineRuntime,
    /// Sent to only through [`AccountSafety::send`], on a slot.
    transport: Arc<dyn Transport>,
    pub clock: Arc<dyn Clock>,
    pub rng: Arc<SeededRng>,
    pub alerts: Alerts,
    /// The running config; replaced by a valid edit of config.toml. A std
    /// lock: held only to clone the `Arc`.
    config: RwLock<Arc<Config>>,
    opt_out: RwLock<Arc<OptOut>>,
    /// Live conductors and their "more work arrived" flags.
    conductors: Mutex<rustc_hash::FxHashMap<DialogId, Arc<AtomicBool>>>,
    /// Per-dialog gates (striped): a send and the handling of an incoming
    /// message of one dialog never overlap, so an opt-out is either seen
    /// before a send or arrives after it.
    gates: Vec<tokio::sync::Mutex<()>>,
    /// Per-account locks: a slot is taken, used and confirmed in one go.
    account_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The config changed: runners and the reviver look again.
    pub changed: Notify,
    /// A dialog was created: the reviver may have work.
    pub activity: Notify,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
    /// Campaigns with a runner.
    runners: Mutex<Vec<String>>,
}

impl Host {
    /// The transport: sends go through [`AccountSafety::send`], which
    /// takes the slot each needs.
    pub fn transport(&self) -> &dyn Transport {
        self.transport.as_ref()
    }

    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn opt_out(&self) -> Arc<OptOut> {
        self.opt_out
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Applies a new config: limits, campaign status and accounts take
    /// effect at once; new campaigns get a runner.
    pub fn set_config(self: &Arc<Self>, config: Arc<Config>) {
        *self.opt_out.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(OptOut::new(&config.file.compliance.opt_out_patterns));
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = config.clone();
        self.safety.set_config(config);
        self.start_runners();
        self.changed.notify_waiters();
    }

    fn gate(&self, dialog: DialogId) -> &tokio::sync::Mutex<()> {
        &self.gates[self.gate_index(dialog)]
    }

    /// Which of the striped gates guards a dialog.
    fn gate_index(&self, dialog: DialogId) -> usize {
        (dialog as usize) % GATES
    }

    fn account_lock(&self, account: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.account_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(account.to_string())
            .or_default()
            .clone()
    }

    pub fn new_key(&self) -> IdempotencyKey {
        IdempotencyKey(self.rng.next_u64())
    }

    /// Messages an engine asked for, each with a new idempotency key.
    pub fn outbound(&self, kind: MessageKind, texts: &[String]) -> Vec<Outbound> {
        texts
            .iter()
            .map(|text| Outbound {
                kind,
                text: text.clone(),
                key: self.new_key(),
            })
            .collect()
    }

    /// The send window of a campaign for a contact, if it has one.
    pub fn window(&self, campaign: &str, contact: &Contact) -> Option<SendWindow> {
        self.config()
            .campaign(campaign)
            .and_then(|c| c.window_for(contact))
    }

    /// Makes sure a conductor works on the dialog: starts one, or tells the
    /// running one to look again.
    pub fn activate(self: &Arc<Self>, dialog: DialogId) {
        if self.shutdown.is_cancelled() {
            return;
        }
        let mut map = self.conductors.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(dirty) = map.get(&dialog) {
            dirty.store(true, Ordering::SeqCst);
            return;
        }
        let dirty = Arc::new(AtomicBool::new(true));
        map.insert(dialog, dirty.clone());
        drop(map);
        let host = self.clone();
        self.tasks
            .spawn(async move { conductor::run(host, dialog, dirty).await });
    }

    /// Called by a conductor with nothing left to do: it may stop unless
    /// more work arrived meanwhile.
    fn conductor_may_stop(&self, dialog: DialogId, dirty: &AtomicBool) -> bool {
        let mut map = self.conductors.lock().unwrap_or_else(|e| e.into_inner());
        if dirty.load(Ordering::SeqCst) {
            return false;
        }
        map.remove(&dialog);
        true
    }

    pub fn has_conductor(&self, dialog: DialogId) -> bool {
        self.conductors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&dialog)
    }

    /// The engine's view of a dialog.
    pub fn ctx(&self, dialog: &Dialog, contact: &Contact) -> Result<Ctx, StoreError> {
        let config = self.config();
        let history = history_of(self.store.messages(dialog.id)?);
        let mut ctx = self.base_ctx(
            &config,
            &dialog.campaign,
            dialog.variant.as_ref(),
            &dialog.account,
            contact,
        );
        ctx.dialog = dialog_view(dialog);
        ctx.history = Arc::new(history);
        ctx.state = dialog.state.clone();
        Ok(ctx)
    }

    /// The ctx of a contact not yet in a dialog (for `get_opening`).
    pub fn base_ctx(
        &self,
        config: &Config,
        campaign: &str,
        variant: Option<&DialogVariant>,
        account: &str,
        contact: &Contact,
    ) -> Ctx {
        let (campaign, prompt_template) = self.campaign_view(config, campaign, variant);
        Ctx {
            dialog: DialogView {
                status: "active".into(),
                ..DialogView::default()
            },
            contact: contact_view(contact),
            account: AccountView {
                name: account.to_string(),
            },
            campaign,
            prompt_template,
            now: self.clock.now().as_secs_f64(),
            state: serde_json::json!({}),
            history: Arc::new(Vec::new()),
            variant: variant.map(|v| v.name.clone()),
        }
    }

    /// A campaign as engines see it, with the prompt template of the
    /// dialog's variant.
    fn campaign_view(
        &self,
        config: &Config,
        campaign: &str,
        variant: Option<&DialogVariant>,
    ) -> (CampaignView, Option<Arc<str>>) {
        let camp = config.campaign(campaign);
        let template = config
            .runs_on(campaign, variant)
            .prompt_template
            .map(|t| config.resolve(&t))
            .and_then(|p| self.engines.snapshot().templates.get(&p).cloned());
        let view = CampaignView {
            name: campaign.to_string(),
            params: Arc::new(
                camp.map(|c| serde_json::to_value(&c.params).unwrap_or_default())
                    .unwrap_or_default(),
            ),
        };
        (view, template)
    }

    /// Sleeps until `at`, or less if the host is shutting down; false then.
    pub async fn sleep_until(&self, at: Timestamp) -> bool {
        tokio::select! {
            _ = self.clock.sleep_until(at) => true,
            _ = self.shutdown.cancelled() => false,
        }
    }

    fn start_runners(self: &Arc<Self>) {
        let config = self.config();
        let mut running = self.runners.lock().unwrap_or_else(|e| e.into_inner());
        for c in &config.file.campaigns {
            if !running.contains(&c.name) {
                running.push(c.name.clone());
                let host = self.clone();
                let name = c.name.clone();
                self.tasks
                    .spawn(async move { runner::run(host, name).await });
            }
        }
    }

    /// Stores a message from a contact without a dialog (an orphan), and
    /// puts a known contact who opts out on the do-not-contact list.
    async fn receive_orphan(
        &self,
        inbound: Inbound,
        contact: Option<&crate::model::Contact>,
    ) -> Result<(), StoreError> {
        let m = &inbound.message;
        let contact_text = m.contact.to_string();
        if self
            .store
            .record_orphan(&m.account, m.transport_id, &contact_text, &m.text, m.at)?
        {
            tracing::warn!(
                account = m.account,
                contact = contact_text,
                "a message from a contact without a dialog was stored: {}",
                m.text
            );
        }
        if let (Some(c), true) = (contact, self.opt_out().matches(&m.text)) {
            self.store
                .add_do_not_contact(c.id, crate::model::DoNotContact::OptedOut)?;
            self.store.audit_do_not_contact(&crate::model::DncChange {
                at: m.at,
                contact: c.id,
                identity: c.identity.to_string(),
                action: "added".into(),
                why: "opted out".into(),
            })?;
        }
        self.store.flush_async().await?;
        let _ = inbound.stored.send(());
        Ok(())
    }

    /// Stores an incoming message and reacts to an opt-out, under the
    /// dialog's gate; the transport hears back once the message is stored.
    async fn receive(self: &Arc<Self>, inbound: Inbound) -> Result<(), StoreError> {
        let m = &inbound.message;
        let contact = self.store.contact_by_identity(&m.contact)?;
        let dialog = match &contact {
            Some(c) => self.store.dialog_of_contact(c.id)?,
            None => None,
        };
        let Some(dialog) = dialog else {
            return self.receive_orphan(inbound, contact.as_ref()).await;
        };
        let gate = self.gate(dialog).lock().await;
        let stored =
            self.store
                .record_inbound(dialog, &m.account, m.transport_id, &m.text, m.at)?;
        if stored.is_some() {
            crate::metrics::count(
                "colloquy_messages_received_total",
                &[("account", &m.account)],
            );
        }
        let opted_out = stored.is_some() && self.opt_out().matches(&m.text);
        if opted_out {
            let d = self.store.opt_out(dialog)?;
            let identity = self
                .store
                .contact(d.contact)?
                .map(|c| c.identity.to_string());
            self.store.audit_do_not_contact(&crate::model::DncChange {
                at: m.at,
                contact: d.contact,
                identity: identity.unwrap_or_else(|| d.contact.to_string()),
                action: "added".into(),
                why: "opted out".into(),
            })?;
            tracing::info!(
                dialog,
                campaign = d.campaign,
                account = d.account,
                "the contact opted out; nothing more will be sent to it"
            );
        }
        drop(gate);
        if stored.is_some() && !opted_out {
            self.activate(dialog);
        }
        // Durable before the transport hears it was received. The wait runs
        // beside the dispatcher, so receipts share flushes (group commit)
        // while messages are still stored in arrival order.
        let store = self.store.clone();
        self.tasks.spawn(async move {
            match store.flush_async().await {
                Ok(()) => {
                    let _ = inbound.stored.send(());
                }
                Err(e) => tracing::error!("an incoming message could not be made durable: {e}"),
            }
        });
        Ok(())
    }
}

/// A dialog as engines see it.
fn dialog_view(dialog: &Dialog) -> DialogView {
    DialogView {
        id: dialog.id,
        status: dialog.status.label().into(),
        started_at: dialog.started_at.as_secs_f64(),
        follow_ups_sent: dialog.follow_ups_sent,
        last_inbound_at: dialog.last_inbound_at.map(Timestamp::as_secs_f64),
        last_outbound_at: dialog.last_outbound_at.map(Timestamp::as_secs_f64),
    }
}

/// A contact as engines see it.
fn contact_view(contact: &Contact) -> ContactView {
    ContactView {
        id: contact.id,
        username: contact.username.clone(),
        phone: contact.phone.clone(),
        user_id: contact.user_id,
        first_name: contact.first_name.clone(),
        last_name: contact.last_name.clone(),
        fields: contact.fields.clone(),
    }
}

/// A message as `ctx.history` shows it.
fn history_entry(m: &Message) -> HistoryEntry {
    HistoryEntry {
        direction: match m.direction {
            Direction::In => "in".into(),
            Direction::Out => "out".into(),
        },
        text: m.text.clone(),
        at: m.at.as_secs_f64(),
    }
}

/// `ctx.history` of a dialog's messages: what came in and what went out.
fn history_of(messages: Vec<Message>) -> Vec<HistoryEntry> {
    messages
        .iter()
        .filter(|m| m.direction == Direction::In || m.delivery == Some(Delivery::Sent))
        .map(history_entry)
        .collect()
}

/// Opens the store for the host. A reporting command (`status`, `dialogs`)
/// holds it for a few milliseconds when no host runs: that is waited out;
/// another host is not.
/// Why [`run`] ended before it served.
#[derive(Debug)]
pub enum RunError {
    /// The operator must fix something first (exit code 2).
    Input(String),
    Other(String),
}

impl From<String> for RunError {
    fn from(text: String) -> RunError {
        RunError::Other(text)
    }
}

/// A store the operator must see to (damaged, behind, a full disk) is bad
/// input, not a failure of the host.
impl From<StoreError> for RunError {
    fn from(e: StoreError) -> RunError {
        match e.needs_operator() {
            true => RunError::Input(e.to_string()),
            false => RunError::Other(e.to_string()),
        }
    }
}

fn open_store(dir: &std::path::Path) -> Result<Store, RunError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        match Store::open(dir) {
            Err(crate::store::StoreError::Locked(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            other => return Ok(other?),
        }
    }
}

/// Builds a host and runs it until `shutdown` is cancelled; returns once
/// in-flight work has finished or been left reconcilable, with the store
/// flushed. `console` starts the operator's console on the running host
/// (`console::serve`); the caller passes it, as the console depends on the
/// host and not the other way round.
pub async fn run<Console>(
    config: Config,
    shutdown: CancellationToken,
    console: impl FnOnce(Arc<Host>) -> Console,
) -> Result<(), RunError>
where
    Console: std::future::Future<Output = Result<(), String>>,
{
    let config = Arc::new(config);
    let store = open_store(&config.data_dir())?;
    let refused = audiences::import_all(&config, &store)?;
    let mut unauthorized = Vec::new();
    let (transport, clock): (Arc<dyn Transport>, Arc<dyn Clock>) = match config.file.transport.kind
    {
        TransportKind::Sim => {
            let sim = crate::sim::SimTransport::open(&config)?;
            let clock = sim.clock();
            (Arc::new(sim), clock)
        }
        TransportKind::Telegram => {
            let telegram = telegram_transport(&config, &store, &shutdown)?;
            unauthorized = telegram.unauthorized();
            (Arc::new(telegram), Arc::new(SystemClock))
        }
    };
    let host = build(config.clone(), store, transport, clock, shutdown);
    for text in refused {
        host.alerts.raise(Alert::new(
            AlertKind::AudienceRefused,
            host.clock.now(),
            text,
        ));
    }
    // Said once, by the alert the safety core raises.
    for account in unauthorized {
        host.safety
            .mark_unauthorized(&account)
            .map_err(|e| e.to_string())?;
    }
    let _watch = crate::engine::watch(&host.engines)
        .map_err(|e| format!("cannot watch the engine files: {e}"))?;
    let _config_watch = watch_config(host.clone(), config.path.clone());
    let _audience_watch = audiences::watch(host.clone());
    start(&host).await?;
    if let Err(e) = control::serve(host.clone()).await {
        tracing::warn!("status commands cannot reach this host: {e}");
    }
    if let Err(e) = console(host.clone()).await {
        tracing::error!("{e}; the host runs without its console");
    }
    host.shutdown.cancelled().await;
    stop(&host).await;
    tracing::info!("the host stopped on a stop signal; unfinished work resumes at the next start");
    Ok(())
}

/// The Telegram transport over the accounts of the config; connects in
/// the background, so the host starts while Telegram is unreachable.
fn telegram_transport(
    config: &Config,
    store: &Store,
    shutdown: &CancellationToken,
) -> Result<crate::telegram::TelegramTransport, String> {
    use crate::telegram::{GrammersConnector, Manners, TelegramTransport};
    let api_id = config.file.telegram.as_ref().map_or(0, |t| t.api_id);
    let connector = GrammersConnector::new(
        store.clone(),
        i32::try_from(api_id).map_err(|_| format!("telegram.api_id {api_id} is too large"))?,
        config
            .file
            .accounts
            .iter()
            .filter_map(|a| Some((a.name.clone(), a.proxy.clone()?)))
            .collect(),
    );
    TelegramTransport::new(
        config
            .file
            .accounts
            .iter()
            .map(|a| a.name.clone())
            .collect(),
        store,
        Arc::new(connector),
        Manners::from_config(config),
        Arc::new(SystemClock),
        shutdown.clone(),
    )
    .map_err(|e| e.to_string())
}

/// Assembles a host from its parts; nothing runs yet.
pub fn build(
    config: Arc<Config>,
    store: Store,
    transport: Arc<dyn Transport>,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
) -> Arc<Host> {
    let rng = Arc::new(SeededRng::new(config.file.sim.seed ^ clock.now().0 as u64));
    let alerts = Alerts::new(config.file.alerts.webhook_url.as_deref());
    let safety = AccountSafety::new(
        store.clone(),
        config.clone(),
        clock.clone(),
        rng.clone(),
        alerts.clone(),
    );
    let (engines, problems) = EngineRuntime::start(&config, clock.clone(), 0);
    for p in problems {
        tracing::error!("{p}");
    }
    Arc::new(Host {
        store,
        safety,
        engines,
        transport,
        clock,
        rng,
        alerts,
        opt_out: RwLock::new(Arc::new(OptOut::new(
            &config.file.compliance.opt_out_patterns,
        ))),
        config: RwLock::new(config),
        conductors: Mutex::default(),
        gates: (0..GATES).map(|_| tokio::sync::Mutex::new(())).collect(),
        account_locks: Mutex::new(HashMap::new()),
        changed: Notify::new(),
        activity: Notify::new(),
        shutdown,
        tasks: TaskTracker::new(),
        runners: Mutex::new(Vec::new()),
    })
}

/// Resumes unfinished work, then starts receiving, the runners and the
/// reviver.
pub async fn start(host: &Arc<Host>) -> Result<(), StoreError> {
    let mut resume: Vec<DialogId> = host
        .store
        .unhandled()?
        .into_iter()
        .map(|(d, _)| d)
        .collect();
    resume.extend(host.store.pending_outbound()?.into_iter().map(|m| m.dialog));
    for id in host.store.dialogs_with_status("active")? {
        if host.store.dialog(id)?.is_some_and(|d| d.ending.is_some()) {
            resume.push(id);
        }
    }
    resume.sort_unstable();
    resume.dedup();
    if !resume.is_empty() {
        tracing::info!(
            dialogs = resume.len(),
            "resuming dialogs with unfinished work"
        );
    }
    for id in resume {
        host.activate(id);
    }
    let (tx, rx) = mpsc::channel::<Inbound>(4096);
    if let Err(e) = host.transport().subscribe(tx).await {
        tracing::error!("cannot receive messages: {e}");
    }
    host.tasks.spawn(answer::dispatch(host.clone(), rx));
    host.start_runners();
    host.tasks.spawn(reviver::run(host.clone()));
    host.tasks.spawn(disk::watch(host.clone()));
    Ok(())
}

/// Stops taking work and waits (up to 4 s) for in-flight work, then
/// flushes the store.
pub async fn stop(host: &Arc<Host>) {
    host.shutdown.cancel();
    host.tasks.close();
    if tokio::time::timeout(Duration::from_secs(4), host.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("some work was still running at shutdown; it resumes on the next start");
    }
    if let Err(e) = host.store.flush() {
        tracing::error!("the store could not be flushed: {e}");
    }
}

/// Reloads config.toml when it changes; an invalid edit is reported and the
/// running config kept. Reading the file (as `colloquy status` and the
/// reload itself do) is not a change, and neither is a save that leaves
/// the text as it was.
fn watch_config(host: Arc<Host>, path: std::path::PathBuf) -> Option<notify::RecommendedWatcher> {
    use notify::Watcher;
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let name = path.file_name().map(|n| n.to_os_string());
    let mut watcher = notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
        if let Ok(e) = e {
            if !e.kind.is_access()
                && e.paths
                    .iter()
                    .any(|p| p.file_name().map(|n| n.to_os_string()) == name)
            {
                let _ = tx.send(());
            }
        }
    })
    .ok()?;
    let mut loaded = std::fs::read_to_string(&path).ok();
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    watcher
        .watch(dir, notify::RecursiveMode::NonRecursive)
        .ok()?;
    let rt = tokio::runtime::Handle::current();
    std::thread::spawn(move || {
        while rx.recv().is_ok() {
            while rx.recv_timeout(Duration::from_millis(200)).is_ok() {}
            let config = match std::fs::read_to_string(&path) {
                Ok(text) if loaded.as_ref() == Some(&text) => continue,
                Ok(text) => {
                    let config = Config::from_text(&path, &text);
                    loaded = Some(text);
                    config
                }
                // Reported as a load reports it.
                Err(_) => {
                    loaded = None;
                    Config::load(&path)
                }
            };
            match config {
                Ok(c) => {
                    let (before, after) = (host.config(), Arc::new(c));
                    // The templates it names are loaded before anything
                    // runs on it.
                    host.engines.follow_config(&after);
                    let (h, c) = (host.clone(), after.clone());
                    rt.spawn(async move { h.set_config(c) });
                    tracing::info!("config.toml reloaded");
                    audiences::import_added(&host, &rt, &before, &after);
                }
                Err(problems) => {
                    tracing::error!("config.toml was edited but is invalid; the running config stays:\n{problems}");
                }
            }
        }
    });
    Some(watcher)
}
