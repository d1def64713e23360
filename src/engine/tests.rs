//! The engine runtime against real Lua: return shapes, state, sandbox
//! escapes, budgets, reload.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::clock::{SystemClock, Timestamp};

/// A project directory: engines/, scripts/ (with the shipped template.lua
/// and llm.lua) and a config.
pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    pub fn new(engines: &[(&str, &str)], extra_config: &str) -> Project {
        let dir = tempfile::tempdir().unwrap();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        std::fs::create_dir_all(dir.path().join("engines")).unwrap();
        std::fs::create_dir_all(dir.path().join("scripts")).unwrap();
        for m in ["template.lua", "llm.lua"] {
            std::fs::copy(
                root.join("scripts").join(m),
                dir.path().join("scripts").join(m),
            )
            .unwrap();
        }
        for (name, src) in engines {
            std::fs::write(dir.path().join("engines").join(format!("{name}.lua")), src).unwrap();
        }
        std::fs::write(
            dir.path().join("config.toml"),
            format!("[engines]\ninstruction_budget = 2_000_000\ntime_budget = \"2s\"\nmemory_limit = \"16MiB\"\n{extra_config}"),
        )
        .unwrap();
        Project { dir }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn runtime(&self) -> (EngineRuntime, Vec<String>) {
        let config = Config::parse(
            &self.path("config.toml"),
            &std::fs::read_to_string(self.path("config.toml")).unwrap(),
        )
        .unwrap();
        EngineRuntime::start(&config, Arc::new(SystemClock), 2)
    }
}

fn ctx() -> Ctx {
    Ctx {
        dialog: ctx::DialogView {
            id: 7,
            status: "active".into(),
            ..Default::default()
        },
        contact: ctx::ContactView {
            first_name: Some("Ann".into()),
            ..Default::default()
        },
        history: Arc::new(vec![ctx::HistoryEntry {
            direction: "out".into(),
            text: "hello".into(),
            at: 1.0,
        }]),
        now: Timestamp(5_000).as_secs_f64(),
        state: serde_json::json!({}),
        ..Default::default()
    }
}

/// What engine "e" answers to "x".
async fn say(rt: &EngineRuntime) -> Vec<String> {
    rt.call("e", respond("x"), ctx())
        .await
        .unwrap()
        .output
        .messages
}

fn respond(text: &str) -> Call {
    Call::Response {
        text: text.into(),
        at: 2.0,
    }
}

/// Runs one get_response of a one-line engine body.
async fn shape(body: &str) -> Result<Output, EngineError> {
    let src = format!("return {{ get_response = function(ctx, m) {body} end }}");
    let p = Project::new(&[("e", &src)], "");
    let (rt, problems) = p.runtime();
    assert!(problems.is_empty(), "{problems:?}");
    rt.call("e", respond("hi"), ctx()).await.map(|r| r.output)
}

#[tokio::test]
async fn return_shapes() {
    assert_eq!(shape("return nil").await.unwrap(), Output::default());
    assert_eq!(
        shape("return 're: ' .. m.text").await.unwrap().messages,
        vec!["re: hi"]
    );
    assert_eq!(
        shape("return {'a', 'b'}").await.unwrap().messages,
        vec!["a", "b"]
    );
    let o = shape("return { messages = {'x'}, finish = 'booked' }")
        .await
        .unwrap();
    assert_eq!(
        (o.messages, o.finish.as_deref()),
        (vec!["x".to_string()], Some("booked"))
    );
    let o = shape("return { text = 'bye', handoff = true }")
        .await
        .unwrap();
    assert!(o.handoff);
    assert_eq!(o.messages, vec!["bye"]);
}

