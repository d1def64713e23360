//! What an event does to a dialog: [`apply`], the one place where a dialog
//! changes, and [`open`], where one begins. Pure: the dialog's records in,
//! a [`Change`] out. The store reads the records and writes the change
//! through its one write path; the conductor, the reviver, the answer
//! pipeline and the replay of the store's journal all come through here.
//!
//! What a reply's delivery does to its message (sent, cancelled) is
//! [`settle`]: it changes no dialog.

use crate::clock::Timestamp;
use crate::model::{
    ContactId, Delivery, Dialog, DialogId, DialogStatus, DialogVariant, Direction, DoNotContact,
    IdempotencyKey, Message, MessageKind, TransitionError,
};

/// A dialog to create for a claimed contact.
#[derive(Debug, Clone)]
pub struct NewDialog {
    pub campaign: String,
    pub account: String,
    pub contact: ContactId,
    pub at: Timestamp,
    pub variant: Option<DialogVariant>,
}

/// An outbound message to record before it is sent.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub kind: MessageKind,
    pub text: String,
    pub key: IdempotencyKey,
}

/// What came of handling an event of a dialog: the engine's answer, a
/// follow-up, the reviver's look at it.
#[derive(Debug, Default)]
pub struct Apply<'a> {
    pub at: Timestamp,
    /// The incoming message (its seq) that is now handled.
    pub handled: Option<u64>,
    pub state: Option<&'a serde_json::Value>,
    pub outbound: &'a [Outbound],
    /// The status to take after `outbound` is sent (at once if it is empty).
    pub ending: Option<DialogStatus>,
    /// The reviver looked at the dialog.
    pub reviewed: bool,
}

/// An incoming message from the dialog's contact.
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    pub transport_id: i64,
    pub text: &'a str,
    pub at: Timestamp,
}

/// Something that happens to a dialog.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// A message from the contact. `handled`: answered in the same change
    /// (see [`answer`]); otherwise it waits, unhandled, for the dialog's
    /// conductor.
    Incoming {
        message: Incoming<'a>,
        handled: bool,
    },
    /// What came of handling an event (see [`Apply`]). A dialog no longer
    /// live only gets its message marked handled; an ending one only its
    /// review noted.
    Handled(&'a Apply<'a>),
    /// A message outside an answer: an opening sent again, a human's
    /// answer (which a handed-off dialog takes too).
    Outbound { out: &'a Outbound, at: Timestamp },
    /// The messages the dialog waited for are sent: it takes its ending.
    EndingReached,
    /// A status by the transition table: a handoff, a dialog returned to
    /// the host, finished by its human, dead, in error.
    Status(&'a DialogStatus),
    /// The contact opted out: the dialog ends, the contact goes on the
    /// do-not-contact list, what waits to be sent is cancelled and what
    /// waits to be answered is dropped.
    OptedOut {
        waiting: &'a [Message],
        unhandled: &'a [u64],
    },
    /// The dialog's account is out of service: the dialog is blocked and
    /// what waits to be sent is cancelled.
    Blocked {
        waiting: &'a [Message],
        reason: &'a str,
    },
}

/// What an event changed: the dialog as it is now, and its messages.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub dialog: Dialog,
    /// New messages, in order, placed (their seqs given); outbound ones
    /// pending.
    pub appended: Vec<Message>,
    /// Messages rewritten (cancelled).
    pub rewritten: Vec<Message>,
    /// Incoming messages (seqs) now handled.
    pub handled: Vec<u64>,
    /// Incoming messages (seqs) that wait to be handled.
    pub unhandled: Vec<u64>,
    /// The contact goes on the do-not-contact list.
    pub do_not_contact: Option<DoNotContact>,
}

