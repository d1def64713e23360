//! `json.encode(value)` and `json.decode(text)`.

use mlua::{Lua, LuaSerdeExt, Result, Table, Value};

use crate::engine::scope::{from_lua_options, to_lua_options};

pub fn register(lua: &Lua) -> Result<Table> {
    let m = lua.create_table()?;
    m.set(
        "encode",
        lua.create_function(|lua, v: Value| {
            // A call's ctx builds its fields on first read: all of them now.
            if let Value::Table(t) = &v {
                if let Some(meta) = t.metatable() {
                    if let Ok(Value::Function(f)) = meta.raw_get::<Value>("__materialize") {
                        f.call::<()>(t)?;
                    }
                }
            }
            let json: serde_json::Value = lua
                .from_value_with(v, from_lua_options())
                .map_err(|e| mlua::Error::runtime(format!("json.encode: {e}")))?;
            Ok(json.to_string())
        })?,
    )?;
    m.set(
        "decode",
        lua.create_function(|lua, text: mlua::LuaString| {
            let json: serde_json::Value = serde_json::from_slice(&text.as_bytes())
                .map_err(|e| mlua::Error::runtime(format!("json.decode: {e}")))?;
            lua.to_value_with(&json, to_lua_options())
        })?,
    )?;
    Ok(m)
}