#[tokio::test]
async fn wrong_returns_name_engine_function_and_value() {
    let e = shape("return 42").await.unwrap_err().to_string();
    assert!(
        e.starts_with("engine e, get_response: must return nil, a string"),
        "{e}"
    );
    assert!(e.contains("the number 42"), "{e}");
    let e = shape("return {'a', 7}").await.unwrap_err().to_string();
    assert!(
        e.contains("a message must be a string, not the number 7"),
        "{e}"
    );
    let e = shape("return string.rep('x', 4097)")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("4097 characters; Telegram allows at most 4096"),
        "{e}"
    );
    let e = shape("return { finish = 3 }")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("finish must be an outcome label"), "{e}");
    let e = shape("error('boom')").await.unwrap_err().to_string();
    assert!(e.contains("engines/e.lua:1: boom"), "{e}");
}

#[tokio::test]
async fn state_persists_through_the_reply_and_bad_state_is_an_error() {
    let p = Project::new(
        &[(
            "e",
            "return { get_response = function(ctx, m) ctx.state.n = (ctx.state.n or 0) + 1; return tostring(ctx.state.n) end }",
        )],
        "",
    );
    let (rt, _) = p.runtime();
    let mut c = ctx();
    for expected in ["1", "2", "3"] {
        let r = rt.call("e", respond("x"), c.clone()).await.unwrap();
        assert_eq!(r.output.messages, vec![expected]);
        c.state = r.state;
    }
    for bad in [
        "ctx.state.f = print",
        "local t = {}; t.self = t; ctx.state.t = t",
    ] {
        let e = shape(&format!("{bad}; return nil")).await;
        // shape() builds a fresh ctx, so check through a call here.
        let _ = e;
        let p = Project::new(
            &[(
                "e",
                &format!("return {{ get_response = function(ctx, m) {bad}; return nil end }}"),
            )],
            "",
        );
        let (rt, _) = p.runtime();
        let err = rt
            .call("e", respond("x"), ctx())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("ctx.state cannot be stored"), "{bad}: {err}");
    }
}

#[tokio::test]
async fn ctx_fields_reach_the_engine() {
    let o = shape("return ctx.contact.first_name .. ' ' .. ctx.dialog.id .. ' ' .. #ctx.history .. ' ' .. ctx.history[1].direction .. ' ' .. ctx.now").await.unwrap();
    assert_eq!(o.messages, vec!["Ann 7 1 out 5.0"]);
}

#[tokio::test]
async fn ctx_built_on_read_still_iterates_and_encodes_whole() {
    let o = shape(
        "local names = {}; for k in pairs(ctx) do names[#names + 1] = k end; table.sort(names); \
         local json = require('json'); return table.concat(names, ',') .. ' ' .. json.decode(json.encode(ctx)).contact.first_name",
    )
    .await
    .unwrap();
    assert_eq!(
        o.messages,
        vec!["account,campaign,contact,dialog,history,now,state Ann"]
    );
}

#[tokio::test]
async fn state_unread_is_kept_and_state_replaced_or_cleared_is_stored() {
    let state = serde_json::json!({"n": 3, "list": [1, 2]});
    for (body, expected) in [
        ("return 'x'", state.clone()),
        ("local _ = ctx.dialog.id; return 'x'", state.clone()),
        (
            "ctx.state = {m = 1}; return 'x'",
            serde_json::json!({"m": 1}),
        ),
        ("ctx.state = nil; return 'x'", serde_json::json!({})),
        (
            "ctx.state.n = 4; return 'x'",
            serde_json::json!({"n": 4, "list": [1, 2]}),
        ),
    ] {
        let src = format!("return {{ get_response = function(ctx, m) {body} end }}");
        let p = Project::new(&[("e", &src)], "");
        let (rt, _) = p.runtime();
        let mut c = ctx();
        c.state = state.clone();
        let r = rt.call("e", respond("x"), c).await.unwrap();
        assert_eq!(r.state, expected, "{body}");
    }
}

