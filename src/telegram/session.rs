//! A grammers [`Session`] kept in our store, one per account.
//!
//! Why not grammers' sqlite storage: our store is already the one place
//! where state lives (one lock, one backup, one set of file permissions),
//! the sqlite storage pulls in a C build with bindgen that a fresh machine
//! cannot always do, and here the update state is written only when the
//! transport says so (after the messages are stored), which is what makes
//! catch-up lose nothing.
//!
//! `home_dc_id` and `dc_option` are called on every request: they are
//! served from memory; every change is written through to the store.

use std::net::{IpAddr, SocketAddrV4, SocketAddrV6};
use std::sync::Mutex;

use grammers_session::types::{
    ChannelState, DcOption, PeerId, PeerInfo, UpdateState, UpdatesState,
};
use grammers_session::{BoxFuture, Session, SessionData};
use serde::{Deserialize, Serialize};

use super::string_session::Imported;
use crate::store::{Records, Store, StoreError};

/// What is stored per account. Auth keys are credentials: this type has no
/// `Debug`, and nothing logs it.
#[derive(Clone, Serialize, Deserialize)]
pub struct SessionRecord {
    pub home_dc: i32,
    pub dc_options: Vec<DcOption>,
    pub updates_state: UpdatesState,
    /// The logged-in user; grammers asks for it to tell whether the
    /// session is signed in.
    pub self_user: Option<PeerInfo>,
    /// A DC whose address came with an imported session: kept on every
    /// connect and reconnect, whatever Telegram's config says.
    pub pinned_dc: Option<i32>,
    /// Connect over IPv6 (the imported address was IPv6).
    pub ipv6: bool,
}

impl Default for SessionRecord {
    fn default() -> Self {
        let data = SessionData::default();
        let mut dc_options: Vec<DcOption> = data.dc_options.into_values().collect();
        dc_options.sort_by_key(|o| o.id);
        SessionRecord {
            home_dc: data.home_dc,
            dc_options,
            updates_state: data.updates_state,
            self_user: None,
            pinned_dc: None,
            ipv6: false,
        }
    }
}

impl SessionRecord {
    /// A record for an imported string session: its DC is home, with the
    /// address and auth key it carries.
    pub fn imported(s: &Imported) -> SessionRecord {
        let mut r = SessionRecord {
            home_dc: s.dc_id,
            ..SessionRecord::default()
        };
        let known = r.dc_options.iter().find(|o| o.id == s.dc_id).cloned();
        let mut opt = known.unwrap_or(DcOption {
            id: s.dc_id,
            ipv4: SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 443),
            ipv6: SocketAddrV6::new(std::net::Ipv6Addr::UNSPECIFIED, 443, 0, 0),
            auth_key: None,
        });
        opt.auth_key = Some(s.auth_key);
        if let Some(server) = s.server {
            match server.ip() {
                IpAddr::V4(ip) => {
                    opt.ipv4 = SocketAddrV4::new(ip, server.port());
                    opt.ipv6 = SocketAddrV6::new(ip.to_ipv6_mapped(), server.port(), 0, 0);
                }
                IpAddr::V6(ip) => {
                    opt.ipv6 = SocketAddrV6::new(ip, server.port(), 0, 0);
                    r.ipv6 = true;
                }
            }
            r.pinned_dc = Some(s.dc_id);
        }
        r.dc_options.retain(|o| o.id != s.dc_id);
        r.dc_options.push(opt);
        r
    }

    /// Whether the session has an auth key for its home DC.
    pub fn has_key(&self) -> bool {
        self.dc_options
            .iter()
            .any(|o| o.id == self.home_dc && o.auth_key.is_some())
    }
}

/// The store-backed session of one account.
pub struct StoredSession {
    account: String,
    sessions: Records,
    peers: Records,
    data: Mutex<SessionRecord>,
}

#[derive(Debug, thiserror::Error)]
#[error("the session of account {account} cannot be stored: {source}")]
pub struct SessionError {
    account: String,
    source: StoreError,
}

