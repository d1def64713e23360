//! One sandboxed Lua VM: the sandbox, `require` over a snapshot, the
//! per-call instruction and time budgets, ctx in and output out.
//!
//! A VM is not `Send`: each lives on one worker thread (see
//! [`super::EngineRuntime`]) and runs many calls concurrently as coroutines.
//! A global count hook (inherited by every coroutine, including those Lua
//! code creates) charges the instructions to the call being polled, which
//! `Metered` (in `scope.rs`) records in the VM's app data around each
//! poll.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use mlua::chunk::ChunkMode;
use mlua::state::{GcGenParams, GcMode};
use mlua::{
    Function, HookTriggers, Lua, LuaOptions, LuaSerdeExt, MultiValue, StdLib, Table, Value, VmState,
};
use rustc_hash::FxHashMap;

use super::ctx::{Call, Ctx, Output, Reply};
use super::library::{Snapshot, Source};
use super::modules::{self, HostEnv};
use super::scope::{self, current_scope, from_lua_options, to_lua_options, CallScope, Metered};
use super::EngineError;

/// Telegram's limit on one message.
pub const MAX_MESSAGE_CHARS: usize = 4096;
/// The count hook fires every this many VM instructions.
const HOOK_EVERY: u32 = 1000;

/// Limits of every call on a VM.
#[derive(Debug, Clone, Copy)]
pub struct Budgets {
    pub instructions: u64,
    pub time: Duration,
    pub memory: usize,
}

/// A sandboxed VM built from one snapshot.
pub struct Vm {
    lua: Lua,
    snapshot: Arc<Snapshot>,
    budgets: Budgets,
    /// Engine tables loaded so far, by name.
    engines: RefCell<FxHashMap<String, Table>>,
    /// The metamethods every call's ctx shares (see [`LazyCtx`]).
    ctx_methods: CtxMethods,
    /// Calls `get_response` with its message table built in Lua (see
    /// [`RESPOND`]).
    respond: Function,
}

/// `get_response(ctx, {text = text, at = at})`, as a tail call, so that
/// the engine's function runs as if the host called it: building the
/// message table in Lua costs a small part of building it through the C
/// API, field by field.
const RESPOND: &str = "local f, ctx, text, at = ...\nreturn f(ctx, { text = text, at = at })";

/// What a call's `ctx` table builds its fields from, until the call ends.
struct LazyCtx {
    ctx: RefCell<Option<Ctx>>,
    /// Lua read or replaced `ctx.state`, so it is read back after the call.
    state_seen: Cell<bool>,
}

/// Lifts a VM's memory limit while the host builds values for a call (its
/// ctx, its message): they are the host's, not the engine's, so they are
/// not charged to its budget, and with no limit to hit, mlua builds them
/// without a protected call per table and string (most of what building
/// them cost). Nothing else runs on the VM meanwhile: it is single-threaded
/// and Lua code runs only when the host calls it. The limit is back when
/// this is dropped.
struct HostValues<'a> {
    lua: &'a Lua,
    limit: usize,
}

impl<'a> HostValues<'a> {
    fn new(lua: &'a Lua) -> HostValues<'a> {
        // Fails only where memory is not under mlua's control; then there
        // is no limit to lift either.
        let limit = lua.set_memory_limit(0).unwrap_or(0);
        HostValues { lua, limit }
    }
}

impl Drop for HostValues<'_> {
    fn drop(&mut self) {
        let _ = self.lua.set_memory_limit(self.limit);
    }
}

impl LazyCtx {
    /// Every field built on first read.
    const FIELDS: [&'static str; 9] = [
        "now",
        "dialog",
        "contact",
        "account",
        "campaign",
        "prompt_template",
        "state",
        "history",
        "variant",
    ];

