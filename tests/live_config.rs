//! Edits of config.toml apply to the running binary without a restart: a
//! paused campaign starts opening dialogs when set active and stops when
//! paused again, an account taken out of a campaign stops opening for it,
//! and an invalid edit is reported and the running config kept.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_colloquy");

fn config(status: &str, extra_safety: &str) -> String {
    config_with(status, extra_safety, r#"["alice", "bob"]"#)
}

fn config_with(status: &str, extra_safety: &str, accounts: &str) -> String {
    format!(
        r#"
[sim]
seed = 5
time_scale = 100
reply_probability = 0.0
persona = "personas/default.lua"

[safety]
max_per_hour = 1000
max_per_day = 1000
max_new_dialogs_per_day = 1000
min_interval = "30s"
jitter = "0s"
{extra_safety}

[[accounts]]
name = "alice"
[[accounts]]
name = "bob"

[[audiences]]
name = "leads"
file = "leads.csv"

[[campaigns]]
name = "spring"
status = "{status}"
engine = "scripted"
prompt_template = "engines/prompts/spring.md"
audiences = ["leads"]
accounts = {accounts}
[campaigns.params]
product = "Acme CRM"
"#
    )
}

/// The host, with its log collected line by line.
struct Host {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Host {
    fn start(dir: &Path) -> Host {
        let mut child = Command::new(BIN)
            .arg("run")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        Host { child, log }
    }

    /// Waits until the log has shown `text` `n` times.
    fn wait_for_log(&self, text: &str, n: usize) {
        let until = Instant::now() + Duration::from_secs(20);
        while self.log.lock().unwrap().matches(text).count() < n {
            assert!(
                Instant::now() < until,
                "no {text:?} in the log:\n{}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Host {
    /// A failed test leaves no host running.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn openings(dir: &Path) -> usize {
    openings_of(dir, None)
}

fn openings_of(dir: &Path, account: Option<&str>) -> usize {
    common::read_wire(&dir.join("data/sim/wire.jsonl"))
        .iter()
        .filter(|l| l.kind.as_deref() == Some("opening"))
        .filter(|l| account.is_none_or(|a| l.account == a))
        .count()
}

fn edit(dir: &Path, text: &str) {
    // Written whole and renamed into place, as editors save.
    let tmp = dir.join("config.toml.new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join("config.toml")).unwrap();
}

fn control_is_up(dir: &Path) -> bool {
    Command::new(BIN)
        .arg("status")
        .arg("--config")
        .arg(dir.join("config.toml"))
        .output()
        .unwrap()
        .status
        .success()
}

fn status(dir: &Path) -> String {
    let out = Command::new(BIN)
        .arg("status")
        .arg("--config")
        .arg(dir.join("config.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn campaign_edits_apply_while_the_host_runs_and_a_bad_edit_keeps_the_running_config() {
    let dir = common::project(2000, &config("paused", ""));
    let mut host = Host::start(dir.path());
    // Running and answering (once its control endpoint is up), but a
    // paused campaign opens nothing.
    let until = Instant::now() + Duration::from_secs(20);
    while !control_is_up(dir.path()) {
        assert!(Instant::now() < until, "the host never answered `status`");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(openings(dir.path()), 0, "a paused campaign opened dialogs");

    edit(dir.path(), &config("active", ""));
    host.wait_for_log("config.toml reloaded", 1);
    let until = Instant::now() + Duration::from_secs(20);
    while openings(dir.path()) < 3 {
        assert!(
            Instant::now() < until,
            "no openings after the campaign was set active"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // An unknown key: reported, and the campaign keeps running as it was.
    edit(dir.path(), &config("paused", "no_such_limit = 3"));
    host.wait_for_log("the running config stays", 1);
    assert!(
        host.log.lock().unwrap().contains("no_such_limit"),
        "the report names the bad key:\n{}",
        host.log.lock().unwrap()
    );
    let before = openings(dir.path());
    let until = Instant::now() + Duration::from_secs(20);
    while openings(dir.path()) <= before {
        assert!(
            Instant::now() < until,
            "the invalid edit stopped the campaign"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(host.child.try_wait().unwrap().is_none(), "the host exited");

    // Paused again: once the edit is live, no more openings.
    edit(dir.path(), &config("paused", ""));
    host.wait_for_log("config.toml reloaded", 2);
    assert!(status(dir.path()).contains("spring"));
    std::thread::sleep(Duration::from_millis(1000));
    let paused_at = openings(dir.path());
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        openings(dir.path()),
        paused_at,
        "a paused campaign kept opening"
    );

    // Active with one account taken out of the campaign: only the other
    // opens dialogs.
    edit(dir.path(), &config_with("active", "", r#"["alice"]"#));
    host.wait_for_log("config.toml reloaded", 3);
    std::thread::sleep(Duration::from_millis(500));
    let (all, bob) = (openings(dir.path()), openings_of(dir.path(), Some("bob")));
    let until = Instant::now() + Duration::from_secs(20);
    while openings(dir.path()) < all + 3 {
        assert!(Instant::now() < until, "alice opened nothing");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        openings_of(dir.path(), Some("bob")),
        bob,
        "an account taken out of the campaign kept opening"
    );
    // Reading the file (`status` does, every few milliseconds above) and
    // saving it unchanged are no edits: one reload per edit, no more.
    edit(dir.path(), &config_with("active", "", r#"["alice"]"#));
    std::thread::sleep(Duration::from_millis(1000));
    let log = host.log.lock().unwrap().clone();
    assert_eq!(log.matches("config.toml reloaded").count(), 3, "{log}");

    Command::new("kill")
        .args(["-TERM", &host.child.id().to_string()])
        .status()
        .unwrap();
    assert!(host.child.wait().unwrap().success());
}
