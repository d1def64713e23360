//! The pure core of the safety gate: given an account's record, its limits
//! and a moment, may it send now, and if not, when at the earliest?
//!
//! Nothing here does IO or reads a clock; [`decide`] and [`reserve`] are
//! functions of their arguments, which is what the property tests exercise.
//!
//! A send at time `s` counts in a sliding window of length `W` at time `t`
//! while `t - s < W`. Each constraint has an "earliest time at or after `t`
//! when it holds"; all but the send window only get easier as time passes, so
//! the earliest moment that satisfies every constraint is the fixed point of
//! taking the latest of those times.

use std::time::Duration;

use chrono::{NaiveTime, TimeZone as _};

use crate::clock::Timestamp;
use crate::config::{Safety, SendWindow};
use crate::model::{AccountRecord, AccountStatus, IdempotencyKey, MessageKind, SendMark};

const HOUR: i64 = 3_600_000;
const DAY: i64 = 24 * HOUR;

/// The limits of one account, in the units the decision uses.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub max_per_hour: u32,
    pub max_per_day: u32,
    pub max_new_dialogs_per_day: u32,
    pub min_interval: Duration,
    pub jitter: Duration,
    pub warmup: Duration,
    pub warmup_start: f64,
}

impl From<&Safety> for Limits {
    fn from(s: &Safety) -> Limits {
        Limits {
            max_per_hour: s.max_per_hour,
            max_per_day: s.max_per_day,
            max_new_dialogs_per_day: s.max_new_dialogs_per_day,
            min_interval: s.min_interval.0,
            jitter: s.jitter.0,
            warmup: s.warmup.0,
            warmup_start: s.warmup_start,
        }
    }
}

/// The answer of the gate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Not now; this is the earliest moment the send could be allowed.
    NotBefore(Timestamp),
    /// Never, while the account stays as it is.
    Deny(Denied),
}

/// Why an account cannot send at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("account {0} is blocked")]
    Blocked(String),
    #[error("account {0} is logged out; run `colloquy login {0}`")]
    Unauthorized(String),
    #[error("account {0} is disabled")]
    Disabled(String),
}

/// One send to decide on.
#[derive(Debug, Clone, Copy)]
pub struct SendRequest<'a> {
    pub kind: MessageKind,
    pub now: Timestamp,
    /// The campaign's send window; it binds openings and follow-ups.
    pub window: Option<&'a SendWindow>,
}

/// May `record`'s account send `req` now?
pub fn decide(record: &AccountRecord, limits: &Limits, req: SendRequest<'_>) -> Decision {
    match &record.status {
        AccountStatus::Blocked { .. } => {
            return Decision::Deny(Denied::Blocked(record.name.clone()))
        }
        AccountStatus::Unauthorized => {
            return Decision::Deny(Denied::Unauthorized(record.name.clone()))
        }
        AccountStatus::Disabled => return Decision::Deny(Denied::Disabled(record.name.clone())),
        _ => {}
    }
    let t = earliest(record, limits, req);
    if t <= req.now {
        Decision::Allow
    } else {
        Decision::NotBefore(t)
    }
}

/// The earliest moment at or after `req.now` when every constraint holds.
fn earliest(record: &AccountRecord, limits: &Limits, req: SendRequest<'_>) -> Timestamp {
    let opening = req.kind == MessageKind::Opening;
    let windowed = !req.kind.answers();
    let mut t = req.now;
    // Each round moves `t` to the latest "earliest" of the constraints; only
    // the send window can break again, once per day, so this ends quickly.
    for _ in 0..64 {
        let mut next = t.max(record.next_send_at);
        if let AccountStatus::FloodWait { until } = record.status {
            next = next.max(until);
        }
        if opening {
            if let AccountStatus::SpamLimited { until } = record.status {
                next = next.max(until);
            }
        }
        next = next.max(window_free(&record.sends, t, HOUR, |_| limits.max_per_hour));
        let cap_day = |at: Timestamp| warm_cap(record, limits, limits.max_per_day, at);
        next = next.max(window_free_with_cap(
            record,
            &record.sends,
            t,
            cap_day,
            limits.max_per_day,
            limits,
        ));
        if opening {
            let openings: Vec<SendMark> =
                record.sends.iter().filter(|s| s.opening).copied().collect();
            let cap_new =
                |at: Timestamp| warm_cap(record, limits, limits.max_new_dialogs_per_day, at);
            next = next.max(window_free_with_cap(
                record,
                &openings,
                t,
                cap_new,
                limits.max_new_dialogs_per_day,
                limits,
            ));
        }
        if windowed {
            if let Some(w) = req.window {
                next = next.max(window_open_at(w, next));
            }
        }
        if next == t {
            return t;
        }
        t = next;
    }
    t
}

/// How many of `sends` count at `t` in a window of `len` ms.
fn count_at(sends: &[SendMark], t: Timestamp, len: i64) -> usize {
    sends
        .iter()
        .filter(|s| t.0 - s.at.0 < len && s.at <= t)
        .count()
}

