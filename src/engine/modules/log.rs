//! `log.debug/info/warn/error(...)`: into the host's tracing stream, tagged
//! with the engine and the dialog of the call that logs.

use mlua::{Lua, MultiValue, Result, Table};

use crate::engine::scope::current_scope;

pub fn register(lua: &Lua) -> Result<Table> {
    let m = lua.create_table()?;
    for level in ["debug", "info", "warn", "error"] {
        m.set(
            level,
            lua.create_function(move |lua, args: MultiValue| {
                let text = args
                    .iter()
                    .map(|v| v.to_string().unwrap_or_else(|_| format!("{v:?}")))
                    .collect::<Vec<_>>()
                    .join(" ");
                let (engine, dialog) = current_scope(lua)
                    .map(|s| (s.engine.clone(), s.dialog))
                    .unwrap_or_default();
                match level {
                    "debug" => tracing::debug!(engine, dialog, "{text}"),
                    "info" => tracing::info!(engine, dialog, "{text}"),
                    "warn" => tracing::warn!(engine, dialog, "{text}"),
                    _ => tracing::error!(engine, dialog, "{text}"),
                }
                Ok(())
            })?,
        )?;
    }
    Ok(m)
}
