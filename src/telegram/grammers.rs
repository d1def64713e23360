//! The real [`Connector`]: one grammers sender pool, client and update
//! stream per account, over the account's stored session.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use grammers_client::sender::{ConnectionParams, NoRetries, UpdatesConfiguration};
use grammers_client::tl;
use grammers_client::{Client, InvocationError, SenderPool};
use grammers_mtproto::mtp::DeserializeError;
use grammers_session::types::{PeerAuth, PeerInfo, UpdateState, UpdatesState};
use grammers_session::Session;
use tokio::sync::{mpsc, oneshot};

use super::api::GrammersApi;
use super::errors::{classify, from_panic};
use super::session::StoredSession;
use super::{Connection, Connector, Incoming};
use crate::clock::BoxFuture;
use crate::store::Store;
use crate::transport::SendError;

/// Updates buffered between the network and the update stream: bursts
/// wait here instead of being dropped.
const UPDATES_CAPACITY: usize = 100_000;

pub struct GrammersConnector {
    store: Store,
    api_id: i32,
    /// Proxy URL (`socks5://…`) by account.
    proxies: HashMap<String, String>,
    refusals: Refusals,
}

impl GrammersConnector {
    pub fn new(store: Store, api_id: i32, proxies: HashMap<String, String>) -> GrammersConnector {
        GrammersConnector {
            store,
            api_id,
            proxies,
            refusals: Refusals::default(),
        }
    }
}

/// Connection attempts in a row that the server refused at the transport
/// level before an account counts as logged out.
const REFUSALS_UNTIL_UNAUTHORIZED: u32 = 3;

/// Consecutive transport-level refusals, by account.
///
/// A server that does not know a connection's auth key answers with the
/// transport error -404. Telegram sends it bare, and grammers then makes a
/// new key (the account is then simply not logged in, a 401). A server that
/// wraps it in a normal frame (as some self-hosted ones do) reaches us as a
/// four-byte payload, too small for any encrypted message: grammers cannot
/// read the code, so we count. The same answer on every attempt means the
/// key is gone; a passing refusal (-429, too many connections) does not
/// repeat three times across the backoff.
#[derive(Default)]
struct Refusals(Mutex<HashMap<String, u32>>);

impl Refusals {
    fn judge(&self, account: &str, outcome: Result<(), Refused>) -> Result<(), SendError> {
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(account.to_string()).or_default();
        match outcome {
            Ok(()) => {
                *count = 0;
                Ok(())
            }
            Err(Refused::Transport) => {
                *count += 1;
                if *count >= REFUSALS_UNTIL_UNAUTHORIZED {
                    Err(SendError::Unauthorized)
                } else {
                    Err(SendError::Transient(
                        "Telegram refused the connection at the transport level".into(),
                    ))
                }
            }
            Err(Refused::Other(e)) => {
                *count = 0;
                Err(e)
            }
        }
    }
}

/// How preparing a connection failed.
enum Refused {
    /// The server answered with a transport error instead of a message.
    Transport,
    Other(SendError),
}

impl From<SendError> for Refused {
    fn from(e: SendError) -> Refused {
        Refused::Other(e)
    }
}

impl From<InvocationError> for Refused {
    fn from(e: InvocationError) -> Refused {
        match e {
            InvocationError::Deserialize(DeserializeError::MessageBufferTooSmall) => {
                Refused::Transport
            }
            e => Refused::Other(classify(&e)),
        }
    }
}

/// A client over the account's stored session, with its runner started.
/// Every flood wait reaches the caller: the pool never retries by itself.
pub fn client(
    store: &Store,
    account: &str,
    api_id: i32,
    proxy: Option<String>,
) -> Result<
    (
        Client,
        mpsc::Receiver<grammers_session::updates::UpdatesLike>,
        Arc<StoredSession>,
    ),
    SendError,
> {
    let session =
        Arc::new(StoredSession::open(store, account).map_err(|e| SendError::Other(e.to_string()))?);
    let params = ConnectionParams {
        device_model: "colloquy".into(),
        app_version: env!("CARGO_PKG_VERSION").into(),
        proxy_url: proxy,
        use_ipv6: session.record().ipv6,
        retry_policy: Box::new(NoRetries),
        updates_channel_capacity: NonZeroUsize::new(UPDATES_CAPACITY).expect("non-zero"),
        ..Default::default()
    };
    let pool = SenderPool::with_configuration(session.clone(), api_id, params);
    let client = Client::new(pool.handle);
    tokio::spawn(pool.runner.run());
    Ok((client, pool.updates, session))
}

impl Connector for GrammersConnector {
    fn has_session(&self, account: &str) -> bool {
        StoredSession::is_logged_in(&self.store, account).unwrap_or(false)
    }

