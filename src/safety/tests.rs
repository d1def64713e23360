use super::*;
use crate::audience;
use crate::clock::TokioClock;
use crate::transition::NewDialog;
use std::path::Path;

const START: Timestamp = Timestamp(1_768_000_000_000);

fn config(safety: &str) -> Arc<Config> {
    let text = format!(
        "[safety]\n{safety}\n[[accounts]]\nname = \"a\"\n[[accounts]]\nname = \"b\"\n\
         [[campaigns]]\nname = \"c\"\nengine = \"echo\"\naudiences = [\"l\"]\naccounts = [\"a\"]\n"
    );
    Arc::new(Config::parse(Path::new("t.toml"), &text).unwrap())
}

fn gate(store: &Store, safety: &str) -> AccountSafety {
    AccountSafety::new(
        store.clone(),
        config(safety),
        Arc::new(TokioClock::new(START, 1.0)),
        Arc::new(SeededRng::new(3)),
        Alerts::log_only(),
    )
}

/// A failed send of message `key` in campaign "c".
fn failure<'a>(
    account: &'a str,
    dialog: Option<DialogId>,
    contact: Option<ContactId>,
    key: u64,
    error: &'a SendError,
) -> Failure<'a> {
    Failure {
        account,
        campaign: "c",
        dialog,
        contact,
        key: IdempotencyKey(key),
        attempt: 0,
        error,
    }
}

const TIGHT: &str = "max_per_hour = 2\nmax_per_day = 10\nmax_new_dialogs_per_day = 2\nmin_interval = \"10s\"\njitter = \"0s\"";

#[tokio::test(start_paused = true)]
async fn acquire_sleeps_until_exactly_the_next_slot() {
    let store = Store::temporary().unwrap();
    let g = gate(&store, TIGHT);
    g.acquire("a", MessageKind::Reply, None, IdempotencyKey(1))
        .await
        .unwrap();
    assert_eq!(g.now(), START);
    g.acquire("a", MessageKind::Reply, None, IdempotencyKey(2))
        .await
        .unwrap();
    assert_eq!(g.now(), Timestamp(START.0 + 10_000), "min_interval");
    g.acquire("a", MessageKind::Reply, None, IdempotencyKey(3))
        .await
        .unwrap();
    assert_eq!(g.now(), Timestamp(START.0 + 3_600_000), "the hour window");
}

