//! `config.toml`: its shape (SPEC section 4), parsing with file positions,
//! and the semantic checks that parsing cannot make.
//!
//! [`Config::load`] gives a validated config or every [`Problem`] found.
//! Shape errors (syntax, unknown keys, wrong types, bad values) stop parsing
//! and carry `file:line:column`; semantic problems carry the key path, such
//! as `campaigns[0].accounts[1]`, and are all reported together.

pub mod edit;
mod validate;
pub mod values;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::problem::{io_reason, Problem, Problems};

pub use validate::{is_env_name, is_module_name};
pub use values::{ByteSize, Dur, DurRange, Moment, TimeOfDay, Zone};

/// The validated configuration, with the place it was read from.
#[derive(Debug, Clone)]
pub struct Config {
    /// The config file as given on the command line.
    pub path: PathBuf,
    /// The directory relative paths in the file are resolved against.
    pub base_dir: PathBuf,
    pub file: ConfigFile,
    /// Each account's place in `file.accounts`, by name: the answer path
    /// looks up the limits of every account in a batch, and a pool may
    /// hold thousands.
    account_places: HashMap<String, usize>,
}

/// The file as written, with defaults filled in.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub host: Host,
    #[serde(default)]
    pub transport: TransportSection,
    #[serde(default)]
    pub sim: Sim,
    pub telegram: Option<Telegram>,
    #[serde(default)]
    pub safety: Safety,
    #[serde(default)]
    pub engines: Engines,
    #[serde(default)]
    pub alerts: Alerts,
    #[serde(default)]
    pub compliance: Compliance,
    /// The web console; off when the section is absent.
    pub console: Option<Console>,
    #[serde(default)]
    pub accounts: Vec<Account>,
    #[serde(default)]
    pub audiences: Vec<Audience>,
    #[serde(default)]
    pub campaigns: Vec<Campaign>,
}

/// `[console]`: the operator's web console, served by the running host.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Console {
    /// Where it listens, `127.0.0.1:8750` by default; another address than
    /// loopback is logged as a warning.
    #[serde(default = "Console::default_listen")]
    pub listen: std::net::SocketAddr,
    /// An environment variable whose value also logs in, beside the token
    /// in `data_dir/console.token`.
    pub password_env: Option<String>,
    /// Serve `/metrics` without a login (for a Prometheus on this machine).
    #[serde(default)]
    pub open_metrics: bool,
}

