//! The invariant checker of SPEC section 7, over a run's wire log and store.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use colloquy::config::Config;
use colloquy::host::OptOut;
use colloquy::model::{Delivery, DialogStatus, Direction};
use colloquy::store::Store;

#[derive(Debug, Clone)]
pub struct Line {
    pub at: f64,
    pub account: String,
    pub contact: String,
    pub direction: Option<String>,
    pub kind: Option<String>,
    pub key: Option<String>,
    pub text: String,
    pub event: Option<String>,
    pub seconds: Option<f64>,
}

pub fn read_wire(path: &Path) -> Vec<Line> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| Line {
            at: v["at"].as_f64().expect("every wire line has at"),
            account: v["account"].as_str().unwrap_or("").to_string(),
            contact: v["contact"].as_str().unwrap_or("").to_string(),
            direction: v["direction"].as_str().map(str::to_string),
            kind: v["kind"].as_str().map(str::to_string),
            key: v["key"].as_str().map(str::to_string),
            text: v["text"].as_str().unwrap_or("").to_string(),
            event: v["event"].as_str().map(str::to_string),
            seconds: v["seconds"].as_f64(),
        })
        .collect()
}

/// Counts of what a run did, for assertions that it did something.
#[derive(Debug, Default)]
pub struct Summary {
    pub out: usize,
    pub inbound: usize,
    pub openings: usize,
    pub follow_ups: usize,
    pub faults: HashMap<String, usize>,
    pub opt_outs: usize,
}

