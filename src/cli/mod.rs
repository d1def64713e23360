//! The command line (SPEC section 3): argument parsing and one function per
//! command. Exit codes: 0 success, 2 bad usage or bad input, 1 anything else.

mod chat;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::audience;
use crate::clock::SystemClock;
use crate::config::Config;
use crate::engine::EngineRuntime;
use crate::host::control;
use crate::logging::{self, LogFormat};
use crate::model::{DialogId, DialogStatus};
use crate::problem::{Problem, Problems};
use crate::report;
use crate::store::{Store, StoreError};

#[derive(Debug, Parser)]
#[command(
    name = "colloquy",
    version,
    about = "Runs Telegram conversation campaigns with Lua dialog engines"
)]
pub struct Cli {
    /// The config file.
    #[arg(long, global = true, default_value = "config.toml")]
    pub config: PathBuf,
    /// How log lines look on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the headless host until SIGINT or SIGTERM.
    Run,
    /// Validate the config, its audiences and every engine.
    Check,
    /// Run a Lua file in the engine environment and print its result as JSON.
    Eval {
        file: PathBuf,
        /// Values for the script's `arg` table.
        args: Vec<String>,
    },
    /// Play a contact on stdin while a campaign's engine answers on stdout.
    Chat {
        #[arg(long)]
        campaign: String,
        /// Try this variant of the campaign (the first one by default).
        #[arg(long)]
        variant: Option<String>,
    },
    /// Campaigns with their funnels, accounts, dialog counts by status.
    Status {
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List dialogs: a header row, then one tab-separated line each.
    Dialogs {
        #[arg(long)]
        campaign: Option<String>,
        /// A status, or `finished:OUTCOME`.
        #[arg(long)]
        status: Option<String>,
        /// Finished dialogs with this outcome.
        #[arg(long)]
        outcome: Option<String>,
        /// JSON lines instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Answer a dialog as a human; the message goes through the account's
    /// limits like every other (at once while a host runs, else when one
    /// starts).
    Reply { dialog: DialogId, text: String },
    /// Give a handed-off dialog back to its engine.
    Handback { dialog: DialogId },
    /// Write a campaign's dialogs, their messages, or the do-not-contact
    /// list to stdout, as CSV or JSON lines.
    Export {
        #[arg(long)]
        campaign: Option<String>,
        #[arg(long, value_enum)]
        what: crate::export::What,
        #[arg(long, value_enum, default_value = "csv")]
        format: crate::export::Format,
        /// A time (2026-12-01, 2026-12-01T08:00:00Z) or a duration back
        /// from now (7d).
        #[arg(long)]
        since: Option<String>,
    },
    /// Print one dialog's transcript.
    Dialog { id: DialogId },
    /// Put back into their audiences the contacts of dialogs that ended in
    /// error before any message was written to them (what a broken engine
    /// left behind); run it while no host runs.
    ReleaseContacts {
        #[arg(long)]
        campaign: Option<String>,
    },
    /// Copy the store into a new directory, consistent even while the host
    /// runs; `restore` puts it back.
    Backup { dest: PathBuf },
    /// Put a backup in place of the store (the host stopped); the store it
    /// replaces is kept beside it.
    Restore {
        from: PathBuf,
        /// Restore a backup older than the store the data_dir held last:
        /// contacts written to since could be written to again.
        #[arg(long)]
        accept_older: bool,
    },
    /// Log a Telegram user account in (code, then 2FA password if asked),
    /// or import a Telethon/Pyrogram string session.
    Login {
        account: String,
        /// The login code, instead of a prompt.
        #[arg(long)]
        code: Option<String>,
        /// Name of an environment variable holding the 2FA password.
        #[arg(long, value_name = "VAR")]
        password_env: Option<String>,
        /// Store a Telethon or Pyrogram string session for the account,
        /// read from stdin with `-`. A string given here shows in `ps` and
        /// in shell history: prefer `-`, a file or a variable.
        #[arg(long, value_name = "-|STRING", group = "session")]
        import_session: Option<String>,
        /// Store the string session held in this file.
        #[arg(long, value_name = "PATH", group = "session")]
        import_session_file: Option<PathBuf>,
        /// Store the string session held in this environment variable.
        #[arg(long, value_name = "VAR", group = "session")]
        import_session_env: Option<String>,
    },
}

/// How a command failed, and so which exit code it gets.
#[derive(Debug)]
pub enum Failure {
    /// Bad usage or bad input: exit 2.
    Input(Problems),
    /// Anything else: exit 1.
    Other(String),
}

impl From<Problems> for Failure {
    fn from(p: Problems) -> Failure {
        Failure::Input(p)
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Failure {
        // What the operator must act on is like bad input.
        match e.needs_operator() {
            true => input("", e.to_string()),
            false => Failure::Other(e.to_string()),
        }
    }
}

/// Parses the process arguments, runs the command, and maps the outcome to
/// an exit code.
pub fn main() -> ExitCode {
    // The store holds Telegram auth keys: whatever the host writes is
    // readable by its user only (files 0600, directories 0700).
    // SAFETY: umask only sets the process's file mode mask.
    unsafe {
        libc::umask(0o077);
    }
    let cli = Cli::parse();
    logging::init(cli.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Input(problems)) => {
            eprintln!("{problems}");
            ExitCode::from(2)
        }
        Err(Failure::Other(message)) => {
            eprintln!("{message}");
            ExitCode::from(1)
        }
    }
}

/// Runs one parsed command.
pub fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Check => check(&cli.config),
        Command::Status { json } => status(&cli.config, json),
        Command::Dialogs {
            campaign,
            status,
            outcome,
            json,
        } => dialogs(&cli.config, campaign, status, outcome, json),
        Command::Reply { dialog, text } => report(
            &Config::load(&cli.config)?,
            control::Request::Reply { dialog, text },
        ),
        Command::Export {
            campaign,
            what,
            format,
            since,
        } => export(&cli.config, campaign, what, format, since.as_deref()),
        Command::Handback { dialog } => report(
            &Config::load(&cli.config)?,
            control::Request::Handback { dialog },
        ),
        Command::Dialog { id } => dialog(&cli.config, id),
        Command::ReleaseContacts { campaign } => release_contacts(&cli.config, campaign.as_deref()),
        Command::Run => run_host(&cli.config),
        Command::Backup { dest } => backup(&cli.config, &dest),
        Command::Restore { from, accept_older } => restore(&cli.config, &from, accept_older),
        Command::Eval { file, args } => eval(&cli.config, &file, &args),
        Command::Chat { campaign, variant } => {
            chat::run(&cli.config, &campaign, variant.as_deref())
        }
        Command::Login {
            account,
            code,
            password_env,
            import_session,
            import_session_file,
            import_session_env,
        } => {
            let import = match (import_session, import_session_file, import_session_env) {
                (Some(s), _, _) if s == "-" => Some(SessionSource::Stdin),
                (Some(s), _, _) => Some(SessionSource::Argument(s)),
                (_, Some(path), _) => Some(SessionSource::File(path)),
                (_, _, Some(var)) => Some(SessionSource::Env(var)),
                _ => None,
            };
            login(&cli.config, &account, code, password_env.as_deref(), import)
        }
    }
}

