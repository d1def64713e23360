//! The semantic checks of a parsed config: every one that parsing cannot
//! make, all reported together with their key paths.

use std::collections::HashSet;
use std::path::Path;

use super::{Config, Safety, TransportKind};
use crate::model::Identity;
use crate::problem::Problem;

/// Collects problems under the config file's name.
struct Checker<'a> {
    file: String,
    config: &'a Config,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn fail(&mut self, key: impl AsRef<str>, message: impl Into<String>) {
        let location = format!("{}: {}", self.file, key.as_ref());
        self.problems.push(Problem::new(location, message));
    }

    /// `name` must be an engine with a file in engines/.
    fn engine(&mut self, key: &str, name: &str) {
        if !is_module_name(name) {
            self.fail(
                key,
                format!(
                    "\"{name}\" is not an engine name; name a file of engines/ without \".lua\", like \"scripted\""
                ),
            );
            return;
        }
        let path = self.config.engine_path(name);
        if !path.is_file() {
            let msg = format!("engine \"{name}\" has no file \"{}\"", path.display());
            self.fail(key, msg);
        }
    }

    /// The path must name an existing file.
    fn file_exists(&mut self, key: &str, what: &str, p: &Path) {
        let resolved = self.config.resolve(p);
        if !resolved.is_file() {
            let msg = format!("{what} \"{}\" does not exist", resolved.display());
            self.fail(key, msg);
        }
    }

    fn dir_exists(&mut self, key: &str, what: &str, p: &Path) {
        let resolved = self.config.resolve(p);
        if !resolved.is_dir() {
            let msg = format!("{what} \"{}\" is not a directory", resolved.display());
            self.fail(key, msg);
        }
    }

    fn chance(&mut self, key: &str, p: f64) {
        if !(0.0..=1.0).contains(&p) {
            self.fail(key, format!("must be a chance between 0 and 1, got {p}"));
        }
    }

    fn unique<'n>(&mut self, what: &str, names: impl Iterator<Item = &'n str>) {
        let mut seen = HashSet::new();
        for (i, name) in names.enumerate() {
            if name.trim().is_empty() {
                self.fail(format!("{what}[{i}].name"), "must not be empty");
            } else if !seen.insert(name) {
                self.fail(
                    format!("{what}[{i}].name"),
                    format!("\"{name}\" is declared twice; names must be unique"),
                );
            }
        }
    }

    fn safety(&mut self, key: &str, s: &Safety) {
        for (field, v) in [
            ("max_per_hour", s.max_per_hour),
            ("max_per_day", s.max_per_day),
            ("max_new_dialogs_per_day", s.max_new_dialogs_per_day),
            ("retry_attempts", s.retry_attempts),
        ] {
            if v == 0 {
                self.fail(format!("{key}.{field}"), "must be positive, got 0");
            }
        }
        if s.max_per_hour > s.max_per_day {
            self.fail(
                format!("{key}.max_per_hour"),
                format!(
                    "is {} but max_per_day is {}; an hour cannot allow more than a day",
                    s.max_per_hour, s.max_per_day
                ),
            );
        }
        if s.max_new_dialogs_per_day > s.max_per_day {
            self.fail(
                format!("{key}.max_new_dialogs_per_day"),
                format!(
                    "is {} but max_per_day is {}; every new dialog is a message of the day",
                    s.max_new_dialogs_per_day, s.max_per_day
                ),
            );
        }
        for (field, d) in [
            ("stuck_after", s.stuck_after),
            ("retry_max_delay", s.retry_max_delay),
            ("peer_flood_cooldown", s.peer_flood_cooldown),
        ] {
            if d.0.is_zero() {
                self.fail(format!("{key}.{field}"), "must be longer than 0s");
            }
        }
        if !(s.warmup_start > 0.0 && s.warmup_start <= 1.0) {
            self.fail(
                format!("{key}.warmup_start"),
                format!(
                    "must be a fraction above 0 and at most 1, got {}",
                    s.warmup_start
                ),
            );
        }
    }
}

