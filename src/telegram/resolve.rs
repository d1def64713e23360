//! Contact resolution, cached per (account, contact): a username or phone is
//! resolved once per account; a bare user id needs an access hash the
//! account has seen (in its session's peer cache, or among its recent
//! dialogs).

use grammers_session::types::{PeerId, PeerInfo};

use super::api::{Api, Peer};
use super::errors::classify;
use crate::model::Identity;
use crate::store::{Records, Store, StoreError};
use crate::transport::SendError;

/// Records tree: `account \0 identity key` → [`Peer`].
pub const CACHE: &str = "tg_contacts";
/// Records tree: `account \0 user id` → the [`Identity`] the contact was
/// resolved from, so replies are matched to the contact we know.
pub const USERS: &str = "tg_users";

#[derive(Clone)]
pub struct Resolver {
    cache: Records,
    users: Records,
    peers: Records,
}

fn storage(e: StoreError) -> SendError {
    SendError::Other(e.to_string())
}

impl Resolver {
    pub fn new(store: &Store) -> Result<Resolver, StoreError> {
        Ok(Resolver {
            cache: store.records(CACHE)?,
            users: store.records(USERS)?,
            peers: store.records("tg_peers")?,
        })
    }

    /// The cached peer of a contact for an account, if resolved before.
    pub fn cached(&self, account: &str, contact: &Identity) -> Result<Option<Peer>, StoreError> {
        self.cache.get(&format!("{account}\0{}", contact.key()))
    }

    /// The contact's peer for this account: from the cache, or resolved
    /// and cached. A contact that cannot be resolved is `Unreachable`.
    pub async fn peer(
        &self,
        account: &str,
        api: &dyn Api,
        contact: &Identity,
    ) -> Result<Peer, SendError> {
        if let Some(p) = self.cached(account, contact).map_err(storage)? {
            return Ok(p);
        }
        let found = match contact {
            Identity::Username(u) => api.resolve_username(u).await.map_err(|e| classify(&e))?,
            Identity::Phone(p) => api.resolve_phone(p).await.map_err(|e| classify(&e))?,
            Identity::UserId(id) => match self.seen_user(account, *id).map_err(storage)? {
                Some(peer) => Some(peer),
                None => api.dialog_user(*id).await.map_err(|e| classify(&e))?,
            },
        };
        let Some(peer) = found else {
            return Err(SendError::Unreachable(match contact {
                Identity::Username(u) => format!("no Telegram user has the username {u}"),
                Identity::Phone(p) => format!("no Telegram user can be found by the phone {p}"),
                Identity::UserId(id) => format!(
                    "account {account} has never seen user {id} (not among its recent dialogs), so it has no access hash for it; give the contact's username or phone"
                ),
            }));
        };
        self.remember(account, contact, peer).map_err(storage)?;
        Ok(peer)
    }

    /// Caches a contact's peer for an account.
    pub fn remember(
        &self,
        account: &str,
        contact: &Identity,
        peer: Peer,
    ) -> Result<(), StoreError> {
        self.cache
            .put(&format!("{account}\0{}", contact.key()), &peer)?;
        self.users
            .put(&format!("{account}\0{}", peer.user_id), contact)
    }

    /// The identity we know a Telegram user by on this account.
    pub fn identity_of(&self, account: &str, user_id: i64) -> Identity {
        self.users
            .get(&format!("{account}\0{user_id}"))
            .ok()
            .flatten()
            .unwrap_or(Identity::UserId(user_id))
    }

    fn seen_user(&self, account: &str, id: i64) -> Result<Option<Peer>, StoreError> {
        let Some(pid) = PeerId::user(id) else {
            return Ok(None);
        };
        let info: Option<PeerInfo> = self
            .peers
            .get(&format!("{account}\0{}", pid.bot_api_dialog_id_unchecked()))?;
        Ok(info.and_then(|i| i.auth()).map(|a| Peer {
            user_id: id,
            access_hash: a.hash(),
        }))
    }
}