/// Why an event cannot happen to a dialog; nothing changes.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error(transparent)]
    Transition(#[from] TransitionError),
    #[error("dialog {id} is {status}; nothing more is sent in it")]
    Ended { id: DialogId, status: &'static str },
}

/// A new dialog, with its opening (pending) if it has one.
pub fn open(id: DialogId, new: &NewDialog, opening: Option<&Outbound>) -> Change {
    let dialog = Dialog {
        id,
        campaign: new.campaign.clone(),
        account: new.account.clone(),
        contact: new.contact,
        status: DialogStatus::Active,
        started_at: new.at,
        follow_ups_sent: 0,
        last_inbound_at: None,
        last_outbound_at: None,
        state: serde_json::Value::Object(Default::default()),
        next_seq: 0,
        reviewed_at: None,
        ending: None,
        indexed_at: None,
        max_incoming_id: None,
        variant: new.variant.clone(),
    };
    let mut change = Change::of(dialog);
    if let Some(out) = opening {
        change.append(outbound_message(out, new.at));
    }
    change
}

/// What `event` does to `dialog`.
pub fn apply(dialog: Dialog, event: Event<'_>) -> Result<Change, Refused> {
    let mut c = Change::of(dialog);
    c.take(event)?;
    Ok(c)
}

/// An incoming message answered at once: the answer pipeline's step, and
/// the store journal's when it replays one.
pub fn answer(dialog: Dialog, message: Incoming<'_>, a: &Apply<'_>) -> Result<Change, Refused> {
    apply(
        dialog,
        Event::Incoming {
            message,
            handled: true,
        },
    )?
    .then(Event::Handled(a))
}

/// A pending message sent (with the transport's id) or cancelled.
pub fn settle(mut msg: Message, delivery: Delivery, transport_id: Option<i64>) -> Message {
    debug_assert_eq!(msg.delivery, Some(Delivery::Pending), "settled twice");
    msg.delivery = Some(delivery);
    msg.transport_id = transport_id.or(msg.transport_id);
    msg
}

impl Change {
    fn of(dialog: Dialog) -> Change {
        Change {
            dialog,
            appended: Vec::new(),
            rewritten: Vec::new(),
            handled: Vec::new(),
            unhandled: Vec::new(),
            do_not_contact: None,
        }
    }

    /// This change followed by what `event` does.
    pub fn then(mut self, event: Event<'_>) -> Result<Change, Refused> {
        self.take(event)?;
        Ok(self)
    }

    /// This change followed by `next`, a change of the dialog as this one
    /// left it (the journal's answers of one dialog, folded).
    pub fn and(mut self, next: Change) -> Change {
        debug_assert_eq!(
            next.dialog.next_seq,
            self.dialog.next_seq + next.appended.len() as u64
        );
        self.dialog = next.dialog;
        self.appended.extend(next.appended);
        self.rewritten.extend(next.rewritten);
        self.handled.extend(next.handled);
        self.unhandled.extend(next.unhandled);
        self.do_not_contact = next.do_not_contact.or(self.do_not_contact);
        self
    }

    /// Adds what `event` does to the dialog as this change left it.
    fn take(&mut self, event: Event<'_>) -> Result<(), Refused> {
        match event {
            Event::Incoming { message, handled } => {
                let seq = self.append(incoming_message(message));
                if !handled {
                    self.unhandled.push(seq);
                }
            }
            Event::Handled(a) => self.handle(a)?,
            Event::Outbound { out, at } => {
                let d = &self.dialog;
                let human = out.kind == MessageKind::Human && d.status == DialogStatus::Handoff;
                if !d.status.is_live() && !human {
                    return Err(Refused::Ended {
                        id: d.id,
                        status: d.status.label(),
                    });
                }
                self.append(outbound_message(out, at));
            }
            Event::EndingReached => {
                let d = &mut self.dialog;
                if let Some(ending) = d.ending.take() {
                    if d.status.can_become(&ending) {
                        d.status = ending;
                    }
                }
            }
            Event::Status(next) => {
                self.dialog.status = self.dialog.status.transition(next.clone())?
            }
            Event::OptedOut { waiting, unhandled } => {
                let d = &mut self.dialog;
                d.ending = None;
                if d.status.can_become(&DialogStatus::OptedOut) {
                    d.status = DialogStatus::OptedOut;
                }
                self.do_not_contact = Some(DoNotContact::OptedOut);
                self.cancel(waiting, "the contact opted out");
                self.handled.extend_from_slice(unhandled);
            }
            Event::Blocked { waiting, reason } => {
                let d = &mut self.dialog;
                d.status = d.status.transition(DialogStatus::Blocked)?;
                d.ending = None;
                self.cancel(waiting, reason);
            }
        }
        Ok(())
    }

    /// The outbound messages this change recorded as pending.
    pub fn pending(&self) -> impl Iterator<Item = &Message> {
        self.appended
            .iter()
            .filter(|m| m.delivery == Some(Delivery::Pending))
    }

    fn handle(&mut self, a: &Apply<'_>) -> Result<(), Refused> {
        self.handled.extend(a.handled);
        let d = &mut self.dialog;
        if !d.status.is_live() {
            return Ok(());
        }
        if a.reviewed {
            d.reviewed_at = Some(a.at);
        }
        if d.ending.is_some() {
            return Ok(());
        }
        if let Some(state) = a.state {
            d.state = state.clone();
        }
        for out in a.outbound {
            self.append(outbound_message(out, a.at));
        }
        let d = &mut self.dialog;
        match &a.ending {
            Some(ending) if a.outbound.is_empty() => {
                d.status = d.status.transition(ending.clone())?
            }
            Some(ending) => d.ending = Some(ending.clone()),
            None => {}
        }
        Ok(())
    }

    /// Puts a message at the end of the dialog; its seq.
    fn append(&mut self, mut msg: Message) -> u64 {
        place(&mut self.dialog, &mut msg);
        let seq = msg.seq;
        self.appended.push(msg);
        seq
    }

    fn cancel(&mut self, waiting: &[Message], reason: &str) {
        for m in waiting {
            debug_assert_eq!(m.dialog, self.dialog.id);
            let cancelled = Delivery::Cancelled {
                reason: reason.to_string(),
            };
            self.rewritten.push(settle(m.clone(), cancelled, None));
        }
    }
}

/// Gives a message its place at the end of a dialog and moves the dialog's
/// counters on.
fn place(dialog: &mut Dialog, msg: &mut Message) {
    msg.dialog = dialog.id;
    msg.seq = dialog.next_seq;
    dialog.next_seq += 1;
    match msg.direction {
        Direction::In => {
            if let Some(id) = msg.transport_id {
                dialog.max_incoming_id = match dialog.max_incoming_id {
                    Some(max) => Some(max.max(id)),
                    None if dialog.last_inbound_at.is_none() => Some(id),
                    // Stored before the highest id was kept.
                    None => None,
                };
            }
            dialog.last_inbound_at = Some(msg.at);
        }
        Direction::Out => {
            dialog.last_outbound_at = Some(msg.at);
            if msg.kind == Some(MessageKind::FollowUp) {
                dialog.follow_ups_sent += 1;
            }
        }
    }
}

fn incoming_message(m: Incoming<'_>) -> Message {
    Message {
        dialog: 0,
        seq: 0,
        direction: Direction::In,
        kind: None,
        text: m.text.to_string(),
        at: m.at,
        key: None,
        delivery: None,
        transport_id: Some(m.transport_id),
    }
}

fn outbound_message(out: &Outbound, at: Timestamp) -> Message {
    Message {
        dialog: 0,
        seq: 0,
        direction: Direction::Out,
        kind: Some(out.kind),
        text: out.text.clone(),
        at,
        key: Some(out.key),
        delivery: Some(Delivery::Pending),
        transport_id: None,
    }
}

#[cfg(test)]
pub(crate) mod tests;
