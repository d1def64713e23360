//! `colloquy check` driven as a user runs it: the shipped config passes, and
//! every kind of bad input gets one clear sentence and exit code 2.

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_colloquy");

/// A project directory with engines, scripts, an audience and a config.
struct Project {
    dir: tempfile::TempDir,
}

const GOOD: &str = r#"
[host]
data_dir = "data"

[[accounts]]
name = "alice"
phone = "+15550000001"

[[audiences]]
name = "leads"
file = "leads.csv"

[[campaigns]]
name = "spring"
engine = "echo"
audiences = ["leads"]
accounts = ["alice"]
send_window = { start = "09:00", end = "19:00", timezone = "Europe/Berlin" }
"#;

impl Project {
    fn new(config: &str) -> Project {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("engines")).unwrap();
        std::fs::create_dir_all(dir.path().join("scripts")).unwrap();
        std::fs::write(
            dir.path().join("engines/echo.lua"),
            "return { get_opening = function(ctx) return 'hi' end, get_response = function(ctx, m) return m.text end }",
        )
        .unwrap();
        std::fs::write(dir.path().join("leads.csv"), "username\nalice_a\n").unwrap();
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        Project { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn check(&self) -> (i32, String, String) {
        run_check(&self.path("config.toml"))
    }
}

fn run_check(config: &Path) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The config with `from` replaced by `to` fails with exit 2 and a message
/// that contains every one of `expect`.
fn fails(from: &str, to: &str, expect: &[&str]) {
    assert!(GOOD.contains(from), "test setup: {from:?} not in GOOD");
    let p = Project::new(&GOOD.replacen(from, to, 1));
    assert_bad(&p, expect);
}

fn assert_bad(p: &Project, expect: &[&str]) {
    let (code, stdout, stderr) = p.check();
    assert_eq!(code, 2, "stdout: {stdout}\nstderr: {stderr}");
    for e in expect {
        assert!(stderr.contains(e), "expected {e:?} in:\n{stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
    for line in stderr.lines() {
        assert!(
            line.contains("config.toml") || line.contains(".csv") || line.contains(".md:"),
            "no location in {line:?}"
        );
    }
}

#[test]
fn the_shipped_config_is_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (code, stdout, stderr) = run_check(&root.join("config.toml"));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("is valid: 1 campaign, 2 accounts, 1 audience (200 contacts)"),
        "{stdout}"
    );
}

#[test]
fn a_good_config_passes() {
    let (code, stdout, stderr) = Project::new(GOOD).check();
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("1 contact"), "{stdout}");
}

#[test]
fn missing_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, stderr) = run_check(&dir.path().join("nope.toml"));
    assert_eq!(code, 2);
    assert!(
        stderr.contains("nope.toml: cannot read the config file: no such file"),
        "{stderr}"
    );
}

#[test]
fn toml_syntax_error_has_line_and_column() {
    fails(
        "name = \"alice\"",
        "name = \"alice",
        &["config.toml:6:14", "invalid basic string"],
    );
}

#[test]
fn unknown_key() {
    fails(
        "[host]",
        "[host]\ncolour = \"blue\"",
        &["config.toml:3:1", "unknown field `colour`"],
    );
}

#[test]
fn wrong_type() {
    fails(
        "[host]",
        "[safety]\nmax_per_hour = \"many\"\n[host]",
        &["config.toml:3:16", "invalid type"],
    );
}

#[test]
fn zero_limit() {
    fails(
        "[host]",
        "[safety]\nmax_per_day = 0\n[host]",
        &["safety.max_per_day: must be positive, got 0"],
    );
}

#[test]
fn negative_limit() {
    fails(
        "[host]",
        "[safety]\nmax_per_day = -5\n[host]",
        &["config.toml:3:15", "-5"],
    );
}

#[test]
fn inconsistent_limits_are_all_reported() {
    let p = Project::new(&GOOD.replacen(
        "phone = \"+15550000001\"",
        "phone = \"+15550000001\"\n[accounts.safety]\nmax_per_hour = 50\nmax_per_day = 40\nmax_new_dialogs_per_day = 45",
        1,
    ));
    assert_bad(
        &p,
        &[
            "accounts[0].safety.max_per_hour: is 50 but max_per_day is 40",
            "accounts[0].safety.max_new_dialogs_per_day: is 45 but max_per_day is 40",
        ],
    );
}