/// Checks every invariant; panics with the violation.
pub fn check(config: &Config, store: &Store, wire: &[Line], settled: bool) -> Summary {
    let mut s = Summary::default();
    let outs: Vec<&Line> = wire
        .iter()
        .filter(|l| l.direction.as_deref() == Some("out"))
        .collect();
    s.out = outs.len();
    s.inbound = wire
        .iter()
        .filter(|l| l.direction.as_deref() == Some("in"))
        .count();
    for l in wire {
        if let Some(e) = &l.event {
            *s.faults.entry(e.clone()).or_default() += 1;
        }
    }

    // 1. Limits, pauses, blocks per account.
    for account in &config.file.accounts {
        let limits = config.account_safety(&account.name);
        let mine: Vec<&&Line> = outs.iter().filter(|l| l.account == account.name).collect();
        // Warm-up counts from the account's first send (its first slot).
        let first_send = store
            .account(&account.name)
            .unwrap()
            .first_send_at
            .map(|t| t.0 as f64 / 1000.0);
        if let (Some(first), Some(l)) = (first_send, mine.first()) {
            assert!(
                first <= l.at + 1e-3,
                "{}: first send at {} but warm-up counts from {first}",
                account.name,
                l.at
            );
        }
        for (i, l) in mine.iter().enumerate() {
            let in_window = |len: f64, openings: bool| {
                mine[..=i]
                    .iter()
                    .filter(|x| {
                        l.at - x.at < len && (!openings || x.kind.as_deref() == Some("opening"))
                    })
                    .count()
            };
            assert!(
                in_window(3600.0, false) <= limits.max_per_hour as usize,
                "{}: more than max_per_hour in the hour ending {}",
                account.name,
                l.at
            );
            assert!(
                in_window(86400.0, false) <= limits.max_per_day as usize,
                "{}: more than max_per_day in the day ending {}",
                account.name,
                l.at
            );
            assert!(
                in_window(86400.0, true) <= limits.max_new_dialogs_per_day as usize,
                "{}: more than max_new_dialogs_per_day ending {}",
                account.name,
                l.at
            );
            let cap = warm_cap(&limits, first_send, limits.max_per_day, l.at);
            assert!(
                in_window(86400.0, false) <= cap as usize,
                "{}: more than the warm-up cap of {cap} sends in the day ending {}",
                account.name,
                l.at
            );
            let cap = warm_cap(&limits, first_send, limits.max_new_dialogs_per_day, l.at);
            assert!(
                in_window(86400.0, true) <= cap as usize,
                "{}: more than the warm-up cap of {cap} openings in the day ending {}",
                account.name,
                l.at
            );
            if i > 0 {
                let gap = l.at - mine[i - 1].at;
                assert!(
                    gap + 1e-6 >= limits.min_interval.0.as_secs_f64(),
                    "{}: sends {gap}s apart at {}",
                    account.name,
                    l.at
                );
            }
        }
        for f in wire.iter().filter(|f| f.account == account.name) {
            match f.event.as_deref() {
                Some("flood_wait") => {
                    let until = f.at + f.seconds.unwrap();
                    let bad = mine.iter().find(|l| l.at > f.at && l.at < until);
                    assert!(
                        bad.is_none(),
                        "{}: sent at {} during a flood wait {}..{until}",
                        account.name,
                        bad.unwrap().at,
                        f.at
                    );
                }
                Some("peer_flood") => {
                    let until = f.at + limits.peer_flood_cooldown.0.as_secs_f64();
                    let bad = mine.iter().find(|l| {
                        l.kind.as_deref() == Some("opening") && l.at > f.at && l.at < until
                    });
                    assert!(
                        bad.is_none(),
                        "{}: opened a dialog at {} within the peer-flood cooldown {}..{until}",
                        account.name,
                        bad.unwrap().at,
                        f.at
                    );
                }
                Some("ban") => {
                    let bad = mine.iter().find(|l| l.at > f.at);
                    assert!(
                        bad.is_none(),
                        "{}: sent at {} after its ban at {}",
                        account.name,
                        bad.unwrap().at,
                        f.at
                    );
                }
                _ => {}
            }
        }
    }

    // 2. No contact opened twice.
    let mut opened = HashSet::new();
    for l in outs.iter().filter(|l| l.kind.as_deref() == Some("opening")) {
        s.openings += 1;
        assert!(
            opened.insert(l.contact.clone()),
            "contact {} opened twice",
            l.contact
        );
    }

    // 3. Nothing after an opt-out.
    let opt_out = OptOut::new(&config.file.compliance.opt_out_patterns);
    let mut opted: HashMap<&str, f64> = HashMap::new();
    for l in wire.iter().filter(|l| l.direction.as_deref() == Some("in")) {
        if opt_out.matches(&l.text) {
            opted.entry(&l.contact).or_insert(l.at);
        }
    }
    s.opt_outs = opted.len();
    for l in &outs {
        if let Some(t) = opted.get(l.contact.as_str()) {
            assert!(
                l.at <= *t,
                "sent to {} at {} after it opted out at {t}",
                l.contact,
                l.at
            );
        }
    }

    // Openings and follow-ups go inside their campaign's send window.
    let mut campaign_of: HashMap<String, String> = HashMap::new();
    for d in store.all_dialogs() {
        let d = d.unwrap();
        if let Some(c) = store.contact(d.contact).unwrap() {
            campaign_of.insert(c.identity.to_string(), d.campaign.clone());
        }
    }
    for l in outs.iter().filter(|l| l.kind.as_deref() != Some("reply")) {
        let window = campaign_of
            .get(&l.contact)
            .and_then(|c| config.campaign(c))
            .and_then(|c| c.send_window.as_ref());
        if let Some(w) = window {
            let utc = chrono::DateTime::from_timestamp_millis((l.at * 1000.0) as i64).unwrap();
            let tod = utc.with_timezone(&w.timezone.0).time();
            let (start, end) = (w.start.0, w.end.0);
            let inside = if start < end {
                tod >= start && tod < end
            } else {
                tod >= start || tod < end
            };
            assert!(
                inside,
                "{:?} to {} at {} ({tod} local) outside the send window",
                l.kind, l.contact, l.at
            );
        }
    }

    // 4. Keys unique on the wire.
    let mut keys = HashSet::new();
    for l in &outs {
        let key = l.key.clone().expect("outbound lines carry a key");
        assert!(keys.insert(key.clone()), "key {key} is on the wire twice");
    }

    // 5. Every incoming message stored once and handled; 6. follow-ups.
    let mut stored_in: HashMap<String, usize> = HashMap::new();
    let mut follow_ups: HashMap<String, usize> = HashMap::new();
    for d in store.all_dialogs() {
        let d = d.unwrap();
        let contact = store
            .contact(d.contact)
            .unwrap()
            .unwrap()
            .identity
            .to_string();
        for m in store.messages(d.id).unwrap() {
            if m.direction == Direction::In {
                *stored_in.entry(contact.clone()).or_default() += 1;
            }
        }
        if !d.status.is_live() {
            let pending = store.pending_of(d.id).unwrap();
            assert!(
                pending.is_empty(),
                "dialog {} is {} but has pending messages",
                d.id,
                d.status.label()
            );
        }
        if matches!(
            d.status,
            DialogStatus::Finished { .. } | DialogStatus::Dead | DialogStatus::Blocked
        ) {
            // A message that went out must have been recorded before the end.
            for m in store.messages(d.id).unwrap() {
                assert_ne!(
                    m.delivery,
                    Some(Delivery::Pending),
                    "dialog {} ended with a pending message",
                    d.id
                );
            }
        }
    }
    let mut wire_in: HashMap<String, usize> = HashMap::new();
    for l in wire.iter().filter(|l| l.direction.as_deref() == Some("in")) {
        *wire_in.entry(l.contact.clone()).or_default() += 1;
    }
    for (contact, n) in &wire_in {
        // A kill between the host's receipt and the wire line can leave a
        // stored message off the wire, never the other way round.
        let stored = stored_in.get(contact).copied().unwrap_or(0);
        assert!(
            stored >= *n,
            "contact {contact}: {n} incoming on the wire, only {stored} stored"
        );
    }
    if settled {
        assert!(
            store.unhandled().unwrap().is_empty(),
            "incoming messages left unhandled: {:?}",
            store.unhandled().unwrap()
        );
    }
    for l in outs
        .iter()
        .filter(|l| l.kind.as_deref() == Some("follow_up"))
    {
        s.follow_ups += 1;
        *follow_ups.entry(l.contact.clone()).or_default() += 1;
    }
    for (contact, n) in follow_ups {
        let max = config.file.safety.max_follow_ups as usize;
        assert!(
            n <= max,
            "contact {contact} got {n} follow-ups, more than {max}"
        );
    }
    s
}

