//! The opt-out check the answer pipeline runs on every message it routes,
//! with the shipped patterns, on replies of the lengths contacts write.

use criterion::{criterion_group, criterion_main, Criterion};

use colloquy::host::optout::{OptOut, DEFAULT_PATTERNS};

fn opt_out(c: &mut Criterion) {
    let patterns: Vec<String> = DEFAULT_PATTERNS.iter().map(|p| p.to_string()).collect();
    let o = OptOut::new(&patterns);
    let replies = [
        ("one_word", "m17"),
        (
            "a_sentence",
            "Hi, sounds interesting, could you tell me more about the pricing for teams?",
        ),
        (
            "russian",
            "Здравствуйте, а сколько стоит тариф для команды из десяти человек?",
        ),
        ("opt_out", "Please stop messaging me"),
    ];
    for (name, text) in replies {
        c.bench_function(&format!("optout/{name}"), |b| {
            b.iter(|| o.matches(std::hint::black_box(text)))
        });
    }
}

criterion_group!(benches, opt_out);
criterion_main!(benches);