    fn connect(&self, account: &str) -> BoxFuture<'_, Result<Connection, SendError>> {
        let account = account.to_string();
        Box::pin(async move {
            let proxy = self.proxies.get(&account).cloned();
            let (client, updates, session) = client(&self.store, &account, self.api_id, proxy)?;
            let prepared = contained(prepare(client.clone(), session)).await;
            let prepared = self.refusals.judge(&account, prepared).and_then(|()| {
                self.store
                    .flush()
                    .map_err(|e| SendError::Other(e.to_string()))
            });
            if let Err(e) = prepared {
                client.disconnect();
                return Err(e);
            }
            let stream = client
                .stream_updates(updates, UpdatesConfiguration { catch_up: true })
                .await
                .map_err(|e| SendError::Transient(format!("cannot follow updates: {e}")))?;
            let (tx, rx) = mpsc::channel(1024);
            tokio::spawn(follow(account, client.clone(), stream, tx));
            Ok(Connection {
                api: Arc::new(GrammersApi(client)),
                incoming: rx,
            })
        })
    }
}

/// Runs a library call on a task of its own, so that a panic inside
/// grammers becomes an error of this account.
async fn contained<T: Send + 'static, E: From<SendError> + Send + 'static>(
    call: impl std::future::Future<Output = Result<T, E>> + Send + 'static,
) -> Result<T, E> {
    match tokio::spawn(call).await {
        Ok(result) => result,
        Err(join) if join.is_panic() => Err(from_panic(join.into_panic()).into()),
        Err(_) => Err(SendError::Transient("the connection attempt was cancelled".into()).into()),
    }
}

/// What must hold before an account counts as ready: Telegram knows its
/// key, the session knows which user it is, and an update state is stored.
/// Without a stored state, a crash before the first incoming message would
/// make the next start ask for a fresh state and skip everything that
/// arrived in between.
async fn prepare(client: Client, session: Arc<StoredSession>) -> Result<(), Refused> {
    let tl::enums::updates::State::State(state) =
        client.invoke(&tl::functions::updates::GetState {}).await?;
    let stored = |e: super::session::SessionError| SendError::Other(e.to_string());
    if session.record().self_user.is_none() {
        let me = client
            .invoke(&tl::functions::users::GetUsers {
                id: vec![tl::enums::InputUser::UserSelf],
            })
            .await?;
        if let Some(tl::enums::User::User(me)) = me.first() {
            session
                .cache_peer(PeerInfo::User {
                    id: me.id,
                    auth: me.access_hash.map(PeerAuth::from_hash),
                    bot: Some(me.bot),
                    is_self: Some(true),
                })
                .await
                .map_err(stored)?;
        }
    }
    if session.record().updates_state.pts == 0 {
        session
            .set_update_state(UpdateState::All(UpdatesState {
                pts: state.pts,
                qts: state.qts,
                date: state.date,
                seq: state.seq,
                channels: Vec::new(),
            }))
            .await
            .map_err(stored)?;
    }
    Ok(())
}

/// Forwards incoming private messages one at a time and saves the update
/// state after each is stored. Ends (closing the channel) when the stream
/// fails or the host stops listening.
async fn follow(
    account: String,
    client: Client,
    mut stream: grammers_client::client::UpdateStream,
    tx: mpsc::Sender<Incoming>,
) {
    loop {
        let raw = tokio::select! {
            r = stream.next_raw() => r,
            _ = tx.closed() => break,
        };
        let (update, _, _) = match raw {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(account, "the update stream failed: {}", classify(&e));
                break;
            }
        };
        let (stored, done) = oneshot::channel();
        let Some(incoming) = private_message(&update, stored) else {
            continue;
        };
        if tx.send(incoming).await.is_err() || done.await.is_err() {
            break;
        }
        if let Err(e) = stream.sync_update_state().await {
            tracing::warn!(account, "the update state could not be saved: {e}");
        }
    }
    let _ = stream.sync_update_state().await;
    client.disconnect();
}

/// An incoming private text message. The sender's access hash is not in
/// the message: the client caches it in the session's peers, where the
/// resolver finds it.
fn private_message(update: &tl::enums::Update, stored: oneshot::Sender<()>) -> Option<Incoming> {
    let tl::enums::Update::NewMessage(u) = update else {
        return None;
    };
    let tl::enums::Message::Message(m) = &u.message else {
        return None;
    };
    if m.out || m.message.is_empty() {
        return None;
    }
    let tl::enums::Peer::User(user) = &m.peer_id else {
        return None;
    };
    Some(Incoming {
        user_id: user.user_id,
        id: m.id,
        text: m.message.clone(),
        date: i64::from(m.date),
        stored,
    })
}