/// A daily cap at `at` (seconds) during warm-up from `first`, as SPEC
/// section 4 ramps it: `floor(full * (start + (1 - start) * progress))`, at
/// least one.
fn warm_cap(limits: &colloquy::config::Safety, first: Option<f64>, full: u32, at: f64) -> u32 {
    let warmup = limits.warmup.0.as_secs_f64();
    let Some(first) = first.filter(|_| warmup > 0.0) else {
        return full;
    };
    let progress = ((at - first) / warmup).clamp(0.0, 1.0);
    let frac = limits.warmup_start + (1.0 - limits.warmup_start) * progress;
    ((full as f64 * frac + 1e-9).floor() as u32).clamp(1, full)
}

/// A project directory with the shipped engines, scripts, persona and a
/// generated audience, and a config built from `sections`.
pub fn project(contacts: usize, sections: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for sub in ["engines", "engines/prompts", "scripts", "personas"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
    }
    for f in [
        "engines/scripted.lua",
        "engines/echo.lua",
        "engines/prompts/spring.md",
        "scripts/template.lua",
        "scripts/llm.lua",
    ] {
        std::fs::copy(root.join(f), dir.path().join(f)).unwrap();
    }
    std::fs::copy(
        root.join("tests/personas/default.lua"),
        dir.path().join("personas/default.lua"),
    )
    .unwrap();
    let mut csv = String::from("username,first_name,company\n");
    for i in 0..contacts {
        csv.push_str(&format!("contact_{i:04},Name{i},Company {}\n", i % 7));
    }
    std::fs::write(dir.path().join("leads.csv"), csv).unwrap();
    std::fs::write(dir.path().join("config.toml"), sections).unwrap();
    dir
}

/// A faulty campaign: every fault type, tight limits, a send window.
pub fn faulty_config(time_scale: f64, seed: u64) -> String {
    format!(
        r#"
[sim]
seed = {seed}
time_scale = {time_scale}
reply_probability = 0.8
reply_delay = "1m..40m"
persona = "personas/default.lua"
[sim.faults]
flood_wait = 0.04
flood_wait_duration = "1m..20m"
peer_flood = 0.02
ban = 0.003
privacy_restricted = 0.08
transient = 0.05
timeout_delivered = 0.04

[safety]
max_per_hour = 8
max_per_day = 40
max_new_dialogs_per_day = 12
min_interval = "20s"
jitter = "10s"
stuck_after = "6h"
max_follow_ups = 2
reply_delay = "10s..2m"
peer_flood_cooldown = "6h"
retry_attempts = 4
retry_max_delay = "5m"


[[accounts]]
name = "alice"
[[accounts]]
name = "bob"
[accounts.safety]
max_per_hour = 5
[[accounts]]
name = "carol"

[[audiences]]
name = "leads"
file = "leads.csv"

[[campaigns]]
name = "spring"
engine = "scripted"
prompt_template = "engines/prompts/spring.md"
audiences = ["leads"]
accounts = ["alice", "bob", "carol"]
send_window = {{ start = "08:00", end = "20:00", timezone = "Europe/Berlin" }}
[campaigns.params]
product = "Acme CRM"
"#
    )
}

