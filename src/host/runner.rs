//! CampaignRunner: opens dialogs with never-contacted contacts whenever an
//! account of the campaign may open one, and sleeps until the earliest
//! moment one may when none can. It never polls.

use std::sync::Arc;

use super::conductor::ending_of;
use super::Host;
use crate::clock::Timestamp;
use crate::config::CampaignStatus;
use crate::engine::{Call, Reply};
use crate::model::{DialogId, DialogStatus, DialogVariant, MessageKind};
use crate::safety::alerts::{Alert, AlertKind};
use crate::safety::decide::window_open_at;
use crate::safety::Decision;
use crate::store::StoreError;
use crate::transition::{NewDialog, Outbound};
use crate::variants::{self, Tally};
use rand::SeedableRng;

pub async fn run(host: Arc<Host>, campaign: String) {
    let mut exhausted_logged = false;
    let mut paused_alerted = false;
    let mut turn = 0usize;
    let mut allocator = Allocator::default();
    // A pause of its own from an earlier run: running again clears it.
    let mut engine = EngineWatch {
        paused_itself: matches!(super::pause::reason(&host.store, &campaign), Ok(Some(_))),
        ..EngineWatch::default()
    };
    loop {
        if host.shutdown.is_cancelled() {
            return;
        }
        let changed = host.changed.notified();
        let reloaded = host.engines.reloaded();
        let config = host.config();
        let Some(camp) = config.campaign(&campaign).cloned() else {
            return;
        };
        if camp.status != CampaignStatus::Active {
            tokio::select! { _ = changed => continue, _ = host.shutdown.cancelled() => return }
        }
        if std::mem::take(&mut engine.paused_itself) {
            if let Err(e) = super::pause::resumed(&host.store, &campaign) {
                tracing::error!(campaign, "cannot clear the campaign's pause: {e}");
            }
        }
        if !engine.loads(&host, &camp) {
            // Nothing is picked while an engine does not load.
            tokio::select! {
                _ = changed => {}
                _ = reloaded => {}
                _ = host.shutdown.cancelled() => return,
            }
            continue;
        }
        let earliest = match round(
            &host,
            &camp,
            &config,
            &mut turn,
            &mut allocator,
            &mut engine,
        )
        .await
        {
            Round::Again => continue,
            Round::Exhausted => {
                if !exhausted_logged {
                    tracing::info!(
                        campaign,
                        "every contact of the campaign's audiences has been contacted"
                    );
                    exhausted_logged = true;
                }
                tokio::select! { _ = changed => continue, _ = host.shutdown.cancelled() => return }
            }
            Round::Wait(t) => t,
        };
        paused_alerted = alert_if_all_limited(&host, &camp, paused_alerted);
        match earliest {
            Some(t) => {
                tokio::select! {
                    _ = host.clock.sleep_until(t) => {}
                    _ = changed => {}
                    _ = host.shutdown.cancelled() => return,
                }
            }
            None => {
                tokio::select! { _ = changed => {}, _ = host.shutdown.cancelled() => return }
            }
        }
    }
}

/// What one round over a campaign's accounts came to.
enum Round {
    /// Something happened (an opening, a failure, a lost race): go again.
    Again,
    /// Every contact of the campaign's audiences has been contacted.
    Exhausted,
    /// No account may open before this time (before a change, if none).
    Wait(Option<Timestamp>),
}