    /// Builds field `name` into `t` and returns it; nil for any other name
    /// and once the call is over.
    fn field(&self, lua: &Lua, t: &Table, name: &str) -> mlua::Result<Value> {
        let source = self.ctx.borrow();
        let Some(ctx) = source.as_ref() else {
            return Ok(Value::Nil);
        };
        let _host = HostValues::new(lua);
        let opts = to_lua_options();
        let value = match name {
            "now" => Value::Number(ctx.now),
            "dialog" => lua.to_value_with(&ctx.dialog, opts)?,
            "contact" => lua.to_value_with(&ctx.contact, opts)?,
            "account" => lua.to_value_with(&ctx.account, opts)?,
            "campaign" => lua.to_value_with(&ctx.campaign, opts)?,
            "prompt_template" => lua.to_value_with(&ctx.prompt_template, opts)?,
            "variant" => lua.to_value_with(&ctx.variant, opts)?,
            "state" => {
                self.state_seen.set(true);
                lua.to_value_with(&ctx.state, opts)?
            }
            "history" => {
                let list = lua.create_table_with_capacity(ctx.history.len(), 0)?;
                for (i, h) in ctx.history.iter().enumerate() {
                    let entry = lua.create_table_with_capacity(0, 3)?;
                    entry.raw_set("direction", h.direction.as_ref())?;
                    entry.raw_set("text", h.text.as_str())?;
                    entry.raw_set("at", h.at)?;
                    list.raw_set(i + 1, entry)?;
                }
                Value::Table(list)
            }
            _ => return Ok(Value::Nil),
        };
        t.raw_set(name, &value)?;
        Ok(value)
    }

    /// Ends the call: gives back the ctx, less whatever Lua holds now.
    fn take(&self) -> Option<Ctx> {
        self.ctx.borrow_mut().take()
    }
}

/// The metatable every call's ctx shares, made once per VM, and the
/// [`LazyCtx`] of each ctx table of a call still running, by the table's
/// address: its metamethods look there (a table kept past its call finds
/// nothing and builds nothing).
struct CtxMethods {
    meta: Table,
    live: Rc<RefCell<FxHashMap<usize, Rc<LazyCtx>>>>,
}

impl CtxMethods {
    fn new(lua: &Lua) -> mlua::Result<CtxMethods> {
        let live: Rc<RefCell<FxHashMap<usize, Rc<LazyCtx>>>> = Rc::default();
        let lazy_of = {
            let live = live.clone();
            move |t: &Table| live.borrow().get(&(t.to_pointer() as usize)).cloned()
        };
        let meta = lua.create_table_with_capacity(0, 4)?;
        let of = lazy_of.clone();
        meta.raw_set(
            "__index",
            lua.create_function(move |lua, (t, key): (Table, Value)| match (key, of(&t)) {
                (Value::String(k), Some(lazy)) => lazy.field(lua, &t, &k.to_str()?),
                _ => Ok(Value::Nil),
            })?,
        )?;
        let of = lazy_of.clone();
        meta.raw_set(
            "__newindex",
            lua.create_function(move |_, (t, key, value): (Table, Value, Value)| {
                if key
                    .as_string()
                    .is_some_and(|k| k.as_bytes() == b"state".as_slice())
                {
                    if let Some(lazy) = of(&t) {
                        lazy.state_seen.set(true);
                    }
                }
                t.raw_set(key, value)
            })?,
        )?;
        let materialize = lua.create_function(move |lua, t: Table| {
            let Some(lazy) = lazy_of(&t) else {
                return Ok(());
            };
            for name in LazyCtx::FIELDS {
                if t.raw_get::<Value>(name)?.is_nil() {
                    lazy.field(lua, &t, name)?;
                }
            }
            Ok(())
        })?;
        let m = materialize.clone();
        meta.raw_set(
            "__pairs",
            lua.create_function(move |lua, t: Table| {
                m.call::<()>(&t)?;
                let next: Function = lua.globals().raw_get("next")?;
                Ok((next, t, Value::Nil))
            })?,
        )?;
        meta.raw_set("__materialize", materialize)?;
        Ok(CtxMethods { meta, live })
    }
}

/// A call's ctx table while the call runs; dropped, it lets go of what it
/// was built from.
struct CallCtx<'a> {
    table: Table,
    lazy: Rc<LazyCtx>,
    methods: &'a CtxMethods,
}

