//! An in-memory transport for driving the whole host without a network:
//! the throughput benchmark and `tests/pipeline.rs` share it. Every send is
//! taken at once; `on_send` sees each one first.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use colloquy::clock::{BoxFuture, Clock, SystemClock};
use colloquy::model::{IdempotencyKey, Identity};
use colloquy::transport::{
    hand_over, Delivered, Inbound, IncomingMessage, OutgoingMessage, SendError, Transport,
};
use tokio::sync::mpsc;

type OnSend = Box<dyn Fn(&OutgoingMessage) + Send + Sync>;

pub struct MemoryTransport {
    /// Where incoming messages go, once the host subscribed.
    pub sink: Mutex<Option<mpsc::Sender<Inbound>>>,
    pub sends: AtomicUsize,
    /// Replies in the chats that were never delivered to the inbox.
    pub lost: Mutex<Vec<IncomingMessage>>,
    /// Notified when `expected` messages were sent.
    pub done: tokio::sync::Notify,
    expected: usize,
    on_send: OnSend,
}

impl MemoryTransport {
    pub fn new(
        expected: usize,
        on_send: impl Fn(&OutgoingMessage) + Send + Sync + 'static,
    ) -> Self {
        MemoryTransport {
            sink: Mutex::new(None),
            sends: AtomicUsize::new(0),
            lost: Mutex::new(Vec::new()),
            done: tokio::sync::Notify::new(),
            expected,
            on_send: Box::new(on_send),
        }
    }

    /// The host's inbox.
    pub fn inbox(&self) -> mpsc::Sender<Inbound> {
        self.sink
            .lock()
            .unwrap()
            .clone()
            .expect("the host subscribed")
    }
}

impl Transport for MemoryTransport {
    fn send(&self, msg: OutgoingMessage) -> BoxFuture<'_, Result<Delivered, SendError>> {
        (self.on_send)(&msg);
        let n = self.sends.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.expected {
            self.done.notify_one();
        }
        let at = SystemClock.now();
        Box::pin(async move {
            Ok(Delivered {
                transport_id: n as i64,
                at,
            })
        })
    }

    /// Nothing is ever left unconfirmed here: a send either returned or
    /// never happened.
    fn was_delivered(
        &self,
        _: &str,
        _: &Identity,
        _: IdempotencyKey,
    ) -> BoxFuture<'_, Result<Option<Delivered>, SendError>> {
        Box::pin(async { Ok(None) })
    }

    fn catch_up(
        &self,
        account: &str,
        contact: &Identity,
        after: i64,
    ) -> BoxFuture<'_, Result<(), SendError>> {
        let missed: Vec<IncomingMessage> = self
            .lost
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.account == account && &m.contact == contact)
            .filter(|m| m.transport_id > after)
            .cloned()
            .collect();
        let sink = self.sink.lock().unwrap().clone();
        Box::pin(async move {
            let Some(sink) = sink else { return Ok(()) };
            for message in missed {
                if !hand_over(&sink, message).await {
                    break;
                }
            }
            Ok(())
        })
    }

    fn subscribe(&self, sink: mpsc::Sender<Inbound>) -> BoxFuture<'_, Result<(), SendError>> {
        *self.sink.lock().unwrap() = Some(sink);
        Box::pin(async { Ok(()) })
    }
}
