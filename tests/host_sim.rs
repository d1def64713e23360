//! The whole host on the simulated Telegram, on tokio's paused clock: a
//! multi-day run with every fault type, then every invariant checked over
//! the wire log and the store.

mod common;

use std::sync::Arc;
use std::time::Duration;

use colloquy::config::Config;

#[tokio::test(start_paused = true)]
async fn a_faulty_multi_day_run_keeps_every_invariant() {
    let s = run_four_days(&common::faulty_config(1.0, 7)).await;
    assert!(s.follow_ups >= 1, "{s:?}");
    for fault in [
        "flood_wait",
        "transient",
        "privacy_restricted",
        "timeout_delivered",
    ] {
        assert!(
            s.faults.get(fault).copied().unwrap_or(0) > 0,
            "no {fault} in {s:?}"
        );
    }
}

/// With no reply delay and loose limits most replies go through the
/// answer pipeline (in batches), the rest through conductors: the same
/// invariants hold under every fault.
#[tokio::test(start_paused = true)]
async fn answered_in_batches_a_faulty_run_keeps_every_invariant() {
    let config = common::faulty_config(1.0, 9)
        .replace("reply_delay = \"10s..2m\"", "reply_delay = \"0s\"")
        .replace("min_interval = \"20s\"", "min_interval = \"0s\"")
        .replace("jitter = \"10s\"", "jitter = \"0s\"")
        .replace("max_per_hour = 8", "max_per_hour = 400")
        .replace("max_per_day = 40", "max_per_day = 2000")
        .replace("ban = 0.003", "ban = 0.001");
    assert!(config.contains("reply_delay = \"0s\""));
    let s = run_four_days(&config).await;
    assert!(s.faults.len() >= 3, "{s:?}");
}

async fn run_four_days(config_text: &str) -> common::Summary {
    let dir = common::project(120, config_text);
    let config = Config::load(&dir.path().join("config.toml")).unwrap();
    let config = Arc::new(config);
    let rows = colloquy::audience::read(&dir.path().join("leads.csv")).rows;
    // Four simulated days.
    let store = common::run_paused(&config, &rows, Duration::from_secs(4 * 86_400)).await;
    assert_eq!(
        store.deferred(),
        0,
        "a stopped host leaves nothing deferred"
    );

    let wire = common::read_wire(&config.data_dir().join("sim/wire.jsonl"));
    let s = common::check(&config, &store, &wire, false);
    println!("{s:?}");
    assert!(s.openings >= 20, "{s:?}");
    assert!(s.inbound >= 10, "{s:?}");
    let counts: std::collections::HashMap<_, _> =
        store.dialog_counts().unwrap().into_iter().collect();
    println!("{counts:?}");
    assert!(
        counts["finished"] + counts["dead"] + counts["opted_out"] > 0,
        "{counts:?}"
    );
    s
}