#[tokio::test]
async fn default_opening_renders_the_prompt_template() {
    let p = Project::new(&[("e", "return { get_response = function() end }")], "");
    let (rt, _) = p.runtime();
    let mut c = ctx();
    c.prompt_template = Some("Hi {{contact.first_name}} & co!\n".into());
    let r = rt.call("e", Call::Opening, c).await.unwrap();
    assert_eq!(r.output.messages, vec!["Hi Ann & co!"]);
    let p = Project::new(
        &[(
            "e",
            "return { get_response = function() end, get_opening = function() return nil end }",
        )],
        "",
    );
    let (rt, _) = p.runtime();
    assert!(
        rt.call("e", Call::Opening, ctx())
            .await
            .unwrap()
            .output
            .skip
    );
}

/// Every escape we can think of fails inside the sandbox.
#[tokio::test]
async fn sandbox_escapes_fail() {
    let attempts = [
        ("io", "return io == nil"),
        (
            "os.execute",
            "return os.execute == nil and os.getenv == nil and os.remove == nil and os.exit == nil",
        ),
        ("debug", "return debug == nil"),
        ("package", "return package == nil"),
        (
            "dofile/loadfile",
            "return dofile == nil and loadfile == nil",
        ),
        ("string.dump", "return string.dump == nil"),
        (
            "binary chunk",
            "local f, err = load('\\27Lua\\84\\0'); return f == nil and err:find('binary') ~= nil",
        ),
        ("load sees sandbox", "return load('return io')() == nil"),
        (
            "require by path",
            "return not pcall(require, '../../etc/passwd')",
        ),
        (
            "require absolute",
            "return not pcall(require, '/etc/passwd')",
        ),
        ("require os", "return not pcall(require, 'os')"),
        ("require io", "return not pcall(require, 'io')"),
        (
            "collectgarbage stop",
            "return not pcall(collectgarbage, 'stop')",
        ),
        (
            "env not allowed",
            "return not pcall(require('env').get, 'HOME')",
        ),
        (
            "globals isolated",
            "x_leak = 1; return rawget(_G, 'x_leak') == nil or _G ~= _ENV",
        ),
    ];
    for (name, body) in attempts {
        let o = shape(&format!(
            "local ok = (function() {body} end)(); return tostring(ok)"
        ))
        .await;
        assert_eq!(
            o.map(|o| o.messages),
            Ok(vec!["true".to_string()]),
            "{name}"
        );
    }
}

#[tokio::test]
async fn runaway_scripts_stop_within_their_budget() {
    let cases = [
        ("infinite loop", "while true do end", "instruction budget"),
        (
            "loop in a coroutine",
            "coroutine.wrap(function() while true do end end)()",
            "instruction budget",
        ),
        (
            "pcall swallowing the budget",
            "while true do pcall(function() while true do end end) end",
            "budget",
        ),
        (
            "memory bomb",
            "local t = {} for i = 1, 1e9 do t[i] = string.rep('x', 1024) .. i end",
            "memory",
        ),
        ("string bomb", "local s = string.rep('x', 2^40)", ""),
        (
            "runaway recursion",
            "local function f(n) return f(n + 1) + 1 end return f(1)",
            "",
        ),
    ];
    let mut engines = Vec::new();
    let sources: Vec<String> = cases
        .iter()
        .map(|(_, body, _)| format!("return {{ get_response = function(ctx, m) {body} end }}"))
        .collect();
    for (i, src) in sources.iter().enumerate() {
        engines.push((["e0", "e1", "e2", "e3", "e4", "e5"][i], src.as_str()));
    }
    engines.push((
        "echo",
        "return { get_response = function(ctx, m) return 're: ' .. m.text end }",
    ));
    let p = Project::new(&engines, "");
    let (rt, problems) = p.runtime();
    assert!(problems.is_empty(), "{problems:?}");
    for (i, (name, _, expect)) in cases.iter().enumerate() {
        let started = std::time::Instant::now();
        let err = rt
            .call(&format!("e{i}"), respond("x"), ctx())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(expect), "{name}: {err}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{name} took {:?}",
            started.elapsed()
        );
        // The runtime still answers.
        let ok = rt.call("echo", respond("still here"), ctx()).await.unwrap();
        assert_eq!(ok.output.messages, vec!["re: still here"], "after {name}");
    }
}