impl StoredSession {
    /// The account's stored session, or a fresh one.
    pub fn open(store: &Store, account: &str) -> Result<StoredSession, StoreError> {
        let sessions = store.records("tg_sessions")?;
        let data = sessions.get(account)?.unwrap_or_default();
        Ok(StoredSession {
            account: account.to_string(),
            sessions,
            peers: store.records("tg_peers")?,
            data: Mutex::new(data),
        })
    }

    /// Replaces the account's session (a login or an import) and drops the
    /// peers cached under the old one: access hashes belong to a session.
    pub fn replace(store: &Store, account: &str, record: &SessionRecord) -> Result<(), StoreError> {
        store.records("tg_sessions")?.put(account, record)?;
        let prefix = format!("{account}\0");
        store.records("tg_peers")?.remove_prefix(&prefix)?;
        store
            .records(super::resolve::CACHE)?
            .remove_prefix(&prefix)?;
        store.flush()
    }

    /// Whether the account has a stored session with a logged-in user.
    pub fn is_logged_in(store: &Store, account: &str) -> Result<bool, StoreError> {
        Ok(store
            .records("tg_sessions")?
            .get::<SessionRecord>(account)?
            .is_some_and(|r| r.self_user.is_some() || r.has_key()))
    }

    pub fn record(&self) -> SessionRecord {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SessionRecord> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self, data: &SessionRecord) -> Result<(), SessionError> {
        self.sessions
            .put(&self.account, data)
            .map_err(|source| self.error(source))
    }

    fn error(&self, source: StoreError) -> SessionError {
        SessionError {
            account: self.account.clone(),
            source,
        }
    }

    fn peer_key(&self, id: PeerId) -> String {
        format!("{}\0{}", self.account, id.bot_api_dialog_id_unchecked())
    }
}

impl Session for StoredSession {
    type Error = SessionError;

    fn home_dc_id(&self) -> Result<i32, SessionError> {
        Ok(self.lock().home_dc)
    }