impl Console {
    fn default_listen() -> std::net::SocketAddr {
        ([127, 0, 0, 1], 8750).into()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Host {
    pub data_dir: PathBuf,
    pub engines_dir: PathBuf,
    pub scripts_dir: PathBuf,
}

impl Default for Host {
    fn default() -> Host {
        Host {
            data_dir: "data".into(),
            engines_dir: "engines".into(),
            scripts_dir: "scripts".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransportKind {
    #[default]
    Sim,
    Telegram,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportSection {
    #[serde(default)]
    pub kind: TransportKind,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sim {
    pub seed: u64,
    pub time_scale: f64,
    pub reply_probability: f64,
    pub reply_delay: DurRange,
    /// Lua file that writes the contacts' replies.
    pub persona: Option<PathBuf>,
    /// When a new simulated world's clock starts (Monday 2026-01-05 08:00
    /// UTC by default).
    pub start: Option<Moment>,
    pub faults: SimFaults,
    /// Contacts that answer some texts more readily: the first entry whose
    /// `contains` is in a message sets its reply probability.
    pub reply_rates: Vec<ReplyRate>,
}

/// `[[sim.reply_rates]]`: the reply probability for messages containing
/// a text (so simulated contacts can prefer a variant's wording).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplyRate {
    pub contains: String,
    pub probability: f64,
}

impl Sim {
    /// The probability that a contact answers `text`.
    pub fn reply_probability_of(&self, text: &str) -> f64 {
        self.reply_rates
            .iter()
            .find(|r| text.contains(&r.contains))
            .map_or(self.reply_probability, |r| r.probability)
    }
}

impl Default for Sim {
    fn default() -> Sim {
        Sim {
            seed: 42,
            time_scale: 60.0,
            reply_probability: 0.6,
            reply_delay: DurRange::between(30, 1200),
            persona: None,
            start: None,
            faults: SimFaults::default(),
            reply_rates: Vec::new(),
        }
    }
}

/// Chances per send attempt (`privacy_restricted`: per contact).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimFaults {
    pub flood_wait: f64,
    pub flood_wait_duration: DurRange,
    pub peer_flood: f64,
    pub ban: f64,
    pub privacy_restricted: f64,
    pub transient: f64,
    pub timeout_delivered: f64,
}

impl Default for SimFaults {
    fn default() -> SimFaults {
        SimFaults {
            flood_wait: 0.0,
            flood_wait_duration: DurRange::between(60, 1800),
            peer_flood: 0.0,
            ban: 0.0,
            privacy_restricted: 0.0,
            transient: 0.0,
            timeout_delivered: 0.0,
        }
    }
}

impl SimFaults {
    /// The chances with their names, for validation and reporting.
    pub fn chances(&self) -> [(&'static str, f64); 6] {
        [
            ("flood_wait", self.flood_wait),
            ("peer_flood", self.peer_flood),
            ("ban", self.ban),
            ("privacy_restricted", self.privacy_restricted),
            ("transient", self.transient),
            ("timeout_delivered", self.timeout_delivered),
        ]
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Telegram {
    pub api_id: i64,
    /// Name of the environment variable that holds the api_hash.
    pub api_hash_env: String,
    /// Show "typing…" before each reply, for a time proportional to it.
    pub typing: bool,
    pub typing_chars_per_second: f64,
    /// Mark incoming messages read once they are stored.
    pub read_marks: bool,
}

impl Default for Telegram {
    fn default() -> Self {
        Telegram {
            api_id: 0,
            api_hash_env: "TELEGRAM_API_HASH".into(),
            typing: true,
            typing_chars_per_second: 20.0,
            read_marks: true,
        }
    }
}

/// Limits of one account: `[safety]`, merged with `[accounts.safety]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Safety {
    pub max_per_hour: u32,
    pub max_per_day: u32,
    pub max_new_dialogs_per_day: u32,
    pub min_interval: Dur,
    pub jitter: Dur,
    pub stuck_after: Dur,
    pub max_follow_ups: u32,
    pub reply_delay: DurRange,
    pub peer_flood_cooldown: Dur,
    pub warmup: Dur,
    pub warmup_start: f64,
    pub retry_attempts: u32,
    pub retry_max_delay: Dur,
}

impl Default for Safety {
    fn default() -> Safety {
        Safety {
            max_per_hour: 20,
            max_per_day: 100,
            max_new_dialogs_per_day: 20,
            min_interval: Dur::secs(30),
            jitter: Dur::secs(15),
            stuck_after: Dur::secs(86_400),
            max_follow_ups: 2,
            reply_delay: DurRange::between(20, 180),
            peer_flood_cooldown: Dur::secs(86_400),
            warmup: Dur::secs(0),
            warmup_start: 0.2,
            retry_attempts: 5,
            retry_max_delay: Dur::secs(600),
        }
    }
}

/// `[accounts.safety]`: any subset of `[safety]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SafetyOverrides {
    pub max_per_hour: Option<u32>,
    pub max_per_day: Option<u32>,
    pub max_new_dialogs_per_day: Option<u32>,
    pub min_interval: Option<Dur>,
    pub jitter: Option<Dur>,
    pub stuck_after: Option<Dur>,
    pub max_follow_ups: Option<u32>,
    pub reply_delay: Option<DurRange>,
    pub peer_flood_cooldown: Option<Dur>,
    pub warmup: Option<Dur>,
    pub warmup_start: Option<f64>,
    pub retry_attempts: Option<u32>,
    pub retry_max_delay: Option<Dur>,
}

impl Safety {
    /// These limits with an account's overrides applied.
    pub fn merged(&self, o: &SafetyOverrides) -> Safety {
        Safety {
            max_per_hour: o.max_per_hour.unwrap_or(self.max_per_hour),
            max_per_day: o.max_per_day.unwrap_or(self.max_per_day),
            max_new_dialogs_per_day: o
                .max_new_dialogs_per_day
                .unwrap_or(self.max_new_dialogs_per_day),
            min_interval: o.min_interval.unwrap_or(self.min_interval),
            jitter: o.jitter.unwrap_or(self.jitter),
            stuck_after: o.stuck_after.unwrap_or(self.stuck_after),
            max_follow_ups: o.max_follow_ups.unwrap_or(self.max_follow_ups),
            reply_delay: o.reply_delay.unwrap_or(self.reply_delay),
            peer_flood_cooldown: o.peer_flood_cooldown.unwrap_or(self.peer_flood_cooldown),
            warmup: o.warmup.unwrap_or(self.warmup),
            warmup_start: o.warmup_start.unwrap_or(self.warmup_start),
            retry_attempts: o.retry_attempts.unwrap_or(self.retry_attempts),
            retry_max_delay: o.retry_max_delay.unwrap_or(self.retry_max_delay),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Engines {
    /// Engine failures in a row, in one campaign's openings, after which
    /// the campaign pauses itself.
    pub pause_after_failures: u32,
    pub instruction_budget: u64,
    pub time_budget: Dur,
    pub memory_limit: ByteSize,
    pub env_allow: Vec<String>,
    pub extra_paths: Vec<PathBuf>,
}

impl Default for Engines {
    fn default() -> Engines {
        Engines {
            pause_after_failures: 3,
            instruction_budget: 10_000_000,
            time_budget: Dur::secs(60),
            memory_limit: ByteSize(64 << 20),
            env_allow: Vec::new(),
            extra_paths: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Alerts {
    pub webhook_url: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Compliance {
    pub opt_out_patterns: Vec<String>,
}

impl Default for Compliance {
    fn default() -> Compliance {
        Compliance {
            opt_out_patterns: crate::host::optout::DEFAULT_PATTERNS
                .iter()
                .map(|p| p.to_string())
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Account {
    pub name: String,
    pub phone: Option<String>,
    pub proxy: Option<String>,
    #[serde(default)]
    pub safety: SafetyOverrides,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Audience {
    pub name: String,
    pub file: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CampaignStatus {
    #[default]
    Active,
    Paused,
    Finished,
}

impl CampaignStatus {
    pub fn label(self) -> &'static str {
        match self {
            CampaignStatus::Active => "active",
            CampaignStatus::Paused => "paused",
            CampaignStatus::Finished => "finished",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendWindow {
    pub start: TimeOfDay,
    pub end: TimeOfDay,
    pub timezone: Zone,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Campaign {
    pub name: String,
    #[serde(default)]
    pub status: CampaignStatus,
    /// Engine name: `engines_dir/NAME.lua`.
    pub engine: String,
    pub prompt_template: Option<PathBuf>,
    pub audiences: Vec<String>,
    pub accounts: Vec<String>,
    pub send_window: Option<SendWindow>,
    /// Free-form values handed to the engine as `ctx.campaign.params`.
    #[serde(default)]
    pub params: BTreeMap<String, toml::Value>,
    /// Versions of the campaign's messages; each dialog gets one at its
    /// opening. None: every dialog runs on the campaign's engine.
    #[serde(default)]
    pub variants: Vec<Variant>,
    /// How new dialogs are shared among the variants.
    #[serde(default)]
    pub allocation: Allocation,
}

/// The audience column that gives a contact's time zone (an IANA name).
pub const TIMEZONE: &str = "timezone";

/// `[[campaigns.variants]]`: a version of a campaign's messages.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    pub name: String,
    /// The campaign's engine when absent.
    pub engine: Option<String>,
    /// The campaign's prompt template when absent.
    pub prompt_template: Option<PathBuf>,
    /// Its share of new dialogs under `fixed` allocation, relative to the
    /// other variants' weights.
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

/// `[campaigns.allocation]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Allocation {
    pub method: AllocationMethod,
    /// What counts as a success for the bandit.
    pub goal: Goal,
    /// Under `bandit`, each variant's least share of new dialogs.
    pub floor: f64,
}

impl Default for Allocation {
    fn default() -> Allocation {
        Allocation {
            method: AllocationMethod::Fixed,
            goal: Goal::Reply,
            floor: 0.05,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AllocationMethod {
    /// By the variants' weights.
    Fixed,
    /// Thompson sampling on the goal, with a floor of exploration.
    Bandit,
}

/// A dialog's success: `"reply"` (the contact answered) or
/// `"finish:LABEL"` (the engine finished it with that outcome).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Goal {
    Reply,
    Finish(String),
}

impl TryFrom<String> for Goal {
    type Error = String;
    fn try_from(s: String) -> Result<Goal, String> {
        match s.strip_prefix("finish:") {
            _ if s == "reply" => Ok(Goal::Reply),
            Some(label) if !label.is_empty() => Ok(Goal::Finish(label.to_string())),
            _ => Err(format!(
                "goal \"{s}\" is neither \"reply\" nor \"finish:LABEL\" (like \"finish:booked\")"
            )),
        }
    }
}

impl fmt::Display for Goal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Goal::Reply => write!(f, "reply"),
            Goal::Finish(label) => write!(f, "finish:{label}"),
        }
    }
}

/// What a dialog runs on: an engine and a prompt template.
#[derive(Debug, Clone, PartialEq)]
pub struct RunsOn {
    pub engine: String,
    pub prompt_template: Option<PathBuf>,
}

impl Campaign {
    /// The send window for `contact`: the campaign's hours in the contact's
    /// own `timezone` field when it has one, in the campaign's zone
    /// otherwise.
    pub fn window_for(&self, contact: &crate::model::Contact) -> Option<SendWindow> {
        let mut w = self.send_window.clone()?;
        if let Some(tz) = contact.fields.get(TIMEZONE).and_then(|t| t.parse().ok()) {
            w.timezone = Zone(tz);
        }
        Some(w)
    }

    /// The variant named `name`, if the campaign declares it.
    pub fn variant(&self, name: &str) -> Option<&Variant> {
        self.variants.iter().find(|v| v.name == name)
    }

    /// What a dialog on `variant` runs on: the variant's engine and
    /// template where it sets them, the campaign's otherwise; a variant
    /// no longer in the config keeps the engine it had at its opening.
    pub fn runs_on(&self, variant: Option<&crate::model::DialogVariant>) -> RunsOn {
        match variant {
            Some(v) if self.variant(&v.name).is_none() => RunsOn {
                engine: v.engine.clone(),
                prompt_template: self.prompt_template.clone(),
            },
            _ => self.runs_on_declared(variant.map(|v| v.name.as_str())),
        }
    }

    /// What a new dialog on the declared variant `name` (`None`: the
    /// campaign itself) runs on.
    pub fn runs_on_declared(&self, name: Option<&str>) -> RunsOn {
        let declared = name.and_then(|n| self.variant(n));
        RunsOn {
            engine: declared
                .and_then(|d| d.engine.clone())
                .unwrap_or_else(|| self.engine.clone()),
            prompt_template: declared
                .and_then(|d| d.prompt_template.clone())
                .or_else(|| self.prompt_template.clone()),
        }
    }

    /// Every engine the campaign's declared variants run on, the
    /// campaign's own first.
    pub fn engines(&self) -> Vec<&str> {
        let mut out = vec![self.engine.as_str()];
        for v in &self.variants {
            if let Some(e) = &v.engine {
                if !out.contains(&e.as_str()) {
                    out.push(e);
                }
            }
        }
        out
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, Problems> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            Problems(vec![Problem::new(
                &shown,
                format!("cannot read the config file: {}", io_reason(&e)),
            )])
        })?;
        Config::from_text(path, &text)
    }

    /// Parses and checks config text read from `path`.
    pub fn from_text(path: &Path, text: &str) -> Result<Config, Problems> {
        let config = Config::parse(path, text)?;
        let problems = validate::validate(&config);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(Problems(problems))
        }
    }

    /// Parses config text without the semantic checks.
    pub fn parse(path: &Path, text: &str) -> Result<Config, Problems> {
        let file: ConfigFile =
            toml::from_str(text).map_err(|e| Problems(vec![toml_problem(path, text, &e)]))?;
        let base_dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let mut account_places = HashMap::with_capacity(file.accounts.len());
        for (i, a) in file.accounts.iter().enumerate() {
            account_places.entry(a.name.clone()).or_insert(i);
        }
        Ok(Config {
            path: path.to_path_buf(),
            base_dir,
            file,
            account_places,
        })
    }

    /// A path from the file, resolved against the config's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.resolve(&self.file.host.data_dir)
    }

    pub fn engines_dir(&self) -> PathBuf {
        self.resolve(&self.file.host.engines_dir)
    }

    pub fn scripts_dir(&self) -> PathBuf {
        self.resolve(&self.file.host.scripts_dir)
    }

    /// `engines_dir/NAME.lua`.
    pub fn engine_path(&self, engine: &str) -> PathBuf {
        self.engines_dir().join(format!("{engine}.lua"))
    }

    pub fn account(&self, name: &str) -> Option<&Account> {
        let place = *self.account_places.get(name)?;
        self.file.accounts.get(place).filter(|a| a.name == name)
    }

    pub fn campaign(&self, name: &str) -> Option<&Campaign> {
        self.file.campaigns.iter().find(|c| c.name == name)
    }

    /// What a dialog of `campaign` on `variant` runs on; see
    /// [`Campaign::runs_on`]. A campaign gone from the config leaves only
    /// the variant's engine, if there was one.
    pub fn runs_on(&self, campaign: &str, variant: Option<&crate::model::DialogVariant>) -> RunsOn {
        match self.campaign(campaign) {
            Some(c) => c.runs_on(variant),
            None => RunsOn {
                engine: variant.map(|v| v.engine.clone()).unwrap_or_default(),
                prompt_template: None,
            },
        }
    }

    /// The limits in force for an account: `[safety]` merged with its own.
    pub fn account_safety(&self, name: &str) -> Safety {
        match self.account(name) {
            Some(a) => self.file.safety.merged(&a.safety),
            None => self.file.safety.clone(),
        }
    }

    /// The config file's name as shown in messages.
    pub fn shown(&self) -> String {
        self.path.display().to_string()
    }
}

/// A TOML parse or shape error as `file:line:column: message`.
fn toml_problem(path: &Path, text: &str, e: &toml::de::Error) -> Problem {
    let mut location = path.display().to_string();
    if let Some(span) = e.span() {
        let (line, col) = line_col(text, span.start);
        location = format!("{location}:{line}:{col}");
        if let Some(key) = key_at(text, span.start) {
            location = format!("{location}: {key}");
        }
    }
    let mut message = in_words(&e.message().trim().replace('\n', " "));
    for secret in ["api_hash", "api_key", "password", "token"] {
        if message.contains(&format!("unknown field `{secret}`")) {
            message.push_str(&format!(
                "; secrets never go in the file: name an environment variable with `{secret}_env`"
            ));
        }
    }
    Problem::new(location, message)
}

/// serde's names of Rust types in a message, in the user's words.
fn in_words(message: &str) -> String {
    [
        ("expected u8", "expected a whole number from 0 to 255"),
        ("expected u16", "expected a whole number from 0 to 65535"),
        (
            "expected u32",
            "expected a whole number from 0 to 4294967295",
        ),
        ("expected u64", "expected a whole number, 0 or more"),
        ("expected usize", "expected a whole number, 0 or more"),
        ("expected i64", "expected a whole number"),
        ("expected f64", "expected a number"),
        ("expected f32", "expected a number"),
    ]
    .iter()
    .fold(message.to_string(), |m, (rust, words)| {
        // Whole words only: "expected u32" is not "expected u32x".
        match m.find(rust) {
            Some(i) if !m[i + rust.len()..].starts_with(|c: char| c.is_alphanumeric()) => {
                m.replacen(rust, words, 1)
            }
            _ => m,
        }
    })
}

/// The key path (`safety.max_per_day`, `campaigns[0].send_window.start`)
/// whose key or value holds a byte offset of the file.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let doc = toml_edit::Document::parse(text).ok()?;
    let mut path = String::new();
    let mut table = doc.as_table();
    'down: loop {
        for (key, item) in table.iter() {
            let holds =
                |span: Option<std::ops::Range<usize>>| span.is_some_and(|s| s.contains(&offset));
            let at_key = table.key(key).is_some_and(|k| holds(k.span()));
            let name = if path.is_empty() {
                key.to_string()
            } else {
                format!("{path}.{key}")
            };
            match item {
                toml_edit::Item::Table(t) if at_key || holds(t.span()) || contains(t, offset) => {
                    path = name;
                    table = t;
                    continue 'down;
                }
                toml_edit::Item::ArrayOfTables(a) => {
                    for (i, t) in a.iter().enumerate() {
                        if holds(t.span()) || contains(t, offset) {
                            path = format!("{name}[{i}]");
                            table = t;
                            continue 'down;
                        }
                    }
                }
                toml_edit::Item::Value(v) if at_key || holds(v.span()) => {
                    return Some(inline_key(name, v, offset));
                }
                _ => {}
            }
        }
        return (!path.is_empty()).then_some(path);
    }
}

/// Whether any key or value of a table (not its header) holds the offset.
fn contains(t: &toml_edit::Table, offset: usize) -> bool {
    t.iter().any(|(k, item)| {
        let key = t.key(k).and_then(|k| k.span());
        let value = match item {
            toml_edit::Item::Value(v) => v.span(),
            toml_edit::Item::Table(t) => return contains(t, offset),
            _ => None,
        };
        [key, value]
            .into_iter()
            .flatten()
            .any(|s| s.contains(&offset))
    })
}

/// Inside an inline table (`send_window = { start = "…" }`), the inner key.
fn inline_key(name: String, v: &toml_edit::Value, offset: usize) -> String {
    if let toml_edit::Value::InlineTable(t) = v {
        for (key, inner) in t.iter() {
            if inner.span().is_some_and(|s| s.contains(&offset)) {
                return inline_key(format!("{name}.{key}"), inner, offset);
            }
        }
    }
    name
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, Problems> {
        Config::parse(Path::new("c.toml"), text)
    }

    #[test]
    fn every_parse_error_names_its_key() {
        let cases = [
            (
                "[safety]\nmax_per_day = \"lots\"\n",
                "c.toml:2:15: safety.max_per_day: invalid type: string \"lots\", expected a whole number from 0 to 4294967295",
            ),
            (
                "[safety]\nmin_interval = \"thirty seconds\"\n",
                "c.toml:2:16: safety.min_interval: invalid duration \"thirty seconds\"",
            ),
            (
                "[safety]\nreply_delay = \"5m..1m\"\n",
                "c.toml:2:15: safety.reply_delay: range \"5m..1m\" is reversed",
            ),
            (
                "[[accounts]]\nname = \"a\"\n[accounts.safety]\nmax_per_day = -1\n",
                "c.toml:4:15: accounts[0].safety.max_per_day: invalid value: integer `-1`, expected a whole number from 0 to 4294967295",
            ),
            (
                "[[campaigns]]\nname = \"a\"\nsend_window = { start = \"09:00\", end = \"19:00\", timezone = \"Mars/Olympus\" }\n",
                "campaigns[0].send_window.timezone: unknown time zone \"Mars/Olympus\"",
            ),
        ];
        for (text, want) in cases {
            let got = parse(text).unwrap_err().to_string();
            assert!(got.contains(want), "{got}\n  wanted {want}");
        }
    }

    #[test]
    fn defaults_fill_an_empty_file() {
        let c = parse("").unwrap();
        assert_eq!(c.file.safety, Safety::default());
        assert_eq!(c.file.transport.kind, TransportKind::Sim);
        assert_eq!(c.file.sim.seed, 42);
    }

    #[test]
    fn account_overrides_merge_over_defaults() {
        let c = parse(
            "[safety]\nmax_per_day = 80\n[[accounts]]\nname = \"a\"\n[accounts.safety]\nmax_per_hour = 5\n",
        )
        .unwrap();
        let s = c.account_safety("a");
        assert_eq!((s.max_per_hour, s.max_per_day), (5, 80));
    }

    #[test]
    fn shape_errors_carry_line_and_column() {
        let e = parse("[safety]\nmax_per_hour = 20\nbogus = 1\n").unwrap_err();
        assert_eq!(e.0.len(), 1);
        let s = e.to_string();
        assert!(
            s.starts_with("c.toml:3:1: safety.bogus: unknown field `bogus`"),
            "{s}"
        );
    }

    #[test]
    fn secrets_in_the_file_get_a_hint() {
        let e = parse("[telegram]\napi_id = 1\napi_hash = \"abc\"\n").unwrap_err();
        assert!(e.to_string().contains("api_hash_env"), "{e}");
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }
}