/// The earliest time at or after `t` when fewer than `cap` sends count in
/// the window, for a cap that does not change over time.
fn window_free(
    sends: &[SendMark],
    t: Timestamp,
    len: i64,
    cap: impl Fn(Timestamp) -> u32,
) -> Timestamp {
    let cap = cap(t) as usize;
    if sends.len() < cap {
        // Fewer sends in all than the cap: no need to count the window.
        return t;
    }
    let mut live: Vec<Timestamp> = sends
        .iter()
        .filter(|s| t.0 - s.at.0 < len)
        .map(|s| s.at)
        .collect();
    if live.len() < cap {
        return t;
    }
    live.sort();
    // Once the (n - cap + 1)-th oldest leaves, cap - 1 remain.
    Timestamp(live[live.len() - cap].0 + len).max(t)
}

/// Like [`window_free`] over a day, for a cap that rises during warm-up:
/// the answer is the first moment either enough sends have left the window
/// or the cap has risen past the count.
fn window_free_with_cap(
    record: &AccountRecord,
    sends: &[SendMark],
    t: Timestamp,
    cap: impl Fn(Timestamp) -> u32,
    full: u32,
    limits: &Limits,
) -> Timestamp {
    let now_cap = cap(t) as usize;
    if sends.len() < now_cap || count_at(sends, t, DAY) < now_cap {
        return t;
    }
    let mut candidates: Vec<Timestamp> = sends
        .iter()
        .map(|s| Timestamp(s.at.0 + DAY))
        .filter(|c| *c > t)
        .collect();
    if let (Some(first), false) = (record.first_send_at, limits.warmup.is_zero()) {
        for k in 1..=full {
            let c = warm_cap_time(first, limits, full, k);
            if c > t {
                candidates.push(c);
            }
        }
    }
    candidates.sort();
    for c in candidates {
        if count_at(sends, c, DAY) < cap(c) as usize {
            return c;
        }
    }
    // Unreachable with a positive cap: after a day every send has left.
    Timestamp(t.0 + DAY)
}

/// A daily cap at time `t`, ramped during warm-up from the account's first
/// send: `floor(full * (start + (1 - start) * progress))`, at least 1.
/// The share of its limits an account in warm-up may use at `t` (1 once
/// warmed up).
pub fn warmup_factor(record: &AccountRecord, limits: &Limits, t: Timestamp) -> f64 {
    let (Some(first), false) = (record.first_send_at, limits.warmup.is_zero()) else {
        return 1.0;
    };
    let progress = (t.0 - first.0) as f64 / limits.warmup.as_millis() as f64;
    if progress >= 1.0 {
        return 1.0;
    }
    limits.warmup_start + (1.0 - limits.warmup_start) * progress.max(0.0)
}

fn warm_cap(record: &AccountRecord, limits: &Limits, full: u32, t: Timestamp) -> u32 {
    let (Some(first), false) = (record.first_send_at, limits.warmup.is_zero()) else {
        return full;
    };
    let progress = (t.0 - first.0) as f64 / limits.warmup.as_millis() as f64;
    if progress >= 1.0 {
        return full;
    }
    let frac = limits.warmup_start + (1.0 - limits.warmup_start) * progress.max(0.0);
    ((full as f64 * frac).floor() as u32).clamp(1, full)
}

/// The first millisecond at which the warm-up cap reaches `k`.
fn warm_cap_time(first: Timestamp, limits: &Limits, full: u32, k: u32) -> Timestamp {
    let probe = AccountRecord {
        first_send_at: Some(first),
        ..AccountRecord::new("")
    };
    let cap = |at: i64| warm_cap(&probe, limits, full, Timestamp(at));
    if cap(first.0) >= k {
        return first;
    }
    let start = limits.warmup_start;
    let progress = ((k as f64 / full as f64 - start) / (1.0 - start)).clamp(0.0, 1.0);
    let mut at = first.0 + (progress * limits.warmup.as_millis() as f64).ceil() as i64;
    // Float rounding can put the estimate a few milliseconds off either way;
    // settle on the first millisecond at which `warm_cap` itself agrees.
    let end = first.0 + limits.warmup.as_millis() as i64;
    for _ in 0..16 {
        if cap(at) < k && at < end {
            at += 1;
        } else if at > first.0 && cap(at - 1) >= k {
            at -= 1;
        } else {
            break;
        }
    }
    Timestamp(at)
}

/// The earliest time at or after `t` inside the send window.
pub fn window_open_at(w: &SendWindow, t: Timestamp) -> Timestamp {
    let tz = w.timezone.0;
    let Some(utc) = chrono::DateTime::from_timestamp_millis(t.0) else {
        return t;
    };
    let local = utc.with_timezone(&tz);
    let tod = local.time();
    let (start, end) = (w.start.0, w.end.0);
    let inside = if start < end {
        tod >= start && tod < end
    } else {
        tod >= start || tod < end
    };
    if inside {
        return t;
    }
    let mut day = local.date_naive();
    if tod >= start {
        day = day.succ_opt().unwrap_or(day);
    }
    local_instant(tz, day, start).max(t)
}

