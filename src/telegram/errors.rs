//! Every grammers error mapped into the transport's error classes, in one
//! table: the safety core reacts to the class, never to a library type.

use std::time::Duration;

use grammers_client::sender::RpcError;
use grammers_client::InvocationError;
use grammers_mtproto::transport;

use crate::transport::SendError;

/// Telegram error names, by the class they belong to. A trailing `*`
/// matches a prefix.
const FLOOD: &[&str] = &["FLOOD_WAIT", "FLOOD_PREMIUM_WAIT", "SLOWMODE_WAIT"];
const PEER_FLOOD: &[&str] = &["PEER_FLOOD"];
const PRIVACY: &[&str] = &[
    "USER_PRIVACY_RESTRICTED",
    "PRIVACY_PREMIUM_REQUIRED",
    "USER_NOT_MUTUAL_CONTACT",
    "ALLOW_PAYMENT_REQUIRED",
];
const BANNED: &[&str] = &[
    "USER_DEACTIVATED",
    "USER_DEACTIVATED_BAN",
    "PHONE_NUMBER_BANNED",
];
const UNAUTHORIZED: &[&str] = &[
    "AUTH_KEY_UNREGISTERED",
    "SESSION_REVOKED",
    "SESSION_EXPIRED",
    "AUTH_KEY_DUPLICATED",
    "AUTH_KEY_INVALID",
];
const PEER_INVALID: &[&str] = &[
    "PEER_ID_INVALID",
    "USERNAME_NOT_OCCUPIED",
    "USERNAME_INVALID",
    "INPUT_USER_DEACTIVATED",
    "USER_IS_BLOCKED",
    "YOU_BLOCKED_USER",
    "USER_ID_INVALID",
    "PHONE_NOT_OCCUPIED",
];
const DUPLICATE: &[&str] = &["RANDOM_ID_DUPLICATE"];

fn named(e: &RpcError, names: &[&str]) -> bool {
    names.iter().any(|n| e.is(n))
}

/// The class of an RPC error Telegram answered.
pub fn classify_rpc(e: &RpcError) -> SendError {
    let secs = || Duration::from_secs(u64::from(e.value.unwrap_or(0)));
    if named(e, DUPLICATE) {
        SendError::Duplicate
    } else if named(e, FLOOD) || e.code == 420 {
        SendError::FloodWait(secs())
    } else if named(e, PEER_FLOOD) {
        SendError::PeerFlood
    } else if named(e, PRIVACY) {
        SendError::PrivacyRestricted
    } else if named(e, BANNED) {
        SendError::AccountBanned
    } else if named(e, UNAUTHORIZED) || e.code == 401 {
        SendError::Unauthorized
    } else if named(e, PEER_INVALID) {
        SendError::PeerInvalid
    } else if e.code >= 500 || e.code == -503 {
        SendError::Transient(format!("Telegram answered {} ({})", e.name, e.code))
    } else {
        SendError::Other(format!("Telegram answered {} ({})", e.name, e.code))
    }
}

/// The class of any error a grammers call returned.
pub fn classify(e: &InvocationError) -> SendError {
    match e {
        InvocationError::Rpc(rpc) => classify_rpc(rpc),
        InvocationError::Io(io) => SendError::Transient(format!("network: {io}")),
        // A 404 at the transport level means the server does not know the
        // auth key: the session is gone.
        InvocationError::Transport(transport::Error::BadStatus { status: 404 }) => {
            SendError::Unauthorized
        }
        InvocationError::Transport(t) => SendError::Transient(format!("transport: {t}")),
        InvocationError::Dropped(why) => SendError::Transient(format!("connection dropped: {why}")),
        InvocationError::Deserialize(d) => SendError::Other(format!("unreadable answer: {d}")),
        InvocationError::InvalidDc => SendError::Other("unknown Telegram datacenter".into()),
        InvocationError::Authentication(a) => {
            SendError::Transient(format!("key exchange failed: {a}"))
        }
        InvocationError::Session(s) => SendError::Other(format!("session storage: {s}")),
    }
}

/// A panic inside the library, turned into an error for that account.
pub fn from_panic(payload: Box<dyn std::any::Any + Send>) -> SendError {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    SendError::Other(format!("the Telegram library failed: {what}"))
}

