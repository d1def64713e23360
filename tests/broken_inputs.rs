//! Broken inputs spend nothing: the real binary on the simulated Telegram.
//! An engine that fails at the opening (the campaign pauses itself,
//! config.toml says so, every contact is still there, and after the fix and
//! a resume the same contacts are opened); one that does not compile (its
//! campaign waits, says why with file:line, another runs); an audience file
//! with a stray quote (refused whole, the audience kept as last imported).

mod common;

use std::path::Path;

const BROKEN: &str = r#"
local M = {}
function M.get_opening(ctx) return "Hi " .. ctx.contact.nickname.first end
function M.get_response(ctx, message) return "ok" end
return M
"#;

const FIXED: &str = r#"
local M = {}
function M.get_opening(ctx) return "Hi " .. (ctx.contact.first_name or "there") end
function M.get_response(ctx, message) return "ok" end
return M
"#;

const NOT_LUA: &str = "local M = {}\nfunction M.get_opening(ctx) return 'Hi'\nreturn M\n";

fn config(campaigns: &str) -> String {
    format!(
        r#"
[sim]
seed = 7
time_scale = 100
reply_probability = 0.0
persona = "personas/default.lua"

[safety]
max_per_hour = 1000
max_per_day = 1000
max_new_dialogs_per_day = 1000
min_interval = "1s"
jitter = "0s"

[[accounts]]
name = "alice"
[[accounts]]
name = "bob"

[[audiences]]
name = "leads"
file = "leads.csv"
[[audiences]]
name = "others"
file = "others.csv"
{campaigns}"#
    )
}

use common::{colloquy, eventually, host_log, run, stop, text};

fn status_of(d: &Path) -> String {
    text(&colloquy(d, &["status"]))
}

#[test]
fn an_opening_that_fails_pauses_the_campaign_and_spends_no_contact() {
    let dir = common::project(
        20,
        &config(
            "\n[[campaigns]]\nname = \"spring\"\nengine = \"broken\" # under repair\naudiences = [\"leads\"]\naccounts = [\"alice\", \"bob\"]\n",
        ),
    );
    let d = dir.path();
    std::fs::write(d.join("others.csv"), "username\nsomeone_else\n").unwrap();
    std::fs::write(d.join("engines/broken.lua"), BROKEN).unwrap();

    // check tries the opening on real rows and finds the nil index.
    let checked = colloquy(d, &["check"]);
    assert_eq!(checked.status.code(), Some(2), "{}", text(&checked));
    assert!(
        text(&checked).contains(
            "config.toml: campaigns[0]: engine broken, get_opening: engines/broken.lua:3: attempt to index a nil value (field 'nickname') (the opening tried on leads.csv:2)"
        ),
        "{}",
        text(&checked)
    );

    let host = run(d);
    eventually("the campaign paused in config.toml", || {
        std::fs::read_to_string(d.join("config.toml"))
            .unwrap()
            .contains("status = \"paused\"")
    });
    let edited = std::fs::read_to_string(d.join("config.toml")).unwrap();
    assert!(
        edited.contains("engine = \"broken\" # under repair"),
        "{edited}"
    );
    let status = status_of(d);
    assert!(
        status.contains("campaign spring: paused (paused itself at ")
            && status.contains("engine broken, get_opening: engines/broken.lua:3: attempt to index a nil value (field 'nickname'))")
            && status.contains("(20 contacts not yet contacted)"),
        "{status}"
    );
    assert!(status.contains("error 0"), "{status}");
    stop(host);
    let log = host_log(d);
    assert_eq!(log.matches("alert=CampaignPaused").count(), 1, "{log}");

    // Still paused after a restart; fixed and resumed, it opens the
    // contacts it would have burned.
    std::fs::write(d.join("engines/broken.lua"), FIXED).unwrap();
    let host = run(d);
    eventually("the host serving", || d.join("data/control.json").exists());
    assert!(status_of(d).contains("(20 contacts not yet contacted)"));
    let resumed = edited.replace("status = \"paused\"", "status = \"active\"");
    std::fs::write(d.join("config.toml"), resumed).unwrap();
    eventually("every contact opened", || {
        let status = status_of(d);
        // Before the host made its store, status counts no contacts at all.
        !status.contains("no store") && status.contains("(0 contacts not yet contacted)")
    });
    let status = status_of(d);
    assert!(
        status.contains("campaign spring: active, engine"),
        "{status}"
    );
    assert!(status.contains("error 0"), "{status}");
    stop(host);
}

