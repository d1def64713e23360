//! The Lua engine runtime: the only module that names mlua.
//!
//! # VM model
//!
//! A pool of worker threads, one per core, each with a Lua VM per engine
//! (so no engine can change what another's code sees) and a
//! single-threaded tokio runtime. A call goes to the least busy worker and
//! runs there as a coroutine, so thousands of dialogs can each await an HTTP
//! request in one VM while others run. CPU-bound Lua stalls only its own
//! worker, and only up to its instruction and time budgets; the other
//! workers and the host go on. Engines are pure functions of (ctx, state,
//! input): state lives in the store and comes back in [`Reply::state`].
//!
//! # Reload
//!
//! [`library::Snapshot`] holds every engine, module and template in memory.
//! [`EngineRuntime::reload`] reads the files, validates them in a scratch VM
//! and swaps the snapshot only if they pass; engines that fail keep their
//! previous version, and the error is logged once with `file:line`. A worker
//! rebuilds its VM when it sees a newer snapshot; calls in flight finish on
//! the VM they started in. [`watch`] reloads on file changes (debounced) and
//! on SIGHUP.

pub mod ctx;
pub mod library;
pub mod modules;
pub mod scope;
pub mod spin;
pub mod vm;
mod watch;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub use ctx::{Call, Ctx, Output, Reply};
use library::{Dirs, Snapshot};
use modules::HostEnv;
use vm::{Budgets, Vm};
pub use watch::watch;

use crate::clock::Clock;
use crate::config::Config;

/// An engine failed; the message names the engine, the function and, for
/// Lua errors, `file:line`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error("engine {engine} cannot be loaded: {message}")]
    Load { engine: String, message: String },
    #[error("engine {engine}, {function}: {message}")]
    Call {
        engine: String,
        function: &'static str,
        message: String,
    },
    #[error("the engine runtime is shut down")]
    Stopped,
}

/// One engine call.
struct Task {
    engine: String,
    call: Call,
    ctx: Ctx,
}

/// What a worker is asked to do: one call, or many answered together (one
/// message each way for the lot, however many calls).
enum Job {
    One(Box<Task>, oneshot::Sender<Result<Reply, EngineError>>),
    Many(Vec<Task>, oneshot::Sender<Vec<Result<Reply, EngineError>>>),
}

struct Worker {
    jobs: mpsc::UnboundedSender<Job>,
    /// Calls sent and not yet answered, for picking the least busy worker.
    busy: Arc<AtomicUsize>,
    /// When the worker's thread last showed it is not stuck (milliseconds
    /// on [`since_start`]): a task of its own ticks it.
    alive_at: Arc<AtomicU64>,
    /// Cancelled when the worker is given up as stuck: its callers stop
    /// waiting for it.
    lost: CancellationToken,
}

/// A worker's place in the pool; a stuck worker is replaced in its slot.
type Slot = RwLock<Arc<Worker>>;

/// How long a busy worker may show no life past the time budget before it
/// counts as stuck inside C, where no budget reaches.
const STUCK_GRACE: Duration = Duration::from_secs(2);
/// How often a worker says it is alive, and the watchdog looks.
const TICK: Duration = Duration::from_millis(250);

/// Milliseconds since the first call, on the monotonic clock.
fn since_start() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Where a call is when no budget can end it.
const STUCK_IN_C: &str = "it is stuck inside Lua's C library (a pattern match that backtracks, a finalizer, an error handler), where no budget reaches";

/// The error of a call whose worker was given up.
fn stuck(engine: &str, function: &'static str) -> EngineError {
    EngineError::Call {
        engine: engine.to_string(),
        function,
        message: format!(
            "did not end within its time budget: {STUCK_IN_C}; its worker was replaced"
        ),
    }
}

/// What every VM is built with.
#[derive(Clone)]
struct VmSpec {
    budgets: Budgets,
    host: HostEnv,
    seed: u64,
}

