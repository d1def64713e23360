//! Variants on the simulated Telegram, on tokio's paused clock: simulated
//! contacts answer one variant's wording more readily, and the bandit moves
//! most new dialogs to it; each dialog keeps its variant, the engine sees
//! it, and the funnel splits by it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use colloquy::config::Config;
use colloquy::report;

/// Three variants: a name, an opening, words only that opening has, and
/// the probability that a contact answers it.
const VARIANTS: [(&str, &str, &str, f64); 3] = [
    (
        "plain",
        "Hello {{contact.first_name}}, a quick note about our CRM.",
        "quick note",
        0.10,
    ),
    (
        "question",
        "{Quick|Short} question, {{contact.first_name}}: how do you track customer chats?",
        "track customer",
        0.40,
    ),
    (
        "offer",
        "Hi {{contact.first_name}}, we give a free month of our CRM.",
        "free month",
        0.15,
    ),
];

fn config(method: &str) -> String {
    let variants: Vec<String> = VARIANTS
        .iter()
        .map(|(name, _, _, _)| {
            format!("{{ name = \"{name}\", prompt_template = \"engines/prompts/{name}.md\" }}")
        })
        .collect();
    let rates: Vec<String> = VARIANTS
        .iter()
        .map(|(_, _, marker, p)| format!("{{ contains = \"{marker}\", probability = {p} }}"))
        .collect();
    common::quick_config(
        5,
        "variant_echo",
        &format!(
            "variants = [{}]\nallocation = {{ method = \"{method}\", goal = \"reply\", floor = 0.05 }}",
            variants.join(", ")
        ),
    )
    .replace(
        "reply_probability = 0.0",
        &format!(
            "reply_probability = 0.0\nreply_delay = \"1m..10m\"\nreply_rates = [{}]",
            rates.join(", ")
        ),
    )
}

/// Runs `hours` of simulated time; returns the openings' variants in order
/// and the campaign's variant reports.
async fn run(
    method: &str,
    contacts: usize,
    hours: u64,
) -> (Vec<String>, Vec<report::VariantReport>) {
    let dir = common::project(contacts, &config(method));
    let d = dir.path();
    for (name, text, _, _) in VARIANTS {
        std::fs::write(d.join(format!("engines/prompts/{name}.md")), text).unwrap();
    }
    // Says which variant it runs on, so the test sees ctx.variant.
    std::fs::write(
        d.join("engines/variant_echo.lua"),
        "return { get_response = function(ctx, m) return 'variant ' .. ctx.variant end }",
    )
    .unwrap();
    let config = Arc::new(Config::load(&d.join("config.toml")).unwrap());
    let rows = colloquy::audience::read(&d.join("leads.csv")).rows;
    let store = common::run_paused(&config, &rows, Duration::from_secs(hours * 3600)).await;

    let wire = common::read_wire(&config.data_dir().join("sim/wire.jsonl"));
    let variant_of = |text: &str| {
        VARIANTS
            .iter()
            .find(|(_, _, marker, _)| text.contains(marker))
            .map(|(n, _, _, _)| n.to_string())
            .unwrap_or_else(|| panic!("an opening of no variant: {text}"))
    };
    let openings: Vec<String> = wire
        .iter()
        .filter(|l| l.kind.as_deref() == Some("opening"))
        .map(|l| variant_of(&l.text))
        .collect();
    // Every reply names the variant its dialog was opened on.
    for l in wire.iter().filter(|l| l.kind.as_deref() == Some("reply")) {
        let opening = wire
            .iter()
            .find(|o| o.kind.as_deref() == Some("opening") && o.contact == l.contact)
            .unwrap();
        assert_eq!(l.text, format!("variant {}", variant_of(&opening.text)));
    }
    let funnels = report::funnels(&config, &store).unwrap();
    let camp = config.campaign("spring").unwrap();
    let reports = report::variant_reports(camp, &funnels[0]);
    (openings, reports)
}