#[test]
fn an_engine_that_does_not_compile_holds_its_campaign_only() {
    let dir = common::project(
        10,
        &config(
            "\n[[campaigns]]\nname = \"spring\"\nengine = \"typo\"\naudiences = [\"leads\"]\naccounts = [\"alice\"]\n\n[[campaigns]]\nname = \"autumn\"\nengine = \"echo\"\nprompt_template = \"engines/prompts/spring.md\"\naudiences = [\"others\"]\naccounts = [\"bob\"]\n",
        ),
    );
    let d = dir.path();
    std::fs::write(
        d.join("others.csv"),
        "username\nsomeone_else\nsomeone_more\n",
    )
    .unwrap();
    std::fs::write(d.join("engines/typo.lua"), NOT_LUA).unwrap();
    let host = run(d);
    eventually("the other campaign opened its contacts", || {
        let status = status_of(d);
        // Before the host made its store, status counts no contacts at all.
        !status.contains("no store")
            && status.contains("audiences others (0 contacts not yet contacted)")
    });
    let status = status_of(d);
    assert!(
        status.contains("audiences leads (10 contacts not yet contacted)"),
        "{status}"
    );
    assert!(
        status.contains("  opens no dialogs until its engine loads: engine typo cannot be loaded: engines/typo.lua:3:"),
        "{status}"
    );
    stop(host);
    let log = host_log(d);
    assert!(
        log.contains("campaign spring opens no dialogs until its engine loads: engine typo cannot be loaded: engines/typo.lua:3: 'end' expected"),
        "{log}"
    );
    assert!(!log.contains("there is no engine file"), "{log}");
}

const STUCK_IN_C: &str = r#"
local M = {}
function M.get_opening(ctx) return tostring(("a"):rep(40):find(("(.-)"):rep(25) .. "b")) end
function M.get_response(ctx, message) return "ok" end
return M
"#;

