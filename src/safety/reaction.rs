//! The one table from a transport error to the host's reaction. Pure: it
//! says what to do; [`super::AccountSafety::report`] does it.

use std::time::Duration;

use crate::clock::Timestamp;
use crate::config::Safety;
use crate::transport::SendError;

/// What happens to the message that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reaction {
    /// Send it again, with the same key, at this moment.
    RetryAt(Timestamp),
    /// Delivery is unknown: ask the transport whether the key arrived.
    Reconcile,
    /// It will not be sent; the dialog ends with an error.
    FailDialog(String),
    /// It will not be sent; the contact is unreachable and the dialog ends.
    Unreachable(String),
    /// It will not be sent; the account is out of service and its dialogs
    /// are blocked.
    AccountLost,
}

/// What happens to the account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountEffect {
    None,
    /// A flood wait: no send until then.
    Pause(Timestamp),
    /// PEER_FLOOD: no new dialogs until then.
    SpamLimit(Timestamp),
    Banned,
    Unauthorized,
}

/// The full reaction to one failed send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub reaction: Reaction,
    pub account: AccountEffect,
    /// Whether the send's slot goes back to the account: yes when Telegram
    /// surely did not deliver it.
    pub release_slot: bool,
    /// Whether an operator must hear of it.
    pub alert: bool,
}

/// The inputs of the table besides the error.
#[derive(Debug, Clone, Copy)]
pub struct Situation<'a> {
    pub now: Timestamp,
    /// How many times this message has failed before, from 0.
    pub attempt: u32,
    pub safety: &'a Safety,
    /// A uniform draw in `[0, 1)` for the backoff's jitter.
    pub unit: f64,
}

/// A flood wait is honoured with a margin: 10% and 5 seconds more.
pub fn flood_margin(d: Duration) -> Duration {
    d + d / 10 + Duration::from_secs(5)
}

/// Exponential backoff with full jitter: uniform in `[0, min(cap, 2s * 2^attempt)]`.
pub fn backoff(attempt: u32, cap: Duration, unit: f64) -> Duration {
    let ceiling = Duration::from_secs(2)
        .saturating_mul(1u32 << attempt.min(20))
        .min(cap);
    ceiling.mul_f64(unit.clamp(0.0, 1.0))
}

/// The reaction table.
pub fn react(error: &SendError, s: Situation<'_>) -> Outcome {
    let out = |reaction, account, release_slot, alert| Outcome {
        reaction,
        account,
        release_slot,
        alert,
    };
    match error {
        SendError::FloodWait(d) => {
            let until = s.now.saturating_add(flood_margin(*d));
            out(
                Reaction::RetryAt(until),
                AccountEffect::Pause(until),
                true,
                false,
            )
        }
        SendError::PeerFlood => {
            let until = s.now.saturating_add(s.safety.peer_flood_cooldown.0);
            out(
                Reaction::RetryAt(until),
                AccountEffect::SpamLimit(until),
                true,
                true,
            )
        }
        SendError::PrivacyRestricted | SendError::PeerInvalid | SendError::Unreachable(_) => out(
            Reaction::Unreachable(error.to_string()),
            AccountEffect::None,
            true,
            false,
        ),
        SendError::AccountBanned => out(Reaction::AccountLost, AccountEffect::Banned, true, true),
        SendError::Unauthorized => out(
            Reaction::AccountLost,
            AccountEffect::Unauthorized,
            true,
            true,
        ),
        SendError::Transient(why) => {
            if s.attempt + 1 >= s.safety.retry_attempts {
                out(
                    Reaction::FailDialog(format!(
                        "gave up after {} attempts: {why}",
                        s.attempt + 1
                    )),
                    AccountEffect::None,
                    true,
                    true,
                )
            } else {
                let wait = backoff(s.attempt, s.safety.retry_max_delay.0, s.unit);
                out(
                    Reaction::RetryAt(s.now.saturating_add(wait)),
                    AccountEffect::None,
                    true,
                    false,
                )
            }
        }
        SendError::TimedOutAfterSend | SendError::Duplicate => {
            out(Reaction::Reconcile, AccountEffect::None, false, false)
        }
        SendError::Other(_) => out(
            Reaction::FailDialog(error.to_string()),
            AccountEffect::None,
            true,
            true,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn situation(safety: &Safety, attempt: u32) -> Situation<'_> {
        Situation {
            now: Timestamp(1_000_000),
            attempt,
            safety,
            unit: 0.5,
        }
    }

    #[test]
    fn every_error_class_has_its_reaction() {
        let safety = Safety::default();
        let s = situation(&safety, 0);
        let t = |e: SendError| react(&e, s);

        let fw = t(SendError::FloodWait(Duration::from_secs(100)));
        let until = Timestamp(1_000_000 + 115_000);
        assert_eq!(fw.reaction, Reaction::RetryAt(until));
        assert_eq!(fw.account, AccountEffect::Pause(until));
        assert!(fw.release_slot && !fw.alert);

        let pf = t(SendError::PeerFlood);
        assert_eq!(
            pf.account,
            AccountEffect::SpamLimit(Timestamp(1_000_000 + 86_400_000))
        );
        assert!(pf.alert);

        for e in [SendError::PrivacyRestricted, SendError::PeerInvalid] {
            let o = t(e);
            assert!(matches!(o.reaction, Reaction::Unreachable(_)));
            assert_eq!(o.account, AccountEffect::None);
        }
        assert_eq!(t(SendError::AccountBanned).account, AccountEffect::Banned);
        assert_eq!(
            t(SendError::Unauthorized).account,
            AccountEffect::Unauthorized
        );
        assert_eq!(t(SendError::AccountBanned).reaction, Reaction::AccountLost);

        let tr = t(SendError::Transient("reset".into()));
        assert!(matches!(tr.reaction, Reaction::RetryAt(at) if at > s.now));

        let to = t(SendError::TimedOutAfterSend);
        assert_eq!(to.reaction, Reaction::Reconcile);
        assert!(!to.release_slot, "an unknown delivery keeps its slot");

        let other = t(SendError::Other("boom".into()));
        assert!(matches!(other.reaction, Reaction::FailDialog(_)) && other.alert);
    }

    #[test]
    fn transient_errors_give_up_after_the_configured_attempts() {
        let safety = Safety::default();
        let last = react(
            &SendError::Transient("x".into()),
            situation(&safety, safety.retry_attempts - 1),
        );
        assert!(
            matches!(last.reaction, Reaction::FailDialog(ref m) if m.contains("gave up after 5 attempts"))
        );
        assert!(last.alert);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let cap = Duration::from_secs(600);
        assert_eq!(backoff(0, cap, 1.0), Duration::from_secs(2));
        assert_eq!(backoff(3, cap, 1.0), Duration::from_secs(16));
        assert_eq!(backoff(30, cap, 1.0), cap);
        assert_eq!(backoff(5, cap, 0.0), Duration::ZERO);
    }
}