/// A mistake: the text added to the good config's campaign, files written
/// beside it, the sentence expected.
type Case = (String, Vec<(&'static str, &'static str)>, &'static str);

/// Variants, allocation, spintax and contact time zones: each mistake,
/// (the text added to the good config's campaign, files written beside
/// it, the sentence expected).
#[test]
fn variant_allocation_spintax_and_timezone_mistakes() {
    let variant = |body: &str| format!("\n[[campaigns.variants]]\n{body}");
    let cases: Vec<Case> = vec![
        (
            variant("name = \"a\"\nengine = \"nope\""),
            vec![],
            "campaigns[0].variants[0].engine: engine \"nope\" has no file",
        ),
        (
            variant("name = \"a\"") + &variant("name = \"a\""),
            vec![],
            "campaigns[0].variants[1].name: \"a\" is declared twice",
        ),
        (
            variant("name = \"a\"\nweight = 0"),
            vec![],
            "campaigns[0].variants[0].weight: is 0; a weight must be a number above 0",
        ),
        (
            variant("name = \"a\"\nprompt_template = \"gone.md\""),
            vec![],
            "campaigns[0].variants[0].prompt_template: prompt template",
        ),
        (
            "\n[campaigns.allocation]\nmethod = \"bandit\"".to_string() + &variant("name = \"a\""),
            vec![],
            "campaigns[0].allocation.method: \"bandit\" shares dialogs among variants, and the campaign declares 1",
        ),
        (
            "\n[campaigns.allocation]\nfloor = 0.6".to_string()
                + &variant("name = \"a\"")
                + &variant("name = \"b\""),
            vec![],
            "campaigns[0].allocation.floor: is 0.6; it is each variant's least share",
        ),
        (
            "\n[campaigns.allocation]\ngoal = \"booked\"".to_string(),
            vec![],
            "goal \"booked\" is neither \"reply\" nor \"finish:LABEL\"",
        ),
        (
            "\nprompt_template = \"hello.md\"".to_string(),
            vec![("hello.md", "Hi there.\n{Hello|Hey {{contact.first_name}}\n")],
            "hello.md:2: spintax: this { is never closed; write \\{ for a literal brace (column 1)",
        ),
        (
            String::new(),
            vec![("leads.csv", "username,timezone\nalice_a,Asia/Tokyo\nbobby_b,Mars/Olympus\n")],
            "leads.csv:3: timezone \"Mars/Olympus\" is not a known time zone (an IANA name like Europe/Berlin); row skipped",
        ),
    ];
    let end = "timezone = \"Europe/Berlin\" }";
    assert!(GOOD.contains(end), "test setup");
    for (added, files, expect) in cases {
        let config = GOOD.replacen(end, &format!("{end}{added}"), 1);
        let p = Project::new(&config);
        for (name, text) in files {
            std::fs::write(p.path(name), text).unwrap();
        }
        assert_bad(&p, &[expect]);
    }
}

#[test]
fn unknown_timezone() {
    fails(
        "Europe/Berlin",
        "Mars/Olympus",
        &["unknown time zone \"Mars/Olympus\""],
    );
}

#[test]
fn unknown_account_audience_and_engine_are_all_reported() {
    let p = Project::new(
        &GOOD
            .replacen(
                "accounts = [\"alice\"]",
                "accounts = [\"alice\", \"bob\"]",
                1,
            )
            .replacen("audiences = [\"leads\"]", "audiences = [\"vips\"]", 1)
            .replacen("engine = \"echo\"", "engine = \"nosuch\"", 1),
    );
    assert_bad(
        &p,
        &[
            "campaigns[0].accounts[1]: no account named \"bob\"",
            "campaigns[0].audiences[0]: no audience named \"vips\"",
            "campaigns[0].engine: engine \"nosuch\" has no file",
        ],
    );
}

#[test]
fn engine_named_by_path_is_refused() {
    fails(
        "engine = \"echo\"",
        "engine = \"../echo\"",
        &["is not an engine name"],
    );
}

#[test]
fn missing_audience_file() {
    fails(
        "file = \"leads.csv\"",
        "file = \"gone.csv\"",
        &[
            "audiences[0].file: audience file",
            "gone.csv\" does not exist",
        ],
    );
}

#[test]
fn duplicate_names() {
    fails(
        "[[audiences]]",
        "[[accounts]]\nname = \"alice\"\n\n[[audiences]]",
        &["accounts[1].name: \"alice\" is declared twice"],
    );
}

#[test]
fn unparseable_duration() {
    fails(
        "[host]",
        "[safety]\nmin_interval = \"5 fortnights\"\n[host]",
        &["config.toml:3:16", "invalid duration \"5 fortnights\""],
    );
}

#[test]
fn reversed_range() {
    fails(
        "[host]",
        "[safety]\nreply_delay = \"3m..20s\"\n[host]",
        &["config.toml:3:15", "range \"3m..20s\" is reversed"],
    );
}

#[test]
fn unknown_transport_kind() {
    fails(
        "[host]",
        "[transport]\nkind = \"carrier-pigeon\"\n[host]",
        &["config.toml:3:8", "carrier-pigeon"],
    );
}

#[test]
fn secret_in_the_file_is_refused() {
    fails(
        "[host]",
        "[transport]\nkind = \"telegram\"\n[telegram]\napi_id = 1\napi_hash = \"0123abcd\"\n[host]",
        &["unknown field `api_hash`", "api_hash_env"],
    );
}

#[test]
fn audience_file_empty() {
    let p = Project::new(GOOD);
    std::fs::write(p.path("leads.csv"), "").unwrap();
    assert_bad(&p, &["leads.csv: is empty"]);
}

#[test]
fn audience_file_binary() {
    let p = Project::new(GOOD);
    std::fs::write(p.path("leads.csv"), [0x89u8, b'P', b'N', b'G', 0, 0, 1, 2]).unwrap();
    assert_bad(&p, &["leads.csv: looks like a binary file"]);
}

#[test]
fn audience_file_with_bom_and_crlf_is_fine() {
    let p = Project::new(GOOD);
    std::fs::write(
        p.path("leads.csv"),
        "\u{feff}username,first_name\r\nalice_a,Alice\r\nbobby_b,Bob\r\n",
    )
    .unwrap();
    let (code, stdout, stderr) = p.check();
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("(2 contacts)"), "{stdout}");
}

