//! Kills the real binary with SIGKILL at random moments of a faulty run,
//! restarts it, and checks every invariant at the end; the last run stops
//! on SIGTERM and must exit 0 within 5 seconds.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use colloquy::clock::SeededRng;
use colloquy::config::Config;
use colloquy::store::Store;

const BIN: &str = env!("CARGO_BIN_EXE_colloquy");

fn start(dir: &std::path::Path) -> Child {
    Command::new(BIN)
        .arg("run")
        .arg("--config")
        .arg(dir.join("config.toml"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn killed_at_random_moments_the_host_keeps_every_invariant() {
    kill_restart_and_check(&common::faulty_config(8000.0, 11), 2024, 10);
}

/// The same with replies answered in batches by the answer pipeline.
#[test]
fn killed_while_answering_in_batches_the_host_keeps_every_invariant() {
    let config = common::faulty_config(8000.0, 13)
        .replace("reply_delay = \"10s..2m\"", "reply_delay = \"0s\"")
        .replace("min_interval = \"20s\"", "min_interval = \"0s\"")
        .replace("jitter = \"10s\"", "jitter = \"0s\"");
    assert!(config.contains("reply_delay = \"0s\""));
    kill_restart_and_check(&config, 77, 10);
}

/// Other limits, faults and kill timings, for long runs by hand:
///
///     SWEEP=storm SWEEP_SEED=7 cargo test --release --test crash sweep -- --ignored
///
/// `SWEEP` is one of `tight` (low caps, long pauses, warm-up), `storm` (every
/// fault often), `fast` (time scale 10,000, no reply delay), `paced` (no
/// reply delay, so the answer pipeline, but the minimum interval and
/// jitter kept) and `two` (two campaigns over one audience and one
/// account).
#[test]
#[ignore]
fn sweep() {
    let variant = std::env::var("SWEEP").unwrap_or_else(|_| "storm".into());
    let seed: u64 = std::env::var("SWEEP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let base = common::faulty_config(8000.0, seed);
    let config = match variant.as_str() {
        "tight" => base
            .replace("max_per_hour = 8", "max_per_hour = 3")
            .replace(
                "max_per_day = 40",
                "max_per_day = 10\nwarmup = \"3d\"\nwarmup_start = 0.3",
            )
            .replace(
                "max_new_dialogs_per_day = 12",
                "max_new_dialogs_per_day = 4",
            )
            .replace("min_interval = \"20s\"", "min_interval = \"2m\"")
            .replace("jitter = \"10s\"", "jitter = \"1m\""),
        "storm" => base
            .replace("flood_wait = 0.04", "flood_wait = 0.2")
            .replace("peer_flood = 0.02", "peer_flood = 0.1")
            .replace("ban = 0.003", "ban = 0.01")
            .replace("privacy_restricted = 0.08", "privacy_restricted = 0.2")
            .replace("transient = 0.05", "transient = 0.3")
            .replace("timeout_delivered = 0.04", "timeout_delivered = 0.2"),
        "fast" => base
            .replace("time_scale = 8000", "time_scale = 10000")
            .replace("reply_delay = \"10s..2m\"", "reply_delay = \"0s\"")
            .replace("min_interval = \"20s\"", "min_interval = \"0s\"")
            .replace("jitter = \"10s\"", "jitter = \"0s\""),
        "paced" => base
            .replace("time_scale = 8000", "time_scale = 10000")
            .replace("reply_delay = \"10s..2m\"", "reply_delay = \"0s\""),
        "two" => format!(
            "{base}\n[[campaigns]]\nname = \"autumn\"\nengine = \"scripted\"\n\
             prompt_template = \"engines/prompts/spring.md\"\naudiences = [\"leads\"]\n\
             accounts = [\"carol\"]\n"
        ),
        other => panic!("unknown SWEEP variant {other}"),
    };
    kill_restart_and_check(&config, seed, 1);
}

fn kill_restart_and_check(config_text: &str, seed: u64, min_openings: usize) {
    let dir = common::project(150, config_text);
    let rng = SeededRng::new(seed);
    let rounds = std::env::var("SWEEP_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let shortest = if rounds > 5 { 50 } else { 300 };
    for round in 0..rounds {
        let mut child = start(dir.path());
        let life =
            rng.duration_between(Duration::from_millis(shortest), Duration::from_millis(1500));
        std::thread::sleep(life);
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert!(
            !status.success(),
            "round {round}: the host exited by itself: {status:?}"
        );
    }
    let data = Config::load(&dir.path().join("config.toml"))
        .unwrap()
        .data_dir();
    // A killed host leaves its control file behind; the next writes it
    // anew once it holds the store and serves.
    let _ = std::fs::remove_file(data.join("control.json"));
    let mut child = start(dir.path());
    // Up again, and over the rounds at least `min_openings` contacts
    // opened and half as many replies received.
    common::eventually("the restarted host serving", || {
        let served = data.join("control.json").exists();
        let wire = common::read_wire(&data.join("sim/wire.jsonl"));
        let count = |f: &dyn Fn(&common::Line) -> bool| wire.iter().filter(|l| f(l)).count();
        served
            && count(&|l| l.kind.as_deref() == Some("opening")) >= min_openings
            && count(&|l| l.direction.as_deref() == Some("in")) >= min_openings / 2
    });
    // The reporting commands reach the running host through its control
    // endpoint.
    let report = |command: &str| {
        Command::new(BIN)
            .arg(command)
            .arg("--config")
            .arg(dir.path().join("config.toml"))
            .output()
            .unwrap()
    };
    common::eventually("`status` from the running host", || {
        let out = report("status");
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("dialogs: active")
    });
    let listed = report("dialogs");
    assert!(
        listed.status.success() && !listed.stdout.is_empty(),
        "colloquy dialogs: {listed:?}"
    );
    let stopped = Instant::now();
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = child.wait().unwrap();
    let took = stopped.elapsed();
    let mut stderr = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "exit {status:?}: {stderr}");
    assert!(took < Duration::from_secs(5), "took {took:?} to stop");

    // As the host left it (it may have paused a campaign).
    let config = Config::load(&dir.path().join("config.toml")).unwrap();
    let store = Store::open(&data).unwrap();
    let wire = common::read_wire(&data.join("sim/wire.jsonl"));
    let s = common::check(&config, &store, &wire, false);
    println!("{s:?}");
    assert!(s.openings >= min_openings, "{s:?}");
    assert!(s.inbound >= min_openings / 2, "{s:?}");
}
