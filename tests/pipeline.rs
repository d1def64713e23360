//! The answer pipeline end to end, as the throughput benchmark drives it
//! but checked: the real host on an in-memory transport, echo engine,
//! limits lifted and no reply delay, every message offered at once. Every
//! message is answered exactly once, and the store (deferred records
//! written out at shutdown, or replayed from the journal when the store is
//! opened again) holds each dialog's messages in order. A reply whose
//! delivery was lost is found by the reviver and answered, not talked over.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use colloquy::clock::{Clock, SeededRng, SystemClock, TokioClock};
use colloquy::config::Config;
use colloquy::host;
use colloquy::model::{
    Delivery, DialogId, DialogStatus, Direction, IdempotencyKey, Identity, MessageKind,
};
use colloquy::store::Store;
use colloquy::transition::{NewDialog, Outbound};
use colloquy::transport::{Inbound, IncomingMessage};
use tokio_util::sync::CancellationToken;

const DIALOGS: usize = 200;
const MESSAGES: usize = 4_000;

mod memory;
use memory::MemoryTransport;

/// An engine that tells in its reply what history it was given.
const HISTORY_ENGINE: &str = r#"
local M = {}
function M.get_response(ctx, message)
  local h = ctx.history
  local last = h[#h]
  return "re: " .. message.text .. " after " .. #h .. ", last " .. last.direction .. " " .. last.text
end
return M
"#;

fn project(dir: &Path, engine: &str, reply_delay: &str) -> Arc<Config> {
    project_quiet_after(dir, engine, reply_delay, "30days")
}

fn project_quiet_after(
    dir: &Path,
    engine: &str,
    reply_delay: &str,
    stuck_after: &str,
) -> Arc<Config> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(dir.join("engines")).unwrap();
    std::fs::create_dir_all(dir.join("scripts")).unwrap();
    std::fs::copy(root.join("engines/echo.lua"), dir.join("engines/echo.lua")).unwrap();
    std::fs::write(dir.join("engines/history.lua"), HISTORY_ENGINE).unwrap();
    let text = format!(
        "[safety]\nmax_per_hour = 1000000\nmax_per_day = 1000000\n\
         max_new_dialogs_per_day = 1000000\nmin_interval = \"0s\"\njitter = \"0s\"\n\
         reply_delay = \"{reply_delay}\"\nstuck_after = \"{stuck_after}\"\n\
         [[accounts]]\nname = \"a0\"\n[[accounts]]\nname = \"a1\"\n\
         [[audiences]]\nname = \"l\"\nfile = \"l.csv\"\n\
         [[campaigns]]\nname = \"c\"\nstatus = \"paused\"\nengine = \"{engine}\"\n\
         audiences = [\"l\"]\naccounts = [\"a0\"]\n"
    );
    std::fs::write(dir.join("l.csv"), "user_id\n1\n").unwrap();
    std::fs::write(dir.join("config.toml"), text).unwrap();
    Arc::new(Config::load(&dir.join("config.toml")).unwrap())
}

/// A store with `dialogs` dialogs, none with a message yet; dialog `i`
/// (of contact `i + 1`) is on account [`account`]`(i)`.
fn dialogs(config: &Config, dialogs: usize) -> (Store, Vec<DialogId>) {
    let store = Store::open(&config.data_dir()).unwrap();
    let rows: Vec<_> = (1..=dialogs as i64)
        .map(|i| colloquy::audience::ContactRow {
            line: 0,
            identity: Identity::UserId(i),
            username: None,
            phone: None,
            user_id: Some(i),
            first_name: None,
            last_name: None,
            fields: Default::default(),
        })
        .collect();
    let rng = SeededRng::new(1);
    store
        .import_audience("l", &rows, &mut || rng.next_u64())
        .unwrap();
    let ids = rows
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let contact = store.contact_by_identity(&row.identity).unwrap().unwrap();
            let new = NewDialog {
                campaign: "c".into(),
                account: account(i),
                contact: contact.id,
                at: SystemClock.now(),
                variant: None,
            };
            store.open_dialog(&new, None, &|_| Ok(())).unwrap().0.id
        })
        .collect();
    (store, ids)
}