impl CallCtx<'_> {
    /// Ends the call: gives back the ctx, less whatever Lua holds now.
    fn finish(&self) -> Option<Ctx> {
        self.methods
            .live
            .borrow_mut()
            .remove(&(self.table.to_pointer() as usize));
        self.lazy.take()
    }
}

impl Drop for CallCtx<'_> {
    fn drop(&mut self) {
        self.finish();
    }
}

impl Vm {
    pub fn new(
        snapshot: Arc<Snapshot>,
        budgets: Budgets,
        host: &HostEnv,
        seed: u64,
    ) -> Result<Vm, String> {
        let lua = sandbox(&snapshot, budgets, host, seed)
            .map_err(|e| format!("cannot build the Lua sandbox: {e}"))?;
        let ctx_methods =
            CtxMethods::new(&lua).map_err(|e| format!("cannot build the Lua sandbox: {e}"))?;
        let respond = lua
            .load(RESPOND)
            .set_name("=respond")
            .set_mode(ChunkMode::Text)
            .into_function()
            .map_err(|e| format!("cannot build the Lua sandbox: {e}"))?;
        Ok(Vm {
            lua,
            snapshot,
            budgets,
            ctx_methods,
            respond,
            engines: RefCell::default(),
        })
    }

    pub fn generation(&self) -> u64 {
        self.snapshot.generation
    }

    pub fn lua(&self) -> &Lua {
        &self.lua
    }

    /// Runs a chunk of source in the sandbox under the budgets, as `eval`
    /// does: `args` become the global `arg`.
    pub async fn eval(
        &self,
        shown: &str,
        text: &str,
        args: &[String],
    ) -> Result<serde_json::Value, String> {
        let env = fresh_env(&self.lua).map_err(|e| e.to_string())?;
        let arg = self
            .lua
            .create_sequence_from(args.iter().cloned())
            .map_err(|e| e.to_string())?;
        env.set("arg", arg).map_err(|e| e.to_string())?;
        let func = self
            .lua
            .load(text)
            .set_name(format!("@{shown}"))
            .set_mode(ChunkMode::Text)
            .set_environment(env)
            .into_function()
            .map_err(|e| lua_error_text(&e))?;
        let scope = self.scope("eval", None);
        let values: MultiValue = self
            .metered(scope, func.call_async(()))
            .await
            .map_err(|e| lua_error_text(&e))?;
        let first = values.into_iter().next().unwrap_or(Value::Nil);
        self.lua
            .from_value_with(first, from_lua_options())
            .map_err(|e| format!("the result cannot be shown as JSON: {e}"))
    }

    fn scope(&self, engine: &str, dialog: Option<u64>) -> Rc<CallScope> {
        Rc::new(CallScope::new(
            engine,
            dialog,
            self.budgets.instructions,
            self.budgets.time,
        ))
    }