fn input(location: &str, message: impl Into<String>) -> Failure {
    Failure::Input(Problems(vec![Problem::new(location, message)]))
}

/// Where `login` reads a string session to import.
enum SessionSource {
    Stdin,
    File(PathBuf),
    Env(String),
    /// On the command line, where `ps` and shell history show it.
    Argument(String),
}

impl SessionSource {
    /// The session string, trimmed; a missing source is bad input.
    fn read(self) -> Result<String, Failure> {
        let text = match self {
            SessionSource::Stdin => {
                let mut text = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                    .map_err(|e| input("--import-session", format!("cannot read stdin: {e}")))?;
                text
            }
            SessionSource::File(path) => std::fs::read_to_string(&path).map_err(|e| {
                input(
                    "--import-session-file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?,
            SessionSource::Env(var) => env_var("--import-session-env", &var, "")?,
            SessionSource::Argument(text) => text,
        };
        Ok(text.trim().to_string())
    }
}

/// The value of the environment variable `var`, named by `key`; unset is
/// bad input, its sentence ending with `hint`.
fn env_var(key: &str, var: &str, hint: &str) -> Result<String, Failure> {
    std::env::var(var).map_err(|_| {
        input(
            key,
            format!("the environment variable {var} is not set{hint}"),
        )
    })
}

/// `colloquy login`: stores a session for the account, from a login with
/// its phone or from an imported string session.
fn login(
    config_path: &Path,
    account: &str,
    code: Option<String>,
    password_env: Option<&str>,
    import: Option<SessionSource>,
) -> Result<(), Failure> {
    let config = Config::load(config_path)?;
    let Some(acc) = config.file.accounts.iter().find(|a| a.name == account) else {
        return Err(input(
            "",
            format!("there is no account named {account} in {}", config.shown()),
        ));
    };
    match import {
        Some(source) => import_session(&config, account, source),
        None => login_by_phone(&config, acc, code, password_env),
    }
}

/// Stores a Telethon or Pyrogram string session for `account`.
fn import_session(config: &Config, account: &str, source: SessionSource) -> Result<(), Failure> {
    use crate::telegram::session::{SessionRecord, StoredSession};
    let on_command_line = matches!(source, SessionSource::Argument(_));
    let text = source.read()?;
    let imported =
        crate::telegram::string_session::parse(&text).map_err(|e| input("--import-session", e))?;
    let store = Store::open(&config.data_dir())?;
    StoredSession::replace(&store, account, &SessionRecord::imported(&imported))?;
    crate::telegram::logged_in(&store, account)?;
    let server = imported
        .server
        .map_or("its datacenter's address".to_string(), |s| s.to_string());
    println!(
        "account {account}: stored the {} session (DC {}, {server})",
        imported.format, imported.dc_id
    );
    if on_command_line {
        tracing::warn!(
            "a session string on the command line shows in `ps` and in shell history; \
             pipe it in with `--import-session -`, or use --import-session-file or --import-session-env"
        );
    }
    Ok(())
}

/// What a login with the account's phone needs from the config and the
/// environment: the API id and hash, the phone, the 2FA password if given.
struct PhoneLogin<'a> {
    api_id: i32,
    api_hash: String,
    phone: &'a str,
    password: Option<String>,
}

impl<'a> PhoneLogin<'a> {
    fn of(
        config: &Config,
        acc: &'a crate::config::Account,
        password_env: Option<&str>,
    ) -> Result<PhoneLogin<'a>, Failure> {
        let Some(telegram) = &config.file.telegram else {
            return Err(input(
                "telegram",
                "logging in needs a [telegram] section with api_id and api_hash_env",
            ));
        };
        let Some(phone) = &acc.phone else {
            return Err(input(
                &format!("accounts.{}.phone", acc.name),
                "is required to log in; add the account's phone number (or use --import-session)",
            ));
        };
        let api_hash = env_var(
            "telegram.api_hash_env",
            &telegram.api_hash_env,
            "; export the api_hash from my.telegram.org in it",
        )?;
        let password = password_env
            .map(|var| env_var("--password-env", var, ""))
            .transpose()?;
        let api_id = i32::try_from(telegram.api_id)
            .map_err(|_| input("telegram.api_id", "is too large for Telegram"))?;
        Ok(PhoneLogin {
            api_id,
            api_hash,
            phone,
            password,
        })
    }
}

/// Logs the account in with its phone: code, then 2FA password. The login
/// runs on a scratch session, so a failed login leaves the account's
/// current session as it was.
fn login_by_phone(
    config: &Config,
    acc: &crate::config::Account,
    code: Option<String>,
    password_env: Option<&str>,
) -> Result<(), Failure> {
    use crate::telegram::login::{self as tg_login, GrammersAuth, LoginError, Terminal};
    use crate::telegram::session::{SessionRecord, StoredSession};
    let account = acc.name.as_str();
    let store = Store::open(&config.data_dir())?;
    let needs = PhoneLogin::of(config, acc, password_env)?;
    let scratch = format!("{account}\u{1}login");
    StoredSession::replace(&store, &scratch, &SessionRecord::default())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Other(format!("cannot start the runtime: {e}")))?;
    let result = rt.block_on(async {
        let (client, _updates, session) =
            crate::telegram::grammers_client(&store, &scratch, needs.api_id, acc.proxy.clone())
                .map_err(|e| LoginError::Other(e.to_string()))?;
        let mut auth = GrammersAuth::new(client.clone(), needs.api_hash);
        let mut prompt = Terminal {
            code,
            password: needs.password,
        };
        let me = tg_login::login(&mut auth, &mut prompt, needs.phone).await;
        client.disconnect();
        me.map(|me| (me, session.record()))
    });
    let outcome = match result {
        Ok((me, record)) => {
            StoredSession::replace(&store, account, &record)?;
            crate::telegram::logged_in(&store, account)?;
            println!("account {account} is logged in as {me}");
            Ok(())
        }
        Err(e) if e.is_bad_input() => Err(input("", format!("account {account}: {e}"))),
        Err(e) => Err(Failure::Other(format!("account {account}: {e}"))),
    };
    store.records("tg_sessions")?.remove(&scratch)?;
    store
        .records("tg_peers")?
        .remove_prefix(&format!("{scratch}\0"))?;
    store.flush()?;
    outcome
}

