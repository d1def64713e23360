//! The transport against a fake of grammers' shape: the same calls, the
//! same error values Telegram answers with.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::api::{ApiResult, ChatMessage, Peer};
use super::errors::rpc;
use super::*;
use crate::clock::SystemClock;

#[derive(Default)]
struct FakeApi {
    usernames: HashMap<String, Peer>,
    paid: HashSet<i64>,
    resolves: AtomicUsize,
    sent: Mutex<Vec<(i64, String, i64)>>,
    /// Messages users wrote to the account: (user id, message id, text).
    received: Mutex<Vec<(i64, i32, String)>>,
    /// The next send reaches Telegram but its answer is lost.
    lose_answer: AtomicBool,
    panic_on_send: AtomicBool,
    read: Mutex<Vec<i32>>,
}

impl Api for FakeApi {
    fn resolve_username(&self, username: &str) -> BoxFuture<'_, ApiResult<Option<Peer>>> {
        self.resolves.fetch_add(1, Ordering::SeqCst);
        let found = self.usernames.get(username).copied();
        Box::pin(async move {
            match found {
                Some(p) => Ok(Some(p)),
                None => Err(rpc(400, "USERNAME_NOT_OCCUPIED")),
            }
        })
    }
    fn resolve_phone(&self, _: &str) -> BoxFuture<'_, ApiResult<Option<Peer>>> {
        Box::pin(async { Ok(None) })
    }
    fn dialog_user(&self, _: i64) -> BoxFuture<'_, ApiResult<Option<Peer>>> {
        Box::pin(async { Ok(None) })
    }
    fn requirement(&self, peer: Peer) -> BoxFuture<'_, ApiResult<Option<String>>> {
        let paid = self.paid.contains(&peer.user_id);
        Box::pin(async move { Ok(paid.then(|| "the contact charges 10 stars per message".into())) })
    }
    fn send(&self, peer: Peer, text: &str, random_id: i64) -> BoxFuture<'_, ApiResult<i32>> {
        if self.panic_on_send.load(Ordering::SeqCst) {
            panic!("unexpected answer shape");
        }
        let mut sent = self.sent.lock().unwrap();
        let result = if sent.iter().any(|(r, _, _)| *r == random_id) {
            Err(rpc(500, "RANDOM_ID_DUPLICATE"))
        } else {
            sent.push((random_id, text.to_string(), peer.user_id));
            if self.lose_answer.swap(false, Ordering::SeqCst) {
                Err(io_error())
            } else {
                Ok(sent.len() as i32)
            }
        };
        Box::pin(async move { result })
    }
    fn typing(&self, _: Peer) -> BoxFuture<'_, ApiResult<()>> {
        Box::pin(async { Ok(()) })
    }
    fn read(&self, _: Peer, max_id: i32) -> BoxFuture<'_, ApiResult<()>> {
        self.read.lock().unwrap().push(max_id);
        Box::pin(async { Ok(()) })
    }
    fn history(&self, peer: Peer, _: i32) -> BoxFuture<'_, ApiResult<Vec<ChatMessage>>> {
        let now = SystemClock.now().0 / 1000;
        let sent = self.sent.lock().unwrap();
        let sent = sent
            .iter()
            .enumerate()
            .filter(|(_, (_, _, u))| *u == peer.user_id)
            .map(|(i, (_, text, _))| (i as i32 + 1, text, true));
        let received = self.received.lock().unwrap();
        let received = received
            .iter()
            .filter(|(u, _, _)| *u == peer.user_id)
            .map(|(_, id, text)| (*id, text, false));
        let mut list: Vec<ChatMessage> = sent
            .chain(received)
            .map(|(id, text, out)| ChatMessage {
                id,
                text: text.clone(),
                date: now,
                out,
            })
            .collect();
        list.sort_by_key(|m| std::cmp::Reverse(m.id));
        Box::pin(async move { Ok(list) })
    }
}

fn io_error() -> grammers_client::InvocationError {
    grammers_client::InvocationError::Io(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "reset",
    ))
}

struct FakeConnector {
    api: Arc<FakeApi>,
    sessions: HashSet<String>,
    /// Connection attempts that fail before one succeeds.
    failures: AtomicUsize,
    attempts: AtomicUsize,
    feeds: Mutex<HashMap<String, mpsc::Sender<Incoming>>>,
}

