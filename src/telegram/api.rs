//! The few Telegram calls the transport makes, behind a trait: the real one
//! invokes raw functions through a grammers [`Client`]; tests use a fake of
//! the same shape, answering with the same error values.

use grammers_client::tl;
use grammers_client::{Client, InvocationError};

use crate::clock::BoxFuture;

/// A user as one account can address it: id and that account's access hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Peer {
    pub user_id: i64,
    pub access_hash: i64,
}

impl Peer {
    fn input(self) -> tl::enums::InputPeer {
        tl::enums::InputPeer::User(tl::types::InputPeerUser {
            user_id: self.user_id,
            access_hash: self.access_hash,
        })
    }

    fn input_user(self) -> tl::enums::InputUser {
        tl::enums::InputUser::User(tl::types::InputUser {
            user_id: self.user_id,
            access_hash: self.access_hash,
        })
    }
}

/// A text message of a private chat, as its history shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub id: i32,
    pub text: String,
    /// Unix seconds.
    pub date: i64,
    /// Sent by this account (else by the contact).
    pub out: bool,
}

pub type ApiResult<T> = Result<T, InvocationError>;

/// What the transport asks of one logged-in account.
pub trait Api: Send + Sync + 'static {
    fn resolve_username(&self, username: &str) -> BoxFuture<'_, ApiResult<Option<Peer>>>;
    fn resolve_phone(&self, phone: &str) -> BoxFuture<'_, ApiResult<Option<Peer>>>;
    /// A user among this account's most recent dialogs (people it talked
    /// to before, in any app), by id.
    fn dialog_user(&self, user_id: i64) -> BoxFuture<'_, ApiResult<Option<Peer>>>;
    /// Why the user cannot be written to for free (paid messages, Premium
    /// only), or `None` when they can.
    fn requirement(&self, peer: Peer) -> BoxFuture<'_, ApiResult<Option<String>>>;
    /// Sends text with our `random_id`; the message id Telegram gave it
    /// (0 when the answer did not say).
    fn send(&self, peer: Peer, text: &str, random_id: i64) -> BoxFuture<'_, ApiResult<i32>>;
    fn typing(&self, peer: Peer) -> BoxFuture<'_, ApiResult<()>>;
    fn read(&self, peer: Peer, max_id: i32) -> BoxFuture<'_, ApiResult<()>>;
    /// The chat's latest `limit` text messages, newest first.
    fn history(&self, peer: Peer, limit: i32) -> BoxFuture<'_, ApiResult<Vec<ChatMessage>>>;
}

/// Dialogs searched for a contact known only by user id.
const DIALOGS_SEARCHED: i32 = 100;

/// The real calls, through grammers.
pub struct GrammersApi(pub Client);

fn user_peer(users: &[tl::enums::User], peer: &tl::enums::Peer) -> Option<Peer> {
    let tl::enums::Peer::User(u) = peer else {
        return None;
    };
    users.iter().find_map(|user| match user {
        tl::enums::User::User(x) if x.id == u.user_id => x.access_hash.map(|h| Peer {
            user_id: x.id,
            access_hash: h,
        }),
        _ => None,
    })
}

/// The id of the message a send created, from Telegram's answer.
pub fn sent_id(updates: &tl::enums::Updates, random_id: i64) -> i32 {
    use tl::enums::{Update, Updates};
    let list = match updates {
        Updates::UpdateShortSentMessage(s) => return s.id,
        Updates::Updates(u) => &u.updates,
        Updates::Combined(u) => &u.updates,
        Updates::UpdateShort(u) => std::slice::from_ref(&u.update),
        _ => return 0,
    };
    list.iter()
        .find_map(|u| match u {
            Update::MessageId(m) if m.random_id == random_id => Some(m.id),
            _ => None,
        })
        .unwrap_or(0)
}