/// `colloquy check`: every problem of the config and its audiences.
pub fn check(config_path: &Path) -> Result<(), Failure> {
    let config = Config::load(config_path)?;
    let mut problems = Vec::new();
    let mut contacts = 0;
    for a in &config.file.audiences {
        let file = audience::read(&config.resolve(&a.file));
        contacts += file.rows.len();
        problems.extend(file.problems);
    }
    let (engines, engine_problems) = EngineRuntime::start(&config, Arc::new(SystemClock), 1);
    problems.extend(engine_problems.into_iter().map(|m| Problem::new("", m)));
    problems.extend(try_openings(&config, &engines));
    if let Source::Store(store) = source(&config)? {
        problems.extend(orphaned_variants(&config, &store, &engines)?);
    }
    if !problems.is_empty() {
        return Err(Failure::Input(Problems(problems)));
    }
    let f = &config.file;
    println!(
        "{} is valid: {}, {}, {} ({}), {}",
        config.shown(),
        plural(f.campaigns.len(), "campaign"),
        plural(f.accounts.len(), "account"),
        plural(f.audiences.len(), "audience"),
        plural(contacts, "contact"),
        plural(engines.engines().len(), "engine"),
    );
    Ok(())
}

/// Open dialogs on a variant no longer in the config whose engine is gone
/// too: nothing could answer them. (One whose engine still exists runs on.)
fn orphaned_variants(
    config: &Config,
    store: &Store,
    engines: &EngineRuntime,
) -> Result<Vec<Problem>, StoreError> {
    let loaded = engines.engines();
    let mut stranded: std::collections::BTreeMap<(usize, String, String), usize> =
        Default::default();
    for d in store.dialog_summaries(false) {
        let d = d?;
        let (Some(v), true) = (
            &d.variant,
            matches!(d.status, DialogStatus::Active | DialogStatus::Handoff),
        ) else {
            continue;
        };
        let Some(i) = config
            .file
            .campaigns
            .iter()
            .position(|c| c.name == d.campaign)
        else {
            continue;
        };
        if config.file.campaigns[i].variant(&v.name).is_none() && !loaded.contains(&v.engine) {
            *stranded
                .entry((i, v.name.clone(), v.engine.clone()))
                .or_default() += 1;
        }
    }
    Ok(stranded
        .into_iter()
        .map(|((i, name, engine), n)| {
            Problem::new(
                format!("{}: campaigns[{i}].variants", config.shown()),
                format!(
                    "{} on variant \"{name}\", which is no longer declared, and its engine \"{engine}\" has no file {}: declare the variant again, or put the engine file back, so they can be answered",
                    if n == 1 { "1 open dialog is".to_string() } else { format!("{n} open dialogs are") },
                    config.engine_path(&engine).display()
                ),
            )
        })
        .collect())
}

