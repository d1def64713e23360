//! Making writes durable: the group flusher (one fsync for everyone who
//! asked before it started) and the witness's mark after each flush.

use super::*;

/// A flush's outcome as its waiters get it: a full disk kept apart, so
/// that it reads as its own sentence.
#[derive(Clone)]
pub(super) enum Flushed {
    Done,
    DiskFull,
    Failed(String),
}

pub(super) type FlushWaiter = tokio::sync::oneshot::Sender<Flushed>;
pub(super) type FlushQueue = std::sync::mpsc::Sender<FlushWaiter>;

fn mark(accounts: &accounts::AccountCache, counts: &Counts) -> witness::Mark {
    witness::Mark {
        account_writes: accounts.writes(),
        identities: counts.identities.load(Ordering::SeqCst),
        claims: counts.claims.load(Ordering::SeqCst),
    }
}

/// Starts the store's flusher: a thread of its own that serves flush
/// requests in batches, one fsync for everyone who asked before it started
/// (group commit). A thread rather than sled's `flush_async`, which hands
/// each flush to its thread pool and back. It ends when the store's last
/// clone goes.
fn group_flush(
    db: sled::Db,
    mark: impl Fn() -> witness::Mark + Send + 'static,
    witness: Option<Arc<witness::Witness>>,
) -> std::io::Result<FlushQueue> {
    let (tx, rx) = std::sync::mpsc::channel::<FlushWaiter>();
    std::thread::Builder::new()
        .name("store-flush".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut waiters = vec![first];
                waiters.extend(rx.try_iter());
                let mark = mark();
                let result = match db.flush().map_err(StoreError::from) {
                    Ok(_) => Flushed::Done,
                    Err(StoreError::DiskFull) => Flushed::DiskFull,
                    Err(e) => Flushed::Failed(e.to_string()),
                };
                if let (Flushed::Done, Some(witness)) = (&result, &witness) {
                    witness.saw(mark, false);
                }
                for w in waiters {
                    let _ = w.send(result.clone());
                }
            }
        })?;
    Ok(tx)
}

impl Store {
    /// Makes everything written so far durable.
    pub fn flush(&self) -> Result<(), StoreError> {
        let mark = self.mark();
        self.db.flush()?;
        if let Some(witness) = &self.witness {
            witness.saw(mark, true);
        }
        Ok(())
    }

    /// How far the store has got (see `witness.rs`).
    pub(super) fn mark(&self) -> witness::Mark {
        mark(&self.accounts, &self.counts)
    }

    /// For tests on tokio's paused clock: while a flush is in progress (on
    /// the store's own thread) the clock must not auto-advance, or a
    /// shutdown's grace period would pass during one flush. A blocking
    /// task waiting for it holds the clock, as the engines' calls do.
    pub fn hold_paused_clock(&self, on: bool) {
        self.hold_clock.store(on, Ordering::Relaxed);
    }

    /// Makes everything written so far durable without blocking the
    /// runtime's thread. Called before anything leaves the host (a send) or
    /// is acknowledged to the transport (a received message), so a crash
    /// can never lose a record of something the outside world saw.
    pub async fn flush_async(&self) -> Result<(), StoreError> {
        self.start_flush().await
    }

    /// [`Store::flush_async`], asked for at once: what the caller does
    /// before awaiting the result runs while the disk syncs.
    pub fn start_flush(&self) -> impl std::future::Future<Output = Result<(), StoreError>> + '_ {
        let started = std::time::Instant::now();
        let asked = self.ask_flush();
        async move {
            let hold = self.hold_clock.load(Ordering::Relaxed);
            let answered = match asked {
                Some(rx) => crate::concurrent::receive(rx, hold).await,
                None => None,
            };
            let flushed = match answered {
                Some(Flushed::Done) => Ok(()),
                Some(Flushed::DiskFull) => Err(StoreError::DiskFull),
                Some(Flushed::Failed(e)) => Err(StoreError::Storage(e)),
                // No flusher (no thread could be started, or it is gone):
                // flush here.
                None => self.db.flush_async().await.map(|_| ()).map_err(Into::into),
            };
            crate::metrics::observe("colloquy_store_flush_seconds", &[], started.elapsed());
            flushed
        }
    }

    /// Queues a flush with the store's flusher; `None` when there is none.
    fn ask_flush(&self) -> Option<tokio::sync::oneshot::Receiver<Flushed>> {
        let queue = self.flusher.get_or_init(|| {
            let (accounts, counts) = (self.accounts.clone(), self.counts.clone());
            let mark = move || mark(&accounts, &counts);
            group_flush(self.db.clone(), mark, self.witness.clone()).ok()
        });
        let (tx, rx) = tokio::sync::oneshot::channel();
        queue.as_ref()?.send(tx).ok()?;
        Some(rx)
    }
}