/// The host, started on the in-memory transport, and its inbox.
async fn start(
    config: &Arc<Config>,
    store: &Store,
    transport: &Arc<MemoryTransport>,
) -> (Arc<host::Host>, tokio::sync::mpsc::Sender<Inbound>) {
    start_on(config, store, transport, Arc::new(SystemClock)).await
}

async fn start_on(
    config: &Arc<Config>,
    store: &Store,
    transport: &Arc<MemoryTransport>,
    clock: Arc<dyn Clock>,
) -> (Arc<host::Host>, tokio::sync::mpsc::Sender<Inbound>) {
    let h = host::build(
        config.clone(),
        store.clone(),
        transport.clone(),
        clock,
        CancellationToken::new(),
    );
    host::start(&h).await.unwrap();
    let sink = transport.inbox();
    (h, sink)
}

/// An incoming message `text` to dialog `d`.
fn incoming(d: usize, transport_id: usize, text: String) -> Inbound {
    incoming_acked(d, transport_id, text).0
}

/// [`incoming`], and what hears that the host stored it.
fn incoming_acked(
    d: usize,
    transport_id: usize,
    text: String,
) -> (Inbound, tokio::sync::oneshot::Receiver<()>) {
    let (stored, acked) = tokio::sync::oneshot::channel();
    let message = IncomingMessage {
        account: account(d),
        contact: Identity::UserId(d as i64 + 1),
        transport_id: transport_id as i64,
        text,
        at: SystemClock.now(),
    };
    (Inbound { message, stored }, acked)
}