/// Contacts of each audience a campaign's opening is tried on by `check`.
const TRIED_ROWS: usize = 3;

/// Runs each campaign's opening (its `get_opening`, or its prompt template)
/// on the first rows of its audiences, as the host would, with no transport
/// and no store: an engine that fails on real rows fails here first.
fn try_openings(config: &Config, engines: &EngineRuntime) -> Vec<Problem> {
    use crate::engine::{Call, EngineError};
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return Vec::new();
    };
    let clock = SystemClock;
    let mut problems = Vec::new();
    for (i, camp) in config.file.campaigns.iter().enumerate() {
        // The campaign itself, or each of its variants.
        let mut tried: Vec<(String, Option<&str>)> = camp
            .variants
            .iter()
            .enumerate()
            .map(|(j, v)| {
                (
                    format!("campaigns[{i}].variants[{j}]"),
                    Some(v.name.as_str()),
                )
            })
            .collect();
        if tried.is_empty() {
            tried.push((format!("campaigns[{i}]"), None));
        }
        for (key, variant) in tried {
            let runs = camp.runs_on_declared(variant);
            if engines.load_error(&runs.engine).is_some() {
                continue; // reported as the engine's load error
            }
            let template = runs.prompt_template.as_ref().map(|t| config.resolve(t));
            let audiences = config
                .file
                .audiences
                .iter()
                .filter(|a| camp.audiences.contains(&a.name));
            'audiences: for a in audiences {
                let path = config.resolve(&a.file);
                for row in audience::read(&path).rows.into_iter().take(TRIED_ROWS) {
                    let line = row.line;
                    let mut ctx = chat::trial_ctx(camp, row.into(), &clock);
                    ctx.variant = variant.map(str::to_string);
                    ctx.prompt_template = template
                        .as_ref()
                        .and_then(|p| engines.snapshot().templates.get(p).cloned());
                    match rt.block_on(engines.call(&runs.engine, Call::Opening, ctx)) {
                        Ok(_) => {}
                        Err(EngineError::Stopped) => return problems,
                        Err(e) => {
                            problems.push(Problem::new(
                                format!("{}: {key}", config.shown()),
                                format!("{e} (the opening tried on {}:{line})", a.file.display()),
                            ));
                            break 'audiences;
                        }
                    }
                }
            }
        }
    }
    problems
}