    /// Runs `fut` as the call `scope`, within the time budget.
    async fn metered<'a, T>(
        &'a self,
        scope: Rc<CallScope>,
        fut: impl Future<Output = mlua::Result<T>> + 'a,
    ) -> mlua::Result<T> {
        let metered = Metered {
            lua: &self.lua,
            scope,
            inner: Box::pin(fut),
        };
        match tokio::time::timeout(self.budgets.time, metered).await {
            Ok(r) => r,
            Err(_) => Err(mlua::Error::runtime(format!(
                "time budget of {} exceeded",
                humantime::format_duration(self.budgets.time)
            ))),
        }
    }

    /// Compiles a source without running it: a syntax check.
    pub fn compile(&self, source: &Source) -> Result<(), String> {
        self.lua
            .load(&*source.text)
            .set_name(format!("@{}", source.shown))
            .set_mode(ChunkMode::Text)
            .into_function()
            .map(|_| ())
            .map_err(|e| lua_error_text(&e))
    }

    /// The engine's table, loading it on first use.
    pub async fn engine(&self, name: &str) -> Result<Table, EngineError> {
        if let Some(t) = self.engines.borrow().get(name) {
            return Ok(t.clone());
        }
        let source = self
            .snapshot
            .engines
            .get(name)
            .ok_or_else(|| super::missing_engine(&self.snapshot, name))?;
        let table = self.load_engine(name, source).await?;
        self.engines
            .borrow_mut()
            .insert(name.to_string(), table.clone());
        Ok(table)
    }

    async fn load_engine(&self, name: &str, source: &Source) -> Result<Table, EngineError> {
        let load_err = |message: String| EngineError::Load {
            engine: name.to_string(),
            message,
        };
        let env = fresh_env(&self.lua).map_err(|e| load_err(e.to_string()))?;
        let func = self
            .lua
            .load(&*source.text)
            .set_name(format!("@{}", source.shown))
            .set_mode(ChunkMode::Text)
            .set_environment(env)
            .into_function()
            .map_err(|e| load_err(lua_error_text(&e)))?;
        // Loading runs top-level code: it gets a budget like any call.
        let scope = self.scope(name, None);
        let value = self.metered(scope, func.call_async::<Value>(())).await;
        let table = match value.map_err(|e| load_err(lua_error_text(&e)))? {
            Value::Table(t) => t,
            other => {
                return Err(load_err(format!(
                    "{} must return a table of functions, not {}",
                    source.shown,
                    other.type_name()
                )))
            }
        };
        for (function, required) in [
            ("get_response", true),
            ("get_opening", false),
            ("get_follow_up", false),
            ("is_dialog_dead", false),
        ] {
            match table.get::<Value>(function) {
                Ok(Value::Function(_)) => {}
                Ok(Value::Nil) if !required => {}
                Ok(Value::Nil) => {
                    return Err(load_err(format!(
                        "{} has no {function} function",
                        source.shown
                    )))
                }
                Ok(other) => {
                    return Err(load_err(format!(
                        "{}: {function} must be a function, not {}",
                        source.shown,
                        other.type_name()
                    )))
                }
                Err(e) => return Err(load_err(e.to_string())),
            }
        }
        Ok(table)
    }

    /// Calls one engine function for one dialog.
    pub async fn call(&self, engine: &str, call: &Call, ctx: Ctx) -> Result<Reply, EngineError> {
        let fail = |message: String| EngineError::Call {
            engine: engine.to_string(),
            function: call.function(),
            message,
        };
        let table = self.engine(engine).await?;
        let dialog = ctx.dialog.id;
        let ctx = self
            .ctx_table(ctx)
            .map_err(|e| fail(format!("cannot build ctx: {e}")))?;
        let ctx_table = ctx.table.clone();
        let func: Option<Function> = if table.has_metatable() {
            table.get(call.function())
        } else {
            let _host = HostValues::new(&self.lua);
            table.raw_get(call.function())
        }
        .map_err(|e| fail(e.to_string()))?;
        let scope = self.scope(engine, Some(dialog));
        let result: mlua::Result<Value> = match (call, func) {
            (Call::Opening, None) => {
                self.metered(scope, self.default_opening(ctx_table.clone()))
                    .await
            }
            (_, None) => Ok(Value::Nil),
            (Call::Response { text, at }, Some(f)) => {
                let args = (f, ctx_table.clone(), text.as_str(), *at);
                let call = {
                    // The arguments are pushed here, the text among them.
                    let _host = HostValues::new(&self.lua);
                    self.respond.call_async(args)
                };
                self.metered(scope, call).await
            }
            (_, Some(f)) => self.metered(scope, f.call_async(ctx_table.clone())).await,
        };
        // The call is over: whatever of ctx Lua did not read goes back now
        // (a dialog's shared history among it), not when Lua collects it.
        let unread = ctx.finish();
        let value = result.map_err(|e| fail(lua_error_text(&e)))?;
        let state = match unread {
            // Neither read nor replaced: the state stays as it was.
            Some(unread) if !ctx.lazy.state_seen.get() => unread.state,
            _ => match ctx_table
                .raw_get::<Value>("state")
                .map_err(|e| fail(e.to_string()))?
            {
                Value::Nil => serde_json::Value::Object(Default::default()),
                v => self
                    .lua
                    .from_value_with(v, from_lua_options())
                    .map_err(|e| fail(format!("ctx.state cannot be stored: {e}")))?,
            },
        };
        let output = match call {
            Call::IsDead => {
                let dead = match value {
                    Value::Boolean(b) => b,
                    Value::Nil => false,
                    other => {
                        return Err(fail(format!(
                            "must return true or false, not {}",
                            describe(&other)
                        )))
                    }
                };
                Output {
                    dead,
                    ..Output::default()
                }
            }
            Call::Opening if value.is_nil() => Output {
                skip: true,
                ..Output::default()
            },
            _ => parse_output(value).map_err(fail)?,
        };
        Ok(Reply { output, state })
    }

    /// The `ctx` table of a call. Every field is built on its first read
    /// (most calls read few of them, and building them all was most of the
    /// cost of a call), and all of them at once when Lua iterates ctx
    /// (`pairs`) or `json.encode`s it.
    fn ctx_table(&self, ctx: Ctx) -> mlua::Result<CallCtx<'_>> {
        let _host = HostValues::new(&self.lua);
        let table = self.lua.create_table_with_capacity(0, 8)?;
        table.set_metatable(Some(self.ctx_methods.meta.clone()))?;
        let lazy = Rc::new(LazyCtx {
            ctx: RefCell::new(Some(ctx)),
            state_seen: Cell::new(false),
        });
        self.ctx_methods
            .live
            .borrow_mut()
            .insert(table.to_pointer() as usize, lazy.clone());
        Ok(CallCtx {
            table,
            lazy,
            methods: &self.ctx_methods,
        })
    }

    /// The prompt template rendered with ctx, spintax first (seeded by the
    /// contact), without HTML escaping.
    async fn default_opening(&self, ctx: Table) -> mlua::Result<Value> {
        let template: Option<String> = ctx.get("prompt_template")?;
        let Some(template) = template else {
            return Err(mlua::Error::runtime(
                "the engine has no get_opening and the campaign no prompt_template",
            ));
        };
        let require: Function = self.lua.globals().get("require")?;
        let module: Table = require.call("template")?;
        let render: Function = module.get("render")?;
        let opts = self.lua.create_table()?;
        opts.set("escape", false)?;
        opts.set("spin", ctx.clone())?;
        let text: String = render.call_async((template, ctx, Value::Nil, opts)).await?;
        Ok(Value::String(self.lua.create_string(text.trim())?))
    }
}

