//! The text of `colloquy status`, `dialogs` and `dialog ID`, from a config
//! and a store: the CLI prints it when no host runs, the host's control
//! endpoint serves it when one does.

use std::fmt::Write as _;

use crate::config::Config;
use crate::model::{Delivery, DialogId, DialogStatus, Direction};
use crate::store::{Store, StoreError};

/// What only a running host knows for `status`.
#[derive(Default)]
pub struct Live {
    /// The accounts' Telegram connections.
    pub links: Vec<(String, &'static str)>,
    /// Engines that do not load, with why.
    pub engine_errors: Vec<(String, String)>,
}

/// Campaigns (with their funnels, automatic pauses and engine load
/// errors), accounts, dialog counts by status and the do-not-contact list.
/// `json` gives one JSON object instead of text.
pub fn status(
    config: &Config,
    store: Option<&Store>,
    live: &Live,
    json: bool,
) -> Result<String, StoreError> {
    let links = &live.links;
    let engine_error = |engine: &str| {
        live.engine_errors
            .iter()
            .find(|(e, _)| e == engine)
            .map(|(_, why)| why.clone())
    };
    let funnels = match store {
        Some(s) => funnels(config, s)?,
        None => Vec::new(),
    };
    let mut campaigns = Vec::new();
    for c in &config.file.campaigns {
        let paused_itself = match store {
            Some(s) if c.status != crate::config::CampaignStatus::Active => {
                crate::host::pause::reason(s, &c.name)?
            }
            _ => None,
        };
        let funnel = funnels
            .iter()
            .find(|f| f.campaign == c.name)
            .map(|f| f.total.clone())
            .unwrap_or_default();
        campaigns.push((c, paused_itself, funnel));
    }
    let mut accounts = Vec::new();
    for a in &config.file.accounts {
        let record = match store {
            Some(s) => Some(s.account(&a.name)?),
            None => None,
        };
        let link = links.iter().find(|(n, _)| *n == a.name).map(|(_, l)| *l);
        accounts.push((a, record, link));
    }
    let counts = match store {
        Some(s) => Some(s.dialog_counts()?),
        None => None,
    };
    let dnc = match store {
        Some(s) => Some(s.do_not_contact_list()?.len()),
        None => None,
    };
    if json {
        let value = serde_json::json!({
            "campaigns": campaigns.iter().map(|(c, paused, f)| serde_json::json!({
                "name": c.name,
                "status": c.status.label(),
                "paused_itself": paused.as_ref().map(|p| serde_json::json!({"at": p.at.to_rfc3339(), "reason": p.reason})),
                "engine": c.engine,
                "engine_error": engine_error(&c.engine),
                "accounts": c.accounts,
                "audiences": c.audiences,
                "funnel": f,
                "reply_rate": f.reply_rate(),
            })).collect::<Vec<_>>(),
            "accounts": accounts.iter().map(|(a, r, link)| serde_json::json!({
                "name": a.name,
                "status": r.as_ref().map_or("active", |r| r.status.label()),
                "until": r.as_ref().and_then(|r| match &r.status {
                    crate::model::AccountStatus::FloodWait { until }
                    | crate::model::AccountStatus::SpamLimited { until } => Some(until.to_rfc3339()),
                    _ => None,
                }),
                "sends_last_day": r.as_ref().map_or(0, |r| r.sends.len()),
                "connection": link,
            })).collect::<Vec<_>>(),
            "dialogs": counts.as_ref().map(|c| c.iter().map(|(l, n)| ((*l).to_string(), *n)).collect::<std::collections::BTreeMap<_, _>>()),
            "do_not_contact": dnc,
        });
        return Ok(format!("{value}\n"));
    }
    let mut out = String::new();
    for (c, paused, f) in &campaigns {
        let why = paused
            .as_ref()
            .map(|p| format!(" (paused itself at {}: {})", p.at.to_rfc3339(), p.reason))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "campaign {}: {}{why}, engine {}, accounts {}, audiences {} ({} contacts not yet contacted)",
            c.name,
            c.status.label(),
            c.engine,
            c.accounts.join(", "),
            c.audiences.join(", "),
            f.not_contacted
        );
        if let Some(why) = engine_error(&c.engine) {
            let _ = writeln!(out, "  opens no dialogs until its engine loads: {why}");
        }
        if store.is_some() {
            let outcomes: String = f
                .outcomes
                .iter()
                .map(|(label, n)| format!(", finished:{label} {n}"))
                .collect();
            let _ = writeln!(
                out,
                "  funnel: opened {}, delivered {}, replied {} ({:.1}%){outcomes}, handoff {}, dead {}, opted out {}, error {}",
                f.opened,
                f.delivered,
                f.replied,
                100.0 * f.reply_rate(),
                f.handoff,
                f.dead,
                f.opted_out,
                f.error
            );
        }
    }
    for (a, record, link) in &accounts {
        let (state, sent) = match record {
            Some(r) => {
                let until = match &r.status {
                    crate::model::AccountStatus::FloodWait { until }
                    | crate::model::AccountStatus::SpamLimited { until } => {
                        format!(" until {}", until.to_rfc3339())
                    }
                    _ => String::new(),
                };
                (format!("{}{until}", r.status.label()), r.sends.len())
            }
            None => ("active".to_string(), 0),
        };
        let link = link
            .map(|l| format!(", Telegram connection {l}"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "account {}: {state}, {sent} sends in the last day{link}",
            a.name
        );
    }
    match (counts, dnc) {
        (Some(counts), Some(dnc)) => {
            let parts: Vec<String> = counts.iter().map(|(l, n)| format!("{l} {n}")).collect();
            let _ = writeln!(out, "dialogs: {}", parts.join(", "));
            let _ = writeln!(out, "do-not-contact: {dnc} contacts");
        }
        _ => {
            let _ = writeln!(
                out,
                "dialogs: none yet (no store in {})",
                config.data_dir().display()
            );
        }
    }
    Ok(out)
}

/// A status as `dialogs` shows it: `finished:booked`, `error:…`.
pub fn status_text(s: &DialogStatus) -> String {
    match s {
        DialogStatus::Finished { outcome } => format!("finished:{outcome}"),
        DialogStatus::Error { reason } => format!("error:{reason}"),
        other => other.label().to_string(),
    }
}

/// The first line of `dialogs`' text.
pub const DIALOGS_HEADER: &str = "id\tcampaign\taccount\tcontact\tstatus\tlast_activity\n";

/// Which dialogs `dialogs` lists.
#[derive(Debug, Default, Clone, Copy)]
pub struct DialogFilter<'a> {
    pub campaign: Option<&'a str>,
    /// A status label, or `finished:OUTCOME`.
    pub status: Option<&'a str>,
    pub outcome: Option<&'a str>,
}