impl Connector for FakeConnector {
    fn connect(&self, account: &str) -> BoxFuture<'_, Result<Connection, SendError>> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        let account = account.to_string();
        Box::pin(async move {
            if self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(SendError::Transient("network: connection refused".into()));
            }
            let (tx, rx) = mpsc::channel(16);
            self.feeds.lock().unwrap().insert(account, tx);
            Ok(Connection {
                api: self.api.clone(),
                incoming: rx,
            })
        })
    }
    fn has_session(&self, account: &str) -> bool {
        self.sessions.contains(account)
    }
}

fn peer(id: i64) -> Peer {
    Peer {
        user_id: id,
        access_hash: id * 1000,
    }
}

struct World {
    transport: TelegramTransport,
    connector: Arc<FakeConnector>,
    inbound: mpsc::Receiver<Inbound>,
    _store: Store,
}

async fn world(failures: usize) -> World {
    let mut api = FakeApi::default();
    api.usernames.insert("ann".into(), peer(1));
    api.usernames.insert("paula".into(), peer(2));
    api.paid.insert(2);
    let connector = Arc::new(FakeConnector {
        api: Arc::new(api),
        sessions: ["alice".to_string()].into(),
        failures: AtomicUsize::new(failures),
        attempts: AtomicUsize::new(0),
        feeds: Mutex::new(HashMap::new()),
    });
    let store = Store::temporary().unwrap();
    let transport = TelegramTransport::new(
        vec!["alice".into(), "bob".into()],
        &store,
        connector.clone(),
        Manners {
            typing: true,
            typing_chars_per_second: 1000.0,
            read_marks: true,
        },
        Arc::new(SystemClock),
        CancellationToken::new(),
    )
    .unwrap();
    let (tx, inbound) = mpsc::channel(16);
    transport.subscribe(tx).await.unwrap();
    World {
        transport,
        connector,
        inbound,
        _store: store,
    }
}