/// `colloquy backup DEST`: a consistent copy of the store, made by the
/// running host if there is one.
fn backup(config_path: &Path, dest: &Path) -> Result<(), Failure> {
    let config = Config::load(config_path)?;
    // The host may run elsewhere than here: it gets the whole path.
    let dest = std::path::absolute(dest).map_err(|e| input("DEST", e.to_string()))?;
    let request = control::Request::Backup {
        dest: dest.display().to_string(),
    };
    report(&config, request)
}

/// `colloquy restore FROM`: a backup in place of the store, which is kept.
fn restore(config_path: &Path, from: &Path, accept_older: bool) -> Result<(), Failure> {
    let config = Config::load(config_path)?;
    let data_dir = config.data_dir();
    let kept = match crate::store::restore(from, &data_dir, accept_older) {
        Err(StoreError::Locked(dir)) => {
            return Err(input(
                "",
                format!(
                "a host is running on {dir}; stop it first: a store is restored while no host runs"
            ),
            ))
        }
        other => other?,
    };
    println!(
        "restored the backup in {} to {}",
        from.display(),
        data_dir.display()
    );
    if let Some(kept) = kept {
        println!("the store it replaced is kept in {}", kept.display());
    }
    Ok(())
}

/// `colloquy release-contacts`: the contacts of errored dialogs that never
/// got a message go back to their audiences.
fn release_contacts(config_path: &Path, campaign: Option<&str>) -> Result<(), Failure> {
    let config = Config::load(config_path)?;
    if let Some(c) = campaign.filter(|c| config.campaign(c).is_none()) {
        return Err(no_such_campaign(&config, c));
    }
    let store = match Store::open(&config.data_dir()) {
        Err(StoreError::Locked(dir)) => {
            return Err(input(
                "",
                format!("a host is running on {dir}; stop it first: contacts are put back while no host runs"),
            ))
        }
        other => other?,
    };
    let unreached: Vec<_> = store
        .all_dialogs()
        .filter_map(Result::ok)
        .filter(|d| campaign.is_none_or(|c| d.campaign == c))
        .filter(|d| matches!(d.status, crate::model::DialogStatus::Error { .. }) && d.next_seq == 0)
        .map(|d| d.id)
        .collect();
    let mut released = 0;
    for id in unreached {
        if store.release_unreached(id)? {
            released += 1;
        }
    }
    store.flush()?;
    println!(
        "put back {} of dialogs that ended in error before any message was written",
        plural(released, "contact")
    );
    Ok(())
}

/// `colloquy run`: the host until SIGINT or SIGTERM.
fn run_host(config_path: &Path) -> Result<(), Failure> {
    let config = Config::load(config_path)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Other(format!("cannot start the runtime: {e}")))?;
    rt.block_on(async move {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let signal = shutdown.clone();
        let stopped = stop_signal();
        tokio::spawn(async move {
            stopped.await;
            signal.cancel();
            tracing::info!("stopping: finishing in-flight work");
        });
        let console = |host| async move { crate::console::serve(host).await.map(|_| ()) };
        crate::host::run(config, shutdown, console)
            .await
            .map_err(|e| match e {
                crate::host::RunError::Input(text) => input("", text),
                crate::host::RunError::Other(text) => Failure::Other(text),
            })
    })?;
    rt.shutdown_timeout(std::time::Duration::from_millis(500));
    Ok(())
}

