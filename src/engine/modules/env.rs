//! `env.get(NAME)`: environment variables listed in `[engines] env_allow`;
//! any other name is an error, so a typo is not a silent nil.

use std::collections::HashSet;
use std::sync::Arc;

use mlua::{Lua, Result, Table};

pub fn register(lua: &Lua, allow: Arc<HashSet<String>>) -> Result<Table> {
    let m = lua.create_table()?;
    m.set(
        "get",
        lua.create_function(move |_, name: String| {
            if !allow.contains(&name) {
                return Err(mlua::Error::runtime(format!(
                    "env.get: \"{name}\" is not in [engines] env_allow"
                )));
            }
            Ok(std::env::var(&name).ok())
        })?,
    )?;
    Ok(m)
}
