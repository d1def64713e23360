//! The console's pages and actions. Each handler reads what it shows from
//! the store and the host, renders HTML with [`layout`], and escapes every
//! text that came from outside with [`esc`].

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Form, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::{esc, url, Console, Session};
use crate::config::CampaignStatus;
use crate::host::Host;
use crate::model::{
    AccountStatus, Contact, Delivery, Dialog, DialogStatus, DialogSummary, Direction, DoNotContact,
    MessageKind,
};
use crate::report::{self, Funnel};

pub const STYLE: &str = include_str!("style.css");

/// Dialogs per page of the dialog list.
const PER_PAGE: usize = 50;

type Page = Result<Html<String>, Response>;

fn failed(e: impl std::fmt::Display) -> Response {
    (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
}

/// For the head of a page that shows what it has while the rest is read.
const REFRESH: &str = "<meta http-equiv=\"refresh\" content=\"2\">";

fn layout(title: &str, session: &Session, body: &str) -> Html<String> {
    layout_with_head(title, session, "", body)
}

/// [`layout`] with `head` added to the page's head (a refresh, say).
fn layout_with_head(title: &str, session: &Session, head: &str, body: &str) -> Html<String> {
    let nav = [
        ("/", "Campaigns"),
        ("/accounts", "Accounts"),
        ("/dialogs", "Dialogs"),
        ("/inbox", "Inbox"),
        ("/dnc", "Do not contact"),
        ("/alerts", "Alerts"),
    ]
    .iter()
    .map(|(href, name)| format!("<a href=\"{href}\">{name}</a>"))
    .collect::<Vec<_>>()
    .join("");
    Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{} · colloquy</title>\
         <link rel=\"stylesheet\" href=\"/style.css\">{head}</head><body>\
         <header><span class=\"brand\">colloquy</span><nav>{nav}</nav>\
         <form method=\"post\" action=\"/logout\" class=\"logout\">{}<button>Log out</button></form></header>\
         <main><h1>{}</h1>{body}</main></body></html>",
        esc(title),
        csrf_field(session),
        esc(title)
    ))
}

fn csrf_field(session: &Session) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(&session.csrf)
    )
}

pub fn login_html(error: Option<&str>) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Log in · colloquy</title>\
         <link rel=\"stylesheet\" href=\"/style.css\"></head><body class=\"login\"><main>\
         <h1>colloquy</h1>{}<form method=\"post\" action=\"/login\">\
         <label>Console token <input type=\"password\" name=\"token\" autofocus></label>\
         <button>Log in</button></form><p class=\"hint\">The token is in <code>data_dir/console.token</code>.</p>\
         </main></body></html>",
        error.map(|e| format!("<p class=\"error\">{}</p>", esc(e))).unwrap_or_default()
    )
}

pub async fn login_page() -> Html<String> {
    Html(login_html(None))
}

// ------------------------------------------------------------- campaigns

pub async fn campaigns(State(c): State<Console>, headers: HeaderMap) -> Page {
    let session = c.require(&headers)?;
    let host = &c.host;
    let config = host.config();
    let counted = c.funnels().await;
    let mut body = match &counted {
        Some((_, at)) => format!(
            "<p class=\"meta\">Counted {} s ago; counted again at most every {} s while this page is open.</p>",
            at.elapsed().as_secs(),
            super::FUNNEL_FRESH.as_secs()
        ),
        None => "<p class=\"meta\">Counting the funnels; this page shows them in a moment.</p>".into(),
    };
    let funnels = counted
        .as_ref()
        .map(|(f, _)| f.as_slice())
        .unwrap_or_default();
    let none = report::CampaignFunnel::default();
    for campaign in &config.file.campaigns {
        let f = funnels
            .iter()
            .find(|f| f.campaign == campaign.name)
            .unwrap_or(&none);
        let paused = campaign.status != CampaignStatus::Active;
        let why = crate::host::pause::reason(&host.store, &campaign.name)
            .map_err(failed)?
            .filter(|_| paused)
            .map(|p| {
                format!(
                    "<p class=\"warn\">Paused itself at {}: {}</p>",
                    p.at.to_rfc3339(),
                    esc(&p.reason)
                )
            })
            .unwrap_or_default();
        let load = host
            .engines
            .load_error(&campaign.engine)
            .map(|e| format!("<p class=\"error\">{}</p>", esc(&e.to_string())))
            .unwrap_or_default();
        let (action, label) = if paused {
            ("active", "Resume")
        } else {
            ("paused", "Pause")
        };
        let _ = write!(
            body,
            "<section class=\"campaign\" id=\"campaign-{name_id}\"><h2>{name} <span class=\"status {status}\">{status}</span></h2>\
             <form method=\"post\" action=\"/campaigns/{name_url}/status\">{csrf}<input type=\"hidden\" name=\"status\" value=\"{action}\"><button>{label}</button></form>\
             {why}{load}<p class=\"meta\">engine {engine} · accounts {accounts} · audiences {audiences}</p>\
             {funnel}{variants}<h3>By account</h3>{accounts_table}<h3>By day</h3>{chart}</section>",
            name_id = esc(&campaign.name),
            name = esc(&campaign.name),
            name_url = url(&campaign.name),
            status = campaign.status.label(),
            csrf = csrf_field(&session),
            engine = esc(&campaign.engine),
            accounts = esc(&campaign.accounts.join(", ")),
            audiences = esc(&campaign.audiences.join(", ")),
            funnel = counted.as_ref().map(|_| funnel_table(&f.total)).unwrap_or_default(),
            variants = by_variant(campaign, f),
            accounts_table = by_account(&f.by_account),
            chart = day_chart(&f.by_day),
        );
    }
    if config.file.campaigns.is_empty() {
        body.push_str("<p>No campaigns are declared in config.toml.</p>");
    }
    // Until a count as fresh as promised is in, the page refreshes itself.
    let refresh = match counted {
        Some((_, at)) if at.elapsed() <= super::FUNNEL_FRESH => "",
        _ => REFRESH,
    };
    Ok(layout_with_head("Campaigns", &session, refresh, &body))
}

