//! `spin.render(text, seed)`: spintax (see [`crate::engine::spin`]).
//! `seed` is a whole number, or `ctx`: then the dialog (the contact at an
//! opening) and the number of messages so far pick the alternatives, so a
//! retried or restarted call renders the same text. `spin(text, seed)` is
//! the same call.

use mlua::{Lua, Result, Table, Value};

use crate::engine::spin;

pub fn register(lua: &Lua) -> Result<Table> {
    let m = lua.create_table()?;
    let render = lua.create_function(|_, (text, seed): (String, Value)| {
        let seed = seed_from(&seed)?;
        spin::render(&text, seed).map_err(|e| mlua::Error::runtime(format!("spin: {e}")))
    })?;
    m.set("render", render.clone())?;
    let meta = lua.create_table()?;
    meta.set(
        "__call",
        lua.create_function(move |_, (_, text, seed): (Value, String, Value)| {
            render.call::<String>((text, seed))
        })?,
    )?;
    m.set_metatable(Some(meta))?;
    Ok(m)
}

/// A seed from a number, or from `ctx`.
fn seed_from(v: &Value) -> Result<u64> {
    match v {
        Value::Integer(n) => Ok(*n as u64),
        Value::Number(n) if n.fract() == 0.0 => Ok(*n as i64 as u64),
        Value::Table(ctx) => {
            let id = |t: Option<Table>| t.and_then(|t| t.get::<Option<u64>>("id").ok().flatten());
            let dialog = id(ctx.get("dialog")?).unwrap_or(0);
            let contact = id(ctx.get("contact")?).unwrap_or(0);
            let messages = ctx
                .get::<Option<Table>>("history")?
                .map_or(0, |h| h.raw_len() as u64);
            Ok(spin::seed_of(dialog, contact, messages))
        }
        other => Err(mlua::Error::runtime(format!(
            "spin: the seed must be a whole number or ctx, not {}",
            other.type_name()
        ))),
    }
}