#[tokio::test]
async fn broken_edits_keep_the_previous_version() {
    let p = Project::new(
        &[("e", "return { get_response = function() return 'v1' end }")],
        "",
    );
    let (rt, _) = p.runtime();
    assert_eq!(say(&rt).await, vec!["v1"]);
    std::fs::write(
        p.path("engines/e.lua"),
        "return { get_response = function() return 'v2' end",
    )
    .unwrap();
    let report = rt.reload();
    assert_eq!(report.problems.len(), 1);
    assert!(
        report.problems[0].contains("engines/e.lua:1:"),
        "{:?}",
        report.problems
    );
    assert_eq!(say(&rt).await, vec!["v1"]);
    std::fs::write(
        p.path("engines/e.lua"),
        "return { get_opening = function() end }",
    )
    .unwrap();
    let report = rt.reload();
    assert!(
        report.problems[0].contains("has no get_response function"),
        "{:?}",
        report.problems
    );
    assert_eq!(say(&rt).await, vec!["v1"]);
    std::fs::write(
        p.path("engines/e.lua"),
        "return { get_response = function() return 'v3' end }",
    )
    .unwrap();
    assert!(rt.reload().problems.is_empty());
    assert_eq!(say(&rt).await, vec!["v3"]);
}

#[tokio::test]
async fn a_broken_module_keeps_its_previous_version() {
    let p = Project::new(
        &[(
            "e",
            "local u = require('util') return { get_response = function() return u.word() end }",
        )],
        "",
    );
    std::fs::write(
        p.path("scripts/util.lua"),
        "return { word = function() return 'one' end }",
    )
    .unwrap();
    let (rt, problems) = p.runtime();
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(say(&rt).await, vec!["one"]);
    std::fs::write(
        p.path("scripts/util.lua"),
        "return { word = function() return 'two' end",
    )
    .unwrap();
    let report = rt.reload();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("scripts/util.lua:1:")),
        "{:?}",
        report.problems
    );
    assert_eq!(say(&rt).await, vec!["one"]);
}

