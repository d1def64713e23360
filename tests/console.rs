//! The web console in a real headless Chromium (Debian's chromium through
//! chromedriver), against the real binary on the simulated Telegram: log
//! in (refused without the token), the funnel equals the store's, a
//! stranger's `<script>` shows as text, a human answers a handed-off
//! dialog and the answer reaches the simulated wire, a pause stops the
//! runner, a do-not-contact entry is added, removed and audited, and
//! /metrics passes promtool. Screenshots of every page go to
//! `target/console-screenshots/`.

mod browser;
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{colloquy, run, stop, text};

const ENGINE: &str = r#"
local M = {}
function M.get_opening(ctx) return "Hi " .. (ctx.contact.first_name or "there") .. ", a quick question" end
function M.get_response(ctx, message)
  if ctx.state.handed then return "Noted, thank you." end
  ctx.state.handed = true
  return { text = "A colleague will answer you.", handoff = true }
end
return M
"#;

const PERSONA: &str = r#"
local P = {}
function P.get_response(ctx, message)
  ctx.state.step = (ctx.state.step or 0) + 1
  if ctx.state.step == 1 then return "<script>document.title='owned'</script> tell me more" end
  return nil
end
return P
"#;

fn config(port: u16) -> String {
    format!(
        r#"
[sim]
seed = 3
time_scale = 100
reply_probability = 1.0
reply_delay = "1m..2m"
persona = "personas/script.lua"

[safety]
max_per_hour = 1000
max_per_day = 1000
max_new_dialogs_per_day = 1000
min_interval = "20s"
jitter = "0s"
reply_delay = "0s..1s"

[console]
listen = "127.0.0.1:{port}"

[[accounts]]
name = "alice"

[[audiences]]
name = "leads"
file = "leads.csv"

[[campaigns]]
name = "spring"
engine = "handing"
audiences = ["leads"]
accounts = ["alice"]
"#
    )
}