async fn ready(w: &World, account: &str) {
    for _ in 0..1000 {
        if w.transport
            .link_states()
            .iter()
            .any(|(a, s)| a == account && *s != "connecting")
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("account {account} never settled");
}

fn msg(kind: MessageKind, contact: &str, key: u64) -> OutgoingMessage {
    crate::safety::outgoing_for_tests(
        "alice",
        IdempotencyKey(key),
        (
            Identity::Username(contact.into()),
            format!("hello {key}"),
            kind,
        ),
    )
}

#[tokio::test]
async fn sends_resolve_once_and_use_our_key_as_random_id() {
    let w = world(0).await;
    ready(&w, "alice").await;
    let d = w
        .transport
        .send(msg(MessageKind::Opening, "ann", 7))
        .await
        .unwrap();
    assert_eq!(d.transport_id, 1);
    w.transport
        .send(msg(MessageKind::Reply, "ann", 8))
        .await
        .unwrap();
    assert_eq!(w.connector.api.resolves.load(Ordering::SeqCst), 1);
    let sent = w.connector.api.sent.lock().unwrap().clone();
    assert_eq!(sent[0].0, 7);
    assert_eq!(sent[1].0, 8);
    // A retry with the same key is refused by Telegram and reconciles.
    let again = w.transport.send(msg(MessageKind::Reply, "ann", 8)).await;
    assert_eq!(again.unwrap_err(), SendError::Duplicate);
    let d = w
        .transport
        .was_delivered(
            "alice",
            &Identity::Username("ann".into()),
            IdempotencyKey(8),
        )
        .await
        .unwrap();
    assert_eq!(d.map(|d| d.transport_id), Some(2));
}

#[tokio::test]
async fn unreachable_contacts_are_not_messaged() {
    let w = world(0).await;
    ready(&w, "alice").await;
    let e = w
        .transport
        .send(msg(MessageKind::Opening, "paula", 1))
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "the contact charges 10 stars per message");
    let e = w
        .transport
        .send(msg(MessageKind::Opening, "nobody", 2))
        .await
        .unwrap_err();
    assert_eq!(e, SendError::PeerInvalid);
    assert!(w.connector.api.sent.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_lost_answer_is_reconciled_from_history() {
    let w = world(0).await;
    ready(&w, "alice").await;
    w.connector.api.lose_answer.store(true, Ordering::SeqCst);
    let e = w
        .transport
        .send(msg(MessageKind::Opening, "ann", 5))
        .await
        .unwrap_err();
    assert!(matches!(e, SendError::Transient(_)), "{e}");
    let d = w
        .transport
        .was_delivered(
            "alice",
            &Identity::Username("ann".into()),
            IdempotencyKey(5),
        )
        .await
        .unwrap();
    assert_eq!(d.map(|d| d.transport_id), Some(1));
    // A key never attempted was not delivered.
    let none = w
        .transport
        .was_delivered(
            "alice",
            &Identity::Username("ann".into()),
            IdempotencyKey(6),
        )
        .await
        .unwrap();
    assert_eq!(none, None);
}

/// Catching up on a chat hands the host the contact's messages newer than
/// the given id, oldest first, as incoming messages are handed over: each
/// stored before the next, then the chat marked read.
#[tokio::test]
async fn a_reply_whose_update_was_lost_is_caught_up_from_the_chat() {
    let mut w = world(0).await;
    ready(&w, "alice").await;
    let ann = Identity::Username("ann".into());
    // Nothing in the chat yet.
    w.transport.catch_up("alice", &ann, 0).await.unwrap();
    assert!(w.inbound.try_recv().is_err());
    w.transport
        .send(msg(MessageKind::Opening, "ann", 1))
        .await
        .unwrap();
    let ann_id = w.connector.api.usernames["ann"].user_id;
    w.connector.api.received.lock().unwrap().extend([
        (ann_id, 100, "seen before".to_string()),
        (ann_id, 101, "Tell me more".to_string()),
        (ann_id, 102, "And the price?".to_string()),
        (ann_id + 1, 103, "someone else".to_string()),
    ]);
    let transport = w.transport.clone();
    let ann2 = ann.clone();
    let catching_up = tokio::spawn(async move { transport.catch_up("alice", &ann2, 100).await });
    let mut got = Vec::new();
    for _ in 0..2 {
        let inbound = w.inbound.recv().await.unwrap();
        let m = &inbound.message;
        got.push((
            m.account.clone(),
            m.contact.clone(),
            m.transport_id,
            m.text.clone(),
        ));
        // The next comes only once this one is stored.
        tokio::task::yield_now().await;
        assert!(w.inbound.try_recv().is_err());
        inbound.stored.send(()).unwrap();
    }
    catching_up.await.unwrap().unwrap();
    let who = |id, text: &str| ("alice".to_string(), ann.clone(), id, text.to_string());
    assert_eq!(got, [who(101, "Tell me more"), who(102, "And the price?")]);
    assert_eq!(*w.connector.api.read.lock().unwrap(), vec![102]);
}

#[tokio::test]
async fn an_account_without_session_is_unauthorized_and_the_others_run() {
    let w = world(0).await;
    ready(&w, "alice").await;
    ready(&w, "bob").await;
    assert_eq!(
        w.transport.link_states(),
        vec![("alice".into(), "ready"), ("bob".into(), "unauthorized")]
    );
    assert_eq!(w.transport.unauthorized(), vec!["bob".to_string()]);
    let mut m = msg(MessageKind::Opening, "ann", 1);
    m.account = "bob".into();
    assert_eq!(
        w.transport.send(m).await.unwrap_err(),
        SendError::Unauthorized
    );
    w.transport
        .send(msg(MessageKind::Opening, "ann", 2))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_library_panic_is_an_error_of_that_send() {
    let w = world(0).await;
    ready(&w, "alice").await;
    w.connector.api.panic_on_send.store(true, Ordering::SeqCst);
    let e = w
        .transport
        .send(msg(MessageKind::Reply, "ann", 3))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("unexpected answer shape"), "{e}");
    w.connector.api.panic_on_send.store(false, Ordering::SeqCst);
    w.transport
        .send(msg(MessageKind::Reply, "ann", 4))
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn reconnects_with_backoff() {
    let w = world(3).await;
    ready(&w, "alice").await;
    assert_eq!(w.connector.attempts.load(Ordering::SeqCst), 4);
    assert!(w
        .transport
        .send(msg(MessageKind::Reply, "ann", 1))
        .await
        .is_ok());
}

#[tokio::test]
async fn incoming_messages_are_acknowledged_after_the_host_stores_them() {
    let mut w = world(0).await;
    ready(&w, "alice").await;
    // Ann was resolved by username: her reply is matched to that identity.
    w.transport
        .send(msg(MessageKind::Opening, "ann", 1))
        .await
        .unwrap();
    let feed = w.connector.feeds.lock().unwrap()["alice"].clone();
    let (stored, mut acked) = oneshot::channel();
    feed.send(Incoming {
        user_id: 1,
        id: 41,
        text: "hi there".into(),
        date: 1_700_000_000,
        stored,
    })
    .await
    .unwrap();
    let inbound = w.inbound.recv().await.unwrap();
    assert_eq!(inbound.message.contact, Identity::Username("ann".into()));
    assert_eq!(inbound.message.transport_id, 41);
    assert_eq!(inbound.message.at, Timestamp(1_700_000_000_000));
    // Not acknowledged (update state not saved) until the host has it.
    tokio::task::yield_now().await;
    assert!(acked.try_recv().is_err());
    inbound.stored.send(()).unwrap();
    acked.await.unwrap();
    for _ in 0..100 {
        if !w.connector.api.read.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(*w.connector.api.read.lock().unwrap(), vec![41]);
}

/// The whole host on the fake client: the campaign opens a dialog through
/// the Telegram transport, the contact answers, the host replies; what
/// Telegram saw and what the store holds agree.
#[tokio::test]
async fn the_host_runs_a_campaign_on_the_fake_client() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for sub in ["engines", "scripts"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
    }
    std::fs::copy(
        root.join("engines/echo.lua"),
        dir.path().join("engines/echo.lua"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("leads.csv"),
        "username,first_name\nann_lee,Ann\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("config.toml"),
        "[transport]\nkind = \"telegram\"\n[telegram]\napi_id = 1\napi_hash_env = \"UNUSED\"\n\
         [safety]\nmin_interval = \"0s\"\njitter = \"0s\"\nreply_delay = \"0s\"\n\
         [[accounts]]\nname = \"alice\"\nphone = \"+10000000000\"\n\
         [[audiences]]\nname = \"leads\"\nfile = \"leads.csv\"\n\
         [[campaigns]]\nname = \"c\"\nengine = \"echo\"\naudiences = [\"leads\"]\naccounts = [\"alice\"]\n",
    )
    .unwrap();
    let config = Arc::new(crate::config::Config::load(&dir.path().join("config.toml")).unwrap());
    let store = Store::open(&config.data_dir()).unwrap();
    let rows = crate::audience::read(&dir.path().join("leads.csv")).rows;
    assert_eq!(rows.len(), 1);
    store.import_audience("leads", &rows, &mut || 7).unwrap();
    let mut api = FakeApi::default();
    api.usernames.insert("ann_lee".into(), peer(1));
    let connector = Arc::new(FakeConnector {
        api: Arc::new(api),
        sessions: ["alice".to_string()].into(),
        failures: AtomicUsize::new(0),
        attempts: AtomicUsize::new(0),
        feeds: Mutex::new(HashMap::new()),
    });
    let shutdown = CancellationToken::new();
    let transport = TelegramTransport::new(
        vec!["alice".into()],
        &store,
        connector.clone(),
        Manners::from_config(&config),
        Arc::new(SystemClock),
        shutdown.clone(),
    )
    .unwrap();
    let h = crate::host::build(
        config,
        store.clone(),
        Arc::new(transport),
        Arc::new(SystemClock),
        shutdown,
    );
    crate::host::start(&h).await.unwrap();
    let api = connector.api.clone();
    let sent = |n: usize| {
        let api = api.clone();
        async move {
            for _ in 0..500 {
                if api.sent.lock().unwrap().len() >= n {
                    return api.sent.lock().unwrap().clone();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("fewer than {n} messages reached the fake Telegram");
        }
    };
    let opening = sent(1).await;
    assert_eq!(opening[0].1, "hello Ann");
    let feed = connector.feeds.lock().unwrap()["alice"].clone();
    let (stored, acked) = oneshot::channel();
    feed.send(Incoming {
        user_id: 1,
        id: 900,
        text: "tell me more".into(),
        date: SystemClock.now().0 / 1000,
        stored,
    })
    .await
    .unwrap();
    acked.await.unwrap();
    let both = sent(2).await;
    assert_eq!(both[1].1, "re: tell me more");
    crate::host::stop(&h).await;
    let dialog = store.all_dialogs().next().unwrap().unwrap();
    let messages = store.messages(dialog.id).unwrap();
    let keys: Vec<i64> = both.iter().map(|(r, _, _)| *r).collect();
    let stored_keys: Vec<i64> = messages
        .iter()
        .filter_map(|m| m.key)
        .map(|k| k.0 as i64)
        .collect();
    assert_eq!(stored_keys, keys, "random_id is our idempotency key");
    assert!(messages
        .iter()
        .filter(|m| m.key.is_some())
        .all(|m| m.delivery == Some(crate::model::Delivery::Sent)));
}
