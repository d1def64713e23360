//! The text of `colloquy status`, `dialogs` and `dialog ID`, from a config
//! and a store: the CLI prints it when no host runs, the host's control
//! endpoint serves it when one does.

use std::fmt::Write as _;

use crate::config::{Config, Goal};
use crate::model::{Delivery, DialogId, DialogStatus, Direction};
use crate::store::{Store, StoreError};
use crate::variants::{self, Tally};

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
    let report = StatusReport::gather(config, store, live)?;
    Ok(match json {
        true => format!("{}\n", report.json()),
        false => report.text(config),
    })
}

/// What `status` shows, gathered once for its text and its JSON.
struct StatusReport<'a> {
    campaigns: Vec<CampaignReport<'a>>,
    accounts: Vec<AccountReport<'a>>,
    /// Dialogs by status and the do-not-contact count; none without a store.
    counts: Option<(Vec<(&'static str, usize)>, usize)>,
}

struct CampaignReport<'a> {
    campaign: &'a crate::config::Campaign,
    paused_itself: Option<crate::host::pause::Paused>,
    engine_error: Option<String>,
    /// None without a store.
    funnel: Option<Funnel>,
    variants: Vec<VariantReport>,
}

struct AccountReport<'a> {
    name: &'a str,
    record: Option<crate::model::AccountRecord>,
    connection: Option<&'static str>,
}

impl AccountReport<'_> {
    fn label(&self) -> &'static str {
        self.record.as_ref().map_or("active", |r| r.status.label())
    }

    /// Until when a flood wait or spam limit holds.
    fn until(&self) -> Option<String> {
        match &self.record.as_ref()?.status {
            crate::model::AccountStatus::FloodWait { until }
            | crate::model::AccountStatus::SpamLimited { until } => Some(until.to_rfc3339()),
            _ => None,
        }
    }

    fn sends_last_day(&self) -> usize {
        self.record.as_ref().map_or(0, |r| r.sends.len())
    }
}

impl<'a> StatusReport<'a> {
    fn gather(
        config: &'a Config,
        store: Option<&Store>,
        live: &Live,
    ) -> Result<StatusReport<'a>, StoreError> {
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
            let counted = funnels.iter().find(|f| f.campaign == c.name);
            campaigns.push(CampaignReport {
                campaign: c,
                paused_itself,
                engine_error: live
                    .engine_errors
                    .iter()
                    .find(|(e, _)| *e == c.engine)
                    .map(|(_, why)| why.clone()),
                funnel: store.map(|_| counted.map(|f| f.total.clone()).unwrap_or_default()),
                variants: counted.map_or_else(Vec::new, |f| variant_reports(c, f)),
            });
        }
        let mut accounts = Vec::new();
        for a in &config.file.accounts {
            accounts.push(AccountReport {
                name: &a.name,
                record: store.map(|s| s.account(&a.name)).transpose()?,
                connection: live
                    .links
                    .iter()
                    .find(|(n, _)| *n == a.name)
                    .map(|(_, l)| *l),
            });
        }
        let counts = match store {
            Some(s) => Some((s.dialog_counts()?, s.do_not_contact_list()?.len())),
            None => None,
        };
        Ok(StatusReport {
            campaigns,
            accounts,
            counts,
        })
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "campaigns": self.campaigns.iter().map(|s| {
                let c = s.campaign;
                let funnel = s.funnel.clone().unwrap_or_default();
                serde_json::json!({
                    "name": c.name,
                    "status": c.status.label(),
                    "paused_itself": s.paused_itself.as_ref().map(|p| serde_json::json!({"at": p.at.to_rfc3339(), "reason": p.reason})),
                    "engine": c.engine,
                    "engine_error": s.engine_error,
                    "accounts": c.accounts,
                    "audiences": c.audiences,
                    "funnel": &funnel,
                    "reply_rate": funnel.reply_rate(),
                    "allocation": (!c.variants.is_empty()).then(|| serde_json::json!({
                        "method": c.allocation.method,
                        "goal": c.allocation.goal.to_string(),
                        "floor": c.allocation.floor,
                        "probability_best_method": PROBABILITY_BEST_METHOD,
                    })),
                    "variants": s.variants,
                })
            }).collect::<Vec<_>>(),
            "accounts": self.accounts.iter().map(|a| serde_json::json!({
                "name": a.name,
                "status": a.label(),
                "until": a.until(),
                "sends_last_day": a.sends_last_day(),
                "connection": a.connection,
            })).collect::<Vec<_>>(),
            "dialogs": self.counts.as_ref().map(|(c, _)| c.iter().map(|(l, n)| ((*l).to_string(), *n)).collect::<std::collections::BTreeMap<_, _>>()),
            "do_not_contact": self.counts.as_ref().map(|(_, dnc)| dnc),
        })
    }

    fn text(&self, config: &Config) -> String {
        let mut out = String::new();
        for s in &self.campaigns {
            campaign_text(&mut out, s);
        }
        for a in &self.accounts {
            let until = a.until().map(|u| format!(" until {u}")).unwrap_or_default();
            let link = a
                .connection
                .map(|l| format!(", Telegram connection {l}"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "account {}: {}{until}, {} sends in the last day{link}",
                a.name,
                a.label(),
                a.sends_last_day()
            );
        }
        match &self.counts {
            Some((counts, dnc)) => {
                let parts: Vec<String> = counts.iter().map(|(l, n)| format!("{l} {n}")).collect();
                let _ = writeln!(out, "dialogs: {}", parts.join(", "));
                let _ = writeln!(out, "do-not-contact: {dnc} contacts");
            }
            None => {
                let _ = writeln!(
                    out,
                    "dialogs: none yet (no store in {})",
                    config.data_dir().display()
                );
            }
        }
        out
    }
}

