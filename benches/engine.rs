//! Engine calls: one `get_response` on echo.lua and scripted.lua with a
//! 20-message history, ctx construction included; directly on a VM and
//! through the runtime's worker pool; and the time a reload takes.

use std::path::Path;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};

use colloquy::clock::SystemClock;
use colloquy::config::Config;
use colloquy::engine::ctx::{ContactView, DialogView, HistoryEntry};
use colloquy::engine::modules::HostEnv;
use colloquy::engine::vm::{Budgets, Vm};
use colloquy::engine::{Call, Ctx, EngineRuntime};

fn ctx() -> Ctx {
    let history = (0..20)
        .map(|i| HistoryEntry {
            direction: if i % 2 == 0 { "out" } else { "in" }.into(),
            text: format!("message number {i} of this dialog, about the product"),
            at: 1_768_000_000.0 + i as f64,
        })
        .collect();
    Ctx {
        dialog: DialogView {
            id: 1,
            status: "active".into(),
            ..Default::default()
        },
        contact: ContactView {
            first_name: Some("Ann".into()),
            username: Some("ann_a".into()),
            ..Default::default()
        },
        history: Arc::new(history),
        state: serde_json::json!({"stage": "qualified", "turns": 3}),
        ..Default::default()
    }
}

fn engines(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config_path = root.join("config.toml");
    let config = Config::load(&config_path).unwrap();
    let (rt, problems) = EngineRuntime::start(&config, Arc::new(SystemClock), 2);
    assert!(problems.is_empty(), "{problems:?}");
    let call = Call::Response {
        text: "how much does it cost?".into(),
        at: 1_768_000_100.0,
    };

    let local = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let host = HostEnv {
        env_allow: Arc::new(Default::default()),
        clock: Arc::new(SystemClock),
        http: reqwest::Client::new(),
    };
    let budgets = Budgets {
        instructions: 10_000_000,
        time: std::time::Duration::from_secs(60),
        memory: 64 << 20,
    };
    let vm = Vm::new(rt.snapshot(), budgets, &host, 1).unwrap();
    for engine in ["echo", "scripted"] {
        let ctx = ctx();
        c.bench_function(
            &format!("engine/vm_{engine}_get_response_20_history"),
            |b| {
                b.iter_batched(
                    || ctx.clone(),
                    |ctx| local.block_on(vm.call(engine, &call, ctx)).unwrap(),
                    criterion::BatchSize::SmallInput,
                )
            },
        );
    }

    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    for engine in ["echo", "scripted"] {
        c.bench_function(
            &format!("engine/runtime_{engine}_get_response_20_history"),
            |b| {
                b.iter(|| {
                    multi
                        .block_on(rt.call(engine, call.clone(), ctx()))
                        .unwrap()
                })
            },
        );
    }

    let mut group = c.benchmark_group("engine");
    group.sample_size(10);
    group.bench_function("reload_all_engines", |b| b.iter(|| rt.reload()));
    group.finish();
}

criterion_group!(benches, engines);
criterion_main!(benches);