fn funnel_table(f: &Funnel) -> String {
    let mut cells = vec![
        ("not contacted", f.not_contacted.to_string()),
        ("opened", f.opened.to_string()),
        ("delivered", f.delivered.to_string()),
        ("replied", f.replied.to_string()),
        ("reply rate", format!("{:.1}%", 100.0 * f.reply_rate())),
        ("active", f.active.to_string()),
        ("handoff", f.handoff.to_string()),
        ("dead", f.dead.to_string()),
        ("opted out", f.opted_out.to_string()),
        ("blocked", f.blocked.to_string()),
        ("error", f.error.to_string()),
    ];
    for (label, n) in &f.outcomes {
        cells.push((label.as_str(), n.to_string()));
    }
    let mut out = String::from("<dl class=\"funnel\">");
    for (label, value) in cells {
        let _ = write!(
            out,
            "<div data-metric=\"{}\"><dt>{}</dt><dd>{}</dd></div>",
            esc(label),
            esc(label),
            value
        );
    }
    out.push_str("</dl>");
    out
}

/// The variants side by side: their funnels, rates with 95% intervals,
/// the chance each is best, and where new dialogs go now.
fn by_variant(campaign: &crate::config::Campaign, f: &report::CampaignFunnel) -> String {
    let reports = report::variant_reports(campaign, f);
    if reports.is_empty() {
        return String::new();
    }
    let a = &campaign.allocation;
    let method = match a.method {
        crate::config::AllocationMethod::Fixed => "fixed weights".to_string(),
        crate::config::AllocationMethod::Bandit => format!(
            "bandit on {} (Thompson sampling, each variant keeps at least {:.0}% of new dialogs)",
            a.goal,
            100.0 * a.floor
        ),
    };
    let pct = |r: &report::Rate| {
        format!(
            "{:.1}% <span class=\"meta\">({:.1}–{:.1}%)</span>",
            100.0 * r.rate,
            100.0 * r.low,
            100.0 * r.high
        )
    };
    let mut out = format!(
        "<h3>By variant</h3><p class=\"meta\">Allocation: {}. Rates with 95% Wilson intervals; “best” is the probability that the variant has the highest {} rate ({}).</p>\
         <table class=\"variants\"><tr><th>variant</th><th>latest {} openings</th><th>opened</th><th>delivered</th><th>replied</th><th>reply rate</th><th>outcomes</th><th>goal rate</th><th>best</th></tr>",
        esc(&method),
        esc(&a.goal.to_string()),
        esc(report::PROBABILITY_BEST_METHOD),
        report::RECENT_OPENINGS
    );
    for v in &reports {
        let gone = if v.declared {
            ""
        } else {
            " <span class=\"meta\">(no longer in config.toml)</span>"
        };
        let _ = write!(
            out,
            "<tr data-variant=\"{name}\"><td>{name}{gone}</td><td><span class=\"bar\" style=\"width:{share_px}px\"></span> {share:.0}%</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{best:.0}%</td></tr>",
            v.funnel.opened,
            v.funnel.delivered,
            v.funnel.replied,
            pct(&v.reply_rate),
            v.outcome_rates
                .iter()
                .map(|(label, r)| format!("{}: {}", esc(label), pct(r)))
                .collect::<Vec<_>>()
                .join("<br>"),
            pct(&v.goal_rate),
            name = esc(&v.name),
            share_px = (100.0 * v.recent_share).round() as u32,
            share = 100.0 * v.recent_share,
            best = 100.0 * v.probability_best,
        );
    }
    out.push_str("</table>");
    out
}

