//! Time and randomness, injected.
//!
//! Nothing in the host reads the wall clock or an unseeded random source
//! directly: it asks a [`Clock`] and a [`SeededRng`]. Production uses
//! [`SystemClock`]; tests use [`TokioClock`], which follows tokio's (possibly
//! paused) time, so a multi-day run finishes in milliseconds and repeats exactly.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use rand::{Rng as _, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// A boxed, sendable future, the return type of the boundary traits.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A point in time: milliseconds since the Unix epoch.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The epoch itself, used as "never" for optional times.
    pub const EPOCH: Timestamp = Timestamp(0);

    pub fn from_secs_f64(secs: f64) -> Timestamp {
        Timestamp((secs * 1000.0).round() as i64)
    }

    /// Unix seconds, the unit engines and the wire log speak.
    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / 1000.0
    }

    pub fn saturating_add(self, d: Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_add(d.as_millis().min(i64::MAX as u128) as i64),
        )
    }

    pub fn saturating_sub(self, d: Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_sub(d.as_millis().min(i64::MAX as u128) as i64),
        )
    }

    /// The time from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0).max(0) as u64)
    }

    /// RFC 3339 in UTC, for humans.
    pub fn to_rfc3339(self) -> String {
        chrono::DateTime::from_timestamp_millis(self.0)
            .map(|t| t.format("%Y-%m-%d %H:%M:%SZ").to_string())
            .unwrap_or_else(|| format!("{}ms", self.0))
    }
}

/// Where "now" comes from, and how to wait for a later "now".
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
    /// Completes once `now() >= at`.
    fn sleep_until(&self, at: Timestamp) -> BoxFuture<'static, ()>;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp(d.as_millis() as i64)
    }

    fn sleep_until(&self, at: Timestamp) -> BoxFuture<'static, ()> {
        let wait = at.since(self.now());
        Box::pin(tokio::time::sleep(wait))
    }
}

/// A clock that starts at a chosen time and advances with tokio's clock,
/// `scale` simulated milliseconds per tokio millisecond. Under
/// `tokio::time::pause()` it only moves when the runtime auto-advances or a
/// test calls `advance`, which makes time-dependent tests exact.
#[derive(Debug, Clone)]
pub struct TokioClock {
    /// Simulated time at `origin`.
    start: Timestamp,
    /// The tokio instant the clock was created at.
    origin: tokio::time::Instant,
    /// Simulated seconds per real second.
    scale: f64,
}

impl TokioClock {
    pub fn new(start: Timestamp, scale: f64) -> TokioClock {
        TokioClock {
            start,
            origin: tokio::time::Instant::now(),
            scale: if scale > 0.0 { scale } else { 1.0 },
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        // Rounded, not truncated: 7290.917 s is 7290916.9999 ms in floating
        // point, and a sleep until 7290917 must end with now() there.
        let real = self.origin.elapsed().as_secs_f64() * 1000.0;
        Timestamp(self.start.0 + (real * self.scale).round() as i64)
    }

    fn sleep_until(&self, at: Timestamp) -> BoxFuture<'static, ()> {
        let sim_wait = at.0 - self.start.0;
        let real_ms = (sim_wait.max(0) as f64 / self.scale).ceil() as u64;
        let deadline = self.origin + Duration::from_millis(real_ms);
        Box::pin(tokio::time::sleep_until(deadline))
    }
}

/// A seeded random source shared by the parts of one host. The same seed and
/// the same sequence of calls give the same numbers.
#[derive(Debug)]
pub struct SeededRng {
    inner: Mutex<ChaCha8Rng>,
}

impl SeededRng {
    pub fn new(seed: u64) -> SeededRng {
        SeededRng {
            inner: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
        }
    }

    pub fn next_u64(&self) -> u64 {
        self.lock().random()
    }

    /// A uniform float in `[0, 1)`.
    pub fn unit(&self) -> f64 {
        self.lock().random()
    }

    /// True with probability `p`.
    pub fn chance(&self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }

    /// A uniform duration in `[lo, hi]`.
    pub fn duration_between(&self, lo: Duration, hi: Duration) -> Duration {
        if hi <= lo {
            return lo;
        }
        let span = (hi - lo).as_millis() as u64;
        lo + Duration::from_millis(self.lock().random_range(0..=span))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ChaCha8Rng> {
        // A poisoned lock only means another thread panicked mid-draw; the
        // generator state is still valid.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_numbers() {
        let a = SeededRng::new(7);
        let b = SeededRng::new(7);
        let xs: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..5).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
    }

    #[test]
    fn duration_between_stays_in_range() {
        let rng = SeededRng::new(1);
        for _ in 0..1000 {
            let d = rng.duration_between(Duration::from_secs(30), Duration::from_secs(60));
            assert!(d >= Duration::from_secs(30) && d <= Duration::from_secs(60));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn tokio_clock_follows_paused_time_with_scale() {
        let clock = TokioClock::new(Timestamp(1_000_000), 60.0);
        assert_eq!(clock.now(), Timestamp(1_000_000));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(clock.now(), Timestamp(1_060_000));
        let target = Timestamp(1_000_000 + 3_600_000);
        clock.sleep_until(target).await;
        assert!(clock.now() >= target);
    }

    #[tokio::test(start_paused = true)]
    async fn after_sleeping_until_a_moment_now_has_reached_it() {
        // Float rounding once left `now()` a millisecond short, so a waiter
        // woke, saw the moment not yet reached, and slept zero time forever.
        for scale in [1.0, 3.0, 60.0, 10_000.0] {
            let clock = TokioClock::new(Timestamp(1_767_600_000_000), scale);
            for step in [1, 7, 999, 7_290_917, 86_400_001] {
                let target = Timestamp(clock.now().0 + step);
                clock.sleep_until(target).await;
                assert!(clock.now() >= target, "scale {scale}, step {step}");
            }
        }
    }
}
