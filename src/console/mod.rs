//! The operator's web console, served by the running host on
//! `[console] listen` (loopback by default). Pages are rendered here, on
//! the server, from the store and the host's state, and work without
//! JavaScript; every asset is in the binary.
//!
//! Every page and action needs a login: the token in
//! `data_dir/console.token` (0600, made on first start) or the password in
//! `[console] password_env`, compared in constant time. A login gets a
//! session cookie (HttpOnly, SameSite=Strict) and a CSRF token that every
//! form posts back. Everything a contact or an engine wrote is escaped.

// A handler's error is the response it sends (a redirect to the login, a
// 403): boxing it would only move the allocation.
#![allow(clippy::result_large_err)]

mod pages;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Form, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

use crate::host::Host;

/// The console's state: the host, the logged-in sessions and the last
/// funnel counted.
#[derive(Clone)]
struct Console {
    host: Arc<Host>,
    token: Arc<String>,
    /// Session id → its CSRF token.
    sessions: Arc<Mutex<HashMap<String, String>>>,
    /// The last funnel count.
    funnels: Arc<Mutex<Option<Counted>>>,
    counting: Arc<Chore>,
    /// Reading every account's record into the store's cache.
    reading_accounts: Arc<Chore>,
}

/// Slow work a page view starts on a blocking thread: one at a time, and
/// the view waits [`CHORE_WAIT`] for it before it shows what there is.
#[derive(Default)]
struct Chore {
    running: AtomicBool,
}

impl Chore {
    /// Starts `work` unless it is under way already.
    fn start(
        self: &Arc<Self>,
        work: impl FnOnce() + Send + 'static,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if self.running.swap(true, Ordering::SeqCst) {
            return None;
        }
        let chore = self.clone();
        Some(tokio::task::spawn_blocking(move || {
            work();
            chore.running.store(false, Ordering::SeqCst);
        }))
    }

    /// Starts `work` unless it is under way, and waits a moment for it.
    async fn start_and_wait(self: &Arc<Self>, work: impl FnOnce() + Send + 'static) {
        if let Some(running) = self.start(work) {
            let _ = tokio::time::timeout(CHORE_WAIT, running).await;
        }
    }
}

/// How long a page view waits for a chore it started.
const CHORE_WAIT: std::time::Duration = std::time::Duration::from_millis(50);

/// Funnels as counted at one moment.
type Counted = (Arc<Vec<crate::report::CampaignFunnel>>, std::time::Instant);

/// How old a funnel may be before a page view counts it again. Counting
/// reads every dialog (about 1.7 µs each warm, 20 µs just after a start),
/// so the first count starts with the console, and a view of the campaigns
/// page that finds the last count older starts a new one in the
/// background, waits a moment for it, and else shows the last count and
/// refreshes itself until the new one is in. An idle host counts nothing.
pub(crate) const FUNNEL_FRESH: std::time::Duration = std::time::Duration::from_secs(5);

const COOKIE: &str = "colloquy_session";

/// Starts serving the console if the config asks for it. Errors (the
/// address taken) are the host's to log; it runs on without a console.
pub async fn serve(host: Arc<Host>) -> Result<Option<SocketAddr>, String> {
    let config = host.config();
    let Some(console) = config.file.console.clone() else {
        return Ok(None);
    };
    if !console.listen.ip().is_loopback() {
        tracing::warn!(
            "the console listens on {}, not a loopback address: anyone who can reach it can try to log in",
            console.listen
        );
    }
    let token = login_token(&config.data_dir())?;
    let state = Console {
        host: host.clone(),
        token: Arc::new(token),
        sessions: Arc::default(),
        funnels: Arc::default(),
        counting: Arc::default(),
        reading_accounts: Arc::default(),
    };
    let listener = tokio::net::TcpListener::bind(console.listen)
        .await
        .map_err(|e| format!("the console cannot listen on {}: {e}", console.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    state.counting.start(state.count_funnels());
    state.reading_accounts.start(state.read_accounts());
    let app = router(state);
    let shutdown = host.shutdown.clone();
    host.tasks.spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!("the console stopped: {e}");
        }
    });
    tracing::info!("console on http://{addr}/ (log in with the token in data_dir/console.token)");
    Ok(Some(addr))
}

fn router(state: Console) -> Router {
    Router::new()
        .route("/login", get(pages::login_page).post(login))
        .route("/logout", post(logout))
        .route("/", get(pages::campaigns))
        .route("/campaigns/{name}/status", post(pages::set_campaign_status))
        .route("/accounts", get(pages::accounts))
        .route("/dialogs", get(pages::dialogs))
        .route("/dialogs/{id}", get(pages::dialog))
        .route("/dialogs/{id}/reply", post(pages::reply))
        .route("/dialogs/{id}/handback", post(pages::handback))
        .route("/dialogs/{id}/finish", post(pages::finish))
        .route("/inbox", get(pages::inbox))
        .route("/dnc", get(pages::dnc))
        .route("/dnc/add", post(pages::dnc_add))
        .route("/dnc/{contact}/remove", post(pages::dnc_remove))
        .route("/alerts", get(pages::alerts))
        .route("/metrics", get(pages::metrics))
        .route("/style.css", get(style))
        .with_state(state)
}