#[tokio::test]
async fn saved_changes_are_live_within_a_second() {
    let p = Project::new(
        &[(
            "e",
            "return { get_response = function() return 'before' end }",
        )],
        "",
    );
    let (rt, _) = p.runtime();
    let _guard = watch(&rt).unwrap();
    std::fs::write(
        p.path("engines/e.lua"),
        "return { get_response = function() return 'after' end }",
    )
    .unwrap();
    let saved = std::time::Instant::now();
    loop {
        let got = rt
            .call("e", respond("x"), ctx())
            .await
            .unwrap()
            .output
            .messages;
        if got == vec!["after"] {
            break;
        }
        assert!(
            saved.elapsed() < Duration::from_secs(1),
            "not live after {:?}",
            saved.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A local HTTP server that answers "ok" after 200 ms.
async fn slow_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                tokio::time::sleep(Duration::from_millis(200)).await;
                let _ = sock
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn many_dialogs_await_http_at_once() {
    // 200 calls to a server that answers after 200 ms must overlap.
    let addr = slow_server().await;
    let src = format!(
        "local http = require('http') return {{ get_response = function(ctx, m) local r = http.request{{ url = 'http://{addr}/' }} return r.body .. ' ' .. r.status end }}"
    );
    let p = Project::new(&[("e", &src)], "");
    let (rt, _) = p.runtime();
    let started = std::time::Instant::now();
    let calls: Vec<_> = (0..200)
        .map(|_| {
            let rt = rt.clone();
            tokio::spawn(async move { rt.call("e", respond("x"), ctx()).await })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap().output.messages, vec!["ok 200"]);
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "calls did not overlap: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_batch_of_calls_some_waiting_on_http_answers_in_order() {
    // Calls that finish at once and calls that wait, interleaved in one
    // batch: each result in its call's place, the waits overlapping.
    let addr = slow_server().await;
    let src = format!(
        "local http = require('http') return {{ get_response = function(ctx, m)\n  if m.text:sub(1, 4) == 'wait' then return http.request{{ url = 'http://{addr}/' }}.body .. ' ' .. m.text end\n  return 're: ' .. m.text\nend }}"
    );
    let p = Project::new(&[("e", &src)], "");
    let (rt, problems) = p.runtime();
    assert!(problems.is_empty(), "{problems:?}");
    let texts: Vec<String> = (0..120)
        .map(|i| {
            if i % 3 == 0 {
                format!("wait{i}")
            } else {
                format!("now{i}")
            }
        })
        .collect();
    let calls = texts
        .iter()
        .map(|t| ("e".to_string(), respond(t), ctx()))
        .collect();
    let started = std::time::Instant::now();
    let out = rt.call_many(calls).await;
    for (t, r) in texts.iter().zip(&out) {
        let expected = if t.starts_with("wait") {
            format!("ok {t}")
        } else {
            format!("re: {t}")
        };
        assert_eq!(r.as_ref().unwrap().output.messages, vec![expected]);
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "waiting calls did not overlap: {:?}",
        started.elapsed()
    );
}

#[test]
fn eval_runs_in_the_sandbox_with_args() {
    let p = Project::new(&[], "");
    let (rt, _) = p.runtime();
    let v = rt
        .eval_blocking("t.lua", "return { n = #arg, first = arg[1], io = io == nil, json = require('json').encode({1, 2}) }", &["a".into(), "b".into()])
        .unwrap();
    assert_eq!(
        v,
        serde_json::json!({"n": 2, "first": "a", "io": true, "json": "[1,2]"})
    );
    let e = rt.eval_blocking("t.lua", "return (", &[]).unwrap_err();
    assert!(e.starts_with("t.lua:1:"), "{e}");
}

/// A one-shot HTTP server on loopback: answers every request with `status`
/// and `body`, and hands back the request bodies it saw.
async fn fake_llm(
    status: u16,
    body: &'static str,
) -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some((head, rest)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap())
                            })
                            .unwrap_or(0);
                        if rest.len() >= len {
                            let _ = tx.send(format!("{head}\r\n\r\n{rest}"));
                            break;
                        }
                    }
                }
                let reply = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(reply.as_bytes()).await;
            });
        }
    });
    (url, rx)
}

fn llm_engine(url: &str) -> String {
    format!(
        "local llm = require('llm') return {{ get_response = function(ctx, m) return llm.chat({{ base_url = '{url}', model = 'm1', api_key_env = 'COLLOQUY_TEST_KEY', temperature = 0.1, max_tokens = 50, timeout = 5 }}, ctx) end }}"
    )
}

#[tokio::test]
async fn llm_chat_sends_the_prompt_and_history() {
    std::env::set_var("COLLOQUY_TEST_KEY", "sk-test");
    let (url, mut requests) = fake_llm(
        200,
        r#"{"choices":[{"message":{"role":"assistant","content":"Sure, Ann!"}}]}"#,
    )
    .await;
    let p = Project::new(
        &[("e", &llm_engine(&url))],
        "env_allow = [\"COLLOQUY_TEST_KEY\"]\n",
    );
    let (rt, problems) = p.runtime();
    assert!(problems.is_empty(), "{problems:?}");
    let mut c = ctx();
    c.prompt_template = Some("You sell to {{contact.first_name}} & friends.".into());
    Arc::make_mut(&mut c.history).push(ctx::HistoryEntry {
        direction: "in".into(),
        text: "hi".into(),
        at: 2.0,
    });
    let r = rt.call("e", respond("hi"), c).await.unwrap();
    assert_eq!(r.output.messages, vec!["Sure, Ann!"]);
    let req = requests.recv().await.unwrap();
    assert!(req.starts_with("POST /v1/chat/completions"), "{req}");
    assert!(
        req.to_ascii_lowercase()
            .contains("authorization: bearer sk-test"),
        "{req}"
    );
    let body: serde_json::Value =
        serde_json::from_str(req.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["model"], "m1");
    assert_eq!(body["max_tokens"], 50);
    assert_eq!(
        body["messages"],
        serde_json::json!([
            {"role": "system", "content": "You sell to Ann & friends."},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "hi"},
        ])
    );
}

