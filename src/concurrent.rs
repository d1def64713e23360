//! Running many futures at once, for the batches of the answer pipeline,
//! and waiting for our own threads.

/// Waits for an answer from a thread of our own (an engine worker, the
/// store's flusher). With `hold_clock` (tests on tokio's paused clock) it
/// waits from a blocking task, which keeps the clock from auto-advancing
/// meanwhile: to tokio every task would look idle.
pub async fn receive<T: Send + 'static>(
    rx: tokio::sync::oneshot::Receiver<T>,
    hold_clock: bool,
) -> Option<T> {
    if hold_clock {
        tokio::task::spawn_blocking(move || rx.blocking_recv())
            .await
            .ok()
            .and_then(Result::ok)
    } else {
        rx.await.ok()
    }
}

/// Runs futures concurrently and returns their outputs in order, as
/// `join_all` does. Each is polled once as it comes: most of a batch's
/// (engine calls without HTTP, sends to a transport that answers at once)
/// finish right there, without the bookkeeping of a set of futures; the
/// rest wait together.
pub async fn run_all<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    use futures_util::{FutureExt, StreamExt};
    let mut out: Vec<Option<F::Output>> = Vec::new();
    let mut waiting = futures_util::stream::FuturesUnordered::new();
    for (i, future) in futures.enumerate() {
        let mut future = Box::pin(future);
        // Polled with a no-op waker: one that must wait is polled again,
        // with the real one, once it joins the others.
        match (&mut future).now_or_never() {
            Some(done) => out.push(Some(done)),
            None => {
                out.push(None);
                waiting.push(async move { (i, future.await) });
            }
        }
    }
    while let Some((i, done)) = waiting.next().await {
        out[i] = Some(done);
    }
    out.into_iter()
        .map(|o| o.expect("every future ran to its end"))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn outputs_come_in_order_whether_or_not_a_future_waited() {
        let futures = (0..10u64).map(|i| async move {
            if i % 3 == 0 {
                tokio::time::sleep(Duration::from_millis(100 - i)).await;
            }
            i
        });
        let started = tokio::time::Instant::now();
        assert_eq!(run_all(futures).await, (0..10).collect::<Vec<_>>());
        // The waits overlapped.
        assert!(started.elapsed() < Duration::from_millis(150));
        assert!(run_all(std::iter::empty::<std::future::Ready<()>>())
            .await
            .is_empty());
    }
}
