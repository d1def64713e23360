//! The answer pipeline end to end, as the throughput benchmark drives it
//! but checked: the real host on an in-memory transport, echo engine,
//! limits lifted and no reply delay, every message offered at once. Every
//! message is answered exactly once, and the store (deferred records
//! written out at shutdown, or replayed from the journal when the store is
//! opened again) holds each dialog's messages in order.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use colloquy::clock::{Clock, SeededRng, SystemClock};
use colloquy::config::Config;
use colloquy::host;
use colloquy::model::{Direction, IdempotencyKey, Identity};
use colloquy::store::{NewDialog, Store};
use colloquy::transport::{Inbound, IncomingMessage};
use tokio_util::sync::CancellationToken;

const DIALOGS: usize = 200;
const MESSAGES: usize = 4_000;

mod memory;
use memory::MemoryTransport;

fn project(dir: &Path) -> Arc<Config> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::create_dir_all(dir.join("engines")).unwrap();
    std::fs::create_dir_all(dir.join("scripts")).unwrap();
    std::fs::copy(root.join("engines/echo.lua"), dir.join("engines/echo.lua")).unwrap();
    let text = "[safety]\nmax_per_hour = 1000000\nmax_per_day = 1000000\n\
                max_new_dialogs_per_day = 1000000\nmin_interval = \"0s\"\njitter = \"0s\"\n\
                reply_delay = \"0s\"\nstuck_after = \"30days\"\n\
                [[accounts]]\nname = \"a0\"\n[[accounts]]\nname = \"a1\"\n\
                [[audiences]]\nname = \"l\"\nfile = \"l.csv\"\n\
                [[campaigns]]\nname = \"c\"\nstatus = \"paused\"\nengine = \"echo\"\n\
                audiences = [\"l\"]\naccounts = [\"a0\"]\n";
    std::fs::write(dir.join("l.csv"), "user_id\n1\n").unwrap();
    std::fs::write(dir.join("config.toml"), text).unwrap();
    Arc::new(Config::load(&dir.join("config.toml")).unwrap())
}

fn account(d: usize) -> String {
    format!("a{}", d % 2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_of_a_burst_is_answered_once_and_stored_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let config = project(dir.path());
    let store = Store::open(&config.data_dir()).unwrap();
    let rows: Vec<_> = (1..=DIALOGS as i64)
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
    let mut dialog_of = HashMap::new();
    for (i, row) in rows.iter().enumerate() {
        let contact = store.contact_by_identity(&row.identity).unwrap().unwrap();
        let new = NewDialog {
            campaign: "c".into(),
            account: account(i),
            contact: contact.id,
            at: SystemClock.now(),
        };
        let (d, _) = store.open_dialog(&new, None, &|_| Ok(())).unwrap();
        dialog_of.insert(i, d.id);
    }
    // Every send: the text by idempotency key.
    let sent: Arc<Mutex<HashMap<IdempotencyKey, String>>> = Arc::default();
    let transport = Arc::new(MemoryTransport::new(MESSAGES, {
        let sent = sent.clone();
        move |msg| {
            let again = sent.lock().unwrap().insert(msg.key, msg.text.clone());
            assert!(again.is_none(), "key {:?} sent twice", msg.key);
        }
    }));
    let h = host::build(
        config.clone(),
        store.clone(),
        transport.clone(),
        Arc::new(SystemClock),
        CancellationToken::new(),
    );
    host::start(&h).await.unwrap();
    let sink = transport.inbox();
    // Which dialog each message goes to, and in what order.
    let mut expected: HashMap<usize, Vec<String>> = HashMap::new();
    let pick = SeededRng::new(7);
    for i in 0..MESSAGES {
        let d = (pick.next_u64() % DIALOGS as u64) as usize;
        expected.entry(d).or_default().push(format!("m{i}"));
        let (stored, _) = tokio::sync::oneshot::channel();
        let message = IncomingMessage {
            account: account(d),
            contact: Identity::UserId(d as i64 + 1),
            transport_id: i as i64 + 1,
            text: format!("m{i}"),
            at: SystemClock.now(),
        };
        sink.send(Inbound { message, stored }).await.unwrap();
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
