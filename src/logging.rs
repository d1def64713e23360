//! Log output: tracing to stderr, filtered by `RUST_LOG` (default `info`),
//! as human-readable lines or JSON objects.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// What is logged without `RUST_LOG`.
const DEFAULT_FILTER: &str = "info,sled=off,pagecache=off,grammers_session=warn,grammers_mtsender=warn,grammers_client=warn,hyper=warn,reqwest=warn";

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

/// Installs the global subscriber. Safe to call once per process.
pub fn init(format: LogFormat) {
    // The libraries' own lines are off unless asked for by name
    // (`RUST_LOG=info,sled=debug`): sled reports what the store then says
    // in one sentence, dozens of times and as debug dumps.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    // A log line that cannot be written (stderr is a pipe nobody reads any
    // more) is dropped: the default would report it with `eprintln!`, which
    // panics on that same closed stderr, in whatever task was logging.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    let _ = match format {
        // Colours for a terminal only: a file or a journal gets plain text.
        LogFormat::Pretty => builder
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}