fn by_account(accounts: &std::collections::BTreeMap<String, Funnel>) -> String {
    if accounts.is_empty() {
        return "<p class=\"meta\">No dialogs yet.</p>".into();
    }
    let mut out = String::from(
        "<table><tr><th>account</th><th>opened</th><th>delivered</th><th>replied</th><th>reply rate</th><th>finished</th><th>opted out</th></tr>",
    );
    for (name, f) in accounts {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}%</td><td>{}</td><td>{}</td></tr>",
            esc(name),
            f.opened,
            f.delivered,
            f.replied,
            100.0 * f.reply_rate(),
            f.outcomes.values().sum::<usize>(),
            f.opted_out
        );
    }
    out.push_str("</table>");
    out
}

/// Openings, replies and endings per day as grouped bars (SVG).
fn day_chart(days: &std::collections::BTreeMap<String, report::Day>) -> String {
    if days.is_empty() {
        return "<p class=\"meta\">No dialogs yet.</p>".into();
    }
    let days: Vec<_> = days
        .iter()
        .rev()
        .take(30)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let top = days
        .iter()
        .map(|(_, d)| d.openings.max(d.replies).max(d.outcomes))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let (h, group) = (120.0, 36.0);
    let width = group * days.len() as f64 + 40.0;
    let mut svg = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {width} {}\" width=\"{width}\" height=\"{}\" role=\"img\" aria-label=\"openings, replies and endings per day\">",
        h + 30.0,
        h + 30.0
    );
    for (i, (day, d)) in days.iter().enumerate() {
        let x = 20.0 + i as f64 * group;
        for (j, (n, class)) in [(d.openings, "o"), (d.replies, "r"), (d.outcomes, "e")]
            .iter()
            .enumerate()
        {
            let bar = h * *n as f64 / top;
            let _ = write!(
                svg,
                "<rect class=\"{class}\" x=\"{:.1}\" y=\"{:.1}\" width=\"9\" height=\"{bar:.1}\"><title>{day}: {n}</title></rect>",
                x + j as f64 * 10.0,
                h - bar
            );
        }
        let _ = write!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\">{}</text>",
            x,
            h + 16.0,
            esc(&day[5..])
        );
    }
    svg.push_str("</svg><p class=\"legend\"><span class=\"o\"></span>openings <span class=\"r\"></span>replied <span class=\"e\"></span>ended</p>");
    svg
}

#[derive(Deserialize)]
pub struct StatusForm {
    csrf: String,
    status: String,
}

pub async fn set_campaign_status(
    State(c): State<Console>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Form(form): Form<StatusForm>,
) -> Response {
    if let Err(r) = c.require_post(&headers, &form.csrf) {
        return r;
    }
    let status = match form.status.as_str() {
        "active" => CampaignStatus::Active,
        "paused" => CampaignStatus::Paused,
        other => return (StatusCode::BAD_REQUEST, format!("no status {other}")).into_response(),
    };
    let config = c.host.config();
    if config.campaign(&name).is_none() {
        return (StatusCode::NOT_FOUND, format!("no campaign {name}")).into_response();
    }
    // config.toml stays the one source of truth: the edit is written there
    // and applied as any save of the file is.
    let path = config.path.clone();
    if let Err(e) = crate::config::edit::set_campaign_status(&path, &name, status) {
        return failed(e);
    }
    let mut next = (*config).clone();
    for campaign in &mut next.file.campaigns {
        if campaign.name == name {
            campaign.status = status;
        }
    }
    c.host.set_config(Arc::new(next));
    tracing::info!(
        campaign = name,
        "campaign {name} set {} from the console",
        status.label()
    );
    Redirect::to("/").into_response()
}

// -------------------------------------------------------------- accounts

