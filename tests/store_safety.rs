//! A store that lost data or went back in time is never run on: the real
//! binary on the simulated Telegram. A backup taken while the host runs
//! restores; an older one put in place (by hand or by `restore`) is refused
//! with one sentence, since the contacts written to after it could be
//! written to again; so are a damaged store and a replaced one.

mod common;

use std::path::Path;

use common::{colloquy, eventually, host_log, run, stop, text};

fn config() -> String {
    common::quick_config(7, "echo", "")
}

/// How many contacts `status` says are not yet contacted.
fn not_yet_contacted(d: &Path) -> usize {
    let status = text(&colloquy(d, &["status"]));
    let Some(at) = status.find(" contacts not yet contacted") else {
        panic!("{status}")
    };
    let digits: String = status[..at]
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.chars().rev().collect::<String>().parse().unwrap()
}

/// Runs the host until it has opened `n` more dialogs, then stops it.
fn run_until_opened(d: &Path, n: usize) {
    let before = not_yet_contacted(d);
    let host = run(d);
    eventually("openings", || not_yet_contacted(d) + n <= before);
    stop(host);
}

fn refused_with(d: &Path, args: &[&str], sentence: &str) {
    let out = colloquy(d, args);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains(sentence), "{}", text(&out));
    assert_eq!(text(&out).trim().lines().count(), 1, "{}", text(&out));
}

fn put_in_place(from: &Path, to: &Path) {
    std::fs::remove_dir_all(to).unwrap();
    let copied = std::process::Command::new("cp")
        .arg("-r")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(copied.success());
}

#[test]
fn a_backup_taken_while_running_restores_and_an_older_one_is_refused() {
    let dir = common::project(2000, &config());
    let d = dir.path();
    let host = run(d);
    eventually("openings", || {
        host_log(d).contains("dialog opened") && not_yet_contacted(d) < 1990
    });
    let backed = colloquy(d, &["backup", "backup-1"]);
    assert!(backed.status.success(), "{}", text(&backed));
    assert!(
        text(&backed).contains("backed up the store as of ")
            && text(&backed).contains("read back and checked"),
        "{}",
        text(&backed)
    );
    let at_backup = not_yet_contacted(d);
    eventually("more openings", || not_yet_contacted(d) + 20 <= at_backup);
    stop(host);
    let newer = not_yet_contacted(d);
    assert!(newer < at_backup);

    // The older backup put in place by hand: refused, nothing sent.
    std::fs::rename(d.join("data/store"), d.join("newer-store")).unwrap();
    std::fs::create_dir(d.join("data/store")).unwrap();
    put_in_place(&d.join("backup-1/store"), &d.join("data/store"));
    let wire = std::fs::read_to_string(d.join("data/sim/wire.jsonl")).unwrap_or_default();
    refused_with(d, &["run"], "is behind what it had written");
    refused_with(
        d,
        &["status"],
        "running it could message contacts a second time",
    );
    assert_eq!(
        std::fs::read_to_string(d.join("data/sim/wire.jsonl")).unwrap_or_default(),
        wire
    );

    // `restore` refuses it too, unless told to accept it.
    put_in_place(&d.join("newer-store"), &d.join("data/store"));
    assert_eq!(not_yet_contacted(d), newer);
    refused_with(
        d,
        &["restore", "backup-1"],
        "contacts written to since could be written to again",
    );
    assert_eq!(not_yet_contacted(d), newer);

    // A backup of the stopped store restores, keeping what it replaced.
    let backed = colloquy(d, &["backup", "backup-2"]);
    assert!(backed.status.success(), "{}", text(&backed));
    run_until_opened(d, 5);
    refused_with(d, &["restore", "backup-2"], "is older than the store");
    let restored = colloquy(d, &["restore", "backup-2", "--accept-older"]);
    assert!(restored.status.success(), "{}", text(&restored));
    assert!(text(&restored).contains("the store it replaced is kept in"));
    assert_eq!(not_yet_contacted(d), newer);
    run_until_opened(d, 5);
}

