//! `time.now()` (unix seconds, from the host's clock) and
//! `time.duration("2h")` (seconds).

use std::sync::Arc;

use mlua::{Lua, Result, Table};

use crate::clock::Clock;
use crate::config::Dur;

pub fn register(lua: &Lua, clock: Arc<dyn Clock>) -> Result<Table> {
    let m = lua.create_table()?;
    m.set(
        "now",
        lua.create_function(move |_, ()| Ok(clock.now().as_secs_f64()))?,
    )?;
    m.set(
        "duration",
        lua.create_function(|_, s: String| {
            s.parse::<Dur>()
                .map(|d| d.0.as_secs_f64())
                .map_err(|e| mlua::Error::runtime(format!("time.duration: {e}")))
        })?,
    )?;
    Ok(m)
}