fn account(d: usize) -> String {
    format!("a{}", d % 2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_of_a_burst_is_answered_once_and_stored_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let config = project(dir.path(), "echo", "0s");
    let (store, ids) = dialogs(&config, DIALOGS);
    let dialog_of: HashMap<usize, DialogId> = ids.into_iter().enumerate().collect();
    // Every send: the text by idempotency key.
    let sent: Arc<Mutex<HashMap<IdempotencyKey, String>>> = Arc::default();
    let transport = Arc::new(MemoryTransport::new(MESSAGES, {
        let sent = sent.clone();
        move |msg| {
            let again = sent.lock().unwrap().insert(msg.key, msg.text.clone());
            assert!(again.is_none(), "key {:?} sent twice", msg.key);
        }
    }));
    let (h, sink) = start(&config, &store, &transport).await;
    // Which dialog each message goes to, and in what order.
    let mut expected: HashMap<usize, Vec<String>> = HashMap::new();
    let pick = SeededRng::new(7);
    for i in 0..MESSAGES {
        let d = (pick.next_u64() % DIALOGS as u64) as usize;
        expected.entry(d).or_default().push(format!("m{i}"));
        sink.send(incoming(d, i + 1, format!("m{i}")))
            .await
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(120), transport.done.notified())
        .await
        .expect("every message answered");
    host::stop(&h).await;
    assert_eq!(store.deferred(), 0, "written out at shutdown");
    let check = |store: &Store| {
        let mut replies = 0;
        for (d, texts) in &expected {
            let messages = store.messages(dialog_of[d]).unwrap();
            let got: Vec<(Direction, &str)> = messages
                .iter()
                .map(|m| (m.direction, m.text.as_str()))
                .collect();
            let want: Vec<(Direction, String)> = texts
                .iter()
                .flat_map(|t| {
                    [
                        (Direction::In, t.clone()),
                        (Direction::Out, format!("re: {t}")),
                    ]
                })
                .collect();
            let want: Vec<(Direction, &str)> = want.iter().map(|(d, t)| (*d, t.as_str())).collect();
            assert_eq!(got, want, "dialog {}", dialog_of[d]);
            for m in messages.iter().filter(|m| m.direction == Direction::Out) {
                let sent = sent.lock().unwrap();
                assert_eq!(sent.get(&m.key.unwrap()), Some(&m.text));
                replies += 1;
            }
        }
        assert_eq!(replies, MESSAGES);
    };
    check(&store);
    assert_eq!(transport.sends.load(Ordering::SeqCst), MESSAGES);
    // Opened again, the store holds the same.
    drop(h);
    drop(store);
    let store = Store::open(&config.data_dir()).unwrap();
    check(&store);
}

/// The engine's `ctx.history` is the dialog so far with the message being
/// answered last, whether the pipeline answers it (no reply delay) or the
/// dialog's conductor does (a reply delay).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_sees_the_dialog_and_the_message_either_way() {
    const DIALOGS: usize = 20;
    const ROUNDS: usize = 6;
    for reply_delay in ["0s", "1ms"] {
        let dir = tempfile::tempdir().unwrap();
        let config = project(dir.path(), "history", reply_delay);
        let (store, ids) = dialogs(&config, DIALOGS);
        let (replied, mut replies) = tokio::sync::mpsc::unbounded_channel();
        let transport = Arc::new(MemoryTransport::new(DIALOGS * ROUNDS, move |msg| {
            let _ = replied.send(msg.text.clone());
        }));
        let (h, sink) = start(&config, &store, &transport).await;
        // A message to every dialog, then their replies, round by round:
        // the k-th message of a dialog comes after k messages and k
        // replies.
        for round in 0..ROUNDS {
            let mut want = Vec::new();
            for d in 0..DIALOGS {
                let text = format!("m{round}.{d}");
                let id = round * DIALOGS + d + 1;
                want.push(format!(
                    "re: {text} after {}, last in {text}",
                    2 * round + 1
                ));
                sink.send(incoming(d, id, text)).await.unwrap();
            }
            let mut got = Vec::new();
            while got.len() < DIALOGS {
                let reply = tokio::time::timeout(Duration::from_secs(30), replies.recv())
                    .await
                    .expect("every message answered")
                    .unwrap();
                got.push(reply);
            }
            got.sort();
            want.sort();
            assert_eq!(got, want, "round {round}, reply delay {reply_delay}");
        }
        host::stop(&h).await;
        for id in ids {
            assert_eq!(store.messages(id).unwrap().len(), 2 * ROUNDS);
        }
    }
}

/// Opt-outs amid a burst to more dialogs than the host has gates (so
/// dialogs share them): every message is stored and acknowledged, each
/// dialog that opted out ends so, and nothing is sent in it afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opt_outs_amid_a_burst_end_their_dialogs_and_the_rest_goes_on() {
    const DIALOGS: usize = 3_000;
    const MESSAGES: usize = 9_000;
    let dir = tempfile::tempdir().unwrap();
    let config = project(dir.path(), "echo", "0s");
    let (store, ids) = dialogs(&config, DIALOGS);
    let transport = Arc::new(MemoryTransport::new(usize::MAX, |_| {}));
    let (h, sink) = start(&config, &store, &transport).await;
    let pick = SeededRng::new(11);
    let mut acks = Vec::with_capacity(MESSAGES);
    let mut opted = std::collections::HashSet::new();
    for i in 0..MESSAGES {
        let d = (pick.next_u64() % DIALOGS as u64) as usize;
        let text = if i % 50 == 7 {
            opted.insert(d);
            "please stop writing".to_string()
        } else {
            format!("m{i}")
        };
        let (message, acked) = incoming_acked(d, i + 1, text);
        acks.push(acked);
        sink.send(message).await.unwrap();
    }
    tokio::time::timeout(
        Duration::from_secs(120),
        futures_util::future::join_all(acks),
    )
    .await
    .expect("every message stored and acknowledged");
    host::stop(&h).await;
    for d in opted {
        let id = ids[d];
        let dialog = store.dialog(id).unwrap().unwrap();
        assert_eq!(dialog.status, DialogStatus::OptedOut, "dialog {id}");
        let messages = store.messages(id).unwrap();
        let stop = messages
            .iter()
            .position(|m| m.text == "please stop writing")
            .expect("the opt-out is stored");
        assert!(
            messages[stop..]
                .iter()
                .all(|m| m.direction == Direction::In || m.delivery != Some(Delivery::Sent)),
            "dialog {id} sent after the opt-out: {messages:?}"
        );
    }
}

