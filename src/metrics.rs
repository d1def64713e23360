//! Counters and histograms for `/metrics`, kept in the process: messages
//! sent and received, send latency, engine calls and their errors, store
//! flushes, safety waits and flood waits. Each update is one short lock of
//! a small map (a few a message); `render` writes them in Prometheus' text
//! format. The gauges read from the store at scrape time are in
//! `host::metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Histogram buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// A metric's name and its labels, as written.
type Key = (&'static str, String);

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

#[derive(Default)]
struct Registry {
    counters: BTreeMap<Key, u64>,
    histograms: BTreeMap<Key, Histogram>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    counters: BTreeMap::new(),
    histograms: BTreeMap::new(),
});

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// `name{k="v",…}` label text.
fn labels(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Adds one to a counter.
pub fn count(name: &'static str, pairs: &[(&str, &str)]) {
    add(name, pairs, 1);
}

/// Adds `n` to a counter.
pub fn add(name: &'static str, pairs: &[(&str, &str)], n: u64) {
    *registry()
        .counters
        .entry((name, labels(pairs)))
        .or_default() += n;
}

/// Records one duration in a histogram.
pub fn observe(name: &'static str, pairs: &[(&str, &str)], took: Duration) {
    let secs = took.as_secs_f64();
    let mut r = registry();
    let h = r.histograms.entry((name, labels(pairs))).or_default();
    for (i, le) in BUCKETS.iter().enumerate() {
        if secs <= *le {
            h.counts[i] += 1;
        }
    }
    h.sum += secs;
    h.count += 1;
}

/// What each metric means, for its HELP line.
fn help(name: &str) -> &'static str {
    match name {
        "colloquy_messages_sent_total" => "Messages sent, by kind and account.",
        "colloquy_messages_received_total" => "Incoming messages stored, by account.",
        "colloquy_send_seconds" => "Time the transport took to send a message.",
        "colloquy_engine_call_seconds" => "Time an engine call took, by engine and function.",
        "colloquy_engine_errors_total" => "Engine calls that failed, by engine and function.",
        "colloquy_store_flush_seconds" => "Time a store flush took.",
        "colloquy_safety_waits_total" => {
            "Sends that had to wait for an account's limits, by account."
        }
        "colloquy_flood_waits_total" => "FLOOD_WAITs Telegram asked for, by account.",
        _ => "",
    }
}

/// Every counter and histogram in the text format.
pub fn render(out: &mut String) {
    let r = registry();
    let mut last = "";
    for ((name, l), n) in &r.counters {
        if *name != last {
            let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} counter", help(name));
            last = name;
        }
        match l.is_empty() {
            true => writeln!(out, "{name} {n}"),
            false => writeln!(out, "{name}{{{l}}} {n}"),
        }
        .ok();
    }
    for ((name, l), h) in &r.histograms {
        if *name != last {
            let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} histogram", help(name));
            last = name;
        }
        let sep = if l.is_empty() { "" } else { "," };
        let braced = |suffix: &str| match l.is_empty() {
            true => format!("{name}{suffix}"),
            false => format!("{name}{suffix}{{{l}}}"),
        };
        for (i, le) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{{l}{sep}le=\"{le}\"}} {}", h.counts[i]);
        }
        let _ = writeln!(out, "{name}_bucket{{{l}{sep}le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "{} {}", braced("_sum"), h.sum);
        let _ = writeln!(out, "{} {}", braced("_count"), h.count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_histograms_render_in_the_text_format() {
        count("colloquy_flood_waits_total", &[("account", "a\"b")]);
        observe(
            "colloquy_store_flush_seconds",
            &[],
            Duration::from_millis(3),
        );
        let mut out = String::new();
        render(&mut out);
        assert!(
            out.contains("colloquy_flood_waits_total{account=\"a\\\"b\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("colloquy_store_flush_seconds_bucket{le=\"0.005\"} 1"),
            "{out}"
        );
        assert!(
            out.contains("colloquy_store_flush_seconds_bucket{le=\"0.0025\"} 0"),
            "{out}"
        );
        assert!(
            out.contains("# TYPE colloquy_store_flush_seconds histogram"),
            "{out}"
        );
    }
}