#[test]
fn an_opening_stuck_inside_c_holds_only_its_worker() {
    let dir = common::project(
        10,
        &config(
            "
[engines]
time_budget = \"1s\"

[[campaigns]]
name = \"spring\"
engine = \"stuck\"
audiences = [\"leads\"]
accounts = [\"alice\"]

[[campaigns]]
name = \"autumn\"
engine = \"echo\"
prompt_template = \"engines/prompts/spring.md\"
audiences = [\"others\"]
accounts = [\"bob\"]
",
        ),
    );
    let d = dir.path();
    let others: String = (0..30).map(|i| format!("other_{i:04}\n")).collect();
    std::fs::write(d.join("others.csv"), format!("username\n{others}")).unwrap();
    std::fs::write(d.join("engines/stuck.lua"), STUCK_IN_C).unwrap();
    let host = run(d);
    eventually("the stuck call given up", || {
        host_log(d).contains("stuck inside Lua's C library")
    });
    eventually("the other campaign opened its contacts", || {
        let status = status_of(d);
        // Before the host made its store, status counts no contacts at all.
        !status.contains("no store")
            && status.contains("audiences others (0 contacts not yet contacted)")
    });
    let status = status_of(d);
    assert!(
        status.contains("audiences leads (10 contacts not yet contacted)"),
        "{status}"
    );
    stop(host);
    // The other campaign opened while the stuck call ran, not after.
    let log = host_log(d);
    let opened = log.find("campaign=\"autumn\"").expect("autumn opened");
    let given_up = log.find("stuck inside Lua's C library").unwrap();
    assert!(opened < given_up, "{log}");
}

#[test]
fn an_audience_file_with_a_stray_quote_is_not_imported_at_all() {
    let dir = common::project(
        0,
        &config(
            "\n[[campaigns]]\nname = \"spring\"\nstatus = \"paused\"\nengine = \"echo\"\naudiences = [\"leads\"]\naccounts = [\"alice\"]\n",
        ),
    );
    let d = dir.path();
    std::fs::write(d.join("others.csv"), "username\nsomeone_else\n").unwrap();
    let rows: Vec<String> = (0..30).map(|i| format!("person_{i:02},P{i},Co")).collect();
    let good = format!("username,first_name,company\n{}\n", rows.join("\n"));
    std::fs::write(d.join("leads.csv"), &good).unwrap();
    let host = run(d);
    eventually("the audience imported", || {
        status_of(d).contains("(30 contacts not yet contacted)")
    });
    stop(host);

    // A quote opened on line 9 and never closed: nothing of the file counts.
    let broken = good.replace("person_07,P7", "\"person_07,P7");
    std::fs::write(d.join("leads.csv"), broken).unwrap();
    let checked = colloquy(d, &["check"]);
    assert_eq!(checked.status.code(), Some(2));
    assert!(
        text(&checked).contains("leads.csv:9: a quote opened here is never closed; lines 9–31 would be read as one field; the file is not imported until this is fixed"),
        "{}",
        text(&checked)
    );
    let host = run(d);
    eventually("the refusal alerted", || {
        host_log(d).contains("alert=AudienceRefused")
    });
    let status = status_of(d);
    assert!(
        status.contains("(30 contacts not yet contacted)"),
        "{status}"
    );
    stop(host);
    let log = host_log(d);
    assert!(
        log.contains("audience leads keeps its contacts as last imported: "),
        "{log}"
    );
    assert!(
        !log.contains("audience imported audience=\"leads\""),
        "{log}"
    );
}

#[test]
fn a_reply_the_engine_cannot_answer_waits_for_the_fix() {
    replies_wait_for_the_fix("1s..2s");
}

/// With no reply delay, replies are answered in batches: the same holds.
#[test]
fn a_reply_the_engine_cannot_answer_in_a_batch_waits_for_the_fix() {
    replies_wait_for_the_fix("0s");
}

fn replies_wait_for_the_fix(reply_delay: &str) {
    let dir = common::project(
        3,
        &config(
            "\n[[campaigns]]\nname = \"spring\"\nengine = \"deaf\"\naudiences = [\"leads\"]\naccounts = [\"alice\"]\n",
        )
        .replace("reply_probability = 0.0", "reply_probability = 1.0\nreply_delay = \"1s..2s\"")
        .replace("jitter = \"0s\"", &format!("jitter = \"0s\"\nreply_delay = \"{reply_delay}\"")),
    );
    let d = dir.path();
    std::fs::write(d.join("others.csv"), "username\nsomeone_else\n").unwrap();
    let deaf = "local M = {}\nfunction M.get_opening(ctx) return 'Hello!' end\nfunction M.get_response(ctx, m) error('no model today') end\nreturn M\n";
    std::fs::write(d.join("engines/deaf.lua"), deaf).unwrap();
    let host = run(d);
    eventually("three replies waiting for the engine", || {
        host_log(d)
            .matches("the dialog waits for a working engine")
            .count()
            >= 3
    });
    let status = status_of(d);
    assert!(
        status.contains("active 3") && status.contains("error 0"),
        "{status}"
    );

    std::fs::write(
        d.join("engines/deaf.lua"),
        deaf.replace("error('no model today')", "return 're: ' .. m.text"),
    )
    .unwrap();
    eventually("every waiting reply answered", || {
        let dialogs = text(&colloquy(d, &["dialogs"]));
        let ids: Vec<String> = dialogs
            .lines()
            .skip(1) // the header
            .filter_map(|l| l.split('\t').next().map(str::to_string))
            .collect();
        ids.len() == 3
            && ids.iter().all(|id| {
                text(&colloquy(d, &["dialog", id]))
                    .lines()
                    .any(|l| l.contains("> reply") && l.contains(" re: "))
            })
    });
    stop(host);
}
