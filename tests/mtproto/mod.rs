//! The local MTProto server of `../shared/mtproto-server`, the colloquy
//! binary run against it, and contacts played with Telethon
//! (`contacts.py`): the parts of the real-protocol tests.
//!
//! The server is built once into `target/mtproto-server` (shared/ is
//! read-only) and started on a free loopback port with an empty database.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const BIN: &str = env!("CARGO_BIN_EXE_colloquy");
/// Any api_id and api_hash do for the local server.
pub const API_HASH: &str = "0123456789abcdef0123456789abcdef";

/// Polls `probe` every 100 ms until it gives a value or `limit` passes.
pub fn eventually<T>(what: &str, limit: Duration, probe: impl FnMut() -> Option<T>) -> T {
    within(limit, probe).unwrap_or_else(|| panic!("gave up after {limit:?} waiting for {what}"))
}

/// Polls `probe` every 100 ms until it gives a value, or `None` once
/// `limit` has passed.
pub fn within<T>(limit: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where the server's scripts live: `MTPROTO_SERVER`, or `../shared/mtproto-server`.
fn server_scripts() -> PathBuf {
    std::env::var_os("MTPROTO_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest().join("../shared/mtproto-server"))
}

fn run_checked(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A user signed up on the server.
#[derive(Debug, Clone)]
pub struct User {
    pub phone: String,
    pub username: String,
    pub user_id: i64,
    /// A Telethon string session.
    pub session: String,
}

/// The running server; stopped on drop.
pub struct Server {
    scripts: PathBuf,
    pub dest: PathBuf,
    pub port: u16,
}

impl Server {
    /// Sets the server up and starts it, or `None` (with one line saying
    /// how to run these tests) when `../shared/mtproto-server` is not there.
    /// With `CI=true` a missing or broken server fails the test instead.
    pub fn start() -> Option<Server> {
        let scripts = server_scripts();
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        if !scripts.join("setup.sh").exists() {
            assert!(
                !ci,
                "CI=true but the MTProto test server is missing at {}",
                scripts.display()
            );
            eprintln!(
                "skipped: the real-protocol tests need the local MTProto server at {} (or MTPROTO_SERVER=DIR); see README.md, \"Tests against a real MTProto server\"",
                scripts.display()
            );
            return None;
        }
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| manifest().join("target"));
        let dest = target.join("mtproto-server");
        std::fs::create_dir_all(&dest).unwrap();
        run_checked(
            Command::new("bash")
                .arg(scripts.join("setup.sh"))
                .arg(&dest),
            "mtproto-server/setup.sh",
        );
        let port = free_port();
        let server = Server {
            scripts,
            dest,
            port,
        };
        // A stale server of an interrupted run holds the pid file.
        let _ = Command::new("bash")
            .arg(server.scripts.join("stop.sh"))
            .arg(&server.dest)
            .output();
        run_checked(
            Command::new("bash")
                .arg(server.scripts.join("start.sh"))
                .arg(&server.dest)
                .arg(port.to_string()),
            "mtproto-server/start.sh",
        );
        Some(server)
    }

    fn python(&self) -> PathBuf {
        self.dest.join("venv/bin/python")
    }

    /// Signs a user up (`+PHONE`, first name, username). About one sign-up
    /// in fifty hangs inside the server's key exchange: each try has a time
    /// limit and is retried.
    pub fn sign_up(&self, phone: &str, first: &str, username: &str) -> User {
        for _ in 0..4 {
            let mut child = Command::new(self.python())
                .arg(self.scripts.join("signup.py"))
                .arg(&self.dest)
                .arg(self.port.to_string())
                .arg(format!("{phone}:{first}:{username}"))
                .env("PYTHONDONTWRITEBYTECODE", "1")
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("signup.py runs");
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            if let Some(v) = text
                .lines()
                .find_map(|l| serde_json::from_str::<Value>(l).ok())
            {
                return User {
                    phone: phone.to_string(),
                    username: v["username"].as_str().unwrap().to_string(),
                    user_id: v["user_id"].as_i64().unwrap(),
                    session: v["session"].as_str().unwrap().to_string(),
                };
            }
        }
        panic!("signing up {username} failed four times");
    }

    fn pid(&self) -> i32 {
        std::fs::read_to_string(self.dest.join("server.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Freezes the server: requests reach its socket, none is answered.
    pub fn freeze(&self) {
        signal(self.pid(), libc::SIGSTOP);
    }

    pub fn thaw(&self) {
        signal(self.pid(), libc::SIGCONT);
    }

    /// Whether the server received a request of `user_id` that contains
    /// every one of `parts` (its log has each request it received).
    pub fn received_request(&self, user_id: i64, parts: &[&str]) -> bool {
        let log = std::fs::read_to_string(self.dest.join("server.log")).unwrap_or_default();
        let from = format!(" {user_id}): ");
        log.lines()
            .filter(|l| l.contains("Received from") && l.contains(&from))
            .any(|l| parts.iter().all(|p| l.contains(p)))
    }

    /// Bytes clients sent that the (frozen) server has not read yet.
    pub fn unread_bytes(&self) -> u64 {
        unread_bytes_on(self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.thaw();
        let _ = Command::new("bash")
            .arg(self.scripts.join("stop.sh"))
            .arg(&self.dest)
            .output();
    }
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: sends a signal to a process this test started.
    unsafe {
        libc::kill(pid, sig);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The receive queues of the server's accepted connections on `port`,
/// from /proc/net/tcp.
fn unread_bytes_on(port: u16) -> u64 {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = u16::from_str_radix(f.get(1)?.split(':').nth(1)?, 16).ok()?;
            let established = *f.get(3)? == "01";
            let rx = u64::from_str_radix(f.get(4)?.split(':').nth(1)?, 16).ok()?;
            (local_port == port && established).then_some(rx)
        })
        .sum()
}

/// A message as a contact's client shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub id: i64,
    /// Sent by the contact.
    pub out: bool,
    pub text: String,
    /// Unix seconds, by the server's clock.
    pub date: i64,
}

/// The contacts, played by one Telethon process (`contacts.py`).
pub struct Contacts {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Contacts {
    pub fn start(server: &Server) -> Contacts {
        let mut child = Command::new(server.python())
            .arg(manifest().join("tests/mtproto/contacts.py"))
            .env("PYTHONPATH", &server.scripts)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("MTPROTO_DEST", &server.dest)
            .env("MTPROTO_PORT", server.port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("contacts.py runs");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Contacts {
            child,
            stdin,
            stdout,
        }
    }

    fn call(&mut self, request: Value) -> Value {
        writeln!(self.stdin, "{request}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let answer: Value = serde_json::from_str(&line)
            .unwrap_or_else(|_| panic!("contacts.py answered {line:?} to {request}"));
        if let Some(e) = answer.get("error") {
            panic!("contacts.py: {request}: {e}");
        }
        answer["result"].clone()
    }

    /// Connects a contact, known from now on by `name`.
    pub fn add(&mut self, name: &str, user: &User) {
        self.call(json!({"op": "add", "name": name, "session": user.session}));
    }

    pub fn send(&mut self, name: &str, to: &str, text: &str) {
        self.call(json!({"op": "send", "name": name, "to": to, "text": text}));
    }

    /// The chat between a contact and `peer` (a username), oldest first.
    pub fn chat(&mut self, name: &str, peer: &str) -> Vec<Seen> {
        let v = self.call(json!({"op": "history", "name": name, "peer": peer, "limit": 100}));
        v.as_array()
            .unwrap()
            .iter()
            .map(|m| Seen {
                id: m["id"].as_i64().unwrap(),
                out: m["out"].as_bool().unwrap(),
                text: m["text"].as_str().unwrap().to_string(),
                date: m["date"].as_i64().unwrap(),
            })
            .collect()
    }

    /// What `peer` sent to the contact, oldest first.
    pub fn received(&mut self, name: &str, peer: &str) -> Vec<String> {
        self.chat(name, peer)
            .into_iter()
            .filter(|m| !m.out)
            .map(|m| m.text)
            .collect()
    }

    /// The highest id of the contact's messages that `peer` has read.
    pub fn read_by(&mut self, name: &str, peer: &str) -> i64 {
        self.call(json!({"op": "read_max", "name": name, "peer": peer}))
            .as_i64()
            .unwrap()
    }

    /// Lets anybody find the contact by its phone number.
    pub fn findable_by_phone(&mut self, name: &str) {
        self.call(json!({"op": "find_me_by_phone", "name": name}));
    }
}

impl Drop for Contacts {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A project directory: config, audience, the shipped engines and scripts.
pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    pub fn new(config: &str, audience_csv: &str) -> Project {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        std::fs::write(dir.path().join("leads.csv"), audience_csv).unwrap();
        for sub in ["engines", "engines/prompts", "scripts"] {
            let from = manifest().join(sub);
            let to = dir.path().join(sub);
            std::fs::create_dir_all(&to).unwrap();
            for e in std::fs::read_dir(&from).unwrap() {
                let p = e.unwrap().path();
                if p.is_file() {
                    std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
                }
            }
        }
        Project { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Adds an engine file to the project's engines.
    pub fn add_engine(&self, source: &str, name: &str) {
        std::fs::write(self.path().join(format!("engines/{name}.lua")), source).unwrap();
    }

    fn colloquy(&self) -> Command {
        let mut c = Command::new(BIN);
        c.current_dir(self.path())
            .env("TG_API_HASH", API_HASH)
            .env("RUST_LOG", "info");
        c
    }

    /// `colloquy login NAME --import-session -`, the session on stdin.
    pub fn import(&self, account: &str, user: &User) {
        let mut child = self
            .colloquy()
            .args(["login", account, "--import-session", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        writeln!(child.stdin.take().unwrap(), "{}", user.session).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "login {account}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A read-only command's stdout (`status`, `dialogs`, `dialog ID`).
    pub fn read(&self, args: &[&str]) -> String {
        let out = run_checked(self.colloquy().args(args), &format!("colloquy {args:?}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `colloquy run`, its log in `host.log`.
    pub fn run(&self) -> Host {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path().join("host.log"))
            .unwrap();
        let child = self
            .colloquy()
            .arg("run")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Host { child: Some(child) }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path().join("host.log")).unwrap_or_default()
    }

    /// The dialog lines of `colloquy dialogs`, by contact as the audience names it.
    pub fn dialog_of(&self, contact: &str) -> Option<(String, String)> {
        self.read(&["dialogs"]).lines().find_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f.get(3) == Some(&contact)).then(|| (f[0].to_string(), f[4].to_string()))
        })
    }

    /// The status of the dialog with `contact`, once there is one.
    pub fn status_of(&self, contact: &str) -> Option<String> {
        self.dialog_of(contact).map(|(_, s)| s)
    }
}

impl Drop for Project {
    /// A failed test shows what the host logged.
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- last lines of {}/host.log:", self.path().display());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// A running `colloquy run`; killed on drop.
pub struct Host {
    child: Option<Child>,
}

impl Host {
    /// Stops the process where it stands (SIGSTOP); `kill9` still ends it.
    pub fn freeze(&self) {
        if let Some(c) = &self.child {
            signal(c.id() as i32, libc::SIGSTOP);
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        signal(c.id() as i32, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("the host did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill9();
    }
}
