use super::*;
use crate::config::{TimeOfDay, Zone};
use proptest::prelude::*;

const MIN: i64 = 60_000;

fn limits() -> Limits {
    Limits {
        max_per_hour: 3,
        max_per_day: 5,
        max_new_dialogs_per_day: 2,
        min_interval: Duration::from_secs(30),
        jitter: Duration::from_secs(10),
        warmup: Duration::ZERO,
        warmup_start: 0.2,
    }
}

fn req(kind: MessageKind, now: i64) -> SendRequest<'static> {
    SendRequest {
        kind,
        now: Timestamp(now),
        window: None,
    }
}

fn send(r: &mut AccountRecord, l: &Limits, kind: MessageKind, now: i64, key: u64) -> Decision {
    reserve(r, l, req(kind, now), IdempotencyKey(key), Duration::ZERO)
}

#[test]
fn hourly_limit_gives_the_exact_next_slot() {
    let l = limits();
    let mut r = AccountRecord::new("a");
    for (i, at) in [0, MIN, 2 * MIN].into_iter().enumerate() {
        assert_eq!(
            send(&mut r, &l, MessageKind::Reply, at, i as u64),
            Decision::Allow
        );
    }
    // The first send leaves the hour at exactly 60 minutes.
    assert_eq!(
        decide(&r, &l, req(MessageKind::Reply, 10 * MIN)),
        Decision::NotBefore(Timestamp(HOUR))
    );
    assert_eq!(
        decide(&r, &l, req(MessageKind::Reply, HOUR)),
        Decision::Allow
    );
}

#[test]
fn min_interval_and_jitter_space_sends() {
    let l = limits();
    let mut r = AccountRecord::new("a");
    reserve(
        &mut r,
        &l,
        req(MessageKind::Reply, 0),
        IdempotencyKey(1),
        Duration::from_secs(7),
    );
    assert_eq!(
        decide(&r, &l, req(MessageKind::Reply, 1)),
        Decision::NotBefore(Timestamp(37_000))
    );
    // Jitter beyond the configured maximum is clamped.
    reserve(
        &mut r,
        &l,
        req(MessageKind::Reply, 37_000),
        IdempotencyKey(2),
        Duration::from_secs(99),
    );
    assert_eq!(r.next_send_at, Timestamp(37_000 + 40_000));
}

#[test]
fn new_dialog_limit_counts_openings_only() {
    let l = limits();
    let mut r = AccountRecord::new("a");
    send(&mut r, &l, MessageKind::Opening, 0, 1);
    send(&mut r, &l, MessageKind::Opening, MIN, 2);
    assert_eq!(
        decide(&r, &l, req(MessageKind::Opening, 2 * MIN)),
        Decision::NotBefore(Timestamp(DAY))
    );
    assert_eq!(
        decide(&r, &l, req(MessageKind::Reply, 2 * MIN)),
        Decision::Allow
    );
}

#[test]
fn daily_limit_spans_hours() {
    let l = limits();
    let mut r = AccountRecord::new("a");
    for i in 0..5 {
        assert_eq!(
            send(&mut r, &l, MessageKind::Reply, i * 2 * HOUR, i as u64),
            Decision::Allow
        );
    }
    assert_eq!(
        decide(&r, &l, req(MessageKind::Reply, 9 * HOUR)),
        Decision::NotBefore(Timestamp(DAY))
    );
}

#[test]
fn warmup_ramps_the_daily_cap() {
    let l = Limits {
        max_per_hour: 100,
        max_per_day: 100,
        max_new_dialogs_per_day: 100,
        min_interval: Duration::ZERO,
        jitter: Duration::ZERO,
        warmup: Duration::from_secs(10 * 86_400),
        warmup_start: 0.1,
    };
    let mut r = AccountRecord::new("a");
    let mut sent = 0;
    while send(&mut r, &l, MessageKind::Reply, sent, sent as u64) == Decision::Allow {
        sent += 1;
    }
    // 10% of 100 on the first day.
    assert_eq!(sent, 10);
    match decide(&r, &l, req(MessageKind::Reply, 20)) {
        Decision::NotBefore(t) => {
            // The cap reaches 11 at 1/90 of the ten days.
            let expected = (10.0 * 86_400_000.0 / 90.0f64).ceil() as i64;
            assert!((t.0 - expected).abs() <= 1, "{t:?} vs {expected}");
            assert_eq!(
                decide(&r, &l, req(MessageKind::Reply, t.0)),
                Decision::Allow
            );
            assert_ne!(
                decide(&r, &l, req(MessageKind::Reply, t.0 - 1)),
                Decision::Allow
            );
        }
        other => panic!("{other:?}"),
    }
}

