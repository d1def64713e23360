//! `/metrics` in Prometheus' text format, read at scrape time from the
//! store and the host: nothing is counted on the hot path for it.

use std::fmt::Write as _;

use super::Host;
use crate::config::Config;
use crate::store::StoreError;

/// The exposition text.
pub fn render(host: &Host) -> Result<String, StoreError> {
    let mut out = String::new();
    let config = host.config();
    store_gauges(&mut out, host, &config)?;
    account_gauges(&mut out, host, &config)?;
    family(
        &mut out,
        "colloquy_alerts_total",
        "counter",
        "Alerts raised since the host started, by kind.",
    );
    for (kind, n) in host.alerts.counts() {
        let _ = writeln!(out, "colloquy_alerts_total{{kind=\"{kind}\"}} {n}");
    }
    crate::metrics::render(&mut out);
    Ok(out)
}

/// Dialogs by status, contacts not contacted yet, the do-not-contact list.
fn store_gauges(out: &mut String, host: &Host, config: &Config) -> Result<(), StoreError> {
    family(out, "colloquy_dialogs", "gauge", "Dialogs by status.");
    for (status, n) in host.store.dialog_counts()? {
        let _ = writeln!(out, "colloquy_dialogs{{status=\"{status}\"}} {n}");
    }

    family(
        out,
        "colloquy_contacts_not_contacted",
        "gauge",
        "Contacts of an audience no campaign has written to yet.",
    );
    for a in &config.file.audiences {
        let _ = writeln!(
            out,
            "colloquy_contacts_not_contacted{{audience=\"{}\"}} {}",
            label(&a.name),
            host.store.uncontacted_count(&a.name)
        );
    }

    family(
        out,
        "colloquy_do_not_contact",
        "gauge",
        "Contacts on the do-not-contact list.",
    );
    let _ = writeln!(
        out,
        "colloquy_do_not_contact {}",
        host.store.do_not_contact_list()?.len()
    );
    Ok(())
}

/// Each account's sends and limits by window, its wait, and whether it may
/// send at all.
fn account_gauges(out: &mut String, host: &Host, config: &Config) -> Result<(), StoreError> {
    let now = host.clock.now();
    // Each family's samples follow its header: one pass per family.
    let mut sends = String::new();
    let mut limit = String::new();
    let mut waiting = String::new();
    let mut up = String::new();
    for a in &config.file.accounts {
        let record = host.store.account(&a.name)?;
        let limits = host.safety.limits(&a.name);
        let name = label(&a.name);
        for (window, secs, most) in [
            ("hour", 3600, limits.max_per_hour),
            ("day", 86_400, limits.max_per_day),
        ] {
            let since = now.saturating_sub(std::time::Duration::from_secs(secs));
            let n = record.sends.iter().filter(|m| m.at > since).count();
            let _ = writeln!(
                sends,
                "colloquy_account_sends{{account=\"{name}\",window=\"{window}\"}} {n}"
            );
            let _ = writeln!(
                limit,
                "colloquy_account_limit{{account=\"{name}\",window=\"{window}\"}} {most}"
            );
        }
        let wait = match host
            .safety
            .check(&a.name, crate::model::MessageKind::Reply, None)?
        {
            crate::safety::decide::Decision::NotBefore(t) => (t.0 - now.0).max(0) as f64 / 1000.0,
            _ => 0.0,
        };
        let _ = writeln!(
            waiting,
            "colloquy_account_waiting_seconds{{account=\"{name}\"}} {wait}"
        );
        let can = matches!(
            record.status,
            crate::model::AccountStatus::Active
                | crate::model::AccountStatus::FloodWait { .. }
                | crate::model::AccountStatus::SpamLimited { .. }
        );
        let _ = writeln!(
            up,
            "colloquy_account_up{{account=\"{name}\"}} {}",
            u8::from(can)
        );
    }
    for (name, kind, help, samples) in [
        (
            "colloquy_account_sends",
            "gauge",
            "Sends that count against an account's limits, by window.",
            sends,
        ),
        (
            "colloquy_account_limit",
            "gauge",
            "An account's limit, by window.",
            limit,
        ),
        (
            "colloquy_account_waiting_seconds",
            "gauge",
            "Seconds until an account may send again (0: it may now).",
            waiting,
        ),
        (
            "colloquy_account_up",
            "gauge",
            "1 while an account may send at all (active, flood wait or spam-limited).",
            up,
        ),
    ] {
        family(out, name, kind, help);
        out.push_str(&samples);
    }
    Ok(())
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value, escaped as the format asks.
fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