fn shares(openings: &[String]) -> Vec<f64> {
    VARIANTS
        .iter()
        .map(|(n, _, _, _)| {
            openings.iter().filter(|o| o == n).count() as f64 / openings.len() as f64
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn the_bandit_moves_new_dialogs_to_the_variant_contacts_answer() {
    let (openings, reports) = run("bandit", 1500, 3).await;
    assert_eq!(openings.len(), 1500, "every contact opened");
    // The first 150 openings go out before most replies are in: how many
    // come back by the 300th depends on how the engine threads are
    // scheduled (on a loaded machine the bandit had learned by then).
    let first = shares(&openings[..150]);
    let last = shares(&openings[1200..]);
    println!("shares of the first 150 openings {first:.2?}, of the last 300 {last:.2?}");
    for (i, chunk) in openings.chunks(150).enumerate() {
        println!(
            "openings {:>4}..{:>4}: {:.2?}",
            i * 150,
            i * 150 + chunk.len(),
            shares(chunk)
        );
    }
    for r in &reports {
        println!(
            "{}: opened {} reply rate {:.3} [{:.3}, {:.3}] best {:.3}",
            r.name,
            r.funnel.opened,
            r.reply_rate.rate,
            r.reply_rate.low,
            r.reply_rate.high,
            r.probability_best
        );
    }
    assert!(first[1] < 0.6, "early on no variant dominates: {first:?}");
    assert!(
        last[1] > 0.75,
        "the better variant gets most new dialogs by the end: {last:?}"
    );
    assert!(
        last[0] >= 0.02 && last[2] >= 0.02,
        "the floor keeps exploring: {last:?}"
    );
    // The estimates bracket the true rates, and the best is known. The
    // reported intervals are 95% ones, so one of three variants misses its
    // true rate now and then by chance (the engine workers are threads, so
    // the run's interleaving is not fixed); the test asks the 99.9%
    // interval of the same counts, which misses one run in a thousand.
    for (r, (_, _, _, p)) in reports.iter().zip(VARIANTS) {
        let (low, high) = wilson(r.funnel.replied, r.funnel.opened, 3.29);
        assert!(
            low <= p && p <= high,
            "{} {p}: [{low:.3}, {high:.3}] {r:?}",
            r.name
        );
    }
    assert!(reports[1].probability_best > 0.95, "{reports:?}");
}

#[tokio::test(start_paused = true)]
async fn fixed_allocation_keeps_the_weights() {
    let (openings, reports) = run("fixed", 600, 1).await;
    assert_eq!(openings.len(), 600);
    let s = shares(&openings);
    assert!(s.iter().all(|x| (0.25..0.42).contains(x)), "{s:?}");
    assert_eq!(reports.iter().map(|r| r.funnel.opened).sum::<usize>(), 600);
}

/// A variant removed from config.toml keeps its open dialogs on the engine
/// they were opened with, as long as that engine's file is there; when it
/// is gone too, `check` says what to do. `chat --variant` tries one.
#[test]
fn a_removed_variant_keeps_its_dialogs_on_its_engine() {
    use common::{colloquy, eventually, run, stop, text};
    let config = common::quick_config(
        8,
        "echo",
        "variants = [{ name = \"a\" }, { name = \"b\", engine = \"warm\" }]",
    )
    .replace("time_scale = 100", "time_scale = 1000")
    .replace(
        "reply_probability = 0.0",
        "reply_probability = 1.0\nreply_delay = \"4h..5h\"",
    );
    let dir = common::project(40, &config);
    let d = dir.path();
    std::fs::write(
        d.join("engines/warm.lua"),
        "return { get_opening = function(ctx) return 'warm hello' end, get_response = function(ctx, m) return 'warm: ' .. m.text end }",
    )
    .unwrap();
    let wire = || common::read_wire(&d.join("data/sim/wire.jsonl"));
    let host = run(d);
    eventually("every contact opened", || {
        wire()
            .iter()
            .filter(|l| l.kind.as_deref() == Some("opening"))
            .count()
            == 40
    });
    stop(host);
    assert!(
        !wire().iter().any(|l| l.direction.as_deref() == Some("in")),
        "replies came too early for this test"
    );
    let on_b: Vec<String> = wire()
        .iter()
        .filter(|l| l.text == "warm hello")
        .map(|l| l.contact.clone())
        .collect();
    assert!(!on_b.is_empty());
    let out = colloquy(d, &["chat", "--campaign", "spring", "--variant", "b"]);
    assert!(text(&out).contains("warm hello"), "{}", text(&out));

    // b leaves the config: check passes, and its dialogs are answered by warm.
    let edited = config.replace(", { name = \"b\", engine = \"warm\" }", "");
    assert_ne!(edited, config);
    std::fs::write(d.join("config.toml"), &edited).unwrap();
    let out = colloquy(d, &["check"]);
    assert!(out.status.success(), "{}", text(&out));
    let host = run(d);
    eventually("b's dialogs answered by warm", || {
        let w = wire();
        on_b.iter().all(|c| {
            w.iter()
                .any(|l| &l.contact == c && l.text.starts_with("warm: "))
        })
    });
    stop(host);
    assert!(
        !wire()
            .iter()
            .any(|l| !on_b.contains(&l.contact) && l.text.starts_with("warm")),
        "a's dialogs stay on echo"
    );

    // With warm's file gone too, check says what to do.
    std::fs::remove_file(d.join("engines/warm.lua")).unwrap();
    let out = colloquy(d, &["check"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("config.toml: campaigns[0].variants: ")
            && said.contains("on variant \"b\", which is no longer declared, and its engine \"warm\" has no file")
            && said.contains("declare the variant again, or put the engine file back"),
        "{said}"
    );

    // chat tries the variant asked for, and names the ones there are.
    let out = colloquy(d, &["chat", "--campaign", "spring", "--variant", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("campaign spring has no variant \"nope\"; it has a"),
        "{}",
        text(&out)
    );
}

/// A variant added to config.toml while the host runs opens dialogs with
/// its own prompt template: the engines follow the templates the config
/// names.
#[test]
fn a_variant_added_while_the_host_runs_uses_its_template() {
    use common::{eventually, run, stop};
    let config = common::quick_config(
        9,
        "plain",
        "status = \"paused\"\nvariants = [{ name = \"a\" }]",
    )
    .replace("time_scale = 100", "time_scale = 1000");
    let dir = common::project(30, &config);
    let d = dir.path();
    std::fs::write(
        d.join("engines/plain.lua"),
        "return { get_response = function(ctx, m) return 'ok' end }",
    )
    .unwrap();
    std::fs::write(
        d.join("engines/prompts/a.md"),
        "A-text for {{contact.first_name}}",
    )
    .unwrap();
    std::fs::write(
        d.join("engines/prompts/b.md"),
        "{B-text|B-words} for {{contact.first_name}}",
    )
    .unwrap();
    let host = run(d);
    // The host serves status once it has started (and watches config.toml).
    eventually("the host started", || d.join("data/control.json").exists());
    let edited = config.replace(
        "status = \"paused\"\nvariants = [{ name = \"a\" }]",
        "prompt_template = \"engines/prompts/a.md\"\nvariants = [{ name = \"a\" }, { name = \"b\", prompt_template = \"engines/prompts/b.md\" }]",
    );
    std::fs::write(d.join("config.toml"), edited).unwrap();
    let openings = || {
        common::read_wire(&d.join("data/sim/wire.jsonl"))
            .into_iter()
            .filter(|l| l.kind.as_deref() == Some("opening"))
            .map(|l| l.text)
            .collect::<Vec<_>>()
    };
    eventually("every contact opened", || openings().len() == 30);
    stop(host);
    let texts = openings();
    assert!(
        texts.iter().any(|t| t.starts_with("A-text for Name")),
        "{texts:?}"
    );
    assert!(texts.iter().any(|t| t.starts_with("B-")), "{texts:?}");
    assert!(
        texts.iter().all(|t| t.starts_with("A-text")
            || t.starts_with("B-text")
            || t.starts_with("B-words")),
        "{texts:?}"
    );
}

/// The Wilson interval of `successes` in `trials` at `z` standard errors.
fn wilson(successes: usize, trials: usize, z: f64) -> (f64, f64) {
    let n = trials as f64;
    let p = successes as f64 / n;
    let centre = p + z * z / (2.0 * n);
    let spread = z * ((p * (1.0 - p) + z * z / (4.0 * n)) / n).sqrt();
    let d = 1.0 + z * z / n;
    ((centre - spread) / d, (centre + spread) / d)
}