#[tokio::test]
async fn llm_errors_carry_status_and_provider_message() {
    std::env::set_var("COLLOQUY_TEST_KEY", "sk-test");
    let (url, _requests) = fake_llm(
        429,
        r#"{"error":{"message":"Rate limit reached for m1","type":"requests"}}"#,
    )
    .await;
    let p = Project::new(
        &[("e", &llm_engine(&url))],
        "env_allow = [\"COLLOQUY_TEST_KEY\"]\n",
    );
    let (rt, _) = p.runtime();
    let err = rt
        .call("e", respond("hi"), ctx())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("llm: HTTP 429: Rate limit reached for m1"),
        "{err}"
    );
    // A server that is not there.
    let p = Project::new(
        &[("e", &llm_engine("http://127.0.0.1:9"))],
        "env_allow = [\"COLLOQUY_TEST_KEY\"]\n",
    );
    let (rt, _) = p.runtime();
    let err = rt
        .call("e", respond("hi"), ctx())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot connect"), "{err}");
}

#[tokio::test]
async fn many_calls_answer_in_order_each_with_its_own_result() {
    let p = Project::new(
        &[(
            "e",
            "return { get_response = function(ctx, m)\n  if m.text == 'boom' then error('no') end\n  return 're: ' .. m.text\nend }",
        )],
        "",
    );
    let (rt, problems) = p.runtime();
    assert!(problems.is_empty(), "{problems:?}");
    let texts = ["a", "b", "boom", "c", "d"];
    let mut calls: Vec<(String, Call, Ctx)> = texts
        .iter()
        .map(|t| ("e".to_string(), respond(t), ctx()))
        .collect();
    calls.push(("missing".into(), respond("e"), ctx()));
    let out = rt.call_many(calls).await;
    assert_eq!(out.len(), 6);
    for (i, t) in texts.iter().enumerate() {
        match (t, &out[i]) {
            // Named by the engine's file and line, as any engine error is.
            (&"boom", Err(e)) => assert!(e.to_string().contains("e.lua:2: no"), "{e}"),
            (t, Ok(r)) => assert_eq!(r.output.messages, vec![format!("re: {t}")]),
            (t, other) => panic!("{t}: {other:?}"),
        }
    }
    assert!(
        matches!(out[5], Err(EngineError::Load { .. })),
        "{:?}",
        out[5]
    );
    assert!(rt.call_many(Vec::new()).await.is_empty());
}

#[tokio::test]
async fn no_engine_changes_what_another_sees() {
    let poison = r#"
local json = require("json")
local template = require("template")
local M = {}
function M.get_opening(ctx)
  getmetatable("").__index.format = function() return "POISONED" end
  string.upper = function() return "POISONED" end
  json.encode = function() return "POISONED" end
  template.render = function() return "POISONED" end
  rawset(string, "rep", function() return "POISONED" end)
  shared_global = "POISONED"
  return "done"
end
function M.get_response(ctx, m) return "ok" end
return M
"#;
    let victim = r#"
local json = require("json")
local template = require("template")
local M = {}
function M.get_opening(ctx)
  return table.concat({
    string.format("%d", 7), ("x"):upper(), ("ab"):rep(2), json.encode({1}),
    template.render("{{a}}", { a = "b" }), tostring(shared_global),
  }, " ")
end
function M.get_response(ctx, m) return "ok" end
return M
"#;
    let p = Project::new(&[("poison", poison), ("victim", victim)], "");
    let (rt, problems) = p.runtime();
    assert!(problems.is_empty(), "{problems:?}");
    let clean = rt.call("victim", Call::Opening, ctx()).await.unwrap();
    for _ in 0..4 {
        // Every worker's VMs get the poison.
        rt.call("poison", Call::Opening, ctx()).await.unwrap();
    }
    for _ in 0..4 {
        let after = rt.call("victim", Call::Opening, ctx()).await.unwrap();
        assert_eq!(after.output.messages, clean.output.messages);
    }
    assert_eq!(clean.output.messages, vec!["7 X abab [1] b nil"]);
}

