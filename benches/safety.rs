//! One safety decision plus its reservation, including the store write, on an
//! account with a full day of sends in its record.

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};

use colloquy::clock::{BoxFuture, Clock, SeededRng, Timestamp};
use colloquy::config::Config;
use colloquy::model::{IdempotencyKey, MessageKind};
use colloquy::safety::alerts::Alerts;
use colloquy::safety::{AccountSafety, Decision};
use colloquy::store::Store;

/// A clock that moves 15 minutes on every read: 96 sends a day, just under
/// the cap of 100, so the record holds a full day of sends.
struct Stepping(AtomicI64);

impl Clock for Stepping {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.fetch_add(900_000, Ordering::Relaxed))
    }
    fn sleep_until(&self, _: Timestamp) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

fn reserve(c: &mut Criterion) {
    let text = "[safety]\nmax_per_hour = 20\nmax_per_day = 100\nmax_new_dialogs_per_day = 20\nmin_interval = \"30s\"\njitter = \"15s\"\n[[accounts]]\nname = \"a\"\n";
    let config = Arc::new(Config::parse(Path::new("b.toml"), text).unwrap());
    let store = Store::temporary().unwrap();
    let gate = AccountSafety::new(
        store,
        config,
        Arc::new(Stepping(AtomicI64::new(1_768_000_000_000))),
        Arc::new(SeededRng::new(1)),
        Alerts::log_only(),
    );
    let mut key = 0u64;
    c.bench_function("safety/decide_and_reserve_with_store_write", |b| {
        b.iter(|| {
            key += 1;
            let d = gate
                .try_reserve("a", MessageKind::Reply, None, IdempotencyKey(key))
                .unwrap();
            assert_eq!(d, Decision::Allow);
        })
    });
}

criterion_group!(benches, reserve);
criterion_main!(benches);