pub async fn accounts(State(c): State<Console>, headers: HeaderMap) -> Page {
    let session = c.require(&headers)?;
    let host = &c.host;
    let now = host.clock.now();
    let links = host.transport().links();
    let mut body = String::from(
        "<table><tr><th>account</th><th>status</th><th>connection</th><th>sends, last hour</th><th>sends, last day</th><th>openings today</th><th>warm-up</th><th>may send</th><th>why it waits</th></tr>",
    );
    let records = c.accounts().await;
    let config = host.config();
    for account in &config.file.accounts {
        let Some(record) = records.get(&account.name) else {
            let _ = write!(
                body,
                "<tr><td>{}</td><td colspan=\"8\" class=\"meta\">reading its record…</td></tr>",
                esc(&account.name)
            );
            continue;
        };
        let limits = host.safety.limits(&account.name);
        let hour_ago = now.saturating_sub(std::time::Duration::from_secs(3600));
        let day_ago = now.saturating_sub(std::time::Duration::from_secs(86_400));
        let hour = record.sends.iter().filter(|m| m.at > hour_ago).count();
        let day = record.sends.iter().filter(|m| m.at > day_ago).count();
        let openings = record
            .sends
            .iter()
            .filter(|m| m.opening && m.at > day_ago)
            .count();
        let warmup = crate::safety::decide::warmup_factor(record, &limits, now);
        let (may, why) = waiting(record, &limits, now, hour, day);
        let link = links
            .iter()
            .find(|(n, _)| *n == account.name)
            .map_or("simulated", |(_, l)| l);
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{hour} / {}</td><td>{day} / {}</td><td>{openings} / {}</td><td>{:.0}%</td><td>{}</td><td>{}</td></tr>",
            esc(&account.name),
            esc(&status_text(&record.status)),
            esc(link),
            limits.max_per_hour,
            limits.max_per_day,
            limits.max_new_dialogs_per_day,
            100.0 * warmup,
            esc(&may),
            esc(&why)
        );
    }
    body.push_str("</table><h2>Recent alerts</h2>");
    body.push_str(&alert_list(&host.alerts.recent(), 10));
    // Until every record is read, the page refreshes itself.
    let refresh = match records.len() < config.file.accounts.len() {
        true => REFRESH,
        false => "",
    };
    Ok(layout_with_head("Accounts", &session, refresh, &body))
}

fn status_text(s: &AccountStatus) -> String {
    match s {
        AccountStatus::FloodWait { until } => format!("flood wait until {}", until.to_rfc3339()),
        AccountStatus::SpamLimited { until } => {
            format!("spam-limited (PEER_FLOOD) until {}", until.to_rfc3339())
        }
        other => other.label().to_string(),
    }
}

/// When the account may send next, and the limit that decides it.
fn waiting(
    record: &crate::model::AccountRecord,
    limits: &crate::safety::decide::Limits,
    now: crate::clock::Timestamp,
    hour: usize,
    day: usize,
) -> (String, String) {
    let mut reasons: Vec<(crate::clock::Timestamp, String)> = Vec::new();
    match &record.status {
        AccountStatus::FloodWait { until } => {
            reasons.push((*until, "Telegram's flood wait".into()))
        }
        AccountStatus::Active | AccountStatus::SpamLimited { .. } => {}
        other => return ("never".into(), format!("the account is {}", other.label())),
    }
    let oldest_after = |window: u64, n: usize| {
        let since = now.saturating_sub(std::time::Duration::from_secs(window));
        let in_window: Vec<_> = record.sends.iter().filter(|m| m.at > since).collect();
        in_window
            .get(in_window.len().saturating_sub(n))
            .map(|m| m.at.saturating_add(std::time::Duration::from_secs(window)))
    };
    if hour >= limits.max_per_hour as usize {
        if let Some(t) = oldest_after(3600, limits.max_per_hour as usize) {
            reasons.push((t, format!("hourly limit ({})", limits.max_per_hour)));
        }
    }
    if day >= limits.max_per_day as usize {
        if let Some(t) = oldest_after(86_400, limits.max_per_day as usize) {
            reasons.push((t, format!("daily limit ({})", limits.max_per_day)));
        }
    }
    if record.next_send_at > now {
        reasons.push((
            record.next_send_at,
            "interval between sends (min_interval + jitter)".into(),
        ));
    }
    match reasons.into_iter().max_by_key(|(t, _)| *t) {
        Some((t, why)) if t > now => (t.to_rfc3339(), why),
        _ => ("now".into(), String::new()),
    }
}

// --------------------------------------------------------------- dialogs

#[derive(Deserialize, Default)]
pub struct DialogFilter {
    campaign: Option<String>,
    account: Option<String>,
    status: Option<String>,
    q: Option<String>,
    page: Option<usize>,
}

pub async fn dialogs(
    State(c): State<Console>,
    headers: HeaderMap,
    Query(filter): Query<DialogFilter>,
) -> Page {
    let session = c.require(&headers)?;
    let chosen = Chosen::of(&filter);
    let store = &c.host.store;
    let found = match searched_contacts(store, chosen.q.as_deref()).map_err(failed)? {
        None => Box::new(store.dialog_summaries(true).map(|d| d.map(|d| (d, None)))),
        Some(contacts) => dialogs_of(store, contacts).map_err(failed)?,
    };
    let (shown, more) = chosen.page_of(store, found).map_err(failed)?;
    let mut body = chosen.form(&c.host.config());
    body.push_str(&dialog_table(&shown));
    body.push_str("<p class=\"pages\">");
    if chosen.page > 0 {
        let _ = write!(
            body,
            "<a href=\"{}\">← newer</a> ",
            chosen.link(chosen.page - 1)
        );
    }
    if more {
        let _ = write!(
            body,
            "<a href=\"{}\">older →</a>",
            chosen.link(chosen.page + 1)
        );
    }
    body.push_str("</p>");
    Ok(layout("Dialogs", &session, &body))
}