#[test]
fn long_loops_inside_c_are_refused_before_they_start() {
    let cases = [
        ("return #string.rep('', 2^53)", Ok("0")),
        ("return #(''):rep(2^53, '')", Ok("0")),
        ("return #string.rep('ab', 3, ',')", Ok("8")),
        (
            "return string.rep('ab', 2^40)",
            Err("string.rep: the result would be 2199023255552 bytes, more than the engine's memory_limit"),
        ),
        (
            "return table.move({}, 1, 2^40, 2)",
            Err("table.move: 1099511627776 elements are more than the engine's memory_limit could hold"),
        ),
        ("local t = table.move({1, 2, 3}, 1, 3, 2); return #t", Ok("4")),
    ];
    let p = Project::new(&[], "");
    let (rt, _) = p.runtime();
    for (code, want) in cases {
        let started = std::time::Instant::now();
        let got = rt.eval_blocking("t.lua", code, &[]);
        assert!(started.elapsed() < Duration::from_secs(1), "{code}");
        match (got, want) {
            (Ok(v), Ok(w)) => assert_eq!(v.to_string(), w, "{code}"),
            (Err(e), Err(w)) => assert!(e.contains(w), "{code}: {e}"),
            (got, want) => panic!("{code}: got {got:?}, wanted {want:?}"),
        }
    }
}

#[tokio::test]
async fn a_call_stuck_inside_c_fails_and_its_worker_is_replaced() {
    let stuck = r#"
local M = {}
function M.get_response(ctx, m)
  return tostring(("a"):rep(40):find(("(.-)"):rep(25) .. "b"))
end
return M
"#;
    let fine = "return { get_response = function(ctx, m) return 'fine' end }";
    let p = Project::new(&[("stuck", stuck), ("fine", fine)], "");
    let (rt, problems) = p.runtime();
    assert!(problems.is_empty(), "{problems:?}");
    let started = std::time::Instant::now();
    let e = rt
        .call("stuck", respond("hello"), ctx())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("engine stuck, get_response: did not end within its time budget: it is stuck inside Lua's C library"),
        "{e}"
    );
    // time_budget (2 s) and the grace (2 s), give or take the watchdog's tick.
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    // Every worker still answers.
    for _ in 0..4 {
        let r = rt.call("fine", respond("hi"), ctx()).await.unwrap();
        assert_eq!(r.output.messages, vec!["fine"]);
    }
    // eval gives up on such a script too.
    let e = tokio::task::spawn_blocking(move || {
        rt.eval_blocking(
            "t.lua",
            r#"return ("a"):rep(40):find(("(.-)"):rep(25) .. "b")"#,
            &[],
        )
    })
    .await
    .unwrap()
    .unwrap_err();
    assert!(
        e.starts_with("the script did not end within its time budget"),
        "{e}"
    );
}