#[test]
fn a_damaged_or_replaced_store_is_refused() {
    let dir = common::project(2000, &config());
    let d = dir.path();
    let host = run(d);
    eventually("openings", || {
        host_log(d).contains("dialog opened") && not_yet_contacted(d) < 1940
    });
    stop(host);
    let good = d.join("good-store");
    std::fs::rename(d.join("data/store"), &good).unwrap();
    std::fs::create_dir(d.join("data/store")).unwrap();
    let db = d.join("data/store/db");
    let size = std::fs::metadata(good.join("db")).unwrap().len();

    // Cut to half.
    put_in_place(&good, &d.join("data/store"));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&db)
        .unwrap()
        .set_len(size / 2)
        .unwrap();
    let out = colloquy(d, &["run"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("is behind what it had written") || text(&out).contains("damaged"),
        "{}",
        text(&out)
    );

    // Another store in its place.
    std::fs::remove_dir_all(d.join("data/store")).unwrap();
    refused_with(d, &["run"], "is not the one this data_dir held");

    // 8 KiB overwritten here and there. Where sled loses a record the
    // host refuses (also where sled would spin on it for ever); where the
    // bytes were space sled no longer reads it runs on. Either way no
    // contact gets a second opening.
    for eighth in 1..8 {
        put_in_place(&good, &d.join("data/store"));
        let mut bytes = std::fs::read(&db).unwrap();
        let at = bytes.len() * eighth / 8;
        let end = (at + 8192).min(bytes.len());
        for (i, b) in bytes[at..end].iter_mut().enumerate() {
            *b = (i * 7919 % 251) as u8;
        }
        std::fs::write(&db, bytes).unwrap();
        let mut host = run(d);
        eventually("the host to refuse or to open", || {
            host.try_wait().unwrap().is_some() || host_log(d).contains("dialog opened")
        });
        match host.try_wait().unwrap() {
            Some(status) => {
                let log = host_log(d);
                assert_eq!(status.code(), Some(2), "{log}");
                assert!(
                    log.contains("is behind") || log.contains("damaged"),
                    "{log}"
                );
            }
            None => {
                // SAFETY: signals a process this test started.
                unsafe { libc::kill(host.id() as i32, libc::SIGTERM) };
                let status = host.wait().unwrap();
                assert!(status.success(), "{status}: {}", host_log(d));
            }
        }
    }
    let wire = common::read_wire(&d.join("data/sim/wire.jsonl"));
    let mut opened = std::collections::HashSet::new();
    for l in wire.iter().filter(|l| l.kind.as_deref() == Some("opening")) {
        assert!(opened.insert(&l.contact), "{} was opened twice", l.contact);
    }
}

/// The data_dir on a small tmpfs, filled up by another file while the host
/// opens dialogs: the host says so in one sentence, sends nothing it has
/// not recorded, and once there is room again the store holds every
/// message that went out and the host runs on. Needs the right to mount
/// (root, as on the CI machine); elsewhere it says so and skips.
#[test]
fn a_full_disk_loses_nothing_and_says_so() {
    let dir = common::project(3000, &config());
    let d = dir.path();
    let data = d.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=32m", "tmpfs"])
        .arg(&data)
        .output();
    if !mounted.as_ref().is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: cannot mount a small tmpfs here (needs root)");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(data.clone());
    let host = run(d);
    eventually("openings", || {
        host_log(d).contains("dialog opened") && not_yet_contacted(d) < 2980
    });
    // Another program takes the rest of the disk.
    let filler = data.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 << 10];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
    // The store meets it when sled needs room (it fills its file first),
    // the simulated world when it logs its next message.
    eventually("the host to meet the full disk", || {
        let log = host_log(d);
        log.contains("the disk holding data_dir is full")
            || log.contains("the simulated world cannot write its log")
    });
    let log = host_log(d);
    assert!(!log.contains("Os {"), "a debug dump: {log}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("alert=DiskFull"), "{log}");

    // Room again: everything that went out is in the store, and the host
    // goes on.
    std::fs::remove_file(&filler).unwrap();
    stop(host);
    let config = colloquy::config::Config::load(&d.join("config.toml")).unwrap();
    let store = colloquy::store::Store::open(&data).unwrap();
    let wire = common::read_wire(&data.join("sim/wire.jsonl"));
    let summary = common::check(&config, &store, &wire, false);
    assert!(summary.openings >= 20, "{summary:?}");
    drop(store);
    run_until_opened(d, 5);
}