/// State shared by the runtime handle and its workers.
struct Shared {
    /// The live snapshot. A std `RwLock`: held only to clone the `Arc`.
    snapshot: RwLock<Arc<Snapshot>>,
    /// Where the files come from; the templates change with the config.
    dirs: RwLock<Dirs>,
    spec: VmSpec,
    /// Errors already logged, so a broken file is reported once, not on
    /// every save or call.
    reported: Mutex<HashSet<String>>,
    /// Woken by every reload.
    reloaded: tokio::sync::Notify,
    /// Wait for replies on a blocking thread, which keeps a paused tokio
    /// clock from jumping ahead while Lua runs on a worker (tests).
    hold_clock: AtomicBool,
}

/// The engine runtime. Cheap to clone.
#[derive(Clone)]
pub struct EngineRuntime {
    shared: Arc<Shared>,
    workers: Arc<Vec<Slot>>,
}

/// What a reload did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// The snapshot went live.
    pub swapped: bool,
    /// One sentence per problem, with `file:line` where Lua gave one.
    pub problems: Vec<String>,
}

impl EngineRuntime {
    /// Loads and validates every engine, then starts `workers` VM threads
    /// (0: one per core). Problems come back beside the runtime: engines
    /// that failed are missing until a reload fixes them.
    pub fn start(
        config: &Config,
        clock: Arc<dyn Clock>,
        workers: usize,
    ) -> (EngineRuntime, Vec<String>) {
        EngineRuntime::start_with(config, Dirs::from_config(config), clock, workers)
    }