/// Builds an RPC error as Telegram sends it (`FLOOD_WAIT_31`, code 420).
pub fn rpc(code: i32, message: &str) -> InvocationError {
    InvocationError::Rpc(RpcError::from(grammers_client::tl::types::RpcError {
        error_code: code,
        error_message: message.to_string(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table() {
        let cases: &[(i32, &str, SendError)] = &[
            (
                420,
                "FLOOD_WAIT_31",
                SendError::FloodWait(Duration::from_secs(31)),
            ),
            (
                420,
                "FLOOD_PREMIUM_WAIT_5",
                SendError::FloodWait(Duration::from_secs(5)),
            ),
            (
                420,
                "SLOWMODE_WAIT_10",
                SendError::FloodWait(Duration::from_secs(10)),
            ),
            (
                420,
                "SOMETHING_NEW_7",
                SendError::FloodWait(Duration::from_secs(7)),
            ),
            (400, "PEER_FLOOD", SendError::PeerFlood),
            (403, "USER_PRIVACY_RESTRICTED", SendError::PrivacyRestricted),
            (
                403,
                "PRIVACY_PREMIUM_REQUIRED",
                SendError::PrivacyRestricted,
            ),
            (400, "USER_NOT_MUTUAL_CONTACT", SendError::PrivacyRestricted),
            (400, "ALLOW_PAYMENT_REQUIRED", SendError::PrivacyRestricted),
            (401, "USER_DEACTIVATED", SendError::AccountBanned),
            (401, "USER_DEACTIVATED_BAN", SendError::AccountBanned),
            (400, "PHONE_NUMBER_BANNED", SendError::AccountBanned),
            (401, "AUTH_KEY_UNREGISTERED", SendError::Unauthorized),
            (401, "SESSION_REVOKED", SendError::Unauthorized),
            (401, "SESSION_EXPIRED", SendError::Unauthorized),
            (406, "AUTH_KEY_DUPLICATED", SendError::Unauthorized),
            (401, "SOMETHING_401", SendError::Unauthorized),
            (400, "PEER_ID_INVALID", SendError::PeerInvalid),
            (400, "USERNAME_NOT_OCCUPIED", SendError::PeerInvalid),
            (400, "USERNAME_INVALID", SendError::PeerInvalid),
            (400, "INPUT_USER_DEACTIVATED", SendError::PeerInvalid),
            (400, "USER_IS_BLOCKED", SendError::PeerInvalid),
            (400, "YOU_BLOCKED_USER", SendError::PeerInvalid),
            (500, "RANDOM_ID_DUPLICATE", SendError::Duplicate),
        ];
        for (code, name, want) in cases {
            assert_eq!(&classify(&rpc(*code, name)), want, "{name} ({code})");
        }
        assert!(matches!(
            classify(&rpc(500, "INTERNAL")),
            SendError::Transient(_)
        ));
        assert!(matches!(
            classify(&rpc(400, "MESSAGE_TOO_LONG")),
            SendError::Other(_)
        ));
    }

    #[test]
    fn library_errors_are_transient_or_other() {
        let io = InvocationError::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        ));
        assert!(matches!(classify(&io), SendError::Transient(_)));
        assert!(matches!(
            classify(&InvocationError::Dropped("gone")),
            SendError::Transient(_)
        ));
        assert!(matches!(
            classify(&InvocationError::InvalidDc),
            SendError::Other(_)
        ));
        let unknown_key = transport::Error::BadStatus { status: 404 };
        assert_eq!(
            classify(&InvocationError::Transport(unknown_key)),
            SendError::Unauthorized
        );
        let too_many = transport::Error::BadStatus { status: 429 };
        assert!(matches!(
            classify(&InvocationError::Transport(too_many)),
            SendError::Transient(_)
        ));
    }

    #[test]
    fn a_panic_becomes_an_error() {
        let caught = std::panic::catch_unwind(|| panic!("unexpected sentCodeSuccess"));
        let e = from_panic(caught.unwrap_err());
        assert_eq!(
            e.to_string(),
            "the transport failed: the Telegram library failed: unexpected sentCodeSuccess"
        );
    }
}
