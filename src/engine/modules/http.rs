//! `http.request{method, url, headers, body, json, timeout}` →
//! `{status, headers, body}`. Async: the calling dialog's coroutine yields
//! while the request is in flight, so other dialogs go on. A transport
//! failure is a Lua error; any HTTP status is a normal result.

use std::time::Duration;

use mlua::{Lua, LuaSerdeExt, Result, Table, Value};

use crate::engine::scope::from_lua_options;

/// Used when the call gives no `timeout`.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

pub fn register(lua: &Lua, client: reqwest::Client) -> Result<Table> {
    let m = lua.create_table()?;
    m.set(
        "request",
        lua.create_async_function(move |lua, req: Table| {
            let client = client.clone();
            async move {
                let method: String = req
                    .get::<Option<String>>("method")?
                    .unwrap_or_else(|| "GET".into());
                let url: String = req
                    .get::<Option<String>>("url")?
                    .ok_or_else(|| mlua::Error::runtime("http.request: url is required"))?;
                let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes())
                    .map_err(|_| {
                        mlua::Error::runtime(format!("http.request: bad method \"{method}\""))
                    })?;
                let timeout = req
                    .get::<Option<f64>>("timeout")?
                    .filter(|t| *t > 0.0)
                    .map(Duration::from_secs_f64)
                    .unwrap_or(DEFAULT_TIMEOUT);
                let mut builder = client.request(method, &url).timeout(timeout);
                if let Some(headers) = req.get::<Option<Table>>("headers")? {
                    for pair in headers.pairs::<String, String>() {
                        let (k, v) = pair?;
                        builder = builder.header(k, v);
                    }
                }
                match req.get::<Value>("json")? {
                    Value::Nil => {}
                    v => {
                        let json: serde_json::Value = lua.from_value_with(v, from_lua_options())?;
                        builder = builder.json(&json);
                    }
                }
                if let Some(body) = req.get::<Option<mlua::LuaString>>("body")? {
                    builder = builder.body(body.as_bytes().to_vec());
                }
                let resp = builder.send().await.map_err(|e| {
                    mlua::Error::runtime(format!("http.request {url}: {}", describe(&e)))
                })?;
                let out = lua.create_table()?;
                out.set("status", resp.status().as_u16())?;
                let headers = lua.create_table()?;
                for (k, v) in resp.headers() {
                    headers.set(
                        k.as_str(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )?;
                }
                out.set("headers", headers)?;
                let body = resp.bytes().await.map_err(|e| {
                    mlua::Error::runtime(format!("http.request {url}: {}", describe(&e)))
                })?;
                out.set("body", lua.create_string(&body)?)?;
                Ok(out)
            }
        })?,
    )?;
    Ok(m)
}

fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "cannot connect".into()
    } else {
        let mut s = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(inner) = src {
            s = format!("{s}: {inner}");
            src = inner.source();
        }
        s
    }
}
