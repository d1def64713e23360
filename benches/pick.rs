//! Picking a random never-contacted contact from a 1,000,000-contact
//! audience: a seek to a random key in the uncontacted index.

use criterion::{criterion_group, criterion_main, Criterion};

use colloquy::audience::ContactRow;
use colloquy::clock::SeededRng;
use colloquy::model::Identity;
use colloquy::store::Store;

fn pick(c: &mut Criterion) {
    let rows: Vec<ContactRow> = (0..1_000_000i64)
        .map(|i| ContactRow {
            line: i as u64 + 2,
            identity: Identity::UserId(i + 1),
            username: None,
            phone: None,
            user_id: Some(i + 1),
            first_name: None,
            last_name: None,
            fields: Default::default(),
        })
        .collect();
    let store = Store::temporary().unwrap();
    let rng = SeededRng::new(1);
    store
        .import_audience("big", &rows, &mut || rng.next_u64())
        .unwrap();
    c.bench_function("store/pick_uncontacted_1m", |b| {
        b.iter(|| {
            store
                .pick_uncontacted("big", rng.next_u64())
                .unwrap()
                .unwrap()
        })
    });
}

criterion_group!(benches, pick);
criterion_main!(benches);