    /// Like [`EngineRuntime::start`], with engines from other directories
    /// (the simulated contacts' personas).
    pub fn start_with(
        config: &Config,
        dirs: Dirs,
        clock: Arc<dyn Clock>,
        workers: usize,
    ) -> (EngineRuntime, Vec<String>) {
        let e = &config.file.engines;
        let spec = VmSpec {
            budgets: Budgets {
                instructions: e.instruction_budget,
                time: e.time_budget.0,
                memory: e.memory_limit.0 as usize,
            },
            host: HostEnv {
                env_allow: Arc::new(e.env_allow.iter().cloned().collect()),
                clock,
                http: reqwest::Client::builder()
                    .user_agent(concat!("colloquy/", env!("CARGO_PKG_VERSION")))
                    .build()
                    .unwrap_or_default(),
            },
            seed: config.file.sim.seed,
        };
        let shared = Arc::new(Shared {
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            dirs: RwLock::new(dirs),
            spec,
            reported: Mutex::new(HashSet::new()),
            reloaded: tokio::sync::Notify::new(),
            hold_clock: AtomicBool::new(false),
        });
        let n = if workers == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            workers
        };
        let workers: Arc<Vec<Slot>> = Arc::new(
            (0..n)
                .map(|i| RwLock::new(Arc::new(spawn_worker(i, shared.clone()))))
                .collect(),
        );
        watch_workers(Arc::downgrade(&workers), Arc::downgrade(&shared));
        let rt = EngineRuntime { shared, workers };
        // The caller says what to do with the first problems: the host logs
        // them, `check` and `eval` print them as their answer.
        let report = rt.swap(false);
        (rt, report.problems)
    }

    /// The live snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared
            .snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Names of the engines that are loaded and valid.
    pub fn engines(&self) -> Vec<String> {
        self.snapshot().engines.keys().cloned().collect()
    }

    /// Why an engine cannot be called, or `None` when it is loaded.
    pub fn load_error(&self, engine: &str) -> Option<EngineError> {
        let snap = self.snapshot();
        if snap.engines.contains_key(engine) {
            return None;
        }
        Some(missing_engine(&snap, engine))
    }

    /// Resolves once a reload after this call has swapped in a snapshot.
    pub fn reloaded(&self) -> tokio::sync::futures::Notified<'_> {
        self.shared.reloaded.notified()
    }

    /// Takes the prompt templates a new config names (a campaign or variant
    /// added by an edit), reloading when they changed.
    pub fn follow_config(&self, config: &Config) {
        let templates = Dirs::from_config(config).templates;
        let changed = {
            let mut dirs = self.shared.dirs.write().unwrap_or_else(|e| e.into_inner());
            let changed = dirs.templates != templates;
            dirs.templates = templates;
            changed
        };
        if changed {
            self.reload();
        }
    }

    /// Re-reads every file, validates it, and swaps in what passes: a module
    /// that does not compile, or an engine that does not load, keeps its
    /// previous version (or stays absent if it never loaded).
    pub fn reload(&self) -> ReloadReport {
        self.swap(true)
    }

    /// Reads, validates and swaps; new problems are logged when `log`.
    fn swap(&self, log: bool) -> ReloadReport {
        let current = self.snapshot();
        let dirs = self
            .shared
            .dirs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (mut next, mut problems) = Snapshot::read(&dirs, current.generation + 1);
        let spec = &self.shared.spec;
        fallback(&mut next, Some(&current), &mut problems, spec);
        // An engine kept at its previous version must still load with the
        // new modules; one that does not is dropped (already reported).
        fallback(&mut next, None, &mut Vec::new(), spec);
        // A template that does not check keeps its previous version.
        for (path, text) in &current.templates {
            next.templates
                .entry(path.clone())
                .or_insert_with(|| text.clone());
        }
        problems.sort();
        problems.dedup();
        *self
            .shared
            .snapshot
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
        let mut reported = self
            .shared
            .reported
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for p in &problems {
            if reported.insert(p.clone()) && log {
                tracing::error!("{p}");
            }
        }
        reported.retain(|p| problems.contains(p));
        drop(reported);
        self.shared.reloaded.notify_waiters();
        ReloadReport {
            swapped: true,
            problems,
        }
    }

    /// The workers as they stand.
    fn workers(&self) -> Vec<Arc<Worker>> {
        self.workers
            .iter()
            .map(|slot| slot.read().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }

    /// The least busy worker, with one more call counted on it. Counted
    /// by a compare-and-swap of the count it was chosen by, so that two
    /// calls made at the same moment never both take the same idle worker
    /// (one stuck call would then hold up the other).
    fn claim_least_busy(&self) -> Option<Arc<Worker>> {
        loop {
            let (worker, seen) = self
                .workers
                .iter()
                .map(|slot| slot.read().unwrap_or_else(|e| e.into_inner()).clone())
                .map(|w| {
                    let seen = w.busy.load(Ordering::Acquire);
                    (w, seen)
                })
                .min_by_key(|(_, seen)| *seen)?;
            let claimed =
                worker
                    .busy
                    .compare_exchange(seen, seen + 1, Ordering::AcqRel, Ordering::Acquire);
            if claimed.is_ok() {
                return Some(worker);
            }
        }
    }

    /// Calls an engine function for one dialog on the least busy worker.
    pub async fn call(&self, engine: &str, call: Call, ctx: Ctx) -> Result<Reply, EngineError> {
        let worker = self.claim_least_busy().ok_or(EngineError::Stopped)?;
        let (tx, rx) = oneshot::channel();
        let function = call.function();
        let started = std::time::Instant::now();
        let task = Box::new(Task {
            engine: engine.to_string(),
            call,
            ctx,
        });
        if worker.jobs.send(Job::One(task, tx)).is_err() {
            worker.busy.fetch_sub(1, Ordering::Relaxed);
            return Err(EngineError::Stopped);
        }
        let out = tokio::select! {
            out = self.answer(rx) => out.unwrap_or(Err(EngineError::Stopped)),
            _ = worker.lost.cancelled() => Err(stuck(engine, function)),
        };
        worker.busy.fetch_sub(1, Ordering::Relaxed);
        let labels = [("engine", engine), ("function", function)];
        crate::metrics::observe("colloquy_engine_call_seconds", &labels, started.elapsed());
        if out.is_err() {
            crate::metrics::count("colloquy_engine_errors_total", &labels);
        }
        out
    }

    /// Many calls at once, spread evenly over the workers; the answers come
    /// back in the order of `calls`. Each worker gets its share as one
    /// message and answers it as one, so a batch costs two thread wake-ups
    /// a worker instead of two a call.
    pub async fn call_many(
        &self,
        calls: Vec<(String, Call, Ctx)>,
    ) -> Vec<Result<Reply, EngineError>> {
        let workers = self.workers();
        let n = workers.len();
        if n == 0 {
            return calls.iter().map(|_| Err(EngineError::Stopped)).collect();
        }
        let total = calls.len();
        let mut shares: Vec<Vec<Task>> = (0..n).map(|_| Vec::new()).collect();
        for (i, (engine, call, ctx)) in calls.into_iter().enumerate() {
            shares[i % n].push(Task { engine, call, ctx });
        }
        let pending = shares
            .into_iter()
            .zip(workers.iter())
            .map(|(share, worker)| async move {
                let len = share.len();
                if len == 0 {
                    return Vec::new();
                }
                let names: Vec<(String, &'static str)> = share
                    .iter()
                    .map(|t| (t.engine.clone(), t.call.function()))
                    .collect();
                let (tx, rx) = oneshot::channel();
                worker.busy.fetch_add(len, Ordering::Relaxed);
                let out = if worker.jobs.send(Job::Many(share, tx)).is_ok() {
                    tokio::select! {
                        out = self.answer(rx) => out,
                        _ = worker.lost.cancelled() => {
                            Some(names.iter().map(|(e, f)| Err(stuck(e, f))).collect())
                        }
                    }
                } else {
                    None
                };
                worker.busy.fetch_sub(len, Ordering::Relaxed);
                out.unwrap_or_else(|| (0..len).map(|_| Err(EngineError::Stopped)).collect())
            });
        let answers = futures_util::future::join_all(pending).await;
        // Call i went to worker i % n, as its (i / n)-th.
        let mut per_worker: Vec<std::vec::IntoIter<_>> =
            answers.into_iter().map(Vec::into_iter).collect();
        (0..total)
            .map(|i| {
                per_worker[i % n]
                    .next()
                    .unwrap_or(Err(EngineError::Stopped))
            })
            .collect()
    }

    /// Waits for a worker's answer; on a paused clock (tests) from a
    /// blocking task, which keeps the clock from jumping ahead while Lua
    /// runs.
    async fn answer<T: Send + 'static>(&self, rx: oneshot::Receiver<T>) -> Option<T> {
        let hold = self.shared.hold_clock.load(Ordering::Relaxed);
        crate::concurrent::receive(rx, hold).await
    }

    /// For tests on tokio's paused clock: while an engine call is in flight
    /// the clock must not auto-advance (a blocking task in progress holds
    /// it), or simulated hours would pass during one Lua call.
    pub fn hold_paused_clock(&self, on: bool) {
        self.shared.hold_clock.store(on, Ordering::Relaxed);
    }

    /// Runs a Lua file in the engine sandbox, as `colloquy eval` does.
    pub fn eval_blocking(
        &self,
        shown: &str,
        text: &str,
        args: &[String],
    ) -> Result<serde_json::Value, String> {
        let spec = self.shared.spec.clone();
        let snap = self.snapshot();
        let limit = spec.budgets.time + STUCK_GRACE;
        let (shown, text, args) = (shown.to_string(), text.to_string(), args.to_vec());
        let (tx, rx) = std::sync::mpsc::channel();
        // A thread of its own, left behind if Lua gets stuck inside C.
        std::thread::spawn(move || {
            let run = || -> Result<serde_json::Value, String> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                let local = tokio::task::LocalSet::new();
                local.block_on(&rt, async move {
                    let vm = Vm::new(snap, spec.budgets, &spec.host, spec.seed)?;
                    vm.eval(&shown, &text, &args).await
                })
            };
            let _ = tx.send(run());
        });
        rx.recv_timeout(limit).unwrap_or_else(|_| {
            Err(format!(
                "the script did not end within its time budget: {STUCK_IN_C}"
            ))
        })
    }
}