/// Code the budget hook cannot interrupt, or that fights the error it
/// raises: each call ends within the time budget and its grace, and every
/// worker answers afterwards.
#[tokio::test]
async fn every_budget_holds_in_finalizers_handlers_and_close_methods() {
    let cases = [
        (
            "handler",
            "return tostring(xpcall(error, function() while true do end end))",
        ),
        (
            "close",
            "local guard <close> = setmetatable({}, { __close = function() while true do end end })\n  while true do end",
        ),
        (
            "handler_of_budget",
            "return tostring(xpcall(function() while true do end end, function() while true do end end))",
        ),
    ];
    let engines: Vec<(String, String)> = cases
        .iter()
        .map(|(name, body)| {
            let src = format!("return {{ get_response = function(ctx, m)\n  {body}\nend }}");
            (name.to_string(), src)
        })
        .chain([(
            "fine".to_string(),
            "return { get_response = function(ctx, m) return 'fine' end }".to_string(),
        )])
        .collect();
    let refs: Vec<(&str, &str)> = engines
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_str()))
        .collect();
    let p = Project::new(&refs, "");
    let (rt, problems) = p.runtime();
    assert!(problems.is_empty(), "{problems:?}");
    for (name, _) in cases {
        let started = std::time::Instant::now();
        let got = rt.call(name, respond("hello"), ctx()).await;
        let e = got.expect_err(name).to_string();
        assert!(e.contains("budget") || e.contains("stuck"), "{name}: {e}");
        assert!(
            started.elapsed() < Duration::from_secs(12),
            "{name}: {:?}",
            started.elapsed()
        );
        // Every worker answers again. On a loaded machine a call can land
        // on a worker still ending the last case and be given up with it
        // (the watchdog's sentence, never a wrong answer); a fresh worker
        // then takes its place.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut answered = 0;
        while answered < 4 {
            match rt.call("fine", respond("hi"), ctx()).await {
                Ok(r) => {
                    assert_eq!(r.output.messages, vec!["fine"], "after {name}");
                    answered += 1;
                }
                Err(e) => {
                    assert!(
                        e.to_string().contains("stuck inside Lua's C library"),
                        "after {name}: {e}"
                    );
                    assert!(std::time::Instant::now() < deadline, "after {name}: {e}");
                }
            }
        }
    }
}

/// Finalizers run where no budget reaches (during any allocation, and
/// when a VM closes), so none can be set: one that resurrects its object
/// and loops at the VM's close is refused when the engine loads, and so is
/// one made during a call; reloads and other engines go on.
#[tokio::test]
async fn finalizers_are_refused_so_none_can_loop() {
    let at_load = r#"
keep = setmetatable({}, { __gc = function(o) keep = o; while true do end end })
return { get_response = function(ctx, m) return 'loaded' end }
"#;
    let in_call = r#"
return { get_response = function(ctx, m)
  local mt = {}
  local t = setmetatable({}, mt)
  mt.__gc = function() while true do end end -- too late to count
  local ok, e = pcall(setmetatable, {}, { __gc = true })
  return tostring(ok) .. ' ' .. e
end }
"#;
    let p = Project::new(&[("at_load", at_load), ("in_call", in_call)], "");
    let (rt, problems) = p.runtime();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("at_load.lua:2: setmetatable: engines cannot use __gc finalizers"),
        "{problems:?}"
    );
    let r = rt.call("in_call", respond("hi"), ctx()).await.unwrap();
    assert_eq!(
        r.output.messages,
        vec!["false setmetatable: engines cannot use __gc finalizers (no budget reaches them)"]
    );
    let sticky = r#"
keep = setmetatable({}, {})
return { get_response = function(ctx, m) return 'sticky' end }
"#;
    std::fs::write(p.path("engines/at_load.lua"), sticky).unwrap();
    rt.reload();
    for _ in 0..4 {
        let r = rt.call("at_load", respond("hi"), ctx()).await.unwrap();
        assert_eq!(r.output.messages, vec!["sticky"]);
        let r = rt.call("in_call", respond("hi"), ctx()).await.unwrap();
        assert!(r.output.messages[0].starts_with("false"));
    }
    rt.reload();
}