impl DialogFilter<'_> {
    fn admits(&self, d: &crate::model::Dialog) -> bool {
        let (status, outcome) = match self.status.and_then(|s| s.split_once(':')) {
            Some((s, o)) => (Some(s), Some(o)),
            None => (self.status, self.outcome),
        };
        let finished_as = match &d.status {
            DialogStatus::Finished { outcome } => Some(outcome.as_str()),
            _ => None,
        };
        self.campaign.is_none_or(|c| c == d.campaign)
            && status.is_none_or(|s| s == d.status.label())
            && outcome.is_none_or(|o| finished_as == Some(o))
    }
}

/// The dialogs the filter admits, oldest first: a header row, then one
/// tab-separated line each (id, campaign, account, contact, status, last
/// activity), or JSON lines with `json`.
pub fn dialogs(store: &Store, filter: &DialogFilter<'_>, json: bool) -> Result<String, StoreError> {
    let mut out = String::new();
    if !json {
        out.push_str(DIALOGS_HEADER);
    }
    for d in store.all_dialogs() {
        let d = d?;
        if !filter.admits(&d) {
            continue;
        }
        let who = store
            .contact(d.contact)?
            .map_or_else(|| d.contact.to_string(), |c| c.identity.to_string());
        if json {
            let outcome = match &d.status {
                DialogStatus::Finished { outcome } => Some(outcome.as_str()),
                _ => None,
            };
            let line = serde_json::json!({
                "id": d.id,
                "campaign": d.campaign,
                "account": d.account,
                "contact": who,
                "status": d.status.label(),
                "outcome": outcome,
                "started_at": d.started_at.to_rfc3339(),
                "last_activity": d.last_activity().to_rfc3339(),
            });
            let _ = writeln!(out, "{line}");
        } else {
            let _ = writeln!(
                out,
                "{}\t{}\t{}\t{}\t{}\t{}",
                d.id,
                d.campaign,
                d.account,
                who,
                status_text(&d.status),
                d.last_activity().to_rfc3339()
            );
        }
    }
    Ok(out)
}

/// A dialog's transcript, or `None` if there is no such dialog.
pub fn dialog(store: &Store, id: DialogId) -> Result<Option<String>, StoreError> {
    let Some(d) = store.dialog(id)? else {
        return Ok(None);
    };
    let who = store
        .contact(d.contact)?
        .map_or_else(|| d.contact.to_string(), |c| c.identity.to_string());
    let mut out = format!(
        "dialog {} · campaign {} · account {} · contact {} · {}\n",
        d.id,
        d.campaign,
        d.account,
        who,
        status_text(&d.status)
    );
    for m in store.messages(id)? {
        let arrow = match m.direction {
            Direction::In => "<".to_string(),
            Direction::Out => format!(
                ">{}",
                m.kind
                    .map(|k| format!(" {}", k.label()))
                    .unwrap_or_default()
            ),
        };
        let note = match &m.delivery {
            Some(Delivery::Pending) => " (pending)".to_string(),
            Some(Delivery::Cancelled { reason }) => format!(" (cancelled: {reason})"),
            _ => String::new(),
        };
        let _ = writeln!(out, "{} {arrow}{note} {}", m.at.to_rfc3339(), m.text);
    }
    Ok(Some(out))
}