fn berlin(start: &str, end: &str) -> SendWindow {
    SendWindow {
        start: start.parse::<TimeOfDay>().unwrap(),
        end: end.parse::<TimeOfDay>().unwrap(),
        timezone: "Europe/Berlin".parse::<Zone>().unwrap(),
    }
}

#[test]
fn send_window_holds_openings_and_follow_ups_not_replies() {
    let l = limits();
    let r = AccountRecord::new("a");
    let w = berlin("09:00", "19:00");
    // 2026-01-15 06:00 UTC is 07:00 in Berlin; the window opens at 08:00 UTC.
    let six_utc = 1_768_456_800_000;
    let mut q = req(MessageKind::Opening, six_utc);
    q.window = Some(&w);
    assert_eq!(
        decide(&r, &l, q),
        Decision::NotBefore(Timestamp(six_utc + 2 * HOUR))
    );
    q.kind = MessageKind::FollowUp;
    assert_eq!(
        decide(&r, &l, q),
        Decision::NotBefore(Timestamp(six_utc + 2 * HOUR))
    );
    q.kind = MessageKind::Reply;
    assert_eq!(decide(&r, &l, q), Decision::Allow);
    // 20:00 Berlin: tomorrow 09:00.
    q.kind = MessageKind::Opening;
    q.now = Timestamp(six_utc + 13 * HOUR);
    assert_eq!(
        decide(&r, &l, q),
        Decision::NotBefore(Timestamp(six_utc + 2 * HOUR + DAY))
    );
}

#[test]
fn overnight_window() {
    let w = berlin("22:00", "02:00");
    // 23:30 Berlin (winter, UTC+1) is inside.
    let t = Timestamp(1_768_516_200_000);
    assert_eq!(window_open_at(&w, t), t);
    // 12:00 Berlin: 22:00 the same day.
    let noon = Timestamp(1_768_474_800_000);
    assert_eq!(window_open_at(&w, noon), Timestamp(noon.0 + 10 * HOUR));
}

#[test]
fn pauses_and_blocks() {
    let l = limits();
    let mut r = AccountRecord::new("a");
    r.status = AccountStatus::FloodWait {
        until: Timestamp(5 * MIN),
    };
    assert_eq!(
        decide(&r, &l, req(MessageKind::Reply, 0)),
        Decision::NotBefore(Timestamp(5 * MIN))
    );
    r.status = AccountStatus::SpamLimited {
        until: Timestamp(DAY),
    };
    assert_eq!(decide(&r, &l, req(MessageKind::Reply, 0)), Decision::Allow);
    assert_eq!(
        decide(&r, &l, req(MessageKind::Opening, 0)),
        Decision::NotBefore(Timestamp(DAY))
    );
    r.status = AccountStatus::Blocked {
        reason: "banned".into(),
    };
    assert!(matches!(
        decide(&r, &l, req(MessageKind::Reply, 0)),
        Decision::Deny(Denied::Blocked(_))
    ));
}

#[test]
fn released_slots_are_free_again() {
    let l = limits();
    let mut r = AccountRecord::new("a");
    for i in 0..3 {
        send(&mut r, &l, MessageKind::Reply, i * MIN, i as u64);
    }
    assert!(release(&mut r, IdempotencyKey(1)));
    assert!(!release(&mut r, IdempotencyKey(1)));
    assert_eq!(
        decide(&r, &l, req(MessageKind::Reply, 3 * MIN)),
        Decision::Allow
    );
}