/// A Lua value in a few words, for error messages.
fn describe(v: &Value) -> String {
    match v {
        Value::String(s) => format!("the string \"{}\"", s.to_string_lossy()),
        Value::Number(n) => format!("the number {n}"),
        Value::Integer(n) => format!("the number {n}"),
        Value::Boolean(b) => format!("{b}"),
        other => format!("a {}", other.type_name()),
    }
}

/// The return shapes of SPEC section 5.
fn parse_output(value: Value) -> Result<Output, String> {
    let mut out = Output::default();
    match value {
        Value::Nil => {}
        Value::String(s) => out.messages.push(message_text(&Value::String(s))?),
        Value::Table(t) => {
            let structured = ["messages", "text", "finish", "handoff"]
                .iter()
                .any(|k| t.contains_key(*k).unwrap_or(false));
            if structured {
                if let Value::Table(list) = t.get::<Value>("messages").map_err(|e| e.to_string())? {
                    out.messages = list_of_messages(&list)?;
                } else if t.contains_key("messages").unwrap_or(false) {
                    return Err("messages must be a list of strings".into());
                }
                match t.get::<Value>("text").map_err(|e| e.to_string())? {
                    Value::Nil => {}
                    v => out.messages.push(message_text(&v)?),
                }
                match t.get::<Value>("finish").map_err(|e| e.to_string())? {
                    Value::Nil => {}
                    Value::String(s) if !s.to_string_lossy().trim().is_empty() => {
                        out.finish = Some(s.to_string_lossy().trim().to_string())
                    }
                    other => return Err(format!("finish must be an outcome label, not {}", describe(&other))),
                }
                match t.get::<Value>("handoff").map_err(|e| e.to_string())? {
                    Value::Nil | Value::Boolean(false) => {}
                    Value::Boolean(true) => out.handoff = true,
                    other => return Err(format!("handoff must be true or false, not {}", describe(&other))),
                }
            } else {
                out.messages = list_of_messages(&t)?;
            }
        }
        other => {
            return Err(format!(
                "must return nil, a string, a list of strings or a table with messages/text/finish/handoff, not {}",
                describe(&other)
            ))
        }
    }
    Ok(out)
}