/// Tries the campaign's accounts in turn, from `turn`, until one of them
/// opens a dialog (the next round starts after it) or none may.
async fn round(
    host: &Arc<Host>,
    camp: &crate::config::Campaign,
    config: &crate::config::Config,
    turn: &mut usize,
    allocator: &mut Allocator,
    engine: &mut EngineWatch,
) -> Round {
    let campaign = camp.name.as_str();
    let earlier = |e: Option<Timestamp>, t: Timestamp| Some(e.map_or(t, |e| e.min(t)));
    let mut earliest = None;
    let n = camp.accounts.len();
    for i in 0..n {
        let account = &camp.accounts[(*turn + i) % n];
        // The send window is the contact's: it binds at the pick.
        match host.safety.check(account, MessageKind::Opening, None) {
            Ok(Decision::Allow) => match open_one(host, camp, account, allocator).await {
                Ok(Opened::Yes) => {
                    engine.failures = 0;
                    *turn = (*turn + i + 1) % n;
                    return Round::Again;
                }
                Ok(Opened::EngineFailed(e)) => {
                    let limit = config.file.engines.pause_after_failures;
                    engine.failed(host, campaign, account, &e, limit);
                    return Round::Again;
                }
                Ok(Opened::NoContactLeft) => return Round::Exhausted,
                Ok(Opened::Retry) => return Round::Again,
                Ok(Opened::NotBefore(t)) => return Round::Wait(earlier(earliest, t)),
                Err(e) => tracing::error!(campaign, "opening a dialog failed: {e}"),
            },
            Ok(Decision::NotBefore(t)) => earliest = earlier(earliest, t),
            Ok(Decision::Deny(_)) => {}
            Err(e) => tracing::error!(campaign, "cannot read account {account}: {e}"),
        }
    }
    Round::Wait(earliest)
}

/// What the runner knows of its campaign's engine.
#[derive(Default)]
struct EngineWatch {
    /// Engine failures in a row at openings.
    failures: u32,
    /// The engine's load error was alerted.
    load_reported: bool,
    /// The campaign paused itself; running again means it was resumed.
    paused_itself: bool,
}

/// The runner's view of its variants' results, recounted from the store
/// after every [`Allocator::RECOUNT`] openings, but never more than a
/// [`Allocator::COUNT_SHARE`]th of the time: a count is a pass over every
/// dialog, so a store of a million (2 s) is counted again 20 s later at
/// the soonest.
#[derive(Default)]
struct Allocator {
    tallies: Vec<Tally>,
    /// Openings since the last count; `None` before the first.
    since: Option<u64>,
    /// When the last count ended, and how long it took.
    counted: Option<(std::time::Instant, std::time::Duration)>,
}

impl Allocator {
    const RECOUNT: u64 = 10;
    const COUNT_SHARE: u32 = 10;

    /// The variant a new dialog of `camp` gets.
    async fn choose(
        &mut self,
        host: &Arc<Host>,
        camp: &crate::config::Campaign,
    ) -> Result<Option<DialogVariant>, StoreError> {
        if camp.variants.is_empty() {
            return Ok(None);
        }
        let due = match (self.since, self.counted) {
            (Some(n), Some((at, took))) => {
                n >= Self::RECOUNT && at.elapsed() >= took * Self::COUNT_SHARE
            }
            _ => true,
        };
        if due || self.tallies.len() != camp.variants.len() {
            let started = std::time::Instant::now();
            let (h, c) = (host.clone(), camp.clone());
            self.tallies =
                tokio::task::spawn_blocking(move || crate::report::variant_tallies(&h.store, &c))
                    .await
                    .map_err(|e| {
                        StoreError::Storage(format!("counting the variants failed: {e}"))
                    })??;
            self.since = Some(0);
            self.counted = Some((std::time::Instant::now(), started.elapsed()));
        }
        self.since = self.since.map(|n| n + 1);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(host.rng.next_u64());
        let i = variants::choose(camp, &self.tallies, &mut rng).unwrap_or(0);
        let name = &camp.variants[i].name;
        Ok(Some(DialogVariant {
            name: name.clone(),
            engine: camp.runs_on_declared(Some(name)).engine,
        }))
    }
}

