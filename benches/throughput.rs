//! Host throughput on an in-memory transport: N live dialogs, M incoming
//! messages, echo engine, limits lifted and reply delays zero. A message is
//! handled when it and its reply are durable in the store and the reply has
//! been handed to the transport. Prints one JSON object, like the Python
//! peer in shared/bench/python_peer.
//!
//!     cargo bench --bench throughput -- --dialogs 10000 --messages 100000
//!
//! By default every message is offered at once (throughput at saturation;
//! latency then is mostly queueing). `--rate N` offers N messages per
//! second instead, for the reply latency at that load.
//!
//! `--import N` imports an audience of N new rows while the messages flow
//! (the reply latency then is the host's while a saved audience file is
//! imported).
//!
//! `--idle N` first fills the store with N more dialogs that get no
//! message (a store that already holds a million dialogs, say) and reports
//! `store_bytes_per_idle_dialog` (the store's files) and
//! `store_live_bytes_per_idle_dialog` (its keys and values); the N
//! dialogs' contacts, claims and indexes all count. They are opened in
//! the order the campaign runner picks contacts (`Store::pick_uncontacted`
//! with a random key), not in the order of their rows.
//!
//! `--data DIR` runs in DIR (kept afterwards, with a config.toml) instead
//! of a temporary directory: a store of that size for other measurements
//! (the console's pages, `colloquy export`).
//!
//! CPU: `cpu_us_per_msg` is the process's CPU time over the messages
//! handled, `cpu_sys_us_per_msg` the kernel's part of it, and
//! `cpu_us_per_msg_to_stopped` the same until the host stopped: with the
//! deferred records the burst left to write out (at 10,000 dialogs all of
//! them wait for the stop; at 100,000 most are written out during the run).
//!
//! Memory: `rss_per_idle_dialog_kib` counts from before the dialogs are
//! created, so it includes the store's cache of their records;
//! `host_rss_per_idle_dialog_kib` counts from a store that already holds
//! them (the Python peer's way), so it is what the running host keeps per
//! idle dialog.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use colloquy::clock::{Clock, SeededRng, SystemClock};
use colloquy::config::Config;
use colloquy::host;
use colloquy::model::Identity;
use colloquy::store::Store;
use colloquy::transition::NewDialog;
use colloquy::transport::{Inbound, IncomingMessage, OutgoingMessage};
use tokio_util::sync::CancellationToken;

/// The binary's allocator (see src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;
#[path = "../tests/memory/mod.rs"]
mod memory;
use common::{bytes_under, cpu_seconds};
use memory::MemoryTransport;

/// When each message arrived, and each reply's latency in microseconds.
#[derive(Default)]
struct Timing {
    arrived: Mutex<HashMap<usize, Instant>>,
    latency: Mutex<Vec<u64>>,
}

impl Timing {
    fn replied(&self, msg: &OutgoingMessage) {
        let Some(i) = msg
            .text
            .strip_prefix("re: m")
            .and_then(|t| t.parse::<usize>().ok())
        else {
            return;
        };
        if let Some(t) = self.arrived.lock().unwrap().remove(&i) {
            self.latency
                .lock()
                .unwrap()
                .push(t.elapsed().as_micros() as u64);
        }
    }
}

fn rss_kib() -> u64 {
    status_kib("VmRSS:")
}

/// A figure of /proc/self/status in KiB: VmRSS (resident now), VmHWM (the
/// most resident so far).
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The directory the run uses.
struct Dir(std::path::PathBuf);

impl Dir {
    fn path(&self) -> &Path {
        &self.0
    }
}

/// `n` audience rows of contacts known by user id, from `first` on.
fn user_rows(first: i64, n: usize) -> Vec<colloquy::audience::ContactRow> {
    (first..first + n as i64)
        .map(|id| colloquy::audience::ContactRow {
            line: 0,
            identity: Identity::UserId(id),
            username: None,
            phone: None,
            user_id: Some(id),
            first_name: None,
            last_name: None,
            fields: Default::default(),
        })
        .collect()
}