async fn until(what: &str, mut probe: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(40);
    while !probe() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn wire(d: &Path) -> Vec<common::Line> {
    common::read_wire(&d.join("data/sim/wire.jsonl"))
}

fn openings(d: &Path) -> usize {
    wire(d)
        .iter()
        .filter(|l| l.kind.as_deref() == Some("opening"))
        .count()
}

/// How many dialogs the campaign has opened (claimed a contact for).
fn claimed(d: &Path) -> usize {
    let listed = text(&colloquy(d, &["dialogs", "--campaign", "spring"]));
    listed.lines().count().saturating_sub(1)
}

fn status_count(d: &Path, label: &str) -> usize {
    let status = text(&colloquy(d, &["status"]));
    let line = status
        .lines()
        .find(|l| l.starts_with("dialogs:"))
        .unwrap_or("");
    line.split(", ")
        .find_map(|p| {
            p.trim_start_matches("dialogs: ")
                .strip_prefix(&format!("{label} "))
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn shots() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_runs_the_campaign_from_the_console() {
    let Some((chromium, chromedriver)) = browser::required() else {
        return;
    };
    let port = common::free_port();
    let dir = common::project(300, &config(port));
    let d = dir.path();
    std::fs::write(d.join("engines/handing.lua"), ENGINE).unwrap();
    std::fs::write(d.join("personas/script.lua"), PERSONA).unwrap();
    let host = run(d);
    until("a handed-off dialog", || status_count(d, "handoff") >= 2).await;
    let token = std::fs::read_to_string(d.join("data/console.token")).unwrap();
    let console = format!("http://127.0.0.1:{port}");
    let profile = tempfile::tempdir().unwrap();
    let b = browser::Browser::start(&chromium, &chromedriver, profile.path()).await;

    // Without the token: the login page, and a wrong token is refused.
    b.goto(&format!("{console}/dialogs")).await;
    assert!(b.source().await.contains("Console token"));
    b.screenshot(&shots().join("login.png")).await;
    b.fill("input[name=token]", "not-the-token").await;
    b.click("button").await;
    b.wait_text("p.error", "That token is not this host").await;
    b.fill("input[name=token]", token.trim()).await;
    b.click("button").await;
    b.wait_text("h1", "Campaigns").await;

    // The funnel's numbers are the store's, at most 5 s old: the first
    // count is from the host's start, and a view of an older one counts
    // again.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (opened, handoff_now) = loop {
        b.wait_text("section.campaign", "reply rate").await;
        let opened: usize = b.text("[data-metric=opened] dd").await.parse().unwrap();
        let handoff: usize = b.text("[data-metric=handoff] dd").await.parse().unwrap();
        if handoff >= 2 {
            break (opened, handoff);
        }
        assert!(
            Instant::now() < deadline,
            "the funnel never showed the handoffs"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        b.goto(&console).await;
    };
    let listed = text(&colloquy(d, &["dialogs", "--campaign", "spring"]));
    // The host runs on: the page was rendered before the listing.
    // One line per dialog after the header.
    assert!(
        opened < listed.lines().count() && opened > 0,
        "{opened} vs {listed}"
    );
    assert!(handoff_now <= status_count(d, "handoff") && handoff_now >= 2);
    b.screenshot(&shots().join("campaigns.png")).await;

    // Pause: config.toml says so, and the runner stops opening.
    b.click("section.campaign form button").await;
    until("config.toml paused", || {
        std::fs::read_to_string(d.join("config.toml"))
            .unwrap()
            .contains("status = \"paused\"")
    })
    .await;
    b.wait_text("section.campaign form button", "Resume").await;
    // Openings already claimed may still go out (on a busy machine a send
    // can take longer than the pause between two openings): what the pause
    // stops is the claiming of contacts, except one whose transaction was
    // under way as the pause came.
    let paused_at = claimed(d);

    // The inbox: a handed-off dialog, the stranger's script as text.
    b.goto(&format!("{console}/inbox")).await;
    b.screenshot(&shots().join("inbox.png")).await;
    b.click("table.dialogs a").await;
    let shown = b.wait_text("ol.transcript", "tell me more").await;
    assert!(
        shown.contains("<script>document.title='owned'</script> tell me more"),
        "{shown}"
    );
    assert_ne!(b.script("return document.title").await, "owned");
    assert!(b.source().await.contains("&lt;script&gt;"));
    // Its events: the handoff.
    b.wait_text("ul.alerts", "was handed to a human").await;
    b.screenshot(&shots().join("dialog.png")).await;

    // A human answers; the answer goes out on the simulated wire.
    let human = "Hello, this is Dana from the team. Shall we talk on Thursday?";
    b.fill("form.reply textarea", human).await;
    b.click("form.reply button").await;
    until("the human answer on the wire", || {
        wire(d)
            .iter()
            .any(|l| l.text == human && l.kind.as_deref() == Some("human"))
    })
    .await;
    // Work went on after the pause, and no dialog was opened with it.
    assert!(
        claimed(d) <= paused_at + 1,
        "{} dialogs after {paused_at}",
        claimed(d)
    );
    // And never a second opening to a contact: one at most per dialog.
    assert!(openings(d) <= claimed(d), "{} openings", openings(d));
    b.goto(&b_url(&b).await).await;
    assert!(b.text("ol.transcript").await.contains(human));
    b.click("form[action$=handback] button").await;
    b.wait_text("p.meta", "active").await;

    // Do not contact: add one by hand, remove it, find the audit.
    b.goto(&format!("{console}/dnc")).await;
    b.fill("input[name=contact]", "contact_0299").await;
    b.fill("input[name=why]", "asked by phone").await;
    b.click("form[action='/dnc/add'] button").await;
    b.wait_text("table.dnc", "contact_0299").await;
    b.screenshot(&shots().join("dnc.png")).await;
    b.click("table.dnc input[name=confirm]").await;
    b.click("table.dnc button").await;
    let audit = b.wait_text("table.audit", "removed").await;
    assert!(
        audit.contains("removed") && audit.contains("added"),
        "{audit}"
    );

    // Search by a piece of a contact's name, in another case: the rows
    // found are that contact's and no other.
    let listed = text(&colloquy(d, &["dialogs"]));
    let username = listed.lines().nth(1).unwrap().split('\t').nth(3).unwrap();
    let number: usize = username.trim_start_matches("contact_").parse().unwrap();
    b.goto(&format!("{console}/dialogs?q=aME{number}%20("))
        .await;
    let found = b.text("table.dialogs").await;
    let rows: Vec<&str> = found.lines().skip(1).collect();
    assert!(
        rows.len() == 1 && rows[0].contains(&format!("Name{number} (contact_{number:04})")),
        "{found}"
    );
    b.screenshot(&shots().join("search.png")).await;

    for page in ["accounts", "dialogs", "alerts"] {
        b.goto(&format!("{console}/{page}")).await;
        b.screenshot(&shots().join(format!("{page}.png"))).await;
    }

    // /metrics is valid for Prometheus.
    b.goto(&format!("{console}/metrics")).await;
    let metrics = b.text("body").await;
    for name in [
        "colloquy_dialogs{status=\"handoff\"}",
        "colloquy_messages_sent_total{kind=\"opening\",account=\"alice\"}",
        "colloquy_messages_received_total{account=\"alice\"}",
        "colloquy_send_seconds_bucket",
        "colloquy_engine_call_seconds_bucket{engine=\"handing\",function=\"get_opening\"",
        "colloquy_store_flush_seconds_count",
        "colloquy_account_sends{account=\"alice\",window=\"hour\"}",
    ] {
        assert!(metrics.contains(name), "{name} in {metrics}");
    }
    let checked = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut p| {
            use std::io::Write;
            p.stdin
                .take()
                .unwrap()
                .write_all(format!("{metrics}\n").as_bytes())?;
            p.wait_with_output()
        });
    match checked {
        Ok(out) => assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => assert!(
            std::env::var("CI").is_err(),
            "promtool is needed under CI: {e}"
        ),
    }

    b.close().await;

    // The same takeover from the CLI, while the host runs and when not.
    let handoff = |d: &Path| -> Vec<u64> {
        text(&colloquy(d, &["dialogs", "--status", "handoff", "--json"]))
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["id"].as_u64())
            .collect()
    };
    let ids = handoff(d);
    assert!(ids.len() >= 2, "{ids:?}");
    let said = "Dana again: here is the price list.";
    let out = colloquy(d, &["reply", &ids[0].to_string(), said]);
    assert!(out.status.success(), "{}", text(&out));
    until("the CLI answer on the wire", || {
        wire(d).iter().any(|l| l.text == said)
    })
    .await;
    let out = colloquy(d, &["handback", &ids[0].to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!handoff(d).contains(&ids[0]));
    stop(host);
    let later = "Dana, after hours: see you Thursday.";
    let out = colloquy(d, &["reply", &ids[1].to_string(), later]);
    assert!(text(&out).contains("when a host runs"), "{}", text(&out));
    let host = run(d);
    until("the queued answer on the wire", || {
        wire(d).iter().any(|l| l.text == later)
    })
    .await;
    // Export while the host runs: the human's answers are there.
    let exported = text(&colloquy(
        d,
        &[
            "export",
            "--what",
            "messages",
            "--campaign",
            "spring",
            "--format",
            "jsonl",
        ],
    ));
    let human_lines: Vec<serde_json::Value> = exported
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["kind"] == "human")
        .collect();
    assert_eq!(human_lines.len(), 3, "{exported}");
    stop(host);
    // And with no host: one CSV row per dialog, under a header.
    let csv = text(&colloquy(d, &["export", "--what", "dialogs"]));
    let listed = text(&colloquy(d, &["dialogs"]));
    assert!(
        csv.starts_with("dialog,campaign,account,contact,status,outcome,"),
        "{csv}"
    );
    assert_eq!(csv.lines().count(), listed.lines().count());
    // `--since` counts back from the simulated clock the host ran on, not
    // from today's date.
    let all = text(&colloquy(d, &["export", "--what", "messages"]));
    let recent = text(&colloquy(
        d,
        &["export", "--what", "messages", "--since", "30d"],
    ));
    assert!(all.lines().count() > 1, "{all}");
    assert_eq!(recent.lines().count(), all.lines().count(), "{recent}");
}

async fn b_url(b: &browser::Browser) -> String {
    b.script("return location.href")
        .await
        .as_str()
        .unwrap()
        .to_string()
}

/// The README's three-variant bandit example, run by the real binary:
/// the console's "By variant" table shows the simulated contacts' favourite
/// wording taking most new dialogs, and `status --json` and `export --what
/// variants` say the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_watches_the_bandit_move_traffic_in_the_console() {
    let Some((chromium, chromedriver)) = browser::required() else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let example = dir.path().join("examples/variants");
    std::fs::create_dir_all(example.join("prompts")).unwrap();
    std::fs::create_dir_all(dir.path().join("tests/personas")).unwrap();
    for f in [
        "leads.csv",
        "prompts/plain.md",
        "prompts/question.md",
        "prompts/offer.md",
    ] {
        std::fs::copy(root.join("examples/variants").join(f), example.join(f)).unwrap();
    }
    for (from, to) in [("engines", "engines"), ("scripts", "scripts")] {
        std::fs::create_dir_all(dir.path().join(to).join("prompts")).unwrap();
        for e in std::fs::read_dir(root.join(from)).unwrap().flatten() {
            if e.path().is_file() {
                std::fs::copy(e.path(), dir.path().join(to).join(e.file_name())).unwrap();
            }
        }
    }
    std::fs::copy(
        root.join("tests/personas/default.lua"),
        dir.path().join("tests/personas/default.lua"),
    )
    .unwrap();
    let port = common::free_port();
    let config = std::fs::read_to_string(root.join("examples/variants/config.toml"))
        .unwrap()
        .replace("127.0.0.1:8751", &format!("127.0.0.1:{port}"))
        .replace("time_scale = 600.0", "time_scale = 3000.0");
    std::fs::write(example.join("config.toml"), config).unwrap();
    let d = example.as_path();
    let host = run(d);
    until("the console's token", || {
        d.join("data/console.token").exists()
    })
    .await;
    let token = std::fs::read_to_string(d.join("data/console.token")).unwrap();
    let profile = tempfile::tempdir().unwrap();
    let b = browser::Browser::start(&chromium, &chromedriver, profile.path()).await;
    b.goto(&format!("http://127.0.0.1:{port}/")).await;
    b.fill("input[name=token]", token.trim()).await;
    b.click("button").await;
    b.wait_text("h1", "Campaigns").await;

    // Poll the page until the favourite wording takes most new dialogs.
    let share = |row: &str| -> f64 {
        row.split_whitespace()
            .find(|w| w.ends_with('%'))
            .and_then(|w| w.trim_end_matches('%').parse().ok())
            .unwrap_or(0.0)
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        b.goto(&format!("http://127.0.0.1:{port}/")).await;
        b.wait_text("table.variants", "question").await;
        let row = b.text("tr[data-variant=question]").await;
        if share(&row) >= 70.0 {
            break;
        }
        assert!(Instant::now() < deadline, "traffic never moved: {row}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let table = b.text("table.variants").await;
    assert!(
        table.contains("plain") && table.contains("offer"),
        "{table}"
    );
    b.screenshot(&shots().join("variants.png")).await;

    // The estimates firm up as replies come in: poll until the favourite
    // is almost surely the best.
    let best = |v: &serde_json::Value| v["probability_best"].as_f64().unwrap();
    loop {
        let status: serde_json::Value =
            serde_json::from_str(&text(&colloquy(d, &["status", "--json"]))).unwrap();
        let variants = status["campaigns"][0]["variants"].as_array().unwrap();
        assert_eq!(variants.len(), 3, "{status}");
        assert_eq!(status["campaigns"][0]["allocation"]["method"], "bandit");
        if best(&variants[1]) > 0.9 {
            break;
        }
        assert!(Instant::now() < deadline, "{variants:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let exported = text(&colloquy(d, &["export", "--what", "variants"]));
    assert!(
        exported.starts_with("campaign,variant,declared,opened,delivered,replied,reply_rate,"),
        "{exported}"
    );
    assert_eq!(exported.lines().count(), 4, "{exported}");
    b.close().await;
    stop(host);
}