/// Waits for SIGINT or SIGTERM. The handlers are in place once this
/// returns, before the host does anything: a stop signal during start-up
/// stops the host gracefully too.
fn stop_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let handlers = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        );
        async move {
            let (Ok(mut int), Ok(mut term)) = handlers else {
                let _ = tokio::signal::ctrl_c().await;
                return;
            };
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// `colloquy eval FILE [ARG...]`: runs a Lua file in the engine sandbox and
/// prints its result as JSON.
fn eval(config_path: &Path, file: &Path, args: &[String]) -> Result<(), Failure> {
    let config = Config::load(config_path)?;
    let shown = file.display().to_string();
    let text = std::fs::read_to_string(file).map_err(|e| {
        Failure::Input(Problems(vec![Problem::new(
            &shown,
            format!(
                "cannot read the Lua file: {}",
                crate::problem::io_reason(&e)
            ),
        )]))
    })?;
    let (engines, _) = EngineRuntime::start(&config, Arc::new(SystemClock), 1);
    match engines.eval_blocking(&shown, &text, args) {
        Ok(value) => {
            println!("{value}");
            Ok(())
        }
        Err(message) => Err(Failure::Input(Problems(vec![Problem::new("", message)]))),
    }
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// The reporting commands read the store directly when no host runs, and
/// ask the running host over its control endpoint when one does (sled
/// allows one process per store).
enum Source {
    Store(Box<Store>),
    Host,
    Nothing,
}

fn source(config: &Config) -> Result<Source, Failure> {
    let dir = config.data_dir();
    if !dir.join("store").exists() {
        return Ok(Source::Nothing);
    }
    match Store::open(&dir) {
        Ok(s) => Ok(Source::Store(Box::new(s))),
        Err(StoreError::Locked(_)) => Ok(Source::Host),
        Err(e) => Err(e.into()),
    }
}

/// How long a reporting command waits for a host that holds the store but
/// does not answer yet: one that is starting, or one that is stopping.
const HOST_STARTING: std::time::Duration = std::time::Duration::from_secs(10);

/// Prints a report: asked of the running host when one holds the store,
/// read from the store when none does.
fn report(config: &Config, request: control::Request) -> Result<(), Failure> {
    let deadline = std::time::Instant::now() + HOST_STARTING;
    loop {
        let text = match source(config)? {
            Source::Nothing => report_without_store(config, &request)?,
            Source::Store(store) => report_from(config, &store, &request)?,
            Source::Host => match control::ask(&config.data_dir(), request.clone()) {
                Ok(control::Response { ok: true, text, .. }) => text,
                Ok(control::Response {
                    ok: false, text, ..
                }) => return Err(Failure::Input(Problems(vec![Problem::new("", text)]))),
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                }
                Err(e) => return Err(Failure::Other(e)),
            },
        };
        print!("{text}");
        return Ok(());
    }
}

fn no_dialog(id: DialogId) -> Failure {
    Failure::Input(Problems(vec![Problem::new(
        "dialog",
        format!("there is no dialog {id}"),
    )]))
}

fn report_from(
    config: &Config,
    store: &Store,
    request: &control::Request,
) -> Result<String, Failure> {
    Ok(match request {
        control::Request::Status { json } => {
            report::status(config, Some(store), &report::Live::default(), *json)?
        }
        control::Request::Dialogs {
            campaign,
            status,
            outcome,
            json,
        } => report::dialogs(
            store,
            &report::DialogFilter {
                campaign: campaign.as_deref(),
                status: status.as_deref(),
                outcome: outcome.as_deref(),
            },
            *json,
        )?,
        control::Request::Reply { dialog, text } => {
            let key = crate::model::IdempotencyKey(rand::random());
            let now = crate::clock::Clock::now(&crate::clock::SystemClock);
            crate::host::takeover::queue_human(store, *dialog, text, key, now)
                .map_err(|e| input("", e))?;
            store.flush()?;
            format!("queued in dialog {dialog}; it goes out when a host runs and the account's limits allow\n")
        }
        control::Request::Handback { dialog } => {
            crate::host::takeover::hand_back(store, *dialog).map_err(|e| input("", e))?;
            store.flush()?;
            format!("dialog {dialog} is the engine's again\n")
        }
        control::Request::Dialog { id } => {
            report::dialog(store, *id)?.ok_or_else(|| no_dialog(*id))?
        }
        control::Request::Backup { dest } => report::backup(store, Path::new(dest))?,
        control::Request::Export(_) => String::new(), // streamed by `export`
    })
}

fn report_without_store(config: &Config, request: &control::Request) -> Result<String, Failure> {
    match request {
        control::Request::Status { json } => Ok(report::status(
            config,
            None,
            &report::Live::default(),
            *json,
        )?),
        control::Request::Dialogs { json: true, .. } | control::Request::Export(_) => {
            Ok(String::new())
        }
        control::Request::Dialogs { json: false, .. } => Ok(report::DIALOGS_HEADER.to_string()),
        control::Request::Dialog { id }
        | control::Request::Reply { dialog: id, .. }
        | control::Request::Handback { dialog: id } => Err(no_dialog(*id)),
        control::Request::Backup { .. } => Err(input(
            "",
            format!(
                "there is no store in {} to back up",
                config.data_dir().display()
            ),
        )),
    }
}

fn export(
    config_path: &Path,
    campaign: Option<String>,
    what: crate::export::What,
    format: crate::export::Format,
    since: Option<&str>,
) -> Result<(), Failure> {
    let config = Config::load(config_path)?;
    if let Some(c) = campaign.as_deref().filter(|c| config.campaign(c).is_none()) {
        return Err(no_such_campaign(&config, c));
    }
    // `--since 7d` counts back from the clock the host runs on.
    let now = match config.file.transport.kind {
        crate::config::TransportKind::Sim => crate::sim::clock_reading(&config),
        crate::config::TransportKind::Telegram => {
            crate::clock::Clock::now(&crate::clock::SystemClock)
        }
    };
    let since = since
        .map(|s| crate::export::parse_since(s, now))
        .transpose()
        .map_err(|e| input("--since", e))?;
    let export = crate::export::Export {
        campaign,
        what,
        format,
        since,
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let deadline = std::time::Instant::now() + HOST_STARTING;
    loop {
        match source(&config)? {
            Source::Nothing => return Ok(()),
            Source::Store(store) => {
                crate::export::write(&config, &store, &export, &mut out)?;
                break;
            }
            Source::Host => match control::ask_streaming(
                &config.data_dir(),
                control::Request::Export(export.clone()),
                &mut out,
            ) {
                Ok(control::Response { ok: true, .. }) => break,
                Ok(control::Response { text, .. }) => return Err(input("", text)),
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(e) => return Err(Failure::Other(e)),
            },
        }
    }
    std::io::Write::flush(&mut out)
        .map_err(|e| Failure::Other(format!("cannot write the export: {e}")))
}

fn status(config_path: &Path, json: bool) -> Result<(), Failure> {
    report(
        &Config::load(config_path)?,
        control::Request::Status { json },
    )
}

fn dialogs(
    config_path: &Path,
    campaign: Option<String>,
    status: Option<String>,
    outcome: Option<String>,
    json: bool,
) -> Result<(), Failure> {
    let config = Config::load(config_path)?;
    if let Some(c) = campaign.as_deref().filter(|c| config.campaign(c).is_none()) {
        return Err(no_such_campaign(&config, c));
    }
    if let Some(s) = status.as_deref() {
        let label = s.split_once(':').map_or(s, |(label, _)| label);
        if crate::model::DialogStatus::tag_of(label).is_none()
            || (label != "finished" && label != s)
        {
            return Err(Failure::Input(Problems(vec![Problem::new(
                "--status",
                format!(
                    "\"{s}\" is not a dialog status; use one of {}",
                    crate::model::DialogStatus::TAGS.join(", ")
                ),
            )])));
        }
    }
    report(
        &config,
        control::Request::Dialogs {
            campaign,
            status,
            outcome,
            json,
        },
    )
}

/// `--campaign` names no campaign of the config: the ones it declares.
pub(crate) fn no_such_campaign(config: &Config, name: &str) -> Failure {
    let names: Vec<&str> = config
        .file
        .campaigns
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    Failure::Input(Problems(vec![Problem::new(
        "--campaign",
        format!(
            "no campaign named \"{name}\" is declared (campaigns: {})",
            names.join(", ")
        ),
    )]))
}

fn dialog(config_path: &Path, id: DialogId) -> Result<(), Failure> {
    report(&Config::load(config_path)?, control::Request::Dialog { id })
}