/// A dialog to list, with its contact when the search already read it.
type Listed = (DialogSummary, Option<Contact>);
type Found = Result<Listed, crate::store::StoreError>;

/// The dialogs page's filter as chosen: empty fields are no filter.
struct Chosen {
    campaign: Option<String>,
    account: Option<String>,
    status: Option<String>,
    /// The contact search as typed, and lowercased to match.
    typed: String,
    q: Option<String>,
    page: usize,
}

impl Chosen {
    fn of(filter: &DialogFilter) -> Chosen {
        let nonempty =
            |s: &Option<String>| s.as_deref().filter(|s| !s.is_empty()).map(str::to_string);
        Chosen {
            campaign: nonempty(&filter.campaign),
            account: nonempty(&filter.account),
            status: nonempty(&filter.status),
            typed: filter.q.clone().unwrap_or_default(),
            q: nonempty(&filter.q).map(|q| q.to_lowercase()),
            page: filter.page.unwrap_or(0),
        }
    }

    fn admits(&self, d: &DialogSummary) -> bool {
        self.campaign.as_ref().is_none_or(|c| *c == d.campaign)
            && self.account.as_ref().is_none_or(|a| *a == d.account)
            && self
                .status
                .as_ref()
                .is_none_or(|s| *s == status_label(&d.status) || *s == d.status.label())
    }

    /// This page's dialogs of `found` (newest first) with their contacts,
    /// and whether there are more.
    fn page_of(
        &self,
        store: &crate::store::Store,
        found: Box<dyn Iterator<Item = Found> + '_>,
    ) -> Result<(Vec<Listed>, bool), crate::store::StoreError> {
        let mut shown = Vec::new();
        let mut skipped = 0;
        for found in found {
            let (d, contact) = found?;
            if !self.admits(&d) {
                continue;
            }
            if skipped < self.page * PER_PAGE {
                skipped += 1;
                continue;
            }
            if shown.len() == PER_PAGE {
                return Ok((shown, true));
            }
            let contact = match contact {
                Some(c) => Some(c),
                None => store.contact(d.contact)?,
            };
            shown.push((d, contact));
        }
        Ok((shown, false))
    }

    fn form(&self, config: &crate::config::Config) -> String {
        let options = |values: Vec<String>, chosen: &Option<String>| {
            let mut out = String::from("<option value=\"\">any</option>");
            for v in values {
                let sel = if chosen.as_deref() == Some(v.as_str()) {
                    " selected"
                } else {
                    ""
                };
                let _ = write!(out, "<option{sel}>{}</option>", esc(&v));
            }
            out
        };
        format!(
            "<form method=\"get\" class=\"filter\">\
             <label>Campaign <select name=\"campaign\">{}</select></label>\
             <label>Account <select name=\"account\">{}</select></label>\
             <label>Status <input name=\"status\" value=\"{}\" placeholder=\"active, handoff, finished:booked…\"></label>\
             <label>Contact <input name=\"q\" value=\"{}\" placeholder=\"name, username, phone\"></label>\
             <button>Filter</button></form>",
            options(config.file.campaigns.iter().map(|c| c.name.clone()).collect(), &self.campaign),
            options(config.file.accounts.iter().map(|a| a.name.clone()).collect(), &self.account),
            esc(self.status.as_deref().unwrap_or("")),
            esc(&self.typed),
        )
    }

    fn link(&self, page: usize) -> String {
        format!(
            "/dialogs?campaign={}&account={}&status={}&q={}&page={page}",
            url(self.campaign.as_deref().unwrap_or("")),
            url(self.account.as_deref().unwrap_or("")),
            url(self.status.as_deref().unwrap_or("")),
            url(&self.typed),
        )
    }
}

/// The contacts searched for (none without a search): one named exactly
/// (a username, a +phone, a user id) through its identity, else those
/// whose names match.
fn searched_contacts(
    store: &crate::store::Store,
    q: Option<&str>,
) -> Result<Option<Vec<Contact>>, crate::store::StoreError> {
    let Some(q) = q else { return Ok(None) };
    if let Some(identity) = crate::model::Identity::parse(q) {
        if let Some(c) = store.contact_by_identity(&identity)? {
            return Ok(Some(vec![c]));
        }
    }
    store
        .contacts_mentioning(sieve(q))
        .filter(|c| {
            c.as_ref()
                .map_or(true, |c| contact_text(c).to_lowercase().contains(q))
        })
        .collect::<Result<_, _>>()
        .map(Some)
}