/// A campaign's lines of `status`: what it is, why it opens nothing, its
/// funnel and its variants.
fn campaign_text(out: &mut String, s: &CampaignReport) {
    let c = s.campaign;
    let why = s
        .paused_itself
        .as_ref()
        .map(|p| format!(" (paused itself at {}: {})", p.at.to_rfc3339(), p.reason))
        .unwrap_or_default();
    let not_contacted = s.funnel.as_ref().map_or(0, |f| f.not_contacted);
    let _ = writeln!(
        out,
        "campaign {}: {}{why}, engine {}, accounts {}, audiences {} ({not_contacted} contacts not yet contacted)",
        c.name,
        c.status.label(),
        c.engine,
        c.accounts.join(", "),
        c.audiences.join(", "),
    );
    if let Some(why) = &s.engine_error {
        let _ = writeln!(out, "  opens no dialogs until its engine loads: {why}");
    }
    let Some(f) = &s.funnel else { return };
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
    for v in &s.variants {
        let _ = writeln!(out, "  {}", variant_line(v, &c.allocation.goal));
    }
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

    /// Delivered dialogs, and those that reached `goal`: what the bandit
    /// learns from.
    pub fn tally(&self, goal: &Goal) -> Tally {
        let successes = match goal {
            Goal::Reply => self.replied,
            Goal::Finish(label) => self.outcomes.get(label).copied().unwrap_or(0),
        };
        Tally {
            trials: self.delivered as u64,
            successes: successes.min(self.delivered) as u64,
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
    /// By variant, in a campaign with variants.
    pub by_variant: std::collections::BTreeMap<String, Funnel>,
    /// The variants of the latest [`RECENT_OPENINGS`] openings, oldest
    /// first: where traffic goes now.
    #[serde(skip)]
    pub recent_variants: std::collections::VecDeque<String>,
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

/// Each of `camp`'s declared variants' tally toward its goal, in the
/// order of `camp.variants`.
pub fn variant_tallies(
    store: &Store,
    camp: &crate::config::Campaign,
) -> Result<Vec<Tally>, StoreError> {
    let funnels = count_funnels(std::slice::from_ref(camp), store, false)?;
    let by_variant = funnels
        .iter()
        .find(|f| f.campaign == camp.name)
        .map(|f| &f.by_variant);
    Ok(camp
        .variants
        .iter()
        .map(|v| {
            by_variant
                .and_then(|b| b.get(&v.name))
                .map_or_else(Tally::default, |f| f.tally(&camp.allocation.goal))
        })
        .collect())
}

/// How a campaign's variants compare, for `status`, the console and
/// export: per variant its funnel, reply rate and goal rate with Wilson
/// 95% intervals, and the probability that it is best at the goal.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VariantReport {
    pub name: String,
    /// Still declared in the config.
    pub declared: bool,
    pub funnel: Funnel,
    pub reply_rate: Rate,
    /// The rate of the campaign's allocation goal.
    pub goal_rate: Rate,
    /// Each finish label's rate among delivered dialogs.
    pub outcome_rates: std::collections::BTreeMap<String, Rate>,
    pub probability_best: f64,
    /// Its share of the campaign's latest [`RECENT_OPENINGS`] openings.
    pub recent_share: f64,
}

/// How many of the latest openings `recent_share` looks at.
pub const RECENT_OPENINGS: usize = 200;

/// A share with its Wilson 95% interval.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Rate {
    pub rate: f64,
    pub low: f64,
    pub high: f64,
}

impl Rate {
    fn of(successes: u64, trials: u64) -> Rate {
        let (low, high) = variants::wilson(successes, trials);
        Rate {
            rate: if trials == 0 {
                0.0
            } else {
                successes as f64 / trials as f64
            },
            low,
            high,
        }
    }
}

/// The variants of `camp` (declared ones first, then any its dialogs still
/// run on), compared; empty for a campaign without variants.
pub fn variant_reports(camp: &crate::config::Campaign, f: &CampaignFunnel) -> Vec<VariantReport> {
    let mut names: Vec<&str> = camp.variants.iter().map(|v| v.name.as_str()).collect();
    names.extend(
        f.by_variant
            .keys()
            .map(String::as_str)
            .filter(|n| camp.variant(n).is_none()),
    );
    let goal = &camp.allocation.goal;
    let funnels: Vec<Funnel> = names
        .iter()
        .map(|n| f.by_variant.get(*n).cloned().unwrap_or_default())
        .collect();
    let tallies: Vec<Tally> = funnels.iter().map(|f| f.tally(goal)).collect();
    let best = variants::probability_best(&tallies);
    names
        .iter()
        .zip(funnels)
        .zip(tallies.iter().zip(best))
        .map(|((name, funnel), (t, best))| VariantReport {
            name: name.to_string(),
            declared: camp.variant(name).is_some(),
            reply_rate: Rate::of(funnel.replied as u64, funnel.delivered as u64),
            goal_rate: Rate::of(t.successes, t.trials),
            outcome_rates: funnel
                .outcomes
                .iter()
                .map(|(label, n)| (label.clone(), Rate::of(*n as u64, funnel.delivered as u64)))
                .collect(),
            probability_best: best,
            recent_share: share_of(&f.recent_variants, name),
            funnel,
        })
        .collect()
}

/// How `probability_best` is computed, as `status --json` names it.
pub const PROBABILITY_BEST_METHOD: &str =
    "Thompson: share of 20,000 joint draws from Beta(1 + successes, 1 + failures) posteriors in which the variant is best at the goal";

/// One variant in a line: `variant a: opened 120 (…), replied 30 of 118
/// delivered, reply rate 25.4% (95% CI 18.4–34.0%), finished:booked …,
/// goal reply 25.4% (…), probability best 81%`.
pub fn variant_line(v: &VariantReport, goal: &Goal) -> String {
    let pct = |r: &Rate| {
        format!(
            "{:.1}% (95% CI {:.1}–{:.1}%)",
            100.0 * r.rate,
            100.0 * r.low,
            100.0 * r.high
        )
    };
    let outcomes: String = v
        .outcome_rates
        .iter()
        .map(|(label, r)| format!(", finished:{label} {}", pct(r)))
        .collect();
    format!(
        "variant {}{}: opened {} ({:.0}% of the latest openings), replied {} of {} delivered, reply rate {}{outcomes}, goal {goal} {}, probability best {:.0}%",
        v.name,
        if v.declared { "" } else { " (no longer in the config)" },
        v.funnel.opened,
        100.0 * v.recent_share,
        v.funnel.replied,
        v.funnel.delivered,
        pct(&v.reply_rate),
        pct(&v.goal_rate),
        100.0 * v.probability_best
    )
}

fn share_of(recent: &std::collections::VecDeque<String>, name: &str) -> f64 {
    if recent.is_empty() {
        return 0.0;
    }
    recent.iter().filter(|v| *v == name).count() as f64 / recent.len() as f64
}

/// Every campaign's funnel, in one pass over the dialogs.
pub fn funnels(config: &Config, store: &Store) -> Result<Vec<CampaignFunnel>, StoreError> {
    count_funnels(&config.file.campaigns, store, true)
}

/// The funnels of `campaigns`; `not_contacted` counts their audiences'
/// uncontacted contacts too (a pass over each audience).
fn count_funnels(
    campaigns: &[crate::config::Campaign],
    store: &Store,
    not_contacted: bool,
) -> Result<Vec<CampaignFunnel>, StoreError> {
    let pending: std::collections::HashSet<DialogId> = store
        .pending_outbound()?
        .into_iter()
        .filter(|m| m.kind == Some(crate::model::MessageKind::Opening))
        .map(|m| m.dialog)
        .collect();
    let mut out: Vec<CampaignFunnel> = campaigns
        .iter()
        .map(|c| CampaignFunnel {
            campaign: c.name.clone(),
            total: Funnel {
                not_contacted: match not_contacted {
                    true => c.audiences.iter().map(|a| store.uncontacted_count(a)).sum(),
                    false => 0,
                },
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
        if let Some(v) = &d.variant {
            f.by_variant
                .entry(v.name.clone())
                .or_default()
                .count(&d, opening_pending);
            // Dialogs come in the order they were opened.
            if f.recent_variants.len() == RECENT_OPENINGS {
                f.recent_variants.pop_front();
            }
            f.recent_variants.push_back(v.name.clone());
        }
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
