//! Random event sequences against the rules every dialog keeps.

use proptest::prelude::*;

use super::*;

#[derive(Debug, Clone)]
pub(crate) enum Op {
    Incoming {
        handled: bool,
    },
    Handled {
        replies: usize,
        ending: Option<u8>,
        reviewed: bool,
    },
    Outbound(MessageKind),
    EndingReached,
    Status(u8),
    OptedOut,
    Blocked,
    Sent,
}

pub(crate) fn status(i: u8) -> DialogStatus {
    match i % 7 {
        0 => DialogStatus::Active,
        1 => DialogStatus::Handoff,
        2 => DialogStatus::Finished {
            outcome: "booked".into(),
        },
        3 => DialogStatus::Dead,
        4 => DialogStatus::Blocked,
        5 => DialogStatus::Error {
            reason: "engine".into(),
        },
        _ => DialogStatus::OptedOut,
    }
}

pub(crate) fn op() -> impl Strategy<Value = Op> {
    let kind = prop_oneof![
        Just(MessageKind::Reply),
        Just(MessageKind::FollowUp),
        Just(MessageKind::Human)
    ];
    prop_oneof![
        4 => any::<bool>().prop_map(|handled| Op::Incoming { handled }),
        4 => (0..3usize, proptest::option::weighted(0.15, 0..7u8), any::<bool>())
            .prop_map(|(replies, ending, reviewed)| Op::Handled { replies, ending, reviewed }),
        2 => kind.prop_map(Op::Outbound),
        1 => Just(Op::EndingReached),
        1 => (0..7u8).prop_map(Op::Status),
        1 => Just(Op::OptedOut),
        1 => Just(Op::Blocked),
        3 => Just(Op::Sent),
    ]
}

/// A model of a dialog's records, as a store would keep them, changed only by
/// [`apply`] and [`settle`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DialogModel {
    pub dialog: Dialog,
    pub messages: Vec<Message>,
    pub unhandled: Vec<u64>,
    pub do_not_contact: bool,
}

impl DialogModel {
    pub(crate) fn new(dialog: Dialog, messages: Vec<Message>) -> DialogModel {
        DialogModel {
            dialog,
            messages,
            unhandled: Vec::new(),
            do_not_contact: false,
        }
    }

    pub(crate) fn waiting(&self) -> Vec<Message> {
        self.messages
            .iter()
            .filter(|m| m.delivery == Some(Delivery::Pending))
            .cloned()
            .collect()
    }

    pub(crate) fn take(&mut self, c: Change) {
        self.dialog = c.dialog;
        self.messages.extend(c.appended);
        for m in c.rewritten {
            let i = m.seq as usize;
            self.messages[i] = m;
        }
        self.unhandled.retain(|s| !c.handled.contains(s));
        self.unhandled.extend(c.unhandled);
        self.do_not_contact |= c.do_not_contact.is_some();
    }
}

fn outbound(kind: MessageKind, key: u64) -> Outbound {
    Outbound {
        kind,
        text: format!("out {key}"),
        key: IdempotencyKey(key),
    }
}

/// Runs `op` on `r`; `n` numbers keys, transport ids and times.
fn run(r: &mut DialogModel, op: &Op, n: u64) -> Result<(), Refused> {
    let at = Timestamp(1_000 + n as i64);
    let message = Incoming {
        transport_id: n as i64,
        text: "hi",
        at,
    };
    let waiting = r.waiting();
    let unhandled = r.unhandled.clone();
    let outs: Vec<Outbound>;
    let apply_;
    let to;
    let event = match op {
        Op::Incoming { handled } => Event::Incoming {
            message,
            handled: *handled,
        },
        Op::Handled {
            replies,
            ending,
            reviewed,
        } => {
            outs = (0..*replies as u64)
                .map(|k| outbound(MessageKind::Reply, 100 * n + k))
                .collect();
            apply_ = Apply {
                at,
                handled: r.unhandled.first().copied(),
                state: None,
                outbound: &outs,
                ending: ending.map(status),
                reviewed: *reviewed,
            };
            Event::Handled(&apply_)
        }
        Op::Outbound(kind) => {
            outs = vec![outbound(*kind, 100 * n)];
            Event::Outbound { out: &outs[0], at }
        }
        Op::EndingReached => Event::EndingReached,
        Op::Status(s) => {
            to = status(*s);
            Event::Status(&to)
        }
        Op::OptedOut => Event::OptedOut {
            waiting: &waiting,
            unhandled: &unhandled,
        },
        Op::Blocked => Event::Blocked {
            waiting: &waiting,
            reason: "banned",
        },
        Op::Sent => {
            if let Some(m) = waiting.into_iter().next() {
                let i = m.seq as usize;
                r.messages[i] = settle(m, Delivery::Sent, Some(n as i64));
            }
            return Ok(());
        }
    };
    let change = apply(r.dialog.clone(), event)?;
    r.take(change);
    Ok(())
}

fn fresh() -> Dialog {
    let new = NewDialog {
        campaign: "c".into(),
        account: "a".into(),
        contact: 7,
        at: Timestamp(1_000),
        variant: None,
    };
    open(1, &new, None).dialog
}