/// Backs the store up into `dest` and says what was written.
pub fn backup(store: &Store, dest: &std::path::Path) -> Result<String, StoreError> {
    let done = store.backup(dest)?;
    Ok(format!(
        "backed up the store as of {} to {} ({:.1} MB, {} contacts, {} contacted; read back and checked); restore it with `colloquy restore {}`\n",
        done.seen.at,
        dest.display(),
        done.bytes as f64 / 1e6,
        done.seen.mark.identities,
        done.seen.mark.claims,
        dest.display()
    ))
}

/// What a campaign's dialogs came to, counted from the store.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize)]
pub struct Funnel {
    /// Contacts in the campaign's audiences not yet contacted.
    pub not_contacted: usize,
    pub opened: usize,
    /// Dialogs whose opening left (confirmed, not pending or failed).
    pub delivered: usize,
    /// Dialogs with at least one incoming message.
    pub replied: usize,
    pub active: usize,
    pub handoff: usize,
    pub dead: usize,
    pub opted_out: usize,
    pub blocked: usize,
    pub error: usize,
    /// Finished dialogs by outcome label.
    pub outcomes: std::collections::BTreeMap<String, usize>,
}

impl Funnel {
    /// Replied over delivered, 0 with nothing delivered.
    pub fn reply_rate(&self) -> f64 {
        if self.delivered == 0 {
            0.0
        } else {
            self.replied as f64 / self.delivered as f64
        }
    }

    fn count(&mut self, d: &crate::model::DialogSummary, opening_pending: bool) {
        self.opened += 1;
        let unsent = matches!(d.status, DialogStatus::Error { .. }) && d.last_inbound_at.is_none();
        if !opening_pending && !unsent {
            self.delivered += 1;
        }
        if d.last_inbound_at.is_some() {
            self.replied += 1;
        }
        match &d.status {
            DialogStatus::Active => self.active += 1,
            DialogStatus::Handoff => self.handoff += 1,
            DialogStatus::Dead => self.dead += 1,
            DialogStatus::OptedOut => self.opted_out += 1,
            DialogStatus::Blocked => self.blocked += 1,
            DialogStatus::Error { .. } => self.error += 1,
            DialogStatus::Finished { outcome } => {
                *self.outcomes.entry(outcome.clone()).or_default() += 1
            }
        }
    }
}

/// A campaign's funnel, whole and split by account and by day (UTC).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct CampaignFunnel {
    pub campaign: String,
    pub total: Funnel,
    pub by_account: std::collections::BTreeMap<String, Funnel>,
    /// Per day: openings, replied dialogs (by the day of their latest
    /// reply) and dialogs that ended.
    pub by_day: std::collections::BTreeMap<String, Day>,
}

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Day {
    pub openings: usize,
    pub replies: usize,
    pub outcomes: usize,
}

/// Every campaign's funnel, in one pass over the dialogs.
pub fn funnels(config: &Config, store: &Store) -> Result<Vec<CampaignFunnel>, StoreError> {
    let pending: std::collections::HashSet<DialogId> = store
        .pending_outbound()?
        .into_iter()
        .filter(|m| m.kind == Some(crate::model::MessageKind::Opening))
        .map(|m| m.dialog)
        .collect();
    let mut out: Vec<CampaignFunnel> = config
        .file
        .campaigns
        .iter()
        .map(|c| CampaignFunnel {
            campaign: c.name.clone(),
            total: Funnel {
                not_contacted: c.audiences.iter().map(|a| store.uncontacted_count(a)).sum(),
                ..Funnel::default()
            },
            ..CampaignFunnel::default()
        })
        .collect();
    for d in store.dialog_summaries(false) {
        let d = d?;
        let Some(f) = out.iter_mut().find(|f| f.campaign == d.campaign) else {
            continue;
        };
        let opening_pending = pending.contains(&d.id);
        f.total.count(&d, opening_pending);
        f.by_account
            .entry(d.account.clone())
            .or_default()
            .count(&d, opening_pending);
        let day = |t: crate::clock::Timestamp| t.to_rfc3339().chars().take(10).collect::<String>();
        f.by_day.entry(day(d.started_at)).or_default().openings += 1;
        if let Some(t) = d.last_inbound_at {
            f.by_day.entry(day(t)).or_default().replies += 1;
        }
        if !d.status.is_live() && d.status != DialogStatus::Handoff {
            f.by_day.entry(day(d.last_activity())).or_default().outcomes += 1;
        }
    }
    Ok(out)
}
