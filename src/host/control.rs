//! The control endpoint: `colloquy status`, `dialogs`, `dialog ID`,
//! `backup`, `reply`, `handback` and `export` while a host runs (sled
//! allows one process per store). The host listens on a loopback port and
//! writes the port and a random token to `data_dir/control.json`, readable
//! by its owner only (0600); a request without the token is refused. One
//! JSON line in (a [`Request`]), one JSON line out (a [`Response`]), then
//! an export's records.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Host;
use crate::report;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Status {
        json: bool,
    },
    Dialogs {
        campaign: Option<String>,
        /// A status label, or `finished:OUTCOME`.
        status: Option<String>,
        outcome: Option<String>,
        json: bool,
    },
    Dialog {
        id: u64,
    },
    /// `colloquy backup DEST`: the host copies its store.
    Backup {
        dest: String,
    },
    /// `colloquy reply DIALOG TEXT`: a human's answer.
    Reply {
        dialog: u64,
        text: String,
    },
    /// `colloquy handback DIALOG`.
    Handback {
        dialog: u64,
    },
    /// `colloquy export`: the records follow the response line.
    Export(crate::export::Export),
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    token: String,
    #[serde(flatten)]
    request: Request,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    pub text: String,
    /// Records follow on the connection (an export).
    #[serde(default)]
    pub stream: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct ControlFile {
    port: u16,
    token: String,
}

fn control_path(data_dir: &Path) -> PathBuf {
    data_dir.join("control.json")
}

/// Starts serving; the file is removed again at shutdown.
pub async fn serve(host: Arc<Host>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let token = format!("{:016x}{:016x}", host.rng.next_u64(), rand::random::<u64>());
    let path = control_path(&host.config().data_dir());
    write_private(
        &path,
        &serde_json::to_vec(&ControlFile {
            port,
            token: token.clone(),
        })?,
    )?;
    let h = host.clone();
    host.tasks.spawn(async move {
        loop {
            let conn = tokio::select! {
                c = listener.accept() => c,
                _ = h.shutdown.cancelled() => break,
            };
            let Ok((sock, _)) = conn else { continue };
            let h = h.clone();
            let token = token.clone();
            // Reports read the store, a backup copies it and an export
            // streams it: each connection is served off the runtime's
            // threads, as plain blocking IO.
            tokio::task::spawn_blocking(move || {
                let Ok(sock) = sock.into_std() else { return };
                let _ = sock.set_nonblocking(false);
                serve_one(&h, &token, sock);
            });
        }
        let _ = std::fs::remove_file(&path);
    });
    Ok(())
}

/// Answers one connection: one JSON line in, one JSON line out, then for
/// an export its records.
fn serve_one(host: &Arc<Host>, token: &str, sock: TcpStream) {
    let mut line = String::new();
    let Ok(read) = sock.try_clone() else { return };
    if BufReader::new(read).read_line(&mut line).is_err() {
        return;
    }
    let mut out = std::io::BufWriter::new(sock);
    if let Ok(Envelope {
        token: given,
        request: Request::Export(export),
    }) = serde_json::from_str::<Envelope>(&line)
    {
        if given == token {
            let _ = writeln!(
                out,
                "{}",
                serde_json::json!({"ok": true, "text": "", "stream": true})
            );
            if let Err(e) = crate::export::write(&host.config(), &host.store, &export, &mut out) {
                tracing::error!("an export stopped: {e}");
            }
            let _ = out.flush();
            return;
        }
    }
    let response = respond(host, token, &line);
    let mut text = serde_json::to_string(&response).unwrap_or_default();
    text.push('\n');
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

fn respond(host: &Arc<Host>, token: &str, line: &str) -> Response {
    let response = |result: Result<String, String>| Response {
        ok: result.is_ok(),
        text: result.unwrap_or_else(|why| why),
        stream: false,
    };
    let Ok(env) = serde_json::from_str::<Envelope>(line) else {
        return response(Err("the request is not understood".into()));
    };
    if env.token != token {
        return response(Err("the control token is wrong".into()));
    }
    let config = host.config();
    let store = |r: Result<String, crate::store::StoreError>| r.map_err(|e| e.to_string());
    response(match env.request {
        Request::Status { json } => {
            let live = report::Live {
                links: host.transport().links(),
                engine_errors: config
                    .file
                    .campaigns
                    .iter()
                    .filter_map(|c| {
                        let e = host.engines.load_error(&c.engine)?;
                        Some((c.engine.clone(), e.to_string()))
                    })
                    .collect(),
            };
            store(report::status(&config, Some(&host.store), &live, json))
        }
        Request::Dialogs {
            campaign,
            status,
            outcome,
            json,
        } => store(report::dialogs(
            &host.store,
            &report::DialogFilter {
                campaign: campaign.as_deref(),
                status: status.as_deref(),
                outcome: outcome.as_deref(),
            },
            json,
        )),
        Request::Dialog { id } => match report::dialog(&host.store, id) {
            Ok(Some(t)) => Ok(t),
            Ok(None) => Err(format!("dialog: there is no dialog {id}")),
            Err(e) => Err(e.to_string()),
        },
        Request::Backup { dest } => store(report::backup(&host.store, Path::new(&dest))),
        Request::Reply { dialog, text } => host.reply_as_human(dialog, &text).map(|()| {
            format!("queued in dialog {dialog}; it goes out when the account's limits allow\n")
        }),
        Request::Handback { dialog } => host
            .hand_back(dialog)
            .map(|()| format!("dialog {dialog} is the engine's again\n")),
        // Streamed by `serve_one`.
        Request::Export(_) => Err("the request is not understood".into()),
    })
}

/// Asks the host that runs on `data_dir`; records that follow the response
/// (an export) are copied to `records`.
pub fn ask(data_dir: &Path, request: Request) -> Result<Response, String> {
    ask_streaming(data_dir, request, &mut std::io::sink())
}

pub fn ask_streaming(
    data_dir: &Path,
    request: Request,
    records: &mut dyn Write,
) -> Result<Response, String> {
    let path = control_path(data_dir);
    let unreachable = |why: String| {
        format!(
            "a host holds the store in {} but cannot be asked ({why})",
            data_dir.display()
        )
    };
    let file: ControlFile = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| unreachable(format!("{} is missing or unreadable", path.display())))?;
    let mut stream =
        TcpStream::connect(("127.0.0.1", file.port)).map_err(|e| unreachable(e.to_string()))?;
    // A backup copies the whole store before it answers.
    let wait = match request {
        Request::Backup { .. } | Request::Export(_) => Duration::from_secs(3600),
        _ => Duration::from_secs(10),
    };
    stream.set_read_timeout(Some(wait)).ok();
    let mut line = serde_json::to_string(&Envelope {
        token: file.token,
        request,
    })
    .unwrap_or_default();
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(|e| unreachable(e.to_string()))?;
    let mut response_line = String::new();
    let mut reader = BufReader::new(stream);
    reader
        .read_line(&mut response_line)
        .map_err(|e| unreachable(e.to_string()))?;
    let response: Response =
        serde_json::from_str(&response_line).map_err(|e| unreachable(e.to_string()))?;
    if response.stream {
        std::io::copy(&mut reader, records).map_err(|e| format!("the export stopped: {e}"))?;
    }
    Ok(response)
}

/// Writes a file only its owner can read.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}