impl Api for GrammersApi {
    fn resolve_username(&self, username: &str) -> BoxFuture<'_, ApiResult<Option<Peer>>> {
        let req = tl::functions::contacts::ResolveUsername {
            username: username.to_string(),
            referer: None,
        };
        Box::pin(async move {
            let tl::enums::contacts::ResolvedPeer::Peer(r) = self.0.invoke(&req).await?;
            Ok(user_peer(&r.users, &r.peer))
        })
    }

    fn resolve_phone(&self, phone: &str) -> BoxFuture<'_, ApiResult<Option<Peer>>> {
        let req = tl::functions::contacts::ResolvePhone {
            phone: phone.trim_start_matches('+').to_string(),
        };
        Box::pin(async move {
            let tl::enums::contacts::ResolvedPeer::Peer(r) = self.0.invoke(&req).await?;
            Ok(user_peer(&r.users, &r.peer))
        })
    }

    fn dialog_user(&self, user_id: i64) -> BoxFuture<'_, ApiResult<Option<Peer>>> {
        let req = tl::functions::messages::GetDialogs {
            exclude_pinned: false,
            folder_id: None,
            offset_date: 0,
            offset_id: 0,
            offset_peer: tl::enums::InputPeer::Empty,
            limit: DIALOGS_SEARCHED,
            hash: 0,
        };
        Box::pin(async move {
            use tl::enums::messages::Dialogs;
            let users = match self.0.invoke(&req).await? {
                Dialogs::Dialogs(d) => d.users,
                Dialogs::Slice(d) => d.users,
                Dialogs::NotModified(_) => Vec::new(),
            };
            let peer = tl::enums::Peer::User(tl::types::PeerUser { user_id });
            Ok(user_peer(&users, &peer))
        })
    }

    fn requirement(&self, peer: Peer) -> BoxFuture<'_, ApiResult<Option<String>>> {
        let req = tl::functions::users::GetRequirementsToContact {
            id: vec![peer.input_user()],
        };
        Box::pin(async move {
            let answer = self.0.invoke(&req).await?;
            Ok(match answer.first() {
                Some(tl::enums::RequirementToContact::Premium) => {
                    Some("the contact accepts messages only from Telegram Premium users".into())
                }
                Some(tl::enums::RequirementToContact::PaidMessages(p)) => Some(format!(
                    "the contact charges {} stars per message",
                    p.stars_amount
                )),
                _ => None,
            })
        })
    }

    fn send(&self, peer: Peer, text: &str, random_id: i64) -> BoxFuture<'_, ApiResult<i32>> {
        let req = tl::functions::messages::SendMessage {
            no_webpage: true,
            silent: false,
            background: false,
            clear_draft: false,
            noforwards: false,
            update_stickersets_order: false,
            invert_media: false,
            allow_paid_floodskip: false,
            peer: peer.input(),
            reply_to: None,
            message: text.to_string(),
            random_id,
            reply_markup: None,
            entities: None,
            schedule_date: None,
            schedule_repeat_period: None,
            send_as: None,
            quick_reply_shortcut: None,
            effect: None,
            allow_paid_stars: None,
            suggested_post: None,
            rich_message: None,
        };
        Box::pin(async move { Ok(sent_id(&self.0.invoke(&req).await?, random_id)) })
    }

    fn typing(&self, peer: Peer) -> BoxFuture<'_, ApiResult<()>> {
        let req = tl::functions::messages::SetTyping {
            peer: peer.input(),
            top_msg_id: None,
            action: tl::enums::SendMessageAction::SendMessageTypingAction,
        };
        Box::pin(async move { self.0.invoke(&req).await.map(|_| ()) })
    }

    fn read(&self, peer: Peer, max_id: i32) -> BoxFuture<'_, ApiResult<()>> {
        let req = tl::functions::messages::ReadHistory {
            peer: peer.input(),
            max_id,
        };
        Box::pin(async move { self.0.invoke(&req).await.map(|_| ()) })
    }

    fn history(&self, peer: Peer, limit: i32) -> BoxFuture<'_, ApiResult<Vec<ChatMessage>>> {
        let req = tl::functions::messages::GetHistory {
            peer: peer.input(),
            offset_id: 0,
            offset_date: 0,
            add_offset: 0,
            limit,
            max_id: 0,
            min_id: 0,
            hash: 0,
        };
        Box::pin(async move {
            use tl::enums::messages::Messages;
            let messages = match self.0.invoke(&req).await? {
                Messages::Messages(m) => m.messages,
                Messages::Slice(m) => m.messages,
                Messages::ChannelMessages(m) => m.messages,
                Messages::NotModified(_) => Vec::new(),
            };
            Ok(messages
                .into_iter()
                .filter_map(|m| match m {
                    tl::enums::Message::Message(m) if !m.message.is_empty() => Some(ChatMessage {
                        id: m.id,
                        text: m.message,
                        date: i64::from(m.date),
                        out: m.out,
                    }),
                    _ => None,
                })
                .collect())
        })
    }
}
