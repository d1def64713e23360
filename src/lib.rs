//! colloquy: a headless host that runs Telegram conversation campaigns.
//!
//! An operator declares campaigns in `config.toml`: audiences of contacts
//! (CSV), a pool of Telegram user accounts, and a dialog engine written in
//! Lua. The host opens dialogs with contacts never contacted before, lets the
//! engine answer every reply, revives dialogs that went quiet, and never lets
//! an account exceed its safety limits.
//!
//! # Layout
//!
//! - [`cli`]: the command line; `main.rs` only calls [`cli::main`];
//!   `cli::chat` is `colloquy chat`.
//! - [`config`]: `config.toml`, parsed with file positions and validated.
//! - [`problem`]: what is wrong with the user's input, one sentence each.
//! - [`audience`]: audience CSV files to contact rows.
//! - [`model`]: campaigns, accounts, contacts, dialogs, messages, and the
//!   status transition tables.
//! - [`transition`]: what an event does to a dialog, the one place where
//!   a dialog changes.
//! - [`store`]: the sled store; the only module that names sled.
//! - [`transport`]: the boundary to Telegram and its classified errors.
//! - [`safety`]: AccountSafety, the only gate to the transport.
//! - [`engine`]: the Lua engine runtime; the only module that names mlua.
//! - [`host`]: runners, conductors, reviver, startup and shutdown.
//! - [`sim`]: the simulated Telegram.
//! - [`telegram`]: the Telegram transport through grammers: sessions,
//!   login, exactly-once sends, catch-up.
//! - [`report`]: what `status`/`dialogs`/`dialog` print.
//! - [`variants`]: which variant a new dialog gets (fixed weights or a
//!   bandit), and how variants compare.
//! - [`clock`]: the injected clock and seeded random source.
//! - [`concurrent`]: `run_all`, the pipeline's way to run a batch of
//!   futures.
//! - [`logging`]: tracing output.

pub mod audience;
pub mod cli;
pub mod clock;
pub mod concurrent;
pub mod config;
pub mod console;
pub mod engine;
pub mod export;
pub mod host;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod problem;
pub mod report;
pub mod safety;
pub mod sim;
pub mod store;
pub mod telegram;
pub mod transition;
pub mod transport;
pub mod variants;
