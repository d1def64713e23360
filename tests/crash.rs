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
    kill_restart_and_check(&common::faulty_config(8000.0, 11), 2024);
}

/// The same with replies answered in batches by the answer pipeline.
#[test]
fn killed_while_answering_in_batches_the_host_keeps_every_invariant() {
    let config = common::faulty_config(8000.0, 13)
        .replace("reply_delay = \"10s..2m\"", "reply_delay = \"0s\"")
        .replace("min_interval = \"20s\"", "min_interval = \"0s\"")
        .replace("jitter = \"10s\"", "jitter = \"0s\"");
    assert!(config.contains("reply_delay = \"0s\""));
    kill_restart_and_check(&config, 77);
}

fn kill_restart_and_check(config_text: &str, seed: u64) {
    let dir = common::project(150, config_text);
    let rng = SeededRng::new(seed);
    for round in 0..5 {
        let mut child = start(dir.path());
        let life = rng.duration_between(Duration::from_millis(300), Duration::from_millis(1500));
        std::thread::sleep(life);
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert!(
            !status.success(),
            "round {round}: the host exited by itself: {status:?}"
        );
    }
    let mut child = start(dir.path());
    std::thread::sleep(Duration::from_secs(2));
    // The reporting commands reach the running host through its control
    // endpoint.
    let status = Command::new(BIN)
        .arg("status")
        .arg("--config")
        .arg(dir.path().join("config.toml"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(text.contains("dialogs: active"), "{text}");
    let listed = Command::new(BIN)
        .arg("dialogs")
        .arg("--config")
        .arg(dir.path().join("config.toml"))
        .output()
        .unwrap();
    assert!(listed.status.success() && !listed.stdout.is_empty());
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

    let config = Config::load(&dir.path().join("config.toml")).unwrap();
    let store = Store::open(&config.data_dir()).unwrap();
    let wire = common::read_wire(&config.data_dir().join("sim/wire.jsonl"));
    let s = common::check(&config, &store, &wire, false);
    println!("{s:?}");
    assert!(s.openings >= 10, "{s:?}");
    assert!(s.inbound >= 5, "{s:?}");
}