fn list_of_messages(t: &Table) -> Result<Vec<String>, String> {
    let len = t.raw_len();
    let pairs = t.pairs::<Value, Value>().count();
    if pairs != len {
        return Err("a list of messages must have only the keys 1..n".into());
    }
    (1..=len)
        .map(|i| message_text(&t.raw_get::<Value>(i).map_err(|e| e.to_string())?))
        .collect()
}

fn message_text(v: &Value) -> Result<String, String> {
    let Value::String(s) = v else {
        return Err(format!("a message must be a string, not {}", describe(v)));
    };
    let text = s
        .to_str()
        .map_err(|_| "a message is not valid UTF-8".to_string())?
        .to_string();
    if text.trim().is_empty() {
        return Err("a message is empty".into());
    }
    let chars = text.chars().count();
    if chars > MAX_MESSAGE_CHARS {
        return Err(format!(
            "a message has {chars} characters; Telegram allows at most {MAX_MESSAGE_CHARS}"
        ));
    }
    Ok(text)
}

/// A Lua error as one line: its message without the Rust-side traceback.
pub fn lua_error_text(e: &mlua::Error) -> String {
    match e {
        mlua::Error::CallbackError { cause, .. } => lua_error_text(cause),
        mlua::Error::WithContext { cause, context } => {
            format!("{context}: {}", lua_error_text(cause))
        }
        mlua::Error::SyntaxError { message, .. } => first_line(message),
        mlua::Error::RuntimeError(m) => first_line(m),
        mlua::Error::MemoryError(_) => "the engine ran out of its memory limit".into(),
        other => first_line(&other.to_string()),
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

/// An error raised by a host function, placed as Lua's `error` places
/// one: at the Lua line that called it.
fn at_caller(lua: &Lua, message: &str) -> mlua::Error {
    let place = lua.inspect_stack(1, |d| {
        let source = d.source();
        let file = source.short_src.as_deref().unwrap_or("?").to_string();
        (source.what != "C").then(|| format!("{file}:{}: ", d.current_line().unwrap_or(0)))
    });
    mlua::Error::runtime(format!("{}{message}", place.flatten().unwrap_or_default()))
}

/// `string.rep` and `table.move` loop inside C, where no budget reaches:
/// `string.rep("", 2^53)` or `table.move(t, 1, 2^40, 2)` would run for
/// ever. Their sizes are checked first against what the engine's memory
/// could ever hold.
fn bound_long_c_loops(lua: &Lua, string: &Table, table: &Table, memory: usize) -> mlua::Result<()> {
    let limit = memory.max(1 << 20) as u128;
    let rep: Function = string.get("rep")?;
    string.set(
        "rep",
        lua.create_function(
            move |lua, (s, n, sep): (mlua::LuaString, i64, Option<mlua::LuaString>)| {
                let l = s.as_bytes().len() as u128;
                let lsep = sep.as_ref().map_or(0, |x| x.as_bytes().len()) as u128;
                if n <= 0 || l + lsep == 0 {
                    return lua.create_string("");
                }
                let total = n as u128 * l + (n as u128 - 1) * lsep;
                if total > limit {
                    return Err(at_caller(lua, &format!(
                        "string.rep: the result would be {total} bytes, more than the engine's memory_limit"
                    )));
                }
                rep.call::<mlua::LuaString>((s, n, sep))
            },
        )?,
    )?;
    let moved: Function = table.get("move")?;
    let slots = limit / 16;
    table.set(
        "move",
        lua.create_function(move |lua, args: mlua::MultiValue| {
            let index = |i: usize| match args.get(i) {
                Some(Value::Integer(n)) => i128::from(*n),
                Some(Value::Number(n)) => *n as i128,
                _ => 0,
            };
            let count = (index(2) - index(1) + 1).max(0) as u128;
            if count > slots {
                return Err(at_caller(lua, &format!(
                    "table.move: {count} elements are more than the engine's memory_limit could hold"
                )));
            }
            moved.call::<mlua::MultiValue>(args)
        })?,
    )?;
    Ok(())
}

/// Lua runs `__gc` finalizers with hooks off, during any allocation and
/// when a VM closes (a reload, a replaced worker): no budget reaches them,
/// and one that loops would hold its thread for ever. An engine has
/// nothing to finalize, so `setmetatable` refuses a metatable with
/// `__gc` (Lua marks an object for finalization only if its metatable has
/// `__gc` when it is set, so adding it later does nothing).
fn refuse_finalizers(lua: &Lua, globals: &Table) -> mlua::Result<()> {
    let guarded: Function = lua
        .load(
            r#"
local set, rawget = ...
return function(t, meta)
  if type(meta) == "table" and rawget(meta, "__gc") ~= nil then
    error("setmetatable: engines cannot use __gc finalizers (no budget reaches them)", 2)
  end
  return set(t, meta)
end"#,
        )
        .set_name("=setmetatable")
        .call((
            globals.get::<Function>("setmetatable")?,
            globals.get::<Function>("rawget")?,
        ))?;
    globals.set("setmetatable", guarded)
}

/// Builds the sandbox: only string, table, math, utf8, coroutine and
/// os.time/clock/date; text chunks only; `require` over the snapshot.
fn sandbox(
    snapshot: &Arc<Snapshot>,
    budgets: Budgets,
    host: &HostEnv,
    seed: u64,
) -> mlua::Result<Lua> {
    let libs = StdLib::COROUTINE
        | StdLib::TABLE
        | StdLib::STRING
        | StdLib::UTF8
        | StdLib::MATH
        | StdLib::OS;
    let lua = Lua::new_with(libs, LuaOptions::new())?;
    lua.set_memory_limit(budgets.memory)?;
    // A call leaves its ctx, message and strings behind: short-lived
    // garbage, which the generational collector takes for much less work.
    lua.gc_set_mode(GcMode::Generational(GcGenParams::default()));
    scope::install(&lua);
    lua.set_global_hook(
        HookTriggers::new().every_nth_instruction(HOOK_EVERY),
        |lua, _debug| match current_scope(lua) {
            Some(scope) => scope.charge(HOOK_EVERY as u64),
            None => Ok(VmState::Continue),
        },
    )?;

    let g = lua.globals();
    for name in [
        "dofile",
        "loadfile",
        "load",
        "require",
        "collectgarbage",
        "print",
    ] {
        g.raw_set(name, Value::Nil)?;
    }
    let os: Table = g.get("os")?;
    let safe_os = lua.create_table()?;
    for name in ["time", "clock", "date"] {
        safe_os.set(name, os.get::<Function>(name)?)?;
    }
    g.set("os", safe_os)?;
    let string: Table = g.get("string")?;
    string.set("dump", Value::Nil)?;
    bound_long_c_loops(&lua, &string, &g.get("table")?, budgets.memory)?;
    refuse_finalizers(&lua, &g)?;
    let math: Table = g.get("math")?;
    let randomseed: Function = math.get("randomseed")?;
    randomseed.call::<()>(seed as i64)?;

    g.set("load", text_load(&lua)?)?;
    g.set("collectgarbage", bounded_collectgarbage(&lua)?)?;

    let preload = lua.create_table()?;
    modules::register_all(&lua, &preload, host)?;
    g.set("print", {
        let log: Table = preload.get("log")?;
        log.get::<Function>("info")?
    })?;
    g.set("require", require_from(&lua, snapshot.clone(), preload)?)?;
    Ok(lua)
}

/// A fresh `_ENV`: a table of its own whose reads fall through to the
/// sandbox's globals (an engine's, a module's, a chunk `load`ed without
/// one).
fn fresh_env(lua: &Lua) -> mlua::Result<Table> {
    let env = lua.create_table()?;
    let meta = lua.create_table()?;
    meta.set("__index", lua.globals())?;
    env.set_metatable(Some(meta))?;
    Ok(env)
}

/// `load`: source text only (never a binary chunk), in the caller-given
/// environment or a fresh one.
fn text_load(lua: &Lua) -> mlua::Result<Function> {
    lua.create_function(
        |lua, (chunk, name, _mode, env): (Value, Option<String>, Value, Option<Table>)| {
            let text = match chunk {
                Value::String(s) => s.as_bytes().to_vec(),
                _ => {
                    return Ok((
                        Value::Nil,
                        Some("load: only source text can be loaded".to_string()),
                    ))
                }
            };
            if text.first() == Some(&0x1b) {
                return Ok((
                    Value::Nil,
                    Some("load: binary chunks are not allowed".to_string()),
                ));
            }
            let env = match env {
                Some(e) => e,
                None => fresh_env(lua)?,
            };
            let chunk = lua
                .load(text)
                .set_name(name.unwrap_or_else(|| "=load".into()))
                .set_mode(ChunkMode::Text)
                .set_environment(env);
            match chunk.into_function() {
                Ok(f) => Ok((Value::Function(f), None)),
                Err(e) => Ok((Value::Nil, Some(lua_error_text(&e)))),
            }
        },
    )
}

/// `collectgarbage`: "count", "collect" and "step" only; an engine cannot
/// stop or tune the collector.
fn bounded_collectgarbage(lua: &Lua) -> mlua::Result<Function> {
    lua.create_function(
        |lua, opt: Option<String>| match opt.as_deref().unwrap_or("collect") {
            "count" => Ok(lua.used_memory() as f64 / 1024.0),
            "collect" | "step" => {
                lua.gc_collect()?;
                Ok(0.0)
            }
            other => Err(mlua::Error::runtime(format!(
                "collectgarbage(\"{other}\") is not allowed in engines"
            ))),
        },
    )
}

/// `require`: the host's modules (`preload`), then the snapshot's by
/// name, each run once in an environment of its own.
fn require_from(lua: &Lua, snapshot: Arc<Snapshot>, preload: Table) -> mlua::Result<Function> {
    let loaded = lua.create_table()?;
    lua.create_function(move |lua, name: String| {
        if let Some(v) = loaded.raw_get::<Option<Value>>(name.as_str())? {
            return Ok(v);
        }
        if let Some(m) = preload.raw_get::<Option<Table>>(name.as_str())? {
            return Ok(Value::Table(m));
        }
        if !crate::config::is_module_name(&name) {
            return Err(mlua::Error::runtime(format!(
                "require: \"{name}\" is not a module name; modules are found by name (like \"template\" or \"lib.util\"), never by path"
            )));
        }
        let Some(source) = snapshot.modules.get(&name) else {
            return Err(mlua::Error::runtime(format!(
                "require: module \"{name}\" not found in scripts_dir, engines_dir or [engines] extra_paths"
            )));
        };
        let value: Value = lua
            .load(&*source.text)
            .set_name(format!("@{}", source.shown))
            .set_mode(ChunkMode::Text)
            .set_environment(fresh_env(lua)?)
            .call(name.as_str())?;
        let value = if value.is_nil() { Value::Boolean(true) } else { value };
        loaded.raw_set(name.as_str(), value.clone())?;
        Ok(value)
    })
}