/// Validates `next`; whatever fails is replaced by its version in
/// `previous`, or removed.
fn fallback(
    next: &mut Snapshot,
    previous: Option<&Snapshot>,
    problems: &mut Vec<String>,
    spec: &VmSpec,
) {
    let snap = Arc::new(std::mem::take(next));
    let (module_errors, engine_errors) = validate(&snap, spec);
    *next = Arc::try_unwrap(snap).unwrap_or_else(|a| a.duplicate());
    for (name, err) in module_errors {
        // An engine file is a module too: its error is said once, as the
        // engine's.
        let same_file =
            |e: &library::Source| next.modules.get(&name).is_some_and(|m| m.shown == e.shown);
        if !(engine_errors.contains_key(&name) && next.engines.get(&name).is_some_and(same_file)) {
            problems.push(err);
        }
        match previous.and_then(|p| p.modules.get(&name)) {
            Some(old) => next.modules.insert(name, old.clone()),
            None => next.modules.remove(&name),
        };
    }
    for (name, err) in engine_errors {
        problems.push(err.to_string());
        match previous.and_then(|p| p.engines.get(&name)) {
            Some(old) => {
                next.engines.insert(name, old.clone());
            }
            None => {
                next.engines.remove(&name);
                let why = match err {
                    EngineError::Load { message, .. } => message,
                    other => other.to_string(),
                };
                next.broken.insert(name, why);
            }
        }
    }
}

