//! `colloquy export`: a campaign's dialogs, their messages, its variants
//! compared, or the do-not-contact list, as CSV or JSON lines, written as
//! they are read from the store (one dialog's messages in memory at a
//! time).

use std::io::Write;

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::config::Config;
use crate::model::{Delivery, Dialog, DialogStatus, Direction, DoNotContact};
use crate::store::{Store, StoreError};

/// What to export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum What {
    Dialogs,
    Messages,
    /// Each campaign's variants side by side: funnel, rates with 95%
    /// intervals, probability best.
    Variants,
    Dnc,
}

/// How each record is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Csv,
    Jsonl,
}

/// One export's choices.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Export {
    pub campaign: Option<String>,
    pub what: What,
    pub format: Format,
    /// Only dialogs active since, and messages written since.
    pub since: Option<Timestamp>,
}

#[derive(Serialize)]
struct DialogRow<'a> {
    dialog: u64,
    campaign: &'a str,
    account: &'a str,
    contact: String,
    status: &'a str,
    outcome: &'a str,
    started_at: String,
    last_activity: String,
    follow_ups: u32,
    variant: &'a str,
}

#[derive(Serialize)]
struct MessageRow<'a> {
    dialog: u64,
    seq: u64,
    campaign: &'a str,
    account: &'a str,
    contact: &'a str,
    variant: &'a str,
    direction: &'a str,
    kind: &'a str,
    at: String,
    delivery: &'a str,
    text: &'a str,
}

#[derive(Serialize)]
struct VariantRow<'a> {
    campaign: &'a str,
    variant: &'a str,
    declared: bool,
    opened: usize,
    delivered: usize,
    replied: usize,
    reply_rate: f64,
    reply_rate_low: f64,
    reply_rate_high: f64,
    goal: String,
    goal_rate: f64,
    goal_rate_low: f64,
    goal_rate_high: f64,
    /// `label=rate (low–high)` for each finish label, `; `-separated.
    outcome_rates: String,
    probability_best: f64,
    latest_openings_share: f64,
}

#[derive(Serialize)]
struct DncRow {
    contact: String,
    why: String,
}

/// Writes records one at a time, as CSV (a header first) or JSON lines.
enum Sink<'w> {
    Csv(Box<csv::Writer<&'w mut dyn Write>>),
    Jsonl(&'w mut dyn Write),
}

impl Sink<'_> {
    fn write<T: Serialize>(&mut self, row: &T) -> std::io::Result<()> {
        match self {
            Sink::Csv(w) => w.serialize(row).map_err(std::io::Error::other),
            Sink::Jsonl(out) => {
                serde_json::to_writer(&mut **out, row)?;
                out.write_all(b"\n")
            }
        }
    }

    fn finish(self) -> std::io::Result<()> {
        match self {
            Sink::Csv(mut w) => w.flush(),
            Sink::Jsonl(out) => out.flush(),
        }
    }
}

fn io(e: std::io::Error) -> StoreError {
    StoreError::Storage(format!("cannot write the export: {e}"))
}

/// Streams the export to `out`; returns how many records it wrote.
pub fn write(
    config: &Config,
    store: &Store,
    export: &Export,
    out: &mut dyn Write,
) -> Result<u64, StoreError> {
    let mut sink = match export.format {
        Format::Csv => Sink::Csv(Box::new(csv::Writer::from_writer(out))),
        Format::Jsonl => Sink::Jsonl(out),
    };
    let n = match export.what {
        What::Variants => variants(config, store, export, &mut sink)?,
        _ => records(store, export, &mut sink)?,
    };
    sink.finish().map_err(io)?;
    Ok(n)
}

/// One row per variant of each (or the chosen) campaign.
fn variants(
    config: &Config,
    store: &Store,
    export: &Export,
    sink: &mut Sink<'_>,
) -> Result<u64, StoreError> {
    let mut n = 0;
    for f in crate::report::funnels(config, store)? {
        let Some(camp) = config.campaign(&f.campaign) else {
            continue;
        };
        if export.campaign.as_deref().is_some_and(|c| c != camp.name) {
            continue;
        }
        for v in crate::report::variant_reports(camp, &f) {
            let row = VariantRow {
                campaign: &camp.name,
                variant: &v.name,
                declared: v.declared,
                opened: v.funnel.opened,
                delivered: v.funnel.delivered,
                replied: v.funnel.replied,
                reply_rate: v.reply_rate.rate,
                reply_rate_low: v.reply_rate.low,
                reply_rate_high: v.reply_rate.high,
                goal: camp.allocation.goal.to_string(),
                goal_rate: v.goal_rate.rate,
                goal_rate_low: v.goal_rate.low,
                goal_rate_high: v.goal_rate.high,
                outcome_rates: v
                    .outcome_rates
                    .iter()
                    .map(|(label, r)| format!("{label}={:.4} ({:.4}–{:.4})", r.rate, r.low, r.high))
                    .collect::<Vec<_>>()
                    .join("; "),
                probability_best: v.probability_best,
                latest_openings_share: v.recent_share,
            };
            sink.write(&row).map_err(io)?;
            n += 1;
        }
    }
    Ok(n)
}

