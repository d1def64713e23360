//! `colloquy login` driven as a user runs it, without a network: importing
//! a string session, and the one-sentence answers to bad input.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use base64::Engine;

const BIN: &str = env!("CARGO_BIN_EXE_colloquy");

const CONFIG: &str = r#"
[transport]
kind = "telegram"

[telegram]
api_id = 12345
api_hash_env = "COLLOQUY_TEST_API_HASH"

[[accounts]]
name = "alice"
phone = "+15550000001"

[[accounts]]
name = "bob"
phone = "+15550000002"

[[audiences]]
name = "leads"
file = "leads.csv"

[[campaigns]]
name = "spring"
engine = "echo"
audiences = ["leads"]
accounts = ["alice", "bob"]
"#;

fn login(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .current_dir(dir)
        .env_remove("COLLOQUY_TEST_API_HASH")
        .arg("login")
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_string()
}

fn telethon(dc: u8, ip: [u8; 4], port: u16) -> String {
    let mut b = vec![dc];
    b.extend_from_slice(&ip);
    b.extend_from_slice(&port.to_be_bytes());
    b.extend_from_slice(&[7u8; 256]);
    format!("1{}", base64::engine::general_purpose::URL_SAFE.encode(b))
}

#[test]
fn a_telethon_session_is_imported_into_a_private_store() {
    let dir = common::project(3, CONFIG);
    let out = login(
        dir.path(),
        &[
            "alice",
            "--import-session",
            &telethon(2, [149, 154, 167, 40], 443),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "account alice: stored the Telethon session (DC 2, 149.154.167.40:443)"
    );
    let store = dir.path().join("data/store");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&store), 0o700);
    for e in std::fs::read_dir(&store).unwrap() {
        let p = e.unwrap().path();
        let want = if p.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode(&p), want, "{}", p.display());
    }
    // The key is nowhere in what the command printed.
    assert!(!String::from_utf8_lossy(&out.stdout).contains("BwcH"));
}

#[test]
fn a_session_is_read_from_stdin_a_file_or_a_variable_and_warned_about_on_the_command_line() {
    let session = telethon(2, [127, 0, 0, 1], 4430);
    let stored = "account alice: stored the Telethon session (DC 2, 127.0.0.1:4430)";
    let dir = common::project(3, CONFIG);
    std::fs::write(dir.path().join("alice.session"), format!("{session}\n")).unwrap();
    let with = |args: &[&str], env: Option<&str>, stdin: Option<&str>| {
        let mut c = Command::new(BIN);
        c.current_dir(dir.path())
            .arg("login")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some(value) = env {
            c.env("ALICE_SESSION", value);
        }
        let mut child = c.spawn().unwrap();
        {
            use std::io::Write;
            let mut input = child.stdin.take().unwrap();
            if let Some(text) = stdin {
                input.write_all(text.as_bytes()).unwrap();
            }
        }
        child.wait_with_output().unwrap()
    };
    let quiet = [
        with(&["alice", "--import-session", "-"], None, Some(&session)),
        with(
            &["alice", "--import-session-file", "alice.session"],
            None,
            None,
        ),
        with(
            &["alice", "--import-session-env", "ALICE_SESSION"],
            Some(&session),
            None,
        ),
    ];
    for out in &quiet {
        assert!(out.status.success(), "{}", stderr(out));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), stored);
        assert!(!stderr(out).contains("shows in `ps`"), "{}", stderr(out));
    }
    let argv = with(&["alice", "--import-session", &session], None, None);
    assert!(argv.status.success(), "{}", stderr(&argv));
    assert!(stderr(&argv).contains("shows in `ps` and in shell history"));
    let missing = with(
        &["alice", "--import-session-env", "NO_SUCH_VAR"],
        None,
        None,
    );
    assert_eq!(missing.status.code(), Some(2));
    assert_eq!(
        stderr(&missing),
        "--import-session-env: the environment variable NO_SUCH_VAR is not set"
    );
}

#[test]
fn bad_input_gets_one_sentence_and_exit_2() {
    let dir = common::project(3, CONFIG);
    let cases: &[(&[&str], &str)] = &[
        (
            &["alice", "--import-session", "1abc"],
            "--import-session: the session string",
        ),
        (
            &["nobody"],
            "there is no account named nobody in config.toml",
        ),
        (
            &["alice"],
            "telegram.api_hash_env: the environment variable COLLOQUY_TEST_API_HASH is not set",
        ),
    ];
    for (args, want) in cases {
        let out = login(dir.path(), args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
}
