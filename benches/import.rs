//! Audience import: parsing and storing 100,000 CSV rows into a fresh store.

use criterion::{criterion_group, criterion_main, Criterion};

use colloquy::audience;
use colloquy::clock::SeededRng;
use colloquy::store::Store;

fn csv(rows: usize) -> Vec<u8> {
    let mut s = String::from("username,phone,first_name,last_name,company\n");
    for i in 0..rows {
        s.push_str(&format!(
            "user_{i:06},+1555{i:07},First{i},Last{i},Company {}\n",
            i % 97
        ));
    }
    s.into_bytes()
}

fn import_100k(c: &mut Criterion) {
    let bytes = csv(100_000);
    let mut group = c.benchmark_group("audience");
    group.sample_size(10);
    group.bench_function("parse_100k_rows", |b| {
        b.iter(|| audience::parse("bench.csv", &bytes).rows.len())
    });
    let rows = audience::parse("bench.csv", &bytes).rows;
    group.bench_function("import_100k_rows_into_fresh_store", |b| {
        b.iter(|| {
            let store = Store::temporary().unwrap();
            let rng = SeededRng::new(1);
            store
                .import_audience("bench", &rows, &mut || rng.next_u64())
                .unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, import_100k);
criterion_main!(benches);