#[tokio::test(start_paused = true)]
async fn two_callers_never_share_the_last_slot() {
    let store = Store::temporary().unwrap();
    let g = gate(&store, "max_per_hour = 1\nmax_per_day = 1\nmax_new_dialogs_per_day = 1\nmin_interval = \"0s\"\njitter = \"0s\"");
    let (x, y) = (g.clone(), g.clone());
    let a = tokio::spawn(async move {
        x.try_reserve("a", MessageKind::Reply, None, IdempotencyKey(1))
            .unwrap()
    });
    let b = tokio::spawn(async move {
        y.try_reserve("a", MessageKind::Reply, None, IdempotencyKey(2))
            .unwrap()
    });
    let got = [a.await.unwrap(), b.await.unwrap()];
    assert_eq!(
        got.iter().filter(|d| **d == Decision::Allow).count(),
        1,
        "{got:?}"
    );
    assert_eq!(store.account("a").unwrap().sends.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn flood_wait_pauses_the_account_across_a_restart() {
    let store = Store::temporary().unwrap();
    let g = gate(&store, TIGHT);
    g.acquire("a", MessageKind::Reply, None, IdempotencyKey(1))
        .await
        .unwrap();
    let err = SendError::FloodWait(Duration::from_secs(600));
    let r = g.report(&failure("a", None, None, 1, &err)).unwrap();
    let until = Timestamp(START.0 + 665_000);
    assert_eq!(r, Reaction::RetryAt(until));
    // The failed send's slot came back; the pause holds for a new gate too.
    let again = gate(&store, TIGHT);
    assert_eq!(store.account("a").unwrap().sends.len(), 0);
    assert_eq!(
        again.check("a", MessageKind::Reply, None).unwrap(),
        Decision::NotBefore(until)
    );
    again
        .acquire("a", MessageKind::Reply, None, IdempotencyKey(2))
        .await
        .unwrap();
    assert_eq!(again.now(), until);
    assert_eq!(store.account("a").unwrap().status, AccountStatus::Active);
}

#[tokio::test(start_paused = true)]
async fn peer_flood_stops_openings_but_not_replies() {
    let store = Store::temporary().unwrap();
    let g = gate(&store, TIGHT);
    let err = SendError::PeerFlood;
    g.report(&failure("a", None, None, 1, &err)).unwrap();
    assert!(matches!(
        g.check("a", MessageKind::Opening, None).unwrap(),
        Decision::NotBefore(_)
    ));
    assert_eq!(
        g.check("a", MessageKind::Reply, None).unwrap(),
        Decision::Allow
    );
    assert!(g.none_can_open(&["a".to_string()]).unwrap());
    assert!(!g
        .none_can_open(&["a".to_string(), "b".to_string()])
        .unwrap());
}

fn dialog_with(store: &Store, account: &str) -> (DialogId, ContactId) {
    let rows = audience::parse("l.csv", b"username\nalice_a\n").rows;
    store.import_audience("l", &rows, &mut || 5).unwrap();
    let contact = store.pick_uncontacted("l", 0).unwrap().unwrap();
    let nd = NewDialog {
        campaign: "c".into(),
        account: account.into(),
        contact,
        at: START,
        variant: None,
    };
    (
        store.open_dialog(&nd, None, &|_| Ok(())).unwrap().0.id,
        contact,
    )
}

#[tokio::test(start_paused = true)]
async fn privacy_restricted_marks_the_contact_unreachable() {
    let store = Store::temporary().unwrap();
    let g = gate(&store, TIGHT);
    let (dialog, contact) = dialog_with(&store, "a");
    let err = SendError::PrivacyRestricted;
    let r = g
        .report(&failure("a", Some(dialog), Some(contact), 1, &err))
        .unwrap();
    assert!(matches!(r, Reaction::Unreachable(_)));
    assert!(matches!(
        store.do_not_contact(contact).unwrap(),
        Some(DoNotContact::Unreachable(_))
    ));
    assert_eq!(store.account("a").unwrap().status, AccountStatus::Active);
}

#[tokio::test(start_paused = true)]
async fn a_ban_blocks_the_account_and_its_dialogs() {
    let store = Store::temporary().unwrap();
    let g = gate(&store, TIGHT);
    let (dialog, _) = dialog_with(&store, "a");
    let err = SendError::AccountBanned;
    let r = g
        .report(&failure("a", Some(dialog), None, 1, &err))
        .unwrap();
    assert_eq!(r, Reaction::AccountLost);
    assert_eq!(
        store.dialog(dialog).unwrap().unwrap().status,
        crate::model::DialogStatus::Blocked
    );
    let denied = g
        .acquire("a", MessageKind::Reply, None, IdempotencyKey(2))
        .await;
    assert!(matches!(denied, Err(GateError::Denied(Denied::Blocked(_)))));

    let err = SendError::Unauthorized;
    g.report(&failure("b", None, None, 3, &err)).unwrap();
    assert_eq!(
        store.account("b").unwrap().status,
        AccountStatus::Unauthorized
    );
}

#[tokio::test(start_paused = true)]
async fn unknown_delivery_keeps_its_slot_and_transient_errors_return_it() {
    let store = Store::temporary().unwrap();
    let g = gate(&store, TIGHT);
    g.acquire("a", MessageKind::Reply, None, IdempotencyKey(1))
        .await
        .unwrap();
    let timeout = SendError::TimedOutAfterSend;
    let r = g
        .report(&Failure {
            account: "a",
            campaign: "c",
            dialog: None,
            contact: None,
            key: IdempotencyKey(1),
            attempt: 0,
            error: &timeout,
        })
        .unwrap();
    assert_eq!(r, Reaction::Reconcile);
    assert_eq!(store.account("a").unwrap().sends.len(), 1);
    let transient = SendError::Transient("connection reset".into());
    let r = g
        .report(&Failure {
            account: "a",
            campaign: "c",
            dialog: None,
            contact: None,
            key: IdempotencyKey(1),
            attempt: 0,
            error: &transient,
        })
        .unwrap();
    assert!(matches!(r, Reaction::RetryAt(_)));
    assert_eq!(store.account("a").unwrap().sends.len(), 0);
}

#[tokio::test(start_paused = true)]
async fn the_opening_reservation_is_part_of_the_claim() {
    let store = Store::temporary().unwrap();
    let g = gate(&store, TIGHT);
    let rows = audience::parse("l.csv", b"username\nalice_a\nbobby_b\ncarla_c\n").rows;
    store.import_audience("l", &rows, &mut || 7).unwrap();
    let mut opened = 0;
    for key in 1..=3u64 {
        let contact = store.pick_uncontacted("l", key).unwrap().unwrap();
        let nd = NewDialog {
            campaign: "c".into(),
            account: "a".into(),
            contact,
            at: g.now(),
            variant: None,
        };
        if store
            .open_dialog(
                &nd,
                None,
                &g.opening_reserver("a", None, IdempotencyKey(key)),
            )
            .is_ok()
        {
            opened += 1;
        }
        tokio::time::advance(Duration::from_secs(60)).await;
    }
    // max_new_dialogs_per_day = 2: the third claim is refused and leaves the contact uncontacted.
    assert_eq!(opened, 2);
    assert_eq!(store.uncontacted_count("l"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_message_waiting_for_a_slot_keeps_the_one_it_holds() {
    let store = Store::temporary().unwrap();
    let g = gate(&store, TIGHT);
    // Two openings claimed their slots (the hour's two), 10 s apart.
    g.acquire("a", MessageKind::Opening, None, IdempotencyKey(1))
        .await
        .unwrap();
    g.acquire("a", MessageKind::Opening, None, IdempotencyKey(2))
        .await
        .unwrap();
    // The first comes to be sent before its interval passed: it waits, and
    // its claim still counts, so no third send fits into the hour.
    let d = g
        .reserve_now("a", MessageKind::Opening, None, IdempotencyKey(1))
        .unwrap();
    assert!(matches!(d, Gate::NotBefore(_)), "{d:?}");
    assert_eq!(store.account("a").unwrap().sends.len(), 2);
    let third = g
        .try_reserve("a", MessageKind::Reply, None, IdempotencyKey(3))
        .unwrap();
    assert!(
        matches!(third, Decision::NotBefore(t) if t.0 >= START.0 + 3_600_000),
        "{third:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_late_send_keeps_min_interval_to_the_next_one() {
    let store = Store::temporary().unwrap();
    let g = gate(&store, "min_interval = \"10s\"\njitter = \"5s\"");
    g.acquire("a", MessageKind::Reply, None, IdempotencyKey(1))
        .await
        .unwrap();
    // A claim takes a slot while the first send is under way...
    tokio::time::advance(std::time::Duration::from_secs(15)).await;
    g.acquire("a", MessageKind::Opening, None, IdempotencyKey(2))
        .await
        .unwrap();
    // ...which the transport reports as gone out a minute after it began.
    let late = Timestamp(START.0 + 60_000);
    let mut record = store.account("a").unwrap();
    decide::confirm(&mut record, IdempotencyKey(1), late, &g.limits("a"));
    // Confirmed past the claim's mark, the first send is still not the
    // latest: its pause is min_interval, not the jitter the claim drew.
    assert_eq!(record.next_send_at, Timestamp(late.0 + 10_000));
    assert_eq!(record.sends.last().map(|m| m.key), Some(IdempotencyKey(1)));
}

#[test]
fn confirming_a_batch_does_not_add_up_the_delays() {
    let limits =
        Limits::from(&config("min_interval = \"0s\"\njitter = \"0s\"").account_safety("a"));
    let mut record = crate::model::AccountRecord::new("a");
    let req = SendRequest {
        kind: MessageKind::Reply,
        now: START,
        window: None,
    };
    for key in 1..=3 {
        let d = decide::reserve(
            &mut record,
            &limits,
            req,
            IdempotencyKey(key),
            Duration::ZERO,
        );
        assert_eq!(d, Decision::Allow);
    }
    for key in 1..=3 {
        let at = Timestamp(START.0 + 10 * key as i64);
        decide::confirm(&mut record, IdempotencyKey(key), at, &limits);
    }
    assert_eq!(record.next_send_at, Timestamp(START.0 + 30));
}

/// A transport that notes each message it is given, as (account, key).
#[derive(Default)]
struct Noting(std::sync::Mutex<Vec<(String, IdempotencyKey)>>);

impl Transport for Noting {
    fn send(
        &self,
        msg: OutgoingMessage,
    ) -> crate::clock::BoxFuture<'_, Result<Delivered, SendError>> {
        self.0.lock().unwrap().push((msg.account.clone(), msg.key));
        Box::pin(async move {
            Ok(Delivered {
                transport_id: msg.key.0 as i64,
                at: START,
            })
        })
    }

    fn was_delivered(
        &self,
        _: &str,
        _: &Identity,
        _: IdempotencyKey,
    ) -> crate::clock::BoxFuture<'_, Result<Option<Delivered>, SendError>> {
        Box::pin(async { Ok(None) })
    }

    fn subscribe(
        &self,
        _: tokio::sync::mpsc::Sender<crate::transport::Inbound>,
    ) -> crate::clock::BoxFuture<'_, Result<(), SendError>> {
        Box::pin(async { Ok(()) })
    }
}

fn message() -> (Identity, String, MessageKind) {
    (
        Identity::Username("ann_a".into()),
        "hi".into(),
        MessageKind::Reply,
    )
}

#[tokio::test(start_paused = true)]
async fn a_send_goes_on_its_slot_with_the_slots_account_and_key() {
    let store = Store::temporary().unwrap();
    let g = gate(&store, TIGHT);
    let transport = Noting::default();
    let Gate::Open(slot) = g
        .reserve_now("a", MessageKind::Reply, None, IdempotencyKey(7))
        .unwrap()
    else {
        panic!("a fresh account has room")
    };
    assert_eq!((slot.account(), slot.key()), ("a", IdempotencyKey(7)));
    let sent = g
        .send_in_window(&transport, slot, None, message())
        .await
        .unwrap();
    assert!(matches!(sent, Sent::Delivered(_)), "{sent:?}");
    assert_eq!(
        *transport.0.lock().unwrap(),
        vec![("a".to_string(), IdempotencyKey(7))]
    );
}

/// The send window closes while a send waits (for a flush, a dialog's
/// gate): nothing is sent and the slot goes back.
#[tokio::test(start_paused = true)]
async fn a_window_that_closed_while_a_send_waited_gives_its_slot_back() {
    let store = Store::temporary().unwrap();
    let g = gate(&store, TIGHT);
    let transport = Noting::default();
    // START is 23:06:40 UTC; the window closes at 23:10.
    let text = "[[accounts]]\nname = \"a\"\n[[campaigns]]\nname = \"c\"\nengine = \"echo\"\naudiences = [\"l\"]\naccounts = [\"a\"]\nsend_window = { start = \"23:00\", end = \"23:10\", timezone = \"UTC\" }\n";
    let parsed = Config::parse(Path::new("t.toml"), text).unwrap();
    let window = parsed.file.campaigns[0].send_window.clone().unwrap();
    let Gate::Open(slot) = g
        .reserve_now("a", MessageKind::Opening, Some(&window), IdempotencyKey(1))
        .unwrap()
    else {
        panic!("the window is open and the account has room")
    };
    assert_eq!(store.account("a").unwrap().sends.len(), 1);
    tokio::time::advance(Duration::from_secs(5 * 60)).await;
    let sent = g
        .send_in_window(&transport, slot, Some(&window), message())
        .await
        .unwrap();
    assert!(matches!(sent, Sent::WindowClosed), "{sent:?}");
    assert!(transport.0.lock().unwrap().is_empty(), "nothing was sent");
    assert_eq!(
        store.account("a").unwrap().sends.len(),
        0,
        "the slot went back"
    );
}
