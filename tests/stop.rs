//! The host stops on SIGTERM and SIGINT, exit code 0, within 5 seconds, also
//! when nobody reads its log any more (its stderr a pipe closed at the
//! other end, as when `colloquy run 2>&1 | head` or a `tee` has gone).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_colloquy");

fn stops_within_five_seconds(signal: &str) {
    let dir = common::project(500, &common::faulty_config(600.0, 3));
    let config = dir.path().join("config.toml");
    let mut host = Command::new(BIN)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Nobody reads the log: the pipe's reading end is closed at once.
    drop(host.stderr.take());
    // Up and working: it answers `status` and has sent something.
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let status = Command::new(BIN)
            .arg("status")
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        let wire = dir.path().join("data/sim/wire.jsonl");
        if status.status.success() && common::read_wire(&wire).len() > 3 {
            break;
        }
        assert!(Instant::now() < until, "the host never got going");
        std::thread::sleep(Duration::from_millis(50));
    }
    Command::new("kill")
        .args([signal, &host.id().to_string()])
        .status()
        .unwrap();
    let asked = Instant::now();
    let code = loop {
        if let Some(code) = host.try_wait().unwrap() {
            break code;
        }
        if asked.elapsed() > Duration::from_secs(5) {
            let _ = host.kill();
            panic!("the host was still running 5 s after {signal}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(code.success(), "exit {code:?} after {signal}");
}

#[test]
fn sigterm_stops_the_host_even_with_its_log_unread() {
    stops_within_five_seconds("-TERM");
}

#[test]
fn sigint_stops_the_host_even_with_its_log_unread() {
    stops_within_five_seconds("-INT");
}
