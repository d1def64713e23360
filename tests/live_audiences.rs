//! Audience files saved while the real binary runs on the simulated
//! Telegram: new rows are imported and opened without a restart, changed
//! fields are updated, removed rows keep their dialogs, and a file that
//! cannot be read as its header promises is refused whole with an alert
//! while the host runs on; an audience added to config.toml is imported.

mod common;

use std::path::Path;

use common::{colloquy, eventually, host_log, run, stop, text};

fn config() -> String {
    common::quick_config(
        11,
        "scripted",
        "prompt_template = \"engines/prompts/spring.md\"\n[campaigns.params]\nproduct = \"Acme CRM\"",
    )
}

fn opened(d: &Path) -> Vec<String> {
    common::read_wire(&d.join("data/sim/wire.jsonl"))
        .into_iter()
        .filter(|l| l.kind.as_deref() == Some("opening"))
        .map(|l| l.contact)
        .collect()
}

fn dialogs(d: &Path) -> usize {
    text(&colloquy(d, &["dialogs"])).lines().count() - 1
}

#[test]
fn a_saved_audience_file_is_imported_while_the_host_runs() {
    let dir = common::project(3, &config());
    let d = dir.path();
    let csv = d.join("leads.csv");
    let host = run(d);
    eventually("the audience to run out", || {
        host_log(d).contains("every contact of the campaign's audiences has been contacted")
    });
    eventually("the three openings on the wire", || opened(d).len() == 3);

    // New rows: imported and opened, no restart.
    let mut rows = std::fs::read_to_string(&csv).unwrap();
    rows.push_str("contact_0003,Name3,Company 3\ncontact_0004,Name4,Company 4\n");
    std::fs::write(&csv, &rows).unwrap();
    eventually("the new contacts opened", || {
        let o = opened(d);
        o.iter().any(|c| c == "contact_0003") && o.iter().any(|c| c == "contact_0004")
    });
    assert!(
        host_log(d).contains("added=2 updated=0 unchanged=3"),
        "{}",
        host_log(d)
    );

    // A changed field is updated; rows removed keep their dialogs.
    let changed = "username,first_name,company\ncontact_0000,Renamed,Company 0\n";
    std::fs::write(&csv, changed).unwrap();
    eventually("the change imported", || {
        host_log(d).contains("added=0 updated=1 unchanged=0")
    });
    assert_eq!(dialogs(d), 5);

    // A stray quote: refused whole, an alert, the host runs on.
    std::fs::write(&csv, format!("{changed}contact_0009,\"Name9,Company 9\n")).unwrap();
    eventually("the refusal", || {
        let log = host_log(d);
        log.contains("leads.csv:3: a quote opened here is never closed")
            && log.contains("alert=AudienceRefused")
    });
    assert!(!opened(d).iter().any(|c| c == "contact_0009"));
    assert_eq!(dialogs(d), 5);

    // An audience added to config.toml is imported and opened.
    std::fs::write(d.join("more.csv"), "username\nlate_comer\n").unwrap();
    let edited = std::fs::read_to_string(d.join("config.toml"))
        .unwrap()
        .replace(
            "audiences = [\"leads\"]",
            "audiences = [\"leads\", \"more\"]",
        )
        .replace(
            "[[campaigns]]",
            "[[audiences]]\nname = \"more\"\nfile = \"more.csv\"\n\n[[campaigns]]",
        );
    std::fs::write(d.join("config.toml"), edited).unwrap();
    eventually("the added audience opened", || {
        opened(d).iter().any(|c| c == "late_comer")
    });
    stop(host);
}