    fn set_home_dc_id(&self, dc_id: i32) -> BoxFuture<'_, Result<(), SessionError>> {
        Box::pin(async move {
            let mut data = self.lock();
            data.home_dc = dc_id;
            self.save(&data)
        })
    }

    fn dc_option(&self, dc_id: i32) -> Result<Option<DcOption>, SessionError> {
        Ok(self
            .lock()
            .dc_options
            .iter()
            .find(|o| o.id == dc_id)
            .cloned())
    }

    fn set_dc_option(&self, option: &DcOption) -> BoxFuture<'_, Result<(), SessionError>> {
        let option = option.clone();
        Box::pin(async move {
            let mut data = self.lock();
            let pinned = data.pinned_dc == Some(option.id);
            match data.dc_options.iter_mut().find(|o| o.id == option.id) {
                // The imported address stays; only a new key is taken.
                Some(old) if pinned => {
                    if option.auth_key.is_some() {
                        old.auth_key = option.auth_key;
                    }
                }
                Some(old) => *old = option,
                None => data.dc_options.push(option),
            }
            self.save(&data)
        })
    }

    fn peer(&self, peer: PeerId) -> BoxFuture<'_, Result<Option<PeerInfo>, SessionError>> {
        Box::pin(async move {
            if peer == PeerId::self_user() {
                return Ok(self.lock().self_user.clone());
            }
            self.peers
                .get(&self.peer_key(peer))
                .map_err(|e| self.error(e))
        })
    }

    fn cache_peer(&self, peer: PeerInfo) -> BoxFuture<'_, Result<(), SessionError>> {
        Box::pin(async move {
            if let PeerInfo::User {
                is_self: Some(true),
                ..
            } = peer
            {
                let mut data = self.lock();
                match &mut data.self_user {
                    Some(old) => {
                        old.extend_info(&peer);
                    }
                    None => data.self_user = Some(peer.clone()),
                }
                self.save(&data)?;
            }
            let key = self.peer_key(peer.id());
            let merged = match self
                .peers
                .get::<PeerInfo>(&key)
                .map_err(|e| self.error(e))?
            {
                Some(mut old) => {
                    if !old.extend_info(&peer) {
                        return Ok(());
                    }
                    old
                }
                None => peer,
            };
            self.peers.put(&key, &merged).map_err(|e| self.error(e))
        })
    }

    fn updates_state(&self) -> BoxFuture<'_, Result<UpdatesState, SessionError>> {
        Box::pin(async move { Ok(self.lock().updates_state.clone()) })
    }

    fn set_update_state(&self, update: UpdateState) -> BoxFuture<'_, Result<(), SessionError>> {
        Box::pin(async move {
            let mut data = self.lock();
            let state = &mut data.updates_state;
            match update {
                UpdateState::All(all) => *state = all,
                UpdateState::Primary { pts, date, seq } => {
                    state.pts = pts;
                    state.date = date;
                    state.seq = seq;
                }
                UpdateState::Secondary { qts } => state.qts = qts,
                UpdateState::Channel { id, pts } => {
                    state.channels.retain(|c| c.id != id);
                    state.channels.push(ChannelState { id, pts });
                }
            }
            self.save(&data)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use grammers_session::types::PeerAuth;

    fn user(id: i64, hash: i64, is_self: bool) -> PeerInfo {
        PeerInfo::User {
            id,
            auth: Some(PeerAuth::from_hash(hash)),
            bot: Some(false),
            is_self: Some(is_self),
        }
    }

    #[tokio::test]
    async fn round_trip_through_the_store() {
        let store = Store::temporary().unwrap();
        let s = StoredSession::open(&store, "alice").unwrap();
        assert_eq!(s.home_dc_id().unwrap(), 2);
        assert!(s.dc_option(4).unwrap().is_some(), "static DCs are known");
        assert!(s.peer(PeerId::self_user()).await.unwrap().is_none());
        let mut opt = s.dc_option(4).unwrap().unwrap();
        opt.auth_key = Some([3; 256]);
        s.set_dc_option(&opt).await.unwrap();
        s.set_home_dc_id(4).await.unwrap();
        s.cache_peer(user(77, 1234, true)).await.unwrap();
        s.cache_peer(user(88, 5678, false)).await.unwrap();
        s.set_update_state(UpdateState::Primary {
            pts: 10,
            date: 20,
            seq: 30,
        })
        .await
        .unwrap();
        drop(s);

        let s = StoredSession::open(&store, "alice").unwrap();
        assert_eq!(s.home_dc_id().unwrap(), 4);
        assert_eq!(s.dc_option(4).unwrap().unwrap().auth_key, Some([3; 256]));
        assert!(s.peer(PeerId::self_user()).await.unwrap().is_some());
        let p = s.peer(PeerId::user(88).unwrap()).await.unwrap().unwrap();
        assert_eq!(p.auth(), Some(PeerAuth::from_hash(5678)));
        assert_eq!(s.updates_state().await.unwrap().pts, 10);
        assert!(StoredSession::is_logged_in(&store, "alice").unwrap());
        // Sessions are per account.
        let bob = StoredSession::open(&store, "bob").unwrap();
        assert!(bob.peer(PeerId::user(88).unwrap()).await.unwrap().is_none());
        assert!(!StoredSession::is_logged_in(&store, "bob").unwrap());
    }

    #[tokio::test]
    async fn an_imported_address_is_kept() {
        let store = Store::temporary().unwrap();
        let imported = Imported {
            dc_id: 2,
            server: Some("149.154.167.40:80".parse().unwrap()),
            auth_key: [9; 256],
            format: "Telethon",
        };
        StoredSession::replace(&store, "alice", &SessionRecord::imported(&imported)).unwrap();
        let s = StoredSession::open(&store, "alice").unwrap();
        assert_eq!(s.home_dc_id().unwrap(), 2);
        let opt = s.dc_option(2).unwrap().unwrap();
        assert_eq!(opt.ipv4, "149.154.167.40:80".parse().unwrap());
        assert_eq!(opt.auth_key, Some([9; 256]));
        // Telegram's config names the production address: ours stays.
        let mut from_server = opt.clone();
        from_server.ipv4 = "149.154.167.41:443".parse().unwrap();
        s.set_dc_option(&from_server).await.unwrap();
        assert_eq!(
            s.dc_option(2).unwrap().unwrap().ipv4,
            "149.154.167.40:80".parse().unwrap()
        );
    }
}