/// Every semantic problem of the config, in file order.
pub(super) fn validate(config: &Config) -> Vec<Problem> {
    let mut c = Checker {
        file: config.shown(),
        config,
        problems: Vec::new(),
    };
    let f = &config.file;
    if f.host.data_dir.as_os_str().is_empty() {
        c.fail("host.data_dir", "must not be empty");
    }
    c.dir_exists("host.engines_dir", "engines directory", &f.host.engines_dir);
    c.dir_exists("host.scripts_dir", "scripts directory", &f.host.scripts_dir);
    match f.transport.kind {
        TransportKind::Sim => c.sim(&f.sim),
        TransportKind::Telegram => c.telegram(f.telegram.as_ref()),
    }
    c.safety("safety", &f.safety);
    c.engines(&f.engines);
    c.alerts_and_compliance(f);
    c.accounts(f);
    c.unique("audiences", f.audiences.iter().map(|a| a.name.as_str()));
    for (i, a) in f.audiences.iter().enumerate() {
        c.file_exists(&format!("audiences[{i}].file"), "audience file", &a.file);
    }
    c.campaigns(f);
    c.problems
}

impl Checker<'_> {
    fn sim(&mut self, sim: &super::Sim) {
        if !(sim.time_scale > 0.0 && sim.time_scale <= 100_000.0) {
            self.fail(
                "sim.time_scale",
                format!("must be above 0 and at most 100000, got {}", sim.time_scale),
            );
        }
        self.chance("sim.reply_probability", sim.reply_probability);
        for (i, r) in sim.reply_rates.iter().enumerate() {
            self.chance(&format!("sim.reply_rates[{i}].probability"), r.probability);
        }
        for (name, p) in sim.faults.chances() {
            self.chance(&format!("sim.faults.{name}"), p);
        }
        if let Some(persona) = &sim.persona {
            self.file_exists("sim.persona", "persona file", persona);
        }
    }

    fn telegram(&mut self, telegram: Option<&super::Telegram>) {
        let Some(t) = telegram else {
            return self.fail(
                "telegram",
                "transport.kind is \"telegram\" but there is no [telegram] section with api_id and api_hash_env",
            );
        };
        if t.api_id <= 0 {
            self.fail(
                "telegram.api_id",
                format!("must be positive, got {}", t.api_id),
            );
        }
        if !is_env_name(&t.api_hash_env) {
            self.fail(
                "telegram.api_hash_env",
                format!(
                    "must name an environment variable (like TG_API_HASH), got \"{}\"",
                    t.api_hash_env
                ),
            );
        }
    }

    fn engines(&mut self, e: &super::Engines) {
        if e.instruction_budget == 0 {
            self.fail("engines.instruction_budget", "must be positive, got 0");
        }
        if e.time_budget.0.is_zero() {
            self.fail("engines.time_budget", "must be longer than 0s");
        }
        if e.memory_limit.0 < (1 << 20) {
            self.fail(
                "engines.memory_limit",
                format!("must be at least 1MiB, got {} bytes", e.memory_limit.0),
            );
        }
        for (i, name) in e.env_allow.iter().enumerate() {
            if !is_env_name(name) {
                self.fail(
                    format!("engines.env_allow[{i}]"),
                    format!("\"{name}\" is not an environment variable name"),
                );
            }
        }
        for (i, p) in e.extra_paths.iter().enumerate() {
            self.dir_exists(&format!("engines.extra_paths[{i}]"), "module directory", p);
        }
    }

    fn alerts_and_compliance(&mut self, f: &super::ConfigFile) {
        if let Some(url) = &f.alerts.webhook_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                self.fail(
                    "alerts.webhook_url",
                    format!("must be an http:// or https:// URL, got \"{url}\""),
                );
            }
        }
        for (i, p) in f.compliance.opt_out_patterns.iter().enumerate() {
            let key = format!("compliance.opt_out_patterns[{i}]");
            if p.trim().is_empty() {
                self.fail(key, "must not be empty");
            } else if let Some(Err(e)) = crate::host::optout::regex_of(p) {
                let e = e.replace('\n', " ");
                self.fail(key, format!("is not a valid regular expression: {e}"));
            }
        }
    }

    fn accounts(&mut self, f: &super::ConfigFile) {
        self.unique("accounts", f.accounts.iter().map(|a| a.name.as_str()));
        for (i, a) in f.accounts.iter().enumerate() {
            if let Some(phone) = &a.phone {
                if let Err(why) = Identity::normalize_phone(phone) {
                    self.fail(format!("accounts[{i}].phone"), why);
                }
            } else if f.transport.kind == TransportKind::Telegram {
                self.fail(
                    format!("accounts[{i}].phone"),
                    "is required with the telegram transport",
                );
            }
            if let Some(proxy) = &a.proxy {
                if !proxy.starts_with("socks5://") {
                    self.fail(
                        format!("accounts[{i}].proxy"),
                        format!("must be a socks5:// URL, got \"{proxy}\""),
                    );
                }
            }
            // Only an account that changes the defaults can break them anew;
            // problems of [safety] itself are reported once, above.
            let merged = f.safety.merged(&a.safety);
            if merged != f.safety {
                self.safety(&format!("accounts[{i}].safety"), &merged);
            }
        }
    }

    fn campaigns(&mut self, f: &super::ConfigFile) {
        self.unique("campaigns", f.campaigns.iter().map(|c| c.name.as_str()));
        let accounts: HashSet<&str> = f.accounts.iter().map(|a| a.name.as_str()).collect();
        let audiences: HashSet<&str> = f.audiences.iter().map(|a| a.name.as_str()).collect();
        for (i, camp) in f.campaigns.iter().enumerate() {
            let key = format!("campaigns[{i}]");
            self.engine(&format!("{key}.engine"), &camp.engine);
            if let Some(t) = &camp.prompt_template {
                self.file_exists(&format!("{key}.prompt_template"), "prompt template", t);
            }
            variants(self, &key, camp);
            self.names(
                &format!("{key}.audiences"),
                &camp.audiences,
                &audiences,
                "audience",
                "audiences",
            );
            self.names(
                &format!("{key}.accounts"),
                &camp.accounts,
                &accounts,
                "account",
                "accounts",
            );
            if let Some(w) = &camp.send_window {
                if w.start == w.end {
                    self.fail(
                        format!("{key}.send_window"),
                        "start and end are equal, which leaves no time to send",
                    );
                }
            }
        }
    }

    /// A campaign's list of `what`s: at least one, each declared in
    /// `[[section]]`.
    fn names(
        &mut self,
        key: &str,
        named: &[String],
        declared: &HashSet<&str>,
        what: &str,
        section: &str,
    ) {
        if named.is_empty() {
            self.fail(key, format!("must name at least one {what}"));
        }
        for (j, name) in named.iter().enumerate() {
            if !declared.contains(name.as_str()) {
                self.fail(
                    format!("{key}[{j}]"),
                    format!("no {what} named \"{name}\" is declared in [[{section}]]"),
                );
            }
        }
    }
}