/// The instant of a local date and time; in a DST gap, the moment the gap ends.
fn local_instant(tz: chrono_tz::Tz, day: chrono::NaiveDate, time: NaiveTime) -> Timestamp {
    let mut naive = day.and_time(time);
    for _ in 0..4 {
        if let Some(dt) = tz.from_local_datetime(&naive).earliest() {
            return Timestamp(dt.timestamp_millis());
        }
        naive += chrono::Duration::minutes(30);
    }
    Timestamp(naive.and_utc().timestamp_millis())
}

/// Counts a send against the account if [`decide`] allows it: the one step
/// that takes a slot. `jitter` is the random part of the pause before the
/// next send, drawn by the caller in `[0, limits.jitter]`.
pub fn reserve(
    record: &mut AccountRecord,
    limits: &Limits,
    req: SendRequest<'_>,
    key: IdempotencyKey,
    jitter: Duration,
) -> Decision {
    // A message keeps its slot across retries and restarts: taking it again
    // is a no-op.
    if record.sends.iter().any(|s| s.key == key) {
        return Decision::Allow;
    }
    reserve_new(record, limits, req, key, jitter)
}

/// [`reserve`] for a key that holds no slot: a message recorded with a
/// key just drawn (the answer pipeline's replies), which spares a look at
/// every mark of the account.
pub fn reserve_new(
    record: &mut AccountRecord,
    limits: &Limits,
    req: SendRequest<'_>,
    key: IdempotencyKey,
    jitter: Duration,
) -> Decision {
    debug_assert!(!record.sends.iter().any(|s| s.key == key));
    let decision = decide(record, limits, req);
    if decision != Decision::Allow {
        return decision;
    }
    let now = req.now;
    // Marks older than a day count in no window; they go once the oldest
    // one (the first: marks are in time order) is.
    if record.sends.first().is_some_and(|s| now.0 - s.at.0 >= DAY) {
        record.sends.retain(|s| now.0 - s.at.0 < DAY);
    }
    record.sends.push(SendMark {
        at: now,
        opening: req.kind == MessageKind::Opening,
        key,
    });
    record.first_send_at.get_or_insert(now);
    record.next_send_at = now.saturating_add(limits.min_interval + jitter.min(limits.jitter));
    if let AccountStatus::FloodWait { until } | AccountStatus::SpamLimited { until } = record.status
    {
        if until <= now {
            record.status = AccountStatus::Active;
        }
    }
    Decision::Allow
}

/// Pauses the account until `until`, or longer if it already waits longer.
/// A blocked, logged-out or disabled account stays as it is.
pub fn pause(record: &mut AccountRecord, until: Timestamp) {
    record.status = match &record.status {
        AccountStatus::Active => AccountStatus::FloodWait { until },
        AccountStatus::FloodWait { until: old } => AccountStatus::FloodWait {
            until: until.max(*old),
        },
        // A spam limit lasts longer than a flood wait; both hold until the
        // later of the two, and openings stay barred until the spam limit ends.
        AccountStatus::SpamLimited { until: old } => AccountStatus::SpamLimited {
            until: (*old).max(until),
        },
        other => other.clone(),
    };
    record.next_send_at = record.next_send_at.max(until);
}

/// Bars new dialogs until `until` (PEER_FLOOD); replies continue.
pub fn spam_limit(record: &mut AccountRecord, until: Timestamp) {
    record.status = match &record.status {
        AccountStatus::Active | AccountStatus::FloodWait { .. } => {
            AccountStatus::SpamLimited { until }
        }
        AccountStatus::SpamLimited { until: old } => AccountStatus::SpamLimited {
            until: until.max(*old),
        },
        other => other.clone(),
    };
}

/// Moves a send's mark to the moment the transport says it went out, and
/// the pause before the next send with it: no send leaves the next one less
/// than `min_interval` after it, and the send taken last (even once an
/// earlier one's confirmation moved past it) keeps the pause it drew
/// (`min_interval` plus its jitter). A batch confirms several
/// marks, and a claim may have taken a slot while a send was under way, so
/// the pause is set from each send's own time, never shifted.
pub fn confirm(record: &mut AccountRecord, key: IdempotencyKey, at: Timestamp, limits: &Limits) {
    let Some(i) = record.sends.iter().rposition(|s| s.key == key) else {
        return;
    };
    let reserved_at = record.sends[i].at;
    let at = at.max(reserved_at);
    record.sends.set_at(i, at);
    let pause = if record.sends.latest() == Some(key) {
        let drawn = Duration::from_millis(
            record.next_send_at.0.saturating_sub(reserved_at.0).max(0) as u64,
        );
        drawn.clamp(limits.min_interval, limits.min_interval + limits.jitter)
    } else {
        limits.min_interval
    };
    record.next_send_at = record.next_send_at.max(at.saturating_add(pause));
}

/// Returns the slot of a send that failed before delivery.
pub fn release(record: &mut AccountRecord, key: IdempotencyKey) -> bool {
    let before = record.sends.len();
    record.sends.retain(|s| s.key != key);
    record.sends.len() != before
}

#[cfg(test)]
mod tests;
