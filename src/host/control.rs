//! The control endpoint: `colloquy status`, `dialogs` and `dialog ID` while
//! a host runs (sled allows one process per store). The host listens on a
//! loopback port and writes the port and a random token to
//! `data_dir/control.json`, readable by its owner only (0600); a request
//! without the token is refused. One JSON line in, one JSON line out.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

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
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    token: String,
    #[serde(flatten)]
    request: Request,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    pub text: String,
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
            tokio::spawn(async move {
                let (read, mut write) = sock.into_split();
                let mut line = String::new();
                let mut reader = tokio::io::BufReader::new(read);
                if reader.read_line(&mut line).await.is_err() {
                    return;
                }
                // Reports read the store, and a backup copies it: off
                // the runtime's threads.
                let reply = tokio::task::spawn_blocking(move || answer(&h, &token, &line))
                    .await
                    .unwrap_or_else(|e| Reply {
                        ok: false,
                        text: format!("the host failed to answer ({e})"),
                    });
                let mut out = serde_json::to_string(&reply).unwrap_or_default();
                out.push('\n');
                let _ = write.write_all(out.as_bytes()).await;
            });
        }
        let _ = std::fs::remove_file(&path);
    });
    Ok(())
}

fn answer(host: &Arc<Host>, token: &str, line: &str) -> Reply {
    let fail = |text: String| Reply { ok: false, text };
    let Ok(env) = serde_json::from_str::<Envelope>(line) else {
        return fail("the request is not understood".into());
    };
    if env.token != token {
        return fail("the control token is wrong".into());
    }
    let config = host.config();
    let text =
        match env.request {
            Request::Status { json } => {
                report::status(&config, Some(&host.store), &host.transport.links(), json)
            }
            Request::Dialogs {
                campaign,
                status,
                outcome,
                json,
            } => report::dialogs(
                &host.store,
                &report::DialogFilter {
                    campaign: campaign.as_deref(),
                    status: status.as_deref(),
                    outcome: outcome.as_deref(),
                },
                json,
            ),
            Request::Reply { dialog, text } => return match host.reply_as_human(dialog, &text) {
                Ok(()) => Reply {
                    ok: true,
                    text: format!(
                        "queued in dialog {dialog}; it goes out when the account's limits allow\n"
                    ),
                },
                Err(e) => fail(e),
            },
            Request::Handback { dialog } => {
                return match host.hand_back(dialog) {
                    Ok(()) => Reply {
                        ok: true,
                        text: format!("dialog {dialog} is the engine's again\n"),
                    },
                    Err(e) => fail(e),
                }
            }
            Request::Dialog { id } => match report::dialog(&host.store, id) {
                Ok(Some(t)) => Ok(t),
                Ok(None) => return fail(format!("dialog: there is no dialog {id}")),
                Err(e) => Err(e),
            },
            Request::Backup { dest } => report::backup(&host.store, Path::new(&dest)),
        };
    match text {
        Ok(text) => Reply { ok: true, text },
        Err(e) => fail(e.to_string()),
    }
}

/// Asks the host that runs on `data_dir`.
pub fn ask(data_dir: &Path, request: Request) -> Result<Reply, String> {
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
        Request::Backup { .. } => Duration::from_secs(3600),
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
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(|e| unreachable(e.to_string()))?;
    serde_json::from_str(&answer).map_err(|e| unreachable(e.to_string()))
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
