//! The engine runtime through the real binary: `colloquy eval`, and the
//! shipped Lua modules.

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_colloquy");

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn eval(file: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("eval")
        .arg(file)
        .args(args)
        .arg("--config")
        .arg(root().join("config.toml"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn template_lua_follows_the_mustache_rules() {
    let (code, stdout, stderr) = eval(&root().join("tests/lua/template_cases.lua"), &[]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["failed"], 0, "{stdout}");
    assert!(v["count"].as_u64().unwrap() > 60);
}

/// Spintax through `require("spin")` and `template.render(..., {spin = ...})`:
/// the same seed or ctx renders the same text, values are never spun, and an
/// unbalanced text says where.
#[test]
fn spintax_renders_one_alternative_the_same_way_every_time() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("spin.lua");
    std::fs::write(
        &f,
        r#"
local spin, template = require("spin"), require("template")
local ctx = { dialog = { id = 7 }, contact = { id = 3 }, history = { {}, {} }, name = "A|B {x|y}" }
local seen = {}
for seed = 1, 64 do seen[spin("{Hi|Hello|Hey}", seed)] = true end
local ok, err = pcall(spin.render, "fine\n{Hi|Hello", 1)
return {
  same = spin.render("{a|b|c|d}{1|2|3|4}", ctx) == spin.render("{a|b|c|d}{1|2|3|4}", ctx),
  called = spin("{a|b}", 5) == spin.render("{a|b}", 5),
  three = seen["Hi"] and seen["Hello"] and seen["Hey"] and true,
  value = template.render("{Dear|Dear} {{name}}", ctx, nil, { spin = ctx, escape = false }),
  plain = template.render("{Hi|Hello}", {}),
  err = tostring(err),
}
"#,
    )
    .unwrap();
    let (code, stdout, stderr) = eval(&f, &[]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["same"], true, "{v}");
    assert_eq!(v["called"], true, "{v}");
    assert_eq!(v["three"], true, "{v}");
    assert_eq!(v["value"], "Dear A|B {x|y}", "{v}");
    assert_eq!(v["plain"], "{Hi|Hello}", "no spin without opts.spin: {v}");
    let err = v["err"].as_str().unwrap();
    assert!(
        err.contains("line 2, column 1: this { is never closed"),
        "{err}"
    );
}

#[test]
fn eval_prints_json_and_passes_args() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("x.lua");
    std::fs::write(
        &f,
        "return { args = arg, sum = 1 + 2, t = require('time').duration('2h') }",
    )
    .unwrap();
    let (code, stdout, stderr) = eval(&f, &["a", "b"]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"args": ["a", "b"], "sum": 3, "t": 7200.0})
    );
}

#[test]
fn eval_reports_lua_errors_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.lua");
    std::fs::write(&f, "local x = 1\nreturn x +\n").unwrap();
    let (code, _, stderr) = eval(&f, &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("bad.lua:3:"), "{stderr}");
    std::fs::write(&f, "local x = nil\nreturn x.y\n").unwrap();
    let (code, _, stderr) = eval(&f, &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("bad.lua:2: attempt to index"), "{stderr}");
    let (code, _, stderr) = eval(&dir.path().join("missing.lua"), &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("missing.lua: cannot read"), "{stderr}");
}

/// `colloquy chat`: the campaign's engine answers what is typed, and an
/// opt-out ends the dialog as the host would, without asking the engine.
#[test]
fn chat_answers_and_an_opt_out_ends_it_as_the_host_would() {
    use std::io::Write;
    use std::process::Stdio;
    let mut chat = Command::new(BIN)
        .args(["chat", "--campaign", "spring", "--config"])
        .arg(root().join("config.toml"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    chat.stdin
        .take()
        .unwrap()
        .write_all("how much is it?\nplease STOP writing\nhello again\n".as_bytes())
        .unwrap();
    let out = chat.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    // The opening, the answer to the question, then the opt-out, last:
    // nothing is answered after it.
    assert!(lines[0].contains("Acme CRM"), "{stdout}");
    assert!(lines[1].contains("29 EUR"), "{stdout}");
    assert!(lines.last().unwrap().starts_with("[opted out"), "{stdout}");
    assert_eq!(stdout.matches("[opted out").count(), 1, "{stdout}");
}