/// A reply that reached the chat but never the host (a lost update) is
/// found by the reviver when the dialog looks quiet: it is stored and
/// answered once, and the follow-up comes only after the next quiet spell.
/// What the contact wrote before the opening is not taken for a reply.
#[tokio::test(start_paused = true)]
async fn a_reply_whose_delivery_was_lost_is_answered_before_any_follow_up() {
    let dir = tempfile::tempdir().unwrap();
    let config = project_quiet_after(dir.path(), "echo", "0s", "1h");
    let clock = Arc::new(TokioClock::new(SystemClock.now(), 1.0));
    let store = Store::open(&config.data_dir()).unwrap();
    let rows = [colloquy::audience::ContactRow {
        line: 0,
        identity: Identity::UserId(1),
        username: None,
        phone: None,
        user_id: Some(1),
        first_name: Some("Ann".into()),
        last_name: None,
        fields: Default::default(),
    }];
    store.import_audience("l", &rows, &mut || 1).unwrap();
    let contact = store
        .contact_by_identity(&Identity::UserId(1))
        .unwrap()
        .unwrap();
    let opening = Outbound {
        key: IdempotencyKey(1),
        text: "hello Ann".into(),
        kind: MessageKind::Opening,
    };
    let new = NewDialog {
        campaign: "c".into(),
        account: account(0),
        contact: contact.id,
        at: clock.now(),
        variant: None,
    };
    let (dialog, _) = store
        .open_dialog(&new, Some(&opening), &|_| Ok(()))
        .unwrap();
    let sent: Arc<Mutex<Vec<(MessageKind, String)>>> = Arc::default();
    let transport = Arc::new(MemoryTransport::new(3, {
        let sent = sent.clone();
        move |msg| sent.lock().unwrap().push((msg.kind, msg.text.clone()))
    }));
    let wrote = |transport_id, text: &str| IncomingMessage {
        at: clock.now(),
        ..incoming(0, transport_id, text.into()).message
    };
    // Before the opening (id 1 on the wire) and after it.
    transport
        .lost
        .lock()
        .unwrap()
        .extend([wrote(0, "hi, old chat"), wrote(7, "Tell me more")]);
    // Flushes and engine calls hold the paused clock, as in the real run.
    store.hold_paused_clock(true);
    let (h, _sink) = start_on(&config, &store, &transport, clock.clone()).await;
    h.engines.hold_paused_clock(true);
    let done = tokio::time::timeout(Duration::from_secs(3 * 3600), transport.done.notified()).await;
    assert!(
        done.is_ok(),
        "the opening, the lost reply answered, then a follow-up; sent {:?}",
        sent.lock().unwrap()
    );
    host::stop(&h).await;
    assert_eq!(
        *sent.lock().unwrap(),
        [
            (MessageKind::Opening, "hello Ann".to_string()),
            (MessageKind::Reply, "re: Tell me more".to_string()),
            (MessageKind::FollowUp, "still there?".to_string()),
        ]
    );
    let incoming: Vec<String> = store
        .messages(dialog.id)
        .unwrap()
        .into_iter()
        .filter(|m| m.direction == Direction::In)
        .map(|m| m.text)
        .collect();
    assert_eq!(incoming, ["Tell me more"], "stored once");
}