/// Why an engine is not in the snapshot: its load error, or no file.
fn missing_engine(snap: &Snapshot, engine: &str) -> EngineError {
    EngineError::Load {
        engine: engine.to_string(),
        message: snap
            .broken
            .get(engine)
            .cloned()
            .unwrap_or_else(|| format!("there is no engine file {engine}.lua")),
    }
}

type ModuleErrors = BTreeMap<String, String>;
type EngineErrors = BTreeMap<String, EngineError>;

/// Compiles every module and loads every engine of a snapshot in a scratch
/// VM; errors by module and engine name.
fn validate(snapshot: &Arc<Snapshot>, spec: &VmSpec) -> (ModuleErrors, EngineErrors) {
    let snap = snapshot.clone();
    let spec = spec.clone();
    // A scratch thread: VMs are not Send, and the caller may be inside a
    // runtime.
    std::thread::spawn(move || {
        let mut modules = BTreeMap::new();
        let mut engines = BTreeMap::new();
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return (modules, engines);
        };
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async {
            let vm = match Vm::new(snap.clone(), spec.budgets, &spec.host, spec.seed) {
                Ok(vm) => vm,
                Err(e) => {
                    for name in snap.engines.keys() {
                        engines.insert(
                            name.clone(),
                            EngineError::Load {
                                engine: name.clone(),
                                message: e.clone(),
                            },
                        );
                    }
                    return;
                }
            };
            let engine_files: HashSet<&str> =
                snap.engines.values().map(|s| s.shown.as_str()).collect();
            for (name, source) in &snap.modules {
                // An engine file is also requirable; its errors are reported
                // once, as the engine's.
                if engine_files.contains(source.shown.as_str()) {
                    continue;
                }
                if let Err(e) = vm.compile(source) {
                    modules.insert(name.clone(), format!("module {name} cannot be loaded: {e}"));
                }
            }
            for name in snap.engines.keys() {
                if let Err(e) = vm.engine(name).await {
                    engines.insert(name.clone(), e);
                }
            }
        });
        (modules, engines)
    })
    .join()
    .unwrap_or_default()
}

fn spawn_worker(index: usize, shared: Arc<Shared>) -> Worker {
    let (tx, rx) = mpsc::unbounded_channel::<Job>();
    let busy = Arc::new(AtomicUsize::new(0));
    let alive_at = Arc::new(AtomicU64::new(since_start()));
    let ticking = alive_at.clone();
    let thread_shared = shared.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("lua-{index}"))
        .spawn(move || {
            let shared = thread_shared;
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                tracing::error!("engine worker {index} could not start its runtime");
                return;
            };
            let local = tokio::task::LocalSet::new();
            local.spawn_local(async move {
                loop {
                    ticking.store(since_start(), Ordering::Relaxed);
                    tokio::time::sleep(TICK).await;
                }
            });
            local.block_on(&rt, serve(index, shared, rx));
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start engine worker {index}: {e}");
    }
    Worker {
        jobs: tx,
        busy,
        alive_at,
        lost: CancellationToken::new(),
    }
}

/// A worker's VMs: one per engine, so that no engine can change what
/// another engine's code sees (the string metatable, globals, modules),
/// all made anew when the snapshot changes.
struct Vms {
    index: usize,
    shared: Arc<Shared>,
    by_engine: HashMap<String, Rc<Vm>>,
    generation: Option<u64>,
}