/// A quick project on the simulated Telegram: one account `alice`, the
/// audience `leads` (leads.csv), the campaign `spring` on `engine` with
/// limits lifted, no replies; `campaign` is added to the campaign's table.
pub fn quick_config(seed: u64, engine: &str, campaign: &str) -> String {
    format!(
        r#"
[sim]
seed = {seed}
time_scale = 100
reply_probability = 0.0
persona = "personas/default.lua"

[safety]
max_per_hour = 10000
max_per_day = 10000
max_new_dialogs_per_day = 10000
min_interval = "1s"
jitter = "0s"

[[accounts]]
name = "alice"

[[audiences]]
name = "leads"
file = "leads.csv"

[[campaigns]]
name = "spring"
engine = "{engine}"
audiences = ["leads"]
accounts = ["alice"]
{campaign}
"#
    )
}

/// The whole host in this process on the simulated Telegram, on tokio's
/// paused clock: `config`'s store with `rows` imported as the audience
/// `leads`, started, run for `time` of tokio time (simulated time is that
/// times `time_scale`), then stopped. Returns the store.
pub async fn run_paused(
    config: &std::sync::Arc<Config>,
    rows: &[colloquy::audience::ContactRow],
    time: Duration,
) -> Store {
    use colloquy::{host, sim::SimTransport};
    let store = Store::open(&config.data_dir()).unwrap();
    let rng = colloquy::clock::SeededRng::new(1);
    store
        .import_audience("leads", rows, &mut || rng.next_u64())
        .unwrap();
    let sim = SimTransport::open(config).unwrap();
    sim.hold_paused_clock(true);
    store.hold_paused_clock(true);
    let clock = sim.clock();
    let h = host::build(
        config.clone(),
        store.clone(),
        std::sync::Arc::new(sim),
        clock,
        tokio_util::sync::CancellationToken::new(),
    );
    h.engines.hold_paused_clock(true);
    host::start(&h).await.unwrap();
    tokio::time::sleep(time).await;
    host::stop(&h).await;
    store
}

// The real binary, as a user runs it.

const BIN: &str = env!("CARGO_BIN_EXE_colloquy");

/// Runs a command of the binary in `dir` and waits for it.
pub fn colloquy(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .current_dir(dir)
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

/// A host started by [`run`]. A test that ends without [`stop`] (a failed
/// assertion) kills it, so that no host outlives its test.
pub struct Host(Option<Child>);

impl std::ops::Deref for Host {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.0.as_ref().expect("a running host")
    }
}

impl std::ops::DerefMut for Host {
    fn deref_mut(&mut self) -> &mut Child {
        self.0.as_mut().expect("a running host")
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(mut host) = self.0.take() {
            let _ = host.kill();
            let _ = host.wait();
        }
    }
}

/// Starts `colloquy run` in `dir`, its log in `dir/host.log`.
pub fn run(dir: &Path) -> Host {
    let log = std::fs::File::create(dir.join("host.log")).unwrap();
    let host = Command::new(BIN)
        .current_dir(dir)
        .arg("run")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Host(Some(host))
}

/// A loopback port free right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What the host started by [`run`] logged so far.
pub fn host_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("host.log")).unwrap_or_default()
}

/// Stops a host as an operator does (SIGTERM); it exits 0.
pub fn stop(mut host: Host) {
    let mut host = host.0.take().expect("a running host");
    // SAFETY: signals a process this test started.
    unsafe { libc::kill(host.id() as i32, libc::SIGTERM) };
    let status = host.wait().unwrap();
    assert!(status.success(), "the host ended with {status}");
}

/// Polls `probe` until it holds, for up to 30 s.
pub fn eventually(what: &str, mut probe: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !probe() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What a command printed, stdout then stderr.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