/// Raises one alert when none of the campaign's accounts may open dialogs
/// (`alerted`: it was raised already); says whether that is so.
fn alert_if_all_limited(host: &Host, camp: &crate::config::Campaign, alerted: bool) -> bool {
    let all_limited = host.safety.none_can_open(&camp.accounts).unwrap_or(false);
    if all_limited && !alerted {
        let text = "paused itself: none of its accounts may open dialogs";
        alert(host, camp, AlertKind::CampaignPaused, text);
    }
    all_limited
}

/// Raises an alert about `camp`: "campaign NAME " and `text`.
fn alert(host: &Host, camp: &crate::config::Campaign, kind: AlertKind, text: &str) {
    let text = format!("campaign {} {text}", camp.name);
    host.alerts
        .raise(Alert::new(kind, host.clock.now(), text).campaign(&camp.name));
}

impl EngineWatch {
    /// Whether every engine of the campaign (its own, its variants') loads;
    /// the first time one does not, an alert says why.
    fn loads(&mut self, host: &Host, camp: &crate::config::Campaign) -> bool {
        let error = camp
            .engines()
            .into_iter()
            .find_map(|engine| host.engines.load_error(engine));
        let Some(e) = error else {
            self.load_reported = false;
            return true;
        };
        if !self.load_reported {
            let text = format!("opens no dialogs until its engine loads: {e}");
            alert(host, camp, AlertKind::EngineError, &text);
            self.load_reported = true;
        }
        false
    }

    /// One more opening the engine failed; `limit` in a row pause the
    /// campaign.
    fn failed(
        &mut self,
        host: &Arc<Host>,
        campaign: &str,
        account: &str,
        e: &crate::engine::EngineError,
        limit: u32,
    ) {
        self.failures += 1;
        let limit = limit.max(1);
        let failures = self.failures;
        tracing::error!(
            campaign,
            account,
            "{e}; the contact stays in the audience ({failures} of {limit} failures in a row)"
        );
        if failures >= limit {
            super::pause::pause_itself(host, campaign, &e.to_string());
            self.failures = 0;
            self.paused_itself = true;
        }
    }
}

enum Opened {
    Yes,
    /// The engine failed; nothing was claimed.
    EngineFailed(crate::engine::EngineError),
    /// Another try may succeed (the contact was taken, or the slot).
    Retry,
    /// No contact looked at is inside its send window before then.
    NotBefore(Timestamp),
    NoContactLeft,
}

/// How many uncontacted contacts a pick looks at for one inside its send
/// window before it waits for the earliest window among them to open.
const WINDOW_SCAN: usize = 256;

/// A random uncontacted contact of `camp` inside its send window now.
/// Contacts outside theirs are passed over (never claimed), walking on
/// from the random start in the audience's pick order.
fn pick(host: &Host, camp: &crate::config::Campaign) -> Result<Picked, StoreError> {
    let mut audiences = camp.audiences.clone();
    let n = audiences.len();
    if n > 1 {
        audiences.rotate_left((host.rng.next_u64() as usize) % n);
    }
    let now = host.clock.now();
    let mut later: Option<Timestamp> = None;
    for a in &audiences {
        let mut r = host.rng.next_u64();
        for _ in 0..WINDOW_SCAN {
            let Some(id) = host.store.pick_uncontacted(a, r)? else {
                break;
            };
            let Some(contact) = host.store.contact(id)? else {
                return Ok(Picked::Retry);
            };
            let opens = camp
                .window_for(&contact)
                .map_or(now, |w| window_open_at(&w, now));
            if opens <= now {
                return Ok(Picked::Contact(Box::new(contact)));
            }
            later = Some(later.map_or(opens, |l| l.min(opens)));
            r = contact.pick_key.wrapping_add(1);
        }
    }
    Ok(match later {
        Some(t) => Picked::NotBefore(t),
        None => Picked::NoContactLeft,
    })
}

enum Picked {
    Contact(Box<crate::model::Contact>),
    Retry,
    NotBefore(Timestamp),
    NoContactLeft,
}