/// The rules a dialog's records keep, whatever happened to them.
fn check(before: &DialogModel, after: &DialogModel, op: &Op, result: &Result<(), Refused>) {
    let d = &after.dialog;
    assert_eq!(d.next_seq as usize, after.messages.len());
    for (i, m) in after.messages.iter().enumerate() {
        assert_eq!((m.dialog, m.seq), (d.id, i as u64));
    }
    let last = |dir| {
        after
            .messages
            .iter()
            .rev()
            .find(|m| m.direction == dir)
            .map(|m| m.at)
    };
    assert_eq!(d.last_inbound_at, last(Direction::In));
    assert_eq!(d.last_outbound_at, last(Direction::Out));
    let follow_ups = after
        .messages
        .iter()
        .filter(|m| m.kind == Some(MessageKind::FollowUp))
        .count();
    assert_eq!(d.follow_ups_sent as usize, follow_ups);
    let ids = after.messages.iter().filter_map(|m| match m.direction {
        Direction::In => m.transport_id,
        Direction::Out => None,
    });
    assert_eq!(d.max_incoming_id, ids.max());
    for s in &after.unhandled {
        assert_eq!(after.messages[*s as usize].direction, Direction::In);
    }
    let (was, is) = (&before.dialog.status, &d.status);
    assert!(was == is || was.can_become(is), "{was:?} became {is:?}");
    if result.is_err() {
        assert_eq!(before, after, "a refused event changes nothing");
    }
    // Nothing is sent in an ended dialog but a human's answer in a
    // handed-off one.
    for m in &after.messages[before.messages.len()..] {
        if m.direction == Direction::Out {
            let human = m.kind == Some(MessageKind::Human) && *was == DialogStatus::Handoff;
            assert!(was.is_live() || human, "{m:?} sent in a {was:?} dialog");
        }
    }
    match op {
        Op::Status(s) => assert_eq!(result.is_ok(), was.can_become(&status(*s))),
        Op::OptedOut | Op::Blocked if result.is_ok() => {
            assert!(after.waiting().is_empty(), "what waited is cancelled");
            assert_eq!(
                after.do_not_contact,
                matches!(op, Op::OptedOut) || before.do_not_contact
            );
        }
        Op::Handled { .. } if !was.is_live() => {
            assert_eq!(after.messages.len(), before.messages.len());
        }
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Every rule holds after every event of any sequence.
    #[test]
    fn random_events_keep_every_dialog_rule(ops in proptest::collection::vec(op(), 1..60)) {
        let mut r = DialogModel::new(fresh(), Vec::new());
        for (n, op) in ops.iter().enumerate() {
            let before = r.clone();
            let result = run(&mut r, op, n as u64 + 1);
            check(&before, &r, op, &result);
        }
    }

    /// Events chained into one change (`Change::then`, the answer
    /// pipeline's way) write the same records as the events one by one.
    #[test]
    fn a_chain_of_events_is_the_events_one_by_one(
        incoming in proptest::collection::vec(any::<bool>(), 1..6),
        replies in 0..3usize,
    ) {
        let mut one_by_one = DialogModel::new(fresh(), Vec::new());
        let mut chained = one_by_one.clone();
        let outs: Vec<Outbound> = (0..replies as u64).map(|k| outbound(MessageKind::Reply, k)).collect();
        let a = Apply { at: Timestamp(2_000), outbound: &outs, ..Apply::default() };
        let mut change: Option<Change> = None;
        for (n, handled) in incoming.iter().enumerate() {
            let message = Incoming { transport_id: n as i64, text: "hi", at: Timestamp(1_500) };
            let e = Event::Incoming { message, handled: *handled };
            one_by_one.take(apply(one_by_one.dialog.clone(), e).unwrap());
            change = Some(match change {
                None => apply(chained.dialog.clone(), e).unwrap(),
                Some(c) => c.then(e).unwrap(),
            });
        }
        one_by_one.take(apply(one_by_one.dialog.clone(), Event::Handled(&a)).unwrap());
        chained.take(change.unwrap().then(Event::Handled(&a)).unwrap());
        prop_assert_eq!(one_by_one, chained);
    }

    /// Answers folded into one change (`Change::and`, the journal's
    /// replay) write the same records as the answers one by one.
    #[test]
    fn folded_answers_are_the_answers_one_by_one(replies in proptest::collection::vec(0..3usize, 1..6)) {
        let mut one_by_one = DialogModel::new(fresh(), Vec::new());
        let mut folded = one_by_one.clone();
        let mut change: Option<Change> = None;
        for (n, k) in replies.iter().enumerate() {
            let outs: Vec<Outbound> = (0..*k as u64).map(|j| outbound(MessageKind::Reply, 10 * n as u64 + j)).collect();
            let a = Apply { at: Timestamp(2_000 + n as i64), outbound: &outs, ..Apply::default() };
            let message = Incoming { transport_id: n as i64, text: "hi", at: Timestamp(1_500) };
            one_by_one.take(answer(one_by_one.dialog.clone(), message, &a).unwrap());
            let from = change.as_ref().map_or_else(|| folded.dialog.clone(), |c| c.dialog.clone());
            let next = answer(from, message, &a).unwrap();
            change = Some(match change {
                None => next,
                Some(c) => c.and(next),
            });
        }
        folded.take(change.unwrap());
        prop_assert_eq!(one_by_one, folded);
    }
}
