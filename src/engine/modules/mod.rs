//! Host modules written in Rust, preloaded into every VM: `json`, `http`,
//! `log`, `env`, `time`, `spin`. Each file has a `register` that builds the module
//! table; [`register_all`] is the one list that wires them in.

pub mod env;
pub mod http;
pub mod json;
pub mod log;
pub mod spin;
pub mod time;

use std::collections::HashSet;
use std::sync::Arc;

use mlua::{Lua, Table};

use crate::clock::Clock;

/// What the host modules need from the host.
#[derive(Clone)]
pub struct HostEnv {
    /// Variables `env.get` may read.
    pub env_allow: Arc<HashSet<String>>,
    /// `time.now()` reads this, so simulated runs see simulated time.
    pub clock: Arc<dyn Clock>,
    pub http: reqwest::Client,
}

/// Builds every host module into `preload` under its name.
pub fn register_all(lua: &Lua, preload: &Table, host: &HostEnv) -> mlua::Result<()> {
    preload.set("json", json::register(lua)?)?;
    preload.set("http", http::register(lua, host.http.clone())?)?;
    preload.set("log", log::register(lua)?)?;
    preload.set("env", env::register(lua, host.env_allow.clone())?)?;
    preload.set("time", time::register(lua, host.clock.clone())?)?;
    preload.set("spin", spin::register(lua)?)?;
    Ok(())
}