fn main() {
    let dialogs = arg("--dialogs", 10_000);
    let messages = arg("--messages", 100_000);
    let accounts = arg("--accounts", (dialogs / 100).max(1));
    let rate = arg("--rate", 0);
    let import = arg("--import", 0);
    let idle = arg("--idle", 0);
    let temporary = tempfile::tempdir().unwrap();
    let kept = std::env::args()
        .skip_while(|a| a != "--data")
        .nth(1)
        .map(std::path::PathBuf::from);
    let dir_path = kept
        .clone()
        .unwrap_or_else(|| temporary.path().to_path_buf());
    std::fs::create_dir_all(&dir_path).unwrap();
    let dir = Dir(dir_path);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(dir.path().join("engines")).unwrap();
    std::fs::create_dir_all(dir.path().join("scripts")).unwrap();
    std::fs::copy(
        root.join("engines/echo.lua"),
        dir.path().join("engines/echo.lua"),
    )
    .unwrap();
    let mut text = String::from(
        "[safety]\nmax_per_hour = 1000000\nmax_per_day = 1000000\nmax_new_dialogs_per_day = 1000000\nmin_interval = \"0s\"\njitter = \"0s\"\nreply_delay = \"0s\"\nstuck_after = \"30days\"\n",
    );
    let names: Vec<String> = (0..accounts).map(|i| format!("a{i}")).collect();
    for n in &names {
        text.push_str(&format!("[[accounts]]\nname = \"{n}\"\n"));
    }
    text.push_str("[[audiences]]\nname = \"l\"\nfile = \"l.csv\"\n[[campaigns]]\nname = \"c\"\nstatus = \"paused\"\nengine = \"echo\"\naudiences = [\"l\"]\naccounts = [\"a0\"]\n");
    std::fs::write(dir.path().join("l.csv"), "user_id\n1\n").unwrap();
    std::fs::write(dir.path().join("config.toml"), text).unwrap();
    let config = Arc::new(Config::load(&dir.path().join("config.toml")).unwrap());

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let store = Store::open(&config.data_dir()).unwrap();
        let rows = user_rows(1, dialogs);
        let rng = SeededRng::new(1);
        store.import_audience("l", &rows, &mut || rng.next_u64()).unwrap();
        let rss_before = rss_kib();
        for (i, row) in rows.iter().enumerate() {
            let contact = store.contact_by_identity(&row.identity).unwrap().unwrap();
            let new = NewDialog { campaign: "c".into(), account: names[i % accounts].clone(), contact: contact.id, at: SystemClock.now(), variant: None };
            store.open_dialog(&new, None, &|_| Ok(())).unwrap();
        }
        store.flush().unwrap();
        let idle_bytes = (idle > 0).then(|| {
            let before = bytes_under(&config.data_dir().join("store"));
            let live_before = store.live_bytes().unwrap();
            let rows = user_rows(3_000_000_000, idle);
            store.import_audience("idle", &rows, &mut || rng.next_u64()).unwrap();
            // Contacts in the order the campaign runner picks them.
            for i in 0..rows.len() {
                let contact = store.pick_uncontacted("idle", rng.next_u64()).unwrap().unwrap();
                let new = NewDialog { campaign: "c".into(), account: names[i % accounts].clone(), contact, at: SystemClock.now(), variant: None };
                store.open_dialog(&new, None, &|_| Ok(())).unwrap();
            }
            store.flush().unwrap();
            let live = store.live_bytes().unwrap().saturating_sub(live_before) / idle as u64;
            let file = bytes_under(&config.data_dir().join("store")).saturating_sub(before) / idle as u64;
            (file, live)
        });
        // The host's own state per dialog, as the Python peer measures it:
        // from a store that already holds the dialogs.
        let rss_stored = rss_kib();
        let timing = Arc::new(Timing::default());
        let transport = Arc::new(MemoryTransport::new(messages, {
            let timing = timing.clone();
            move |msg| timing.replied(msg)
        }));
        let h = host::build(config.clone(), store.clone(), transport.clone(), Arc::new(SystemClock), CancellationToken::new());
        host::start(&h).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let rss_idle = rss_kib();
        let sink = transport.inbox();
        let started = Instant::now();
        let cpu_before = cpu_seconds();
        // `--import N`: an audience of N new rows imported while the
        // messages flow, as a saved audience file is while the host runs.
        let importing = (import > 0).then(|| {
            let store = store.clone();
            tokio::task::spawn_blocking(move || {
                let mut rows = user_rows(1_000_000_000, import);
                for (i, row) in rows.iter_mut().enumerate() {
                    row.first_name = Some(format!("Imported {i}"));
                }
                let began = Instant::now();
                let rng = SeededRng::new(2);
                store.import_audience("imported", &rows, &mut || rng.next_u64()).unwrap();
                began.elapsed().as_secs_f64()
            })
        });
        let feeder = {
            let timing = timing.clone();
            tokio::spawn(async move {
                let rng = SeededRng::new(42);
                let began = tokio::time::Instant::now();
                for i in 0..messages {
                    if rate > 0 {
                        let due = began + Duration::from_secs_f64(i as f64 / rate as f64);
                        tokio::time::sleep_until(due).await;
                    }
                    let d = (rng.next_u64() % dialogs as u64) as i64 + 1;
                    timing.arrived.lock().unwrap().insert(i, Instant::now());
                    let (tx, _rx) = tokio::sync::oneshot::channel();
                    let message = IncomingMessage {
                        account: names[(d as usize - 1) % accounts].clone(),
                        contact: Identity::UserId(d),
                        transport_id: i as i64 + 1,
                        text: format!("m{i}"),
                        at: SystemClock.now(),
                    };
                    if sink.send(Inbound { message, stored: tx }).await.is_err() {
                        break;
                    }
                }
            })
        };
        let finished = tokio::time::timeout(Duration::from_secs(300), transport.done.notified()).await.is_ok();
        let elapsed = started.elapsed().as_secs_f64();
        let cpu_after = cpu_seconds();
        let (cpu_sys, cpu) = (cpu_after.0 - cpu_before.0, cpu_after.1 - cpu_before.1);
        feeder.abort();
        let sent = transport.sends.load(Ordering::SeqCst);
        let mut lat = timing.latency.lock().unwrap().clone();
        lat.sort_unstable();
        let p = |q: f64| lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(0) as f64 / 1000.0;
        let import_s = match importing {
            Some(task) => serde_json::json!((task.await.unwrap() * 1000.0).round() / 1000.0),
            None => serde_json::Value::Null,
        };
        let mut figures = serde_json::json!({
                "imported_rows": import,
                "import_s": import_s,
                "dialogs": dialogs,
                "messages": messages,
                "offered_per_s": if rate > 0 { serde_json::json!(rate) } else { serde_json::json!("all at once") },
                "completed": finished,
                "replies_sent": sent,
                "msgs_per_s": (sent as f64 / elapsed).round(),
                "elapsed_s": (elapsed * 1000.0).round() / 1000.0,
                "p50_ms": p(0.50),
                "p99_ms": p(0.99),
                "cpu_us_per_msg": (cpu * 1e7 / sent.max(1) as f64).round() / 10.0,
                "cpu_sys_us_per_msg": (cpu_sys * 1e7 / sent.max(1) as f64).round() / 10.0,
                "rss_idle_mib": rss_idle as f64 / 1024.0,
                "peak_rss_mib": status_kib("VmHWM:") as f64 / 1024.0,
                "rss_per_idle_dialog_kib": (rss_idle.saturating_sub(rss_before)) as f64 / (dialogs + idle) as f64,
                "host_rss_per_idle_dialog_kib": (rss_idle.saturating_sub(rss_stored)) as f64 / (dialogs + idle) as f64,
                "idle_dialogs": idle,
                "store_bytes_per_idle_dialog": idle_bytes.map(|(file, _)| file),
                "store_live_bytes_per_idle_dialog": idle_bytes.map(|(_, live)| live),
        });
        // Stopping writes every deferred record to its tree (see
        // ARCHITECTURE.md, "What the store's mechanisms pay"): work the
        // burst put off, reported beside the rate.
        let stopping = Instant::now();
        host::stop(&h).await;
        figures["stop_s"] = ((stopping.elapsed().as_secs_f64() * 1000.0).round() / 1000.0).into();
        figures["msgs_per_s_to_stopped"] = (sent as f64 / (elapsed + stopping.elapsed().as_secs_f64())).round().into();
        let cpu_stopped = cpu_seconds().1 - cpu_before.1;
        figures["cpu_us_per_msg_to_stopped"] = ((cpu_stopped * 1e7 / sent.max(1) as f64).round() / 10.0).into();
        // Every message and its reply, on disk once the host stopped.
        let stored = 2 * sent.max(1) as u64;
        let idle_total = idle_bytes.map_or(0, |(file, _)| file) * idle as u64;
        let bytes = bytes_under(&config.data_dir().join("store")).saturating_sub(idle_total);
        figures["store_bytes_per_message"] = (bytes / stored).into();
        println!("{figures}");
    });
}
