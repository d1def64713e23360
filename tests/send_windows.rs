//! Per-contact send windows on the simulated Telegram, on tokio's paused
//! clock: a `timezone` column puts each contact's openings and follow-ups
//! inside the campaign's hours in the contact's own zone, across the days
//! daylight saving time starts or ends in New York, Europe and Sydney.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{NaiveDate, TimeZone, Timelike};
use chrono_tz::Tz;
use colloquy::config::Config;

/// Zones of the audience; an empty one falls back to the campaign's.
const ZONES: [&str; 5] = [
    "America/New_York",
    "Europe/Berlin",
    "Asia/Tokyo",
    "Australia/Sydney",
    "",
];
/// Simulated days the test runs, and how fast simulated time goes.
const DAYS: u64 = 32;
const TIME_SCALE: u64 = 1000;
const CAMPAIGN_ZONE: &str = "Europe/London";

const CONFIG: &str = r#"
[sim]
seed = 3
time_scale = 1000
start = "2026-03-06T00:00:00Z"
reply_probability = 0.0
persona = "personas/default.lua"

[safety]
max_per_hour = 4
max_per_day = 1000
max_new_dialogs_per_day = 1000
min_interval = "5m"
jitter = "1m"
stuck_after = "1d"
max_follow_ups = 1

[[accounts]]
name = "alice"

[[audiences]]
name = "leads"
file = "leads.csv"

[[campaigns]]
name = "spring"
engine = "scripted"
prompt_template = "engines/prompts/spring.md"
audiences = ["leads"]
accounts = ["alice"]
send_window = { start = "09:00", end = "10:00", timezone = "Europe/London" }
[campaigns.params]
product = "Acme CRM"
"#;

#[tokio::test(start_paused = true)]
async fn openings_and_follow_ups_keep_to_each_contacts_local_hours() {
    let dir = common::project(0, CONFIG);
    let d = dir.path();
    let mut csv = String::from("username,first_name,company,timezone\n");
    let mut zone_of = HashMap::new();
    for i in 0..900 {
        let zone = ZONES[i % ZONES.len()];
        csv.push_str(&format!("contact_{i:04},Name{i},Company,{zone}\n"));
        zone_of.insert(
            format!("contact_{i:04}"),
            if zone.is_empty() { CAMPAIGN_ZONE } else { zone },
        );
    }
    csv.push_str("contact_mars,Marvin,Company,Mars/Olympus\n");
    std::fs::write(d.join("leads.csv"), csv).unwrap();

    let file = colloquy::audience::read(&d.join("leads.csv"));
    assert_eq!(file.rows.len(), 900);
    let problems: Vec<String> = file.problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("leads.csv:902: timezone \"Mars/Olympus\" is not a known time zone"),
        "{problems:?}"
    );

    let config = Arc::new(Config::load(&d.join("config.toml")).unwrap());
    // Through 2026-04-07: New York (Mar 8), Europe (Mar 29) and Sydney
    // (Apr 5) change their clocks on the way.
    let time = Duration::from_secs(DAYS * 86_400 / TIME_SCALE);
    common::run_paused(&config, &file.rows, time).await;

    let wire = common::read_wire(&config.data_dir().join("sim/wire.jsonl"));
    let mut days: HashMap<(&str, NaiveDate), usize> = HashMap::new();
    let (mut openings, mut follow_ups) = (0, 0);
    for l in wire
        .iter()
        .filter(|l| l.direction.as_deref() == Some("out"))
    {
        let kind = l.kind.as_deref().unwrap_or("");
        let zone: Tz = zone_of[&l.contact].parse().unwrap();
        let local = zone.timestamp_millis_opt((l.at * 1000.0) as i64).unwrap();
        if kind == "opening" || kind == "follow_up" {
            assert_eq!(
                local.hour(),
                9,
                "{kind} to {} at {local} ({zone})",
                l.contact
            );
            *days
                .entry((zone_of[&l.contact], local.date_naive()))
                .or_default() += 1;
        }
        openings += usize::from(kind == "opening");
        follow_ups += usize::from(kind == "follow_up");
    }
    println!("{openings} openings, {follow_ups} follow-ups");
    assert!(
        openings >= 250 && follow_ups >= 100,
        "{openings} {follow_ups}"
    );
    let date = |m, d| NaiveDate::from_ymd_opt(2026, m, d).unwrap();
    for (zone, day) in [
        ("America/New_York", date(3, 8)),
        ("America/New_York", date(3, 9)),
        ("Europe/Berlin", date(3, 29)),
        ("Europe/Berlin", date(3, 30)),
        (CAMPAIGN_ZONE, date(3, 29)),
        ("Australia/Sydney", date(4, 5)),
    ] {
        assert!(
            days.get(&(zone, day)).copied().unwrap_or(0) > 0,
            "no sends in {zone} on {day}: {days:?}"
        );
    }
}
