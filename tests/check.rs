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

/// A mistake an operator makes: edits to the good config (each `from`
/// replaced by `to`, once), files written beside it, and the sentences
/// `check` must print (with exit code 2).
struct Mistake {
    edits: &'static [(&'static str, &'static str)],
    files: &'static [(&'static str, &'static [u8])],
    expect: &'static [&'static str],
}

/// Where text is added to the good config's campaign.
const CAMPAIGN_END: &str = "timezone = \"Europe/Berlin\" }";

const MISTAKES: &[Mistake] = &[
    // Shape: syntax, unknown keys, types and values carry line and column.
    Mistake {
        edits: &[("name = \"alice\"", "name = \"alice")],
        files: &[],
        expect: &["config.toml:6:14", "invalid basic string"],
    },
    Mistake {
        edits: &[("[host]", "[host]\ncolour = \"blue\"")],
        files: &[],
        expect: &["config.toml:3:1", "unknown field `colour`"],
    },
    Mistake {
        edits: &[("[host]", "[safety]\nmax_per_hour = \"many\"\n[host]")],
        files: &[],
        expect: &["config.toml:3:16", "invalid type"],
    },
    Mistake {
        edits: &[("[host]", "[safety]\nmax_per_day = -5\n[host]")],
        files: &[],
        expect: &["config.toml:3:15", "-5"],
    },
    Mistake {
        edits: &[("[host]", "[safety]\nmin_interval = \"5 fortnights\"\n[host]")],
        files: &[],
        expect: &["config.toml:3:16", "invalid duration \"5 fortnights\""],
    },
    Mistake {
        edits: &[("[host]", "[safety]\nreply_delay = \"3m..20s\"\n[host]")],
        files: &[],
        expect: &["config.toml:3:15", "range \"3m..20s\" is reversed"],
    },
    Mistake {
        edits: &[("[host]", "[transport]\nkind = \"carrier-pigeon\"\n[host]")],
        files: &[],
        expect: &["config.toml:3:8", "carrier-pigeon"],
    },
    Mistake {
        edits: &[(
            "[host]",
            "[transport]\nkind = \"telegram\"\n[telegram]\napi_id = 1\napi_hash = \"0123abcd\"\n[host]",
        )],
        files: &[],
        expect: &["unknown field `api_hash`", "api_hash_env"],
    },
    Mistake {
        edits: &[("Europe/Berlin", "Mars/Olympus")],
        files: &[],
        expect: &["unknown time zone \"Mars/Olympus\""],
    },
    // Meaning: limits, names, references; all of them reported at once.
    Mistake {
        edits: &[("[host]", "[safety]\nmax_per_day = 0\n[host]")],
        files: &[],
        expect: &["safety.max_per_day: must be positive, got 0"],
    },
    Mistake {
        edits: &[(
            "phone = \"+15550000001\"",
            "phone = \"+15550000001\"\n[accounts.safety]\nmax_per_hour = 50\nmax_per_day = 40\nmax_new_dialogs_per_day = 45",
        )],
        files: &[],
        expect: &[
            "accounts[0].safety.max_per_hour: is 50 but max_per_day is 40",
            "accounts[0].safety.max_new_dialogs_per_day: is 45 but max_per_day is 40",
        ],
    },
    Mistake {
        edits: &[
            ("accounts = [\"alice\"]", "accounts = [\"alice\", \"bob\"]"),
            ("audiences = [\"leads\"]", "audiences = [\"vips\"]"),
            ("engine = \"echo\"", "engine = \"nosuch\""),
        ],
        files: &[],
        expect: &[
            "campaigns[0].accounts[1]: no account named \"bob\"",
            "campaigns[0].audiences[0]: no audience named \"vips\"",
            "campaigns[0].engine: engine \"nosuch\" has no file",
        ],
    },
    Mistake {
        edits: &[("engine = \"echo\"", "engine = \"../echo\"")],
        files: &[],
        expect: &["is not an engine name"],
    },
    Mistake {
        edits: &[("[[audiences]]", "[[accounts]]\nname = \"alice\"\n\n[[audiences]]")],
        files: &[],
        expect: &["accounts[1].name: \"alice\" is declared twice"],
    },
    // Variants, allocation, spintax.
    Mistake {
        edits: &[(
            CAMPAIGN_END,
            "timezone = \"Europe/Berlin\" }\n[[campaigns.variants]]\nname = \"a\"\nengine = \"nope\"",
        )],
        files: &[],
        expect: &["campaigns[0].variants[0].engine: engine \"nope\" has no file"],
    },
    Mistake {
        edits: &[(
            CAMPAIGN_END,
            "timezone = \"Europe/Berlin\" }\n[[campaigns.variants]]\nname = \"a\"\n[[campaigns.variants]]\nname = \"a\"",
        )],
        files: &[],
        expect: &["campaigns[0].variants[1].name: \"a\" is declared twice"],
    },
    Mistake {
        edits: &[(
            CAMPAIGN_END,
            "timezone = \"Europe/Berlin\" }\n[[campaigns.variants]]\nname = \"a\"\nweight = 0",
        )],
        files: &[],
        expect: &["campaigns[0].variants[0].weight: is 0; a weight must be a number above 0"],
    },
    Mistake {
        edits: &[(
            CAMPAIGN_END,
            "timezone = \"Europe/Berlin\" }\n[[campaigns.variants]]\nname = \"a\"\nprompt_template = \"gone.md\"",
        )],
        files: &[],
        expect: &["campaigns[0].variants[0].prompt_template: prompt template"],
    },
    Mistake {
        edits: &[(
            CAMPAIGN_END,
            "timezone = \"Europe/Berlin\" }\n[campaigns.allocation]\nmethod = \"bandit\"\n[[campaigns.variants]]\nname = \"a\"",
        )],
        files: &[],
        expect: &["campaigns[0].allocation.method: \"bandit\" shares dialogs among variants, and the campaign declares 1"],
    },
    Mistake {
        edits: &[(
            CAMPAIGN_END,
            "timezone = \"Europe/Berlin\" }\n[campaigns.allocation]\nfloor = 0.6\n[[campaigns.variants]]\nname = \"a\"\n[[campaigns.variants]]\nname = \"b\"",
        )],
        files: &[],
        expect: &["campaigns[0].allocation.floor: is 0.6; it is each variant's least share"],
    },
    Mistake {
        edits: &[(
            CAMPAIGN_END,
            "timezone = \"Europe/Berlin\" }\n[campaigns.allocation]\ngoal = \"booked\"",
        )],
        files: &[],
        expect: &["goal \"booked\" is neither \"reply\" nor \"finish:LABEL\""],
    },
    Mistake {
        edits: &[(CAMPAIGN_END, "timezone = \"Europe/Berlin\" }\nprompt_template = \"hello.md\"")],
        files: &[("hello.md", b"Hi there.\n{Hello|Hey {{contact.first_name}}\n")],
        expect: &["hello.md:2: spintax: this { is never closed; write \\{ for a literal brace (column 1)"],
    },
    // Audience files.
    Mistake {
        edits: &[("file = \"leads.csv\"", "file = \"gone.csv\"")],
        files: &[],
        expect: &["audiences[0].file: audience file", "gone.csv\" does not exist"],
    },
    Mistake {
        edits: &[],
        files: &[("leads.csv", b"")],
        expect: &["leads.csv: is empty"],
    },
    Mistake {
        edits: &[],
        files: &[("leads.csv", &[0x89, b'P', b'N', b'G', 0, 0, 1, 2])],
        expect: &["leads.csv: looks like a binary file"],
    },
    Mistake {
        edits: &[],
        files: &[("leads.csv", b"username,phone\nalice_a,\n,12ab\n,\nbobby_b,+1555\n")],
        expect: &[
            "leads.csv:3: phone \"12ab\" has a character that is not a digit",
            "leads.csv:5: phone \"+1555\" is not an international number",
        ],
    },
    Mistake {
        edits: &[],
        files: &[("leads.csv", b"username,timezone\nalice_a,Asia/Tokyo\nbobby_b,Mars/Olympus\n")],
        expect: &["leads.csv:3: timezone \"Mars/Olympus\" is not a known time zone (an IANA name like Europe/Berlin); row skipped"],
    },
];

/// Every mistake of [`MISTAKES`] gets its sentences, a place on every line
/// and exit code 2.
#[test]
fn every_mistake_gets_its_sentence_and_exit_code_2() {
    for mistake in MISTAKES {
        let mut config = GOOD.to_string();
        for (from, to) in mistake.edits {
            assert!(
                config.contains(from),
                "test setup: {from:?} not in the config"
            );
            config = config.replacen(from, to, 1);
        }
        let p = Project::new(&config);
        for (name, bytes) in mistake.files {
            std::fs::write(p.path(name), bytes).unwrap();
        }
        assert_bad(&p, mistake.expect);
    }
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