/// The login token: read from `data_dir/console.token`, made (0600) when
/// missing.
fn login_token(data_dir: &std::path::Path) -> Result<String, String> {
    let path = data_dir.join("console.token");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let token = text.trim().to_string();
        if !token.is_empty() {
            return Ok(token);
        }
    }
    let token = format!(
        "{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    );
    crate::host::control::write_private(&path, format!("{token}\n").as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(token)
}

/// Compares two secrets in time that depends on their lengths only.
fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A logged-in request: its CSRF token, for the forms of its page.
pub(crate) struct Session {
    pub csrf: String,
}

impl Console {
    /// The funnels of the last count, if there is one. When there is none
    /// or it is older than [`FUNNEL_FRESH`], a count starts and the view
    /// waits a moment for it: a small store is counted within that, a
    /// large one shows its last count.
    async fn funnels(&self) -> Option<Counted> {
        let last = || {
            self.funnels
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        };
        if last().as_ref().is_none_or(|l| l.1.elapsed() > FUNNEL_FRESH) {
            self.counting.start_and_wait(self.count_funnels()).await;
        }
        last()
    }

    fn count_funnels(&self) -> impl FnOnce() + Send + 'static {
        let (host, funnels) = (self.host.clone(), self.funnels.clone());
        move || match crate::report::funnels(&host.config(), &host.store) {
            Ok(f) => {
                *funnels.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some((Arc::new(f), std::time::Instant::now()));
            }
            Err(e) => tracing::warn!("the console cannot count the funnels: {e}"),
        }
    }

    /// The records of the configured accounts the store has read, by
    /// name. If some are not read yet, reading them starts and the view
    /// waits a moment for it: a record holds the sends of its last day,
    /// and a thousand busy accounts take half a second to read.
    async fn accounts(&self) -> HashMap<String, crate::model::AccountRecord> {
        let config = self.host.config();
        let read = || {
            config
                .file
                .accounts
                .iter()
                .filter_map(|a| Some((a.name.clone(), self.host.store.account_if_read(&a.name)?)))
                .collect::<HashMap<_, _>>()
        };
        let mut records = read();
        if records.len() < config.file.accounts.len() {
            self.reading_accounts
                .start_and_wait(self.read_accounts())
                .await;
            records = read();
        }
        records
    }

    fn read_accounts(&self) -> impl FnOnce() + Send + 'static {
        let host = self.host.clone();
        move || {
            for account in &host.config().file.accounts {
                if let Err(e) = host.store.account(&account.name) {
                    tracing::warn!(
                        account = account.name,
                        "the console cannot read the account: {e}"
                    );
                }
            }
        }
    }

    fn session(&self, headers: &HeaderMap) -> Option<Session> {
        let id = cookie(headers, COOKIE)?;
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions
            .iter()
            .find(|(k, _)| same_secret(k, &id))
            .map(|(_, csrf)| Session { csrf: csrf.clone() })
    }

    /// The session, or a response that sends the browser to log in.
    fn require(&self, headers: &HeaderMap) -> Result<Session, Response> {
        self.session(headers)
            .ok_or_else(|| Redirect::to("/login").into_response())
    }

    /// The session of a form post whose CSRF token matches.
    fn require_post(&self, headers: &HeaderMap, csrf: &str) -> Result<Session, Response> {
        let session = self.require(headers)?;
        if !same_secret(&session.csrf, csrf) {
            return Err(
                (StatusCode::FORBIDDEN, "the form is stale; reload the page").into_response(),
            );
        }
        Ok(session)
    }

    fn accepts(&self, secret: &str) -> bool {
        let password = self
            .host
            .config()
            .file
            .console
            .as_ref()
            .and_then(|c| c.password_env.as_ref())
            .and_then(|var| std::env::var(var).ok())
            .filter(|p| !p.is_empty());
        same_secret(secret, &self.token) || password.is_some_and(|p| same_secret(secret, &p))
    }
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(c): State<Console>, Form(form): Form<LoginForm>) -> Response {
    if !c.accepts(form.token.trim()) {
        return (
            StatusCode::UNAUTHORIZED,
            Html(pages::login_html(Some(
                "That token is not this host's: it is in data_dir/console.token.",
            ))),
        )
            .into_response();
    }
    let id = format!(
        "{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    );
    let csrf = format!(
        "{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    );
    c.sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id.clone(), csrf);
    (
        [(
            header::SET_COOKIE,
            format!("{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/"),
        )],
        Redirect::to("/"),
    )
        .into_response()
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: String,
}

async fn logout(State(c): State<Console>, headers: HeaderMap, Form(f): Form<CsrfForm>) -> Response {
    if c.require_post(&headers, &f.csrf).is_ok() {
        if let Some(id) = cookie(&headers, COOKIE) {
            c.sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        }
    }
    (
        [(
            header::SET_COOKIE,
            format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
        )],
        Redirect::to("/login"),
    )
        .into_response()
}

async fn style() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css")], pages::STYLE)
}

/// Escapes text for HTML: contact names and messages are written by
/// strangers.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Query-string encoding for links.
pub(crate) fn url(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strangers_text_is_escaped() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
        assert_eq!(url("finished:booked a&b"), "finished%3Abooked%20a%26b");
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "ab"));
        assert!(!same_secret("", "a"));
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "a=1; colloquy_session=xyz; b=2".parse().unwrap(),
        );
        assert_eq!(cookie(&h, COOKIE).as_deref(), Some("xyz"));
    }
}
