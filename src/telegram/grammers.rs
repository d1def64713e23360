//! The real [`Connector`]: one grammers sender pool, client and update
//! stream per account, over the account's stored session.

use std::num::NonZeroUsize;
use std::sync::Arc;

use grammers_client::sender::{ConnectionParams, NoRetries, UpdatesConfiguration};
use grammers_client::tl;
use grammers_client::{Client, SenderPool};
use tokio::sync::{mpsc, oneshot};

use super::api::GrammersApi;
use super::errors::classify;
use super::session::StoredSession;
use super::{Connection, Connector, Incoming};
use crate::clock::BoxFuture;
use crate::store::Store;
use crate::transport::SendError;

/// Updates buffered between the network and the update stream: bursts
/// wait here instead of being dropped.
const UPDATES_CAPACITY: usize = 100_000;

pub struct GrammersConnector {
    pub store: Store,
    pub api_id: i32,
    /// Proxy URL (`socks5://…`) by account.
    pub proxies: std::collections::HashMap<String, String>,
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
            let (client, updates, _session) = client(&self.store, &account, self.api_id, proxy)?;
            let c = client.clone();
            let authorized = tokio::spawn(async move { c.is_authorized().await })
                .await
                .map_err(|e| SendError::Other(format!("the Telegram library failed: {e}")))?;
            match authorized {
                Ok(true) => {}
                Ok(false) => {
                    client.disconnect();
                    return Err(SendError::Unauthorized);
                }
                Err(e) => {
                    client.disconnect();
                    return Err(classify(&e));
                }
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
