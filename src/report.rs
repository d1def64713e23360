//! The text of `colloquy status`, `dialogs` and `dialog ID`, from a config
//! and a store: the CLI prints it when no host runs, the host's control
//! endpoint serves it when one does.

use std::fmt::Write as _;

use crate::config::Config;
use crate::model::{Delivery, DialogId, DialogStatus, Direction};
use crate::store::{Store, StoreError};

/// Campaigns, accounts and dialog counts by status.
/// `links` are the accounts' Telegram connections, when a host runs them.
pub fn status(
    config: &Config,
    store: Option<&Store>,
    links: &[(String, &'static str)],
) -> Result<String, StoreError> {
    let mut out = String::new();
    for c in &config.file.campaigns {
        let left: usize = match store {
            Some(s) => c.audiences.iter().map(|a| s.uncontacted_count(a)).sum(),
            None => 0,
        };
        let why = match store {
            Some(s) if c.status != crate::config::CampaignStatus::Active => {
                crate::host::pause::reason(s, &c.name)?
                    .map(|p| format!(" (paused itself at {}: {})", p.at.to_rfc3339(), p.reason))
                    .unwrap_or_default()
            }
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "campaign {}: {}{why}, engine {}, accounts {}, audiences {} ({left} contacts not yet contacted)",
            c.name,
            c.status.label(),
            c.engine,
            c.accounts.join(", "),
            c.audiences.join(", ")
        );
    }
    for a in &config.file.accounts {
        let (state, sent) = match store {
            Some(s) => {
                let r = s.account(&a.name)?;
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
        let link = links
            .iter()
            .find(|(n, _)| *n == a.name)
            .map(|(_, l)| format!(", Telegram connection {l}"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "account {}: {state}, {sent} sends in the last day{link}",
            a.name
        );
    }
    match store {
        Some(s) => {
            let parts: Vec<String> = s
                .dialog_counts()?
                .iter()
                .map(|(l, n)| format!("{l} {n}"))
                .collect();
            let _ = writeln!(out, "dialogs: {}", parts.join(", "));
        }
        None => {
            let _ = writeln!(
                out,
                "dialogs: none yet (no store in {})",
                config.data_dir().display()
            );
        }
    }
    Ok(out)
}

fn status_text(s: &DialogStatus) -> String {
    match s {
        DialogStatus::Finished { outcome } => format!("finished:{outcome}"),
        DialogStatus::Error { reason } => format!("error:{reason}"),
        other => other.label().to_string(),
    }
}

/// One line per dialog: id, campaign, account, contact, status, last activity.
pub fn dialogs(
    store: &Store,
    campaign: Option<&str>,
    status: Option<&str>,
) -> Result<String, StoreError> {
    let mut out = String::new();
    for d in store.all_dialogs() {
        let d = d?;
        if campaign.is_some_and(|c| c != d.campaign)
            || status.is_some_and(|s| s != d.status.label())
        {
            continue;
        }
        let who = store
            .contact(d.contact)?
            .map_or_else(|| d.contact.to_string(), |c| c.identity.to_string());
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

    fn count(&mut self, d: &crate::model::Dialog, opening_pending: bool) {
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
    for d in store.all_dialogs() {
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