#[test]
fn audience_file_with_bad_rows() {
    let p = Project::new(GOOD);
    std::fs::write(
        p.path("leads.csv"),
        "username,phone\nalice_a,\n,12ab\n,\nbobby_b,+1555\n",
    )
    .unwrap();
    assert_bad(
        &p,
        &[
            "leads.csv:3: phone \"12ab\" has a character that is not a digit",
            "leads.csv:5: phone \"+1555\" is not an international number",
        ],
    );
}

/// The reporting commands take bad arguments as `check` takes bad input:
/// one sentence naming the argument, exit code 2.
#[test]
fn reporting_commands_refuse_an_unknown_campaign_status_or_dialog() {
    let p = Project::new(GOOD);
    let run = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(p.path("config.toml"))
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = run(&["dialogs", "--campaign", "sprign"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--campaign") && stderr.contains("campaigns: spring"),
        "{stderr}"
    );
    let (code, stderr) = run(&["dialogs", "--status", "closed"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--status"), "{stderr}");
    let (code, stderr) = run(&["dialog", "77"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("no dialog 77"), "{stderr}");
    let (code, stderr) = run(&["dialogs", "--campaign", "spring"]);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn dialogs_and_status_speak_json_and_filter_by_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = std::fs::read_to_string(root.join("config.toml"))
        .unwrap()
        .replace(
            "tests/personas/",
            &format!("{}/tests/personas/", root.display()),
        )
        .replace(
            "tests/fixtures/",
            &format!("{}/tests/fixtures/", root.display()),
        )
        .replace("\"engines\"", &format!("\"{}/engines\"", root.display()))
        .replace("\"scripts\"", &format!("\"{}/scripts\"", root.display()))
        .replace(
            "engines/prompts/",
            &format!("{}/engines/prompts/", root.display()),
        );
    std::fs::write(dir.path().join("config.toml"), config).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_colloquy"))
            .current_dir(dir.path())
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, listed) = run(&["dialogs", "--status", "finished:booked"]);
    assert_eq!(code, 0, "{listed}");
    assert_eq!(
        listed,
        "id\tcampaign\taccount\tcontact\tstatus\tlast_activity\n"
    );
    let (code, listed) = run(&["dialogs", "--outcome", "booked", "--json"]);
    assert_eq!((code, listed.as_str()), (0, ""));
    let (code, status) = run(&["status", "--json"]);
    assert_eq!(code, 0, "{status}");
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["campaigns"][0]["name"], "spring");
    assert_eq!(v["accounts"][1]["name"], "bob");
}