fn records(store: &Store, export: &Export, sink: &mut Sink<'_>) -> Result<u64, StoreError> {
    let mut n = 0;
    let since = export.since.unwrap_or(Timestamp(i64::MIN));
    if export.what == What::Dnc {
        for (id, why) in store.do_not_contact_list()? {
            let contact = store
                .contact(id)?
                .map_or_else(|| id.to_string(), |c| c.identity.to_string());
            let why = match why {
                DoNotContact::OptedOut => "opted out".to_string(),
                DoNotContact::Unreachable(r) => format!("unreachable: {r}"),
            };
            sink.write(&DncRow { contact, why }).map_err(io)?;
            n += 1;
        }
        return Ok(n);
    }
    let admits = |d: &Dialog| {
        export.campaign.as_deref().is_none_or(|c| c == d.campaign) && d.last_activity() >= since
    };
    for d in store.all_dialogs() {
        let d = d?;
        if !admits(&d) {
            continue;
        }
        let contact = store
            .contact(d.contact)?
            .map_or_else(|| d.contact.to_string(), |c| c.identity.to_string());
        let variant = d.variant.as_ref().map_or("", |v| v.name.as_str());
        if export.what == What::Dialogs {
            let outcome = match &d.status {
                DialogStatus::Finished { outcome } => outcome.as_str(),
                _ => "",
            };
            let row = DialogRow {
                dialog: d.id,
                campaign: &d.campaign,
                account: &d.account,
                contact,
                status: d.status.label(),
                outcome,
                started_at: d.started_at.to_rfc3339(),
                last_activity: d.last_activity().to_rfc3339(),
                follow_ups: d.follow_ups_sent,
                variant,
            };
            sink.write(&row).map_err(io)?;
            n += 1;
            continue;
        }
        for m in store.messages(d.id)? {
            if m.at < since {
                continue;
            }
            let row = MessageRow {
                dialog: d.id,
                seq: m.seq,
                campaign: &d.campaign,
                account: &d.account,
                contact: &contact,
                variant,
                direction: match m.direction {
                    Direction::In => "in",
                    Direction::Out => "out",
                },
                kind: m.kind.map_or("", |k| k.label()),
                at: m.at.to_rfc3339(),
                delivery: match &m.delivery {
                    Some(Delivery::Pending) => "pending",
                    Some(Delivery::Sent) => "sent",
                    Some(Delivery::Cancelled { .. }) => "cancelled",
                    None => "",
                },
                text: &m.text,
            };
            sink.write(&row).map_err(io)?;
            n += 1;
        }
    }
    Ok(n)
}

/// `--since`: an RFC 3339 time (`2026-12-01T00:00:00Z`), a date
/// (`2026-12-01`), or a duration back from now (`7d`, `12h`).
pub fn parse_since(text: &str, now: Timestamp) -> Result<Timestamp, String> {
    let text = text.trim();
    if let Ok(d) = humantime::parse_duration(text) {
        return Ok(now.saturating_sub(d));
    }
    let with_time = if text.len() == 10 {
        format!("{text}T00:00:00Z")
    } else {
        text.to_string()
    };
    chrono::DateTime::parse_from_rfc3339(&with_time)
        .map(|t| Timestamp(t.timestamp_millis()))
        .map_err(|_| {
            format!("\"{text}\" is not a time (2026-12-01, 2026-12-01T08:00:00Z) or a duration back from now (7d, 12h)")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_reads_dates_times_and_durations() {
        let now = Timestamp(1_800_000_000_000);
        assert_eq!(
            parse_since("1h", now),
            Ok(Timestamp(1_800_000_000_000 - 3_600_000))
        );
        assert_eq!(
            parse_since("2026-12-01", now).unwrap(),
            parse_since("2026-12-01T00:00:00Z", now).unwrap()
        );
        assert!(parse_since("yesterday", now)
            .unwrap_err()
            .contains("is not a time"));
    }
}