impl Vms {
    /// The VM of `engine` on `snap`; every VM made on an earlier snapshot
    /// is forgotten first.
    fn vm(&mut self, engine: &str, snap: &Arc<Snapshot>) -> Result<Rc<Vm>, EngineError> {
        if self.generation != Some(snap.generation) {
            self.by_engine.clear();
            self.generation = Some(snap.generation);
        }
        if let Some(vm) = self.by_engine.get(engine) {
            return Ok(vm.clone());
        }
        let spec = &self.shared.spec;
        let vm = Vm::new(
            snap.clone(),
            spec.budgets,
            &spec.host,
            spec.seed.wrapping_add(self.index as u64),
        )
        .map_err(|message| EngineError::Load {
            engine: engine.to_string(),
            message,
        })?;
        let vm = Rc::new(vm);
        self.by_engine.insert(engine.to_string(), vm.clone());
        Ok(vm)
    }
}

/// A worker's loop: each job's calls run as local tasks on their engines'
/// VMs, until the job channel closes.
async fn serve(index: usize, shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Job>) {
    let mut vms = Vms {
        index,
        shared: shared.clone(),
        by_engine: HashMap::new(),
        generation: None,
    };
    while let Some(job) = rx.recv().await {
        let snap = shared
            .snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match job {
            // The ctxs are dropped before the answer goes back, so the
            // caller holds the only handle on what they shared (a dialog's
            // history) and can extend it in place.
            Job::One(task, reply) => {
                let vm = vms.vm(&task.engine, &snap);
                tokio::task::spawn_local(async move {
                    let Task { engine, call, ctx } = *task;
                    let out = match vm {
                        Ok(vm) => vm.call(&engine, &call, ctx).await,
                        Err(e) => Err(e),
                    };
                    let _ = reply.send(out);
                });
            }
            Job::Many(tasks, reply) => {
                let calls: Vec<_> = tasks
                    .into_iter()
                    .map(|t| (vms.vm(&t.engine, &snap), t))
                    .collect();
                tokio::task::spawn_local(async move {
                    let calls = calls
                        .into_iter()
                        .map(|(vm, t)| async move { vm?.call(&t.engine, &t.call, t.ctx).await });
                    let out = crate::concurrent::run_all(calls).await;
                    let _ = reply.send(out);
                });
            }
        }
    }
}

/// Replaces a worker that is busy and has shown no life for the time
/// budget and a grace: its thread is stuck in a C call that no budget
/// reaches (a backtracking pattern match, a finalizer, an error handler).
/// The thread cannot be stopped: it is left behind, its callers get an
/// error at once, and a fresh worker with fresh VMs takes its slot. Ends
/// with the runtime.
fn watch_workers(workers: std::sync::Weak<Vec<Slot>>, shared: std::sync::Weak<Shared>) {
    let spawned = std::thread::Builder::new()
        .name("lua-watchdog".into())
        .spawn(move || loop {
            std::thread::sleep(TICK);
            let (Some(workers), Some(shared)) = (workers.upgrade(), shared.upgrade()) else {
                return;
            };
            let limit = (shared.spec.budgets.time + STUCK_GRACE).as_millis() as u64;
            for (index, slot) in workers.iter().enumerate() {
                let worker = slot.read().unwrap_or_else(|e| e.into_inner()).clone();
                let silent = since_start().saturating_sub(worker.alive_at.load(Ordering::Relaxed));
                if worker.busy.load(Ordering::Relaxed) == 0 || silent <= limit {
                    continue;
                }
                tracing::error!(
                    "engine worker {index} has been stuck for {} s inside Lua's C library, where no budget reaches; it is replaced and its calls fail",
                    silent / 1000
                );
                // The fresh worker takes the slot before the stuck one's
                // callers hear of it: a caller that calls again at once
                // must not be given the stuck worker (its count of calls
                // drops to nothing as its callers give up).
                let fresh = Arc::new(spawn_worker(index, shared.clone()));
                *slot.write().unwrap_or_else(|e| e.into_inner()) = fresh;
                worker.lost.cancel();
            }
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start the engine watchdog: {e}");
    }
}

#[cfg(test)]
mod tests;