/// What a property test does to an account.
#[derive(Debug, Clone)]
enum Op {
    /// Try to send after waiting this many ms.
    Send { wait: i64, kind: u8, jitter_ms: u64 },
    /// The last send failed before delivery.
    FailLast,
    /// Telegram asks for a flood wait of this many ms.
    FloodWait(i64),
    /// The process restarts: the record goes through the store encoding.
    Restart,
    /// The clock jumps ahead.
    Jump(i64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0i64..20 * MIN, 0u8..3, 0u64..20_000).prop_map(|(wait, kind, jitter_ms)| Op::Send { wait, kind, jitter_ms }),
        1 => Just(Op::FailLast),
        1 => (1i64..30 * MIN).prop_map(Op::FloodWait),
        1 => Just(Op::Restart),
        1 => (0i64..2 * DAY).prop_map(Op::Jump),
    ]
}

fn any_limits() -> impl Strategy<Value = Limits> {
    (
        1u32..6,
        0u32..10,
        1u32..6,
        0u64..120,
        0u64..60,
        prop::bool::ANY,
        1u32..10,
    )
        .prop_map(|(hour, extra_day, new, interval, jitter, warm, start)| {
            let day = hour + extra_day;
            Limits {
                max_per_hour: hour,
                max_per_day: day,
                max_new_dialogs_per_day: new.min(day),
                min_interval: Duration::from_secs(interval),
                jitter: Duration::from_secs(jitter),
                warmup: if warm {
                    Duration::from_secs(3 * 86_400)
                } else {
                    Duration::ZERO
                },
                warmup_start: start as f64 / 10.0,
            }
        })
}

fn kind_of(k: u8) -> MessageKind {
    [
        MessageKind::Opening,
        MessageKind::Reply,
        MessageKind::FollowUp,
    ][k as usize % 3]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn limits_hold_and_not_before_is_exact(l in any_limits(), ops in prop::collection::vec(op(), 1..80)) {
        let mut r = AccountRecord::new("a");
        let mut now = 1_000_000i64;
        let mut delivered: Vec<SendMark> = Vec::new();
        let mut pauses: Vec<(i64, i64)> = Vec::new();
        let mut key = 0u64;
        for op in ops {
            match op {
                Op::Send { wait, kind, jitter_ms } => {
                    now += wait;
                    let q = req(kind_of(kind), now);
                    let before = decide(&r, &l, q);
                    if let Decision::NotBefore(t) = before {
                        // Never earlier than allowed, never later than needed.
                        prop_assert!(t.0 > now);
                        prop_assert_eq!(decide(&r, &l, req(q.kind, t.0)), Decision::Allow);
                        prop_assert_ne!(decide(&r, &l, req(q.kind, t.0 - 1)), Decision::Allow);
                    }
                    key += 1;
                    let got = reserve(&mut r, &l, q, IdempotencyKey(key), Duration::from_millis(jitter_ms));
                    prop_assert_eq!(&got, &before);
                    if got == Decision::Allow {
                        for (from, until) in &pauses {
                            prop_assert!(!(now >= *from && now < *until), "sent during a flood wait");
                        }
                        delivered.push(*r.sends.last().unwrap());
                    }
                }
                Op::FailLast => {
                    if let Some(last) = delivered.pop() {
                        // A send older than a day has already left the record.
                        let released = release(&mut r, last.key);
                        prop_assert!(released || now - last.at.0 >= DAY);
                    }
                }
                Op::FloodWait(ms) => {
                    let until = now + ms;
                    pause(&mut r, Timestamp(until));
                    pauses.push((now, until));
                }
                Op::Restart => {
                    let bytes = serde_json::to_vec(&r).unwrap();
                    r = serde_json::from_slice(&bytes).unwrap();
                }
                Op::Jump(ms) => now += ms,
            }
        }
        // No sliding window was ever exceeded by what was actually sent.
        let full_day = l.max_per_day as usize;
        for s in &delivered {
            let t = s.at.0;
            let in_window = |len: i64, openings: bool| {
                delivered.iter().filter(|x| x.at.0 <= t && t - x.at.0 < len && (!openings || x.opening)).count()
            };
            prop_assert!(in_window(HOUR, false) <= l.max_per_hour as usize);
            prop_assert!(in_window(DAY, false) <= full_day);
            prop_assert!(in_window(DAY, true) <= l.max_new_dialogs_per_day as usize);
        }
        for w in delivered.windows(2) {
            prop_assert!(w[1].at.0 - w[0].at.0 >= l.min_interval.as_millis() as i64);
        }
    }
}