/// The dialogs of `contacts`, newest first.
fn dialogs_of(
    store: &crate::store::Store,
    contacts: Vec<Contact>,
) -> Result<Box<dyn Iterator<Item = Found> + '_>, crate::store::StoreError> {
    let mut hits = Vec::new();
    for c in contacts {
        if let Some(id) = store.dialog_of_contact(c.id)? {
            hits.push((id, c));
        }
    }
    hits.sort_by_key(|(id, _)| std::cmp::Reverse(*id));
    Ok(Box::new(hits.into_iter().filter_map(|(id, c)| {
        store
            .dialog(id)
            .map(|d| d.map(|d| (DialogSummary::from(&d), Some(c))))
            .transpose()
    })))
}

fn dialog_table(rows: &[Listed]) -> String {
    if rows.is_empty() {
        return "<p>No dialogs match.</p>".into();
    }
    let mut out = String::from(
        "<table class=\"dialogs\"><tr><th>dialog</th><th>contact</th><th>campaign</th><th>account</th><th>status</th><th>last activity</th></tr>",
    );
    for (d, contact) in rows {
        let _ = write!(
            out,
            "<tr><td><a href=\"/dialogs/{id}\">{id}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&contact.as_ref().map(contact_text).unwrap_or_default()),
            esc(&d.campaign),
            esc(&d.account),
            esc(&status_label(&d.status)),
            d.last_activity().to_rfc3339(),
            id = d.id
        );
    }
    out.push_str("</table>");
    out
}

/// The longest piece of a search that lies within one field of a
/// contact: [`contact_text`] joins fields with spaces and parentheses.
fn sieve(q: &str) -> &str {
    q.split([' ', '(', ')'])
        .max_by_key(|p| p.len())
        .unwrap_or_default()
}

fn contact_text(c: &crate::model::Contact) -> String {
    let name = [c.first_name.as_deref(), c.last_name.as_deref()]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ");
    if name.is_empty() {
        c.identity.to_string()
    } else {
        format!("{name} ({})", c.identity)
    }
}

fn status_label(s: &DialogStatus) -> String {
    match s {
        DialogStatus::Finished { outcome } => format!("finished:{outcome}"),
        DialogStatus::Error { reason } => format!("error: {reason}"),
        other => other.label().to_string(),
    }
}

pub async fn dialog(State(c): State<Console>, headers: HeaderMap, Path(id): Path<u64>) -> Page {
    let session = c.require(&headers)?;
    let host = &c.host;
    let Some(d) = host.store.dialog(id).map_err(failed)? else {
        return Err((StatusCode::NOT_FOUND, format!("there is no dialog {id}")).into_response());
    };
    let contact = host.store.contact(d.contact).map_err(failed)?;
    let mut body = format!(
        "<p class=\"meta\">campaign {} · account {} · contact {} · <span class=\"status\">{}</span> · {} follow-ups</p>",
        esc(&d.campaign),
        esc(&d.account),
        esc(&contact.as_ref().map(contact_text).unwrap_or_default()),
        esc(&status_label(&d.status)),
        d.follow_ups_sent
    );
    body.push_str("<ol class=\"transcript\">");
    for m in host.store.messages(id).map_err(failed)? {
        let (class, who) = match (m.direction, m.kind) {
            (Direction::In, _) => ("in", "contact".to_string()),
            (Direction::Out, Some(k)) => ("out", k.label().replace('_', "-")),
            (Direction::Out, None) => ("out", "out".into()),
        };
        let delivery = match &m.delivery {
            Some(Delivery::Pending) => {
                "<span class=\"pending\">waiting to go out</span>".to_string()
            }
            Some(Delivery::Cancelled { reason }) => {
                format!("<span class=\"cancelled\">not sent: {}</span>", esc(reason))
            }
            Some(_) => "<span class=\"sent\">sent</span>".into(),
            None => String::new(),
        };
        let _ = write!(
            body,
            "<li class=\"{class}\"><div class=\"who\">{who} · {} {delivery}</div><div class=\"text\">{}</div></li>",
            m.at.to_rfc3339(),
            esc(&m.text)
        );
    }
    body.push_str("</ol>");
    if d.status == DialogStatus::Handoff || d.status.is_live() {
        body.push_str(&takeover_forms(&c.host, &d, &session));
    }
    let events: Vec<_> = host
        .alerts
        .recent()
        .into_iter()
        .filter(|a| a.dialog == Some(id))
        .collect();
    if !events.is_empty() {
        body.push_str("<h2>Events</h2>");
        body.push_str(&alert_list(&events, 50));
    }
    let _ = write!(
        body,
        "<h2>Engine state</h2><pre class=\"state\">{}</pre>",
        esc(&serde_json::to_string_pretty(&d.state).unwrap_or_default())
    );
    Ok(layout(&format!("Dialog {id}"), &session, &body))
}

