//! The Lua call scope: which engine call is running on a VM now, what is
//! left of its instruction and time budgets, and the serde options every
//! value crossing into or out of Lua uses. The host modules
//! (`modules/`) read it; `vm.rs` sets it around each poll of a call and
//! charges the count hook to it.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use mlua::serde::{DeserializeOptions, SerializeOptions};
use mlua::{Lua, VmState};

/// The call being run, for the hook and the `log` module.
#[derive(Debug)]
pub struct CallScope {
    pub engine: String,
    pub dialog: Option<u64>,
    /// Instructions left.
    remaining: Cell<u64>,
    /// Budget given, for the error message.
    budget: u64,
    deadline: Instant,
    /// Set once a budget ran out. The hook raises an error the first time;
    /// if the script catches it (pcall) and keeps going, every later hook
    /// yields instead, which hands control back to [`Metered`], and that
    /// ends the call. A caught error can thus not keep a call alive.
    exceeded: RefCell<Option<String>>,
}

impl CallScope {
    pub(super) fn new(
        engine: &str,
        dialog: Option<u64>,
        instructions: u64,
        time: Duration,
    ) -> Self {
        CallScope {
            engine: engine.to_string(),
            dialog,
            remaining: Cell::new(instructions),
            budget: instructions,
            deadline: Instant::now() + time,
            exceeded: RefCell::new(None),
        }
    }

    /// Charges `instructions` run since the last charge: whether the call
    /// goes on, or the error that ends it (once; a call that caught it is
    /// yielded from every time after).
    pub(super) fn charge(&self, instructions: u64) -> mlua::Result<VmState> {
        if self.exceeded.borrow().is_some() {
            return Ok(VmState::Yield);
        }
        let left = self.remaining.get().saturating_sub(instructions);
        self.remaining.set(left);
        let why = if left == 0 {
            format!("instruction budget of {} exceeded", self.budget)
        } else if Instant::now() >= self.deadline {
            "time budget exceeded".to_string()
        } else {
            return Ok(VmState::Continue);
        };
        *self.exceeded.borrow_mut() = Some(why.clone());
        Err(mlua::Error::runtime(why))
    }
}

/// Which call is being polled on a VM, if any: kept in the VM's app data
/// (see [`install`]).
#[derive(Default)]
struct Current(RefCell<Option<Rc<CallScope>>>);

/// Makes room on `lua` for the current call's scope.
pub(super) fn install(lua: &Lua) {
    lua.set_app_data(Current::default());
}

/// The scope of the call running now on `lua`'s VM.
pub fn current_scope(lua: &Lua) -> Option<Rc<CallScope>> {
    lua.app_data_ref::<Current>()?.0.borrow().clone()
}

fn set_current(lua: &Lua, scope: Option<Rc<CallScope>>) {
    if let Some(cur) = lua.app_data_ref::<Current>() {
        *cur.0.borrow_mut() = scope;
    }
}

/// A future that marks its call as current on the VM while it is polled.
pub(super) struct Metered<'a, T> {
    pub(super) lua: &'a Lua,
    pub(super) scope: Rc<CallScope>,
    pub(super) inner: Pin<Box<dyn Future<Output = T> + 'a>>,
}

impl<T> Future for Metered<'_, mlua::Result<T>> {
    type Output = mlua::Result<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<mlua::Result<T>> {
        let this = &mut *self;
        set_current(this.lua, Some(this.scope.clone()));
        let out = this.inner.as_mut().poll(cx);
        set_current(this.lua, None);
        if let Some(why) = this.scope.exceeded.borrow().clone() {
            return Poll::Ready(Err(mlua::Error::runtime(why)));
        }
        out
    }
}

pub fn to_lua_options() -> SerializeOptions {
    SerializeOptions::new()
        .serialize_none_to_null(false)
        .serialize_unit_to_null(false)
}

pub fn from_lua_options() -> DeserializeOptions {
    DeserializeOptions::new()
        .deny_unsupported_types(true)
        .deny_recursive_tables(true)
}