/// A campaign's `[[campaigns.variants]]` and `[campaigns.allocation]`.
fn variants(c: &mut Checker, key: &str, camp: &crate::config::Campaign) {
    c.unique(
        &format!("{key}.variants"),
        camp.variants.iter().map(|v| v.name.as_str()),
    );
    for (j, v) in camp.variants.iter().enumerate() {
        let vkey = format!("{key}.variants[{j}]");
        if let Some(e) = &v.engine {
            c.engine(&format!("{vkey}.engine"), e);
        }
        if let Some(t) = &v.prompt_template {
            c.file_exists(&format!("{vkey}.prompt_template"), "prompt template", t);
        }
        if !(v.weight.is_finite() && v.weight > 0.0) {
            c.fail(
                format!("{vkey}.weight"),
                format!("is {}; a weight must be a number above 0", v.weight),
            );
        }
    }
    let a = &camp.allocation;
    let n = camp.variants.len();
    if a.method == crate::config::AllocationMethod::Bandit && n < 2 {
        c.fail(
            format!("{key}.allocation.method"),
            format!("\"bandit\" shares dialogs among variants, and the campaign declares {n}; declare at least two [[campaigns.variants]]"),
        );
    }
    if !(0.0..=1.0).contains(&a.floor) || (n > 0 && a.floor * n as f64 > 1.0) {
        c.fail(
            format!("{key}.allocation.floor"),
            format!(
                "is {}; it is each variant's least share of new dialogs, so it must be from 0 to 1/{} (one over the number of variants)",
                a.floor,
                n.max(1)
            ),
        );
    }
}

/// `[A-Za-z_][A-Za-z0-9_]*`: a plausible environment variable name.
pub fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A Lua module or engine name: letters, digits, `_`, `-`, and dots between
/// parts; never a path.
pub fn is_module_name(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_env_name("OPENAI_API_KEY"));
        assert!(!is_env_name("sk-123"));
        assert!(is_module_name("scripted"));
        assert!(is_module_name("lib.util"));
        assert!(!is_module_name("../etc/passwd"));
        assert!(!is_module_name("a/b"));
    }
}