/// Reply as a human, hand back, finish: for a handed-off or live dialog.
fn takeover_forms(host: &Host, d: &Dialog, session: &Session) -> String {
    let when = host
        .safety
        .check(&d.account, MessageKind::Human, None)
        .map(|decision| match decision {
            crate::safety::decide::Decision::Allow => "now".to_string(),
            crate::safety::decide::Decision::NotBefore(t) => format!("at {}", t.to_rfc3339()),
            crate::safety::decide::Decision::Deny(why) => format!("not while {why:?}"),
        })
        .unwrap_or_else(|e| e.to_string());
    let csrf = csrf_field(session);
    let mut out = format!(
        "<h2>Answer as a human</h2><form method=\"post\" action=\"/dialogs/{id}/reply\" class=\"reply\">{csrf}\
         <textarea name=\"text\" rows=\"3\" required></textarea><button>Send</button>\
         <p class=\"meta\">It goes through the account's limits like every message: it would go out {}.</p></form>",
        esc(&when),
        id = d.id
    );
    if d.status == DialogStatus::Handoff {
        let _ = write!(
            out,
            "<form method=\"post\" action=\"/dialogs/{id}/handback\" class=\"inline\">{csrf}<button>Hand back to the engine</button></form>",
            id = d.id
        );
    }
    let _ = write!(
        out,
        "<form method=\"post\" action=\"/dialogs/{id}/finish\" class=\"inline\">{csrf}<input name=\"outcome\" placeholder=\"outcome, e.g. booked\" required><button>Finish</button></form>",
        id = d.id
    );
    out
}

#[derive(Deserialize)]
pub struct ReplyForm {
    csrf: String,
    text: String,
}

pub async fn reply(
    State(c): State<Console>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    Form(form): Form<ReplyForm>,
) -> Response {
    act(&c, &headers, &form.csrf, &format!("/dialogs/{id}"), || {
        c.host.reply_as_human(id, form.text.trim())
    })
}

#[derive(Deserialize)]
pub struct CsrfOnly {
    csrf: String,
}

pub async fn handback(
    State(c): State<Console>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    Form(form): Form<CsrfOnly>,
) -> Response {
    act(&c, &headers, &form.csrf, &format!("/dialogs/{id}"), || {
        c.host.hand_back(id)
    })
}

#[derive(Deserialize)]
pub struct FinishForm {
    csrf: String,
    outcome: String,
}

pub async fn finish(
    State(c): State<Console>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    Form(form): Form<FinishForm>,
) -> Response {
    act(&c, &headers, &form.csrf, &format!("/dialogs/{id}"), || {
        c.host.finish_by_hand(id, form.outcome.trim())
    })
}

/// A form's action: with a logged-in session and its CSRF token, runs
/// `action`, then sends the browser to `then`, or answers 409 with why.
fn act(
    c: &Console,
    headers: &HeaderMap,
    csrf: &str,
    then: &str,
    action: impl FnOnce() -> Result<(), String>,
) -> Response {
    if let Err(r) = c.require_post(headers, csrf) {
        return r;
    }
    match action() {
        Ok(()) => Redirect::to(then).into_response(),
        Err(e) => (StatusCode::CONFLICT, e).into_response(),
    }
}

// ----------------------------------------------------------------- inbox

pub async fn inbox(State(c): State<Console>, headers: HeaderMap) -> Page {
    let session = c.require(&headers)?;
    let host = &c.host;
    let mut rows = Vec::new();
    for id in host.store.dialogs_with_status("handoff").map_err(failed)? {
        if let Some(d) = host.store.dialog(id).map_err(failed)? {
            let contact = host.store.contact(d.contact).map_err(failed)?;
            rows.push((DialogSummary::from(&d), contact));
        }
    }
    let body = format!(
        "<p class=\"meta\">Dialogs the engine handed to a human. Open one to read it, answer, hand it back or finish it.</p>{}",
        dialog_table(&rows)
    );
    Ok(layout("Inbox", &session, &body))
}

// --------------------------------------------------------- do not contact

pub async fn dnc(State(c): State<Console>, headers: HeaderMap) -> Page {
    let session = c.require(&headers)?;
    let host = &c.host;
    let audit = crate::host::dnc::audit(&host.store).map_err(failed)?;
    let csrf = csrf_field(&session);
    let mut body = format!(
        "<form method=\"post\" action=\"/dnc/add\" class=\"inline\">{csrf}\
         <input name=\"contact\" placeholder=\"username, +phone or user id\" required>\
         <input name=\"why\" placeholder=\"why\"><button>Add</button></form>\
         <table class=\"dnc\"><tr><th>contact</th><th>why</th><th>since</th><th></th></tr>"
    );
    for (id, why) in host.store.do_not_contact_list().map_err(failed)? {
        let contact = host.store.contact(id).map_err(failed)?;
        let since = audit
            .iter()
            .rev()
            .find(|a| a.contact == id && a.action == "added")
            .map(|a| a.at.to_rfc3339())
            .unwrap_or_else(|| "—".into());
        let why = match why {
            DoNotContact::OptedOut => "opted out".to_string(),
            DoNotContact::Unreachable(r) => format!("unreachable: {r}"),
        };
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{since}</td><td><form method=\"post\" action=\"/dnc/{id}/remove\" class=\"inline\">{csrf}\
             <label><input type=\"checkbox\" name=\"confirm\" value=\"yes\" required> they may be written to again</label><button>Remove</button></form></td></tr>",
            esc(&contact.as_ref().map(contact_text).unwrap_or_else(|| id.to_string())),
            esc(&why)
        );
    }
    body.push_str("</table><h2>Audit</h2><table class=\"audit\"><tr><th>when</th><th>contact</th><th>what</th><th>why</th></tr>");
    for a in audit.iter().rev().take(100) {
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            a.at.to_rfc3339(),
            esc(&a.identity),
            esc(&a.action),
            esc(&a.why)
        );
    }
    body.push_str("</table>");
    Ok(layout("Do not contact", &session, &body))
}