/// Claims a contact the engine chose to skip, with a dialog finished as
/// "skipped", so that no campaign writes to it.
fn skip(host: &Host, new: &NewDialog) -> Result<(), StoreError> {
    match host.store.open_dialog(new, None, &|_| Ok(())) {
        Ok((d, _)) => {
            host.store.set_dialog_status(
                d.id,
                DialogStatus::Finished {
                    outcome: "skipped".into(),
                },
            )?;
            Ok(())
        }
        Err(StoreError::Claimed(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Picks a random uncontacted contact, asks the engine for the opening, and
/// claims the contact, creates the dialog, records the opening and takes the
/// account's slot in one store transaction.
async fn open_one(
    host: &Arc<Host>,
    camp: &crate::config::Campaign,
    account: &str,
    allocator: &mut Allocator,
) -> Result<Opened, StoreError> {
    let contact = match pick(host, camp)? {
        Picked::Contact(c) => c,
        Picked::Retry => return Ok(Opened::Retry),
        Picked::NotBefore(t) => return Ok(Opened::NotBefore(t)),
        Picked::NoContactLeft => return Ok(Opened::NoContactLeft),
    };
    let contact_id = contact.id;
    let config = host.config();
    let variant = allocator.choose(host, camp).await?;
    let engine = camp.runs_on(variant.as_ref()).engine;
    let ctx = host.base_ctx(&config, &camp.name, variant.as_ref(), account, &contact);
    let new = NewDialog {
        campaign: camp.name.clone(),
        account: account.to_string(),
        contact: contact_id,
        at: host.clock.now(),
        variant,
    };
    let reply = match host.engines.call(&engine, Call::Opening, ctx).await {
        Ok(r) => r,
        // The contact is not claimed: it stays for a working engine.
        Err(e) => return Ok(Opened::EngineFailed(e)),
    };
    if reply.output.skip || reply.output.messages.is_empty() {
        skip(host, &new)?;
        return Ok(Opened::Retry);
    }
    let mut texts = reply.output.messages.clone().into_iter();
    let first = texts.next().unwrap_or_default();
    let key = host.new_key();
    let opening = Outbound {
        kind: MessageKind::Opening,
        text: first,
        key,
    };
    let window = camp.window_for(&contact);
    let take_slot = host.safety.opening_reserver(account, window, key);
    // A pause that came while the engine wrote the opening stops it here,
    // in the transaction that would claim the contact: nothing is claimed.
    let reserve = |record: &mut crate::model::AccountRecord| {
        if !host
            .config()
            .campaign(&camp.name)
            .is_some_and(|c| c.status == CampaignStatus::Active)
        {
            return Err(format!("campaign {} is paused", camp.name));
        }
        take_slot(record)
    };
    match host.store.open_dialog(&new, Some(&opening), &reserve) {
        Ok((d, _)) => {
            record_the_rest(host, d.id, texts, &reply)?;
            tracing::info!(dialog = d.id, campaign = camp.name, account, contact = %contact.identity, "dialog opened");
            host.activate(d.id);
            host.activity.notify_one();
            Ok(Opened::Yes)
        }
        Err(StoreError::Claimed(_)) | Err(StoreError::Refused(_)) => Ok(Opened::Retry),
        Err(e) => Err(e),
    }
}

/// Records what the opening call answered past its first message (the
/// replies that follow it, the engine's state, an ending) on the dialog it
/// opened.
fn record_the_rest(
    host: &Host,
    dialog: DialogId,
    texts: impl Iterator<Item = String>,
    reply: &Reply,
) -> Result<(), StoreError> {
    let rest: Vec<Outbound> = texts
        .map(|text| Outbound {
            kind: MessageKind::Reply,
            text,
            key: host.new_key(),
        })
        .collect();
    host.store.apply(
        dialog,
        &crate::transition::Apply {
            at: host.clock.now(),
            state: Some(&reply.state),
            outbound: &rest,
            ending: ending_of(&reply.output),
            ..Default::default()
        },
    )?;
    Ok(())
}