#[derive(Deserialize)]
pub struct DncAdd {
    csrf: String,
    contact: String,
    why: Option<String>,
}

pub async fn dnc_add(
    State(c): State<Console>,
    headers: HeaderMap,
    Form(form): Form<DncAdd>,
) -> Response {
    if let Err(r) = c.require_post(&headers, &form.csrf) {
        return r;
    }
    let Some(identity) = crate::model::Identity::parse(&form.contact) else {
        return (
            StatusCode::BAD_REQUEST,
            format!(
                "\"{}\" is not a username, a +phone or a user id",
                form.contact.trim()
            ),
        )
            .into_response();
    };
    let why = form.why.unwrap_or_default();
    match crate::host::dnc::add(&c.host, &identity, why.trim()) {
        Ok(()) => Redirect::to("/dnc").into_response(),
        Err(e) => (StatusCode::CONFLICT, e).into_response(),
    }
}

#[derive(Deserialize)]
pub struct DncRemove {
    csrf: String,
    confirm: Option<String>,
}

pub async fn dnc_remove(
    State(c): State<Console>,
    headers: HeaderMap,
    Path(contact): Path<u64>,
    Form(form): Form<DncRemove>,
) -> Response {
    if let Err(r) = c.require_post(&headers, &form.csrf) {
        return r;
    }
    if form.confirm.as_deref() != Some("yes") {
        return (
            StatusCode::BAD_REQUEST,
            "tick the box to confirm the removal",
        )
            .into_response();
    }
    match crate::host::dnc::remove(&c.host, contact) {
        Ok(()) => Redirect::to("/dnc").into_response(),
        Err(e) => (StatusCode::CONFLICT, e).into_response(),
    }
}

// ---------------------------------------------------------------- alerts

pub async fn alerts(State(c): State<Console>, headers: HeaderMap) -> Page {
    let session = c.require(&headers)?;
    let host = &c.host;
    let mut body = String::new();
    let config = host.config();
    for campaign in &config.file.campaigns {
        if let Some(e) = host.engines.load_error(&campaign.engine) {
            let _ = write!(
                body,
                "<p class=\"error\">Campaign {} opens no dialogs: {}</p>",
                esc(&campaign.name),
                esc(&e.to_string())
            );
        }
    }
    body.push_str(&alert_list(&host.alerts.recent(), 200));
    Ok(layout("Alerts", &session, &body))
}

fn alert_list(alerts: &[crate::safety::alerts::Alert], most: usize) -> String {
    if alerts.is_empty() {
        return "<p class=\"meta\">No alerts since the host started.</p>".into();
    }
    let mut out = String::from("<ul class=\"alerts\">");
    for a in alerts.iter().take(most) {
        let at = crate::clock::Timestamp((a.at * 1000.0) as i64).to_rfc3339();
        let _ = write!(
            out,
            "<li><span class=\"kind\">{:?}</span> <span class=\"when\">{at}</span> {}</li>",
            a.kind,
            esc(&a.message)
        );
    }
    out.push_str("</ul>");
    out
}

// --------------------------------------------------------------- metrics

pub async fn metrics(State(c): State<Console>, headers: HeaderMap) -> Response {
    let open = c
        .host
        .config()
        .file
        .console
        .as_ref()
        .is_some_and(|c| c.open_metrics);
    if !open && c.session(&headers).is_none() {
        return (
            StatusCode::UNAUTHORIZED,
            "log in, or set [console] open_metrics = true",
        )
            .into_response();
    }
    match crate::host::metrics::render(&c.host) {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => failed(e),
    }
}

#[cfg(test)]
mod tests {
    use super::sieve;

    #[test]
    fn the_sieve_is_a_piece_within_one_field() {
        assert_eq!(sieve("hugo jungmann"), "jungmann");
        assert_eq!(sieve("ame12 (contact_0012)"), "contact_0012");
        assert_eq!(sieve("anne-marie"), "anne-marie");
        assert_eq!(sieve(" ( "), "");
    }
}
