//! The simulated world's state and its two append-only files.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::clock::Timestamp;
use crate::engine::ctx::HistoryEntry;
use crate::model::Identity;
use crate::transport::Delivered;

/// A reply a simulated contact will send.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pending {
    pub id: i64,
    pub due: Timestamp,
    pub account: String,
    pub contact: Identity,
    pub text: String,
}

/// One line of `world.jsonl`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Journal {
    Sent {
        key: u64,
        id: i64,
        at: Timestamp,
        contact: Identity,
        text: String,
    },
    Pending(Pending),
    Received {
        id: i64,
    },
    Ban {
        account: String,
    },
    FloodWait {
        account: String,
        until: Timestamp,
    },
    Restricted {
        contact: Identity,
        value: bool,
    },
    State {
        contact: Identity,
        state: serde_json::Value,
    },
    Start,
}

/// What the simulated Telegram knows.
#[derive(Debug, Default)]
pub struct World {
    /// Delivered idempotency keys.
    pub delivered: HashMap<u64, Delivered>,
    pub banned: HashSet<String>,
    /// Accounts told to wait, until when: Telegram refuses their sends
    /// meanwhile.
    pub flood_until: HashMap<String, Timestamp>,
    /// Decided once per contact.
    pub restricted: HashMap<Identity, bool>,
    /// Replies still to deliver, by due time.
    pub pending: BTreeMap<(Timestamp, i64), Pending>,
    /// Each contact's persona state.
    pub persona_state: HashMap<Identity, serde_json::Value>,
    /// Each contact's conversation, from the contact's side.
    pub history: HashMap<Identity, Vec<HistoryEntry>>,
    /// The latest time anything happened, to resume the clock from.
    pub last_time: Option<Timestamp>,
    /// How many times the world was opened before.
    pub restarts: u64,
    next_id: i64,
}

impl World {
    pub fn next_id(&mut self) -> i64 {
        self.next_id += 1;
        self.next_id
    }

    pub fn history_of(&mut self, contact: &Identity) -> &mut Vec<HistoryEntry> {
        self.history.entry(contact.clone()).or_default()
    }

    fn saw(&mut self, at: Timestamp) {
        self.last_time = Some(self.last_time.map_or(at, |t| t.max(at)));
    }

    /// Replays one entry of the world's journal; `ids` collects the
    /// transport id and time of each sent message by its key.
    fn replay(&mut self, entry: Journal, ids: &mut HashMap<u64, (i64, Timestamp)>) {
        match entry {
            Journal::Sent {
                key,
                id,
                at,
                contact,
                text,
            } => {
                ids.insert(key, (id, at));
                self.next_id = self.next_id.max(id);
                self.saw(at);
                self.history_of(&contact).push(HistoryEntry {
                    direction: "in".into(),
                    text,
                    at: at.as_secs_f64(),
                });
            }
            Journal::Pending(p) => {
                self.next_id = self.next_id.max(p.id);
                self.pending.insert((p.due, p.id), p);
            }
            Journal::Received { id } => {
                if let Some(k) = self.pending.keys().find(|(_, i)| *i == id).copied() {
                    let p = self.pending.remove(&k).expect("found above");
                    self.saw(k.0);
                    self.history_of(&p.contact).push(HistoryEntry {
                        direction: "out".into(),
                        text: p.text,
                        at: k.0.as_secs_f64(),
                    });
                }
            }
            Journal::Ban { account } => {
                self.banned.insert(account);
            }
            Journal::FloodWait { account, until } => {
                self.flood_until.insert(account, until);
            }
            Journal::Restricted { contact, value } => {
                self.restricted.insert(contact, value);
            }
            Journal::State { contact, state } => {
                self.persona_state.insert(contact, state);
            }
            Journal::Start => self.restarts += 1,
        }
    }

    /// Notes a line of the wire log: an outgoing message on it was
    /// delivered, with the id and time the journal gave it if it has them.
    fn delivered_on_wire(&mut self, v: &serde_json::Value, ids: &HashMap<u64, (i64, Timestamp)>) {
        if let Some(at) = v["at"].as_f64() {
            self.saw(Timestamp::from_secs_f64(at));
        }
        if v["direction"] != "out" {
            return;
        }
        let Some(key) = v["key"]
            .as_str()
            .and_then(|k| u64::from_str_radix(k, 16).ok())
        else {
            return;
        };
        let at = Timestamp::from_secs_f64(v["at"].as_f64().unwrap_or(0.0));
        let (id, at) = match ids.get(&key) {
            Some(found) => *found,
            None => (self.next_id(), at),
        };
        self.delivered.insert(
            key,
            Delivered {
                transport_id: id,
                at,
            },
        );
    }
}

/// The world's files. Every line goes to the OS at once (no user-space
/// buffer), so it survives the host being killed.
pub struct Files {
    wire: Mutex<File>,
    journal: Mutex<File>,
}

impl Files {
    pub fn wire(&self, line: &serde_json::Value) {
        append(&self.wire, &line.to_string());
    }

    pub fn journal(&self, entry: &Journal) {
        if let Ok(text) = serde_json::to_string(entry) {
            append(&self.journal, &text);
        }
    }
}

fn append(file: &Mutex<File>, text: &str) {
    let mut line = String::with_capacity(text.len() + 1);
    line.push_str(text);
    line.push('\n');
    // Said once, not once a message, until a write succeeds again.
    static FAILING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let mut f = file.lock().unwrap_or_else(|e| e.into_inner());
    let written = f.write_all(line.as_bytes());
    let was_failing = FAILING.swap(written.is_err(), std::sync::atomic::Ordering::Relaxed);
    if let (Err(e), false) = (written, was_failing) {
        tracing::error!("the simulated world cannot write its log: {e}");
    }
}

/// The time of the newest line of the wire log under `dir`, read from its
/// last 64 KiB without opening the world; none for a world not made yet.
pub fn last_seen(dir: &Path) -> Option<Timestamp> {
    let mut f = File::open(dir.join("wire.jsonl")).ok()?;
    let from = f.metadata().ok()?.len().saturating_sub(64 << 10);
    f.seek(SeekFrom::Start(from)).ok()?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).ok()?;
    tail.split(|b| *b == b'\n')
        // The first line of a tail may be cut.
        .skip(usize::from(from > 0))
        .filter_map(|line| serde_json::from_slice::<serde_json::Value>(line).ok()?["at"].as_f64())
        .map(Timestamp::from_secs_f64)
        .max()
}

/// Opens the world's files under `dir` and rebuilds the world from them.
pub fn open(dir: &Path) -> Result<(Files, World), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let wire_path = dir.join("wire.jsonl");
    let journal_path = dir.join("world.jsonl");
    let mut world = World::default();
    let mut ids: HashMap<u64, (i64, Timestamp)> = HashMap::new();
    // A line cut short by a kill is skipped.
    for entry in json_lines::<Journal>(&journal_path) {
        world.replay(entry, &mut ids);
    }
    // The wire log is the truth of what was delivered.
    for line in json_lines::<serde_json::Value>(&wire_path) {
        world.delivered_on_wire(&line, &ids);
    }
    let open = |p: &Path| {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| format!("cannot open {}: {e}", p.display()))
    };
    let files = Files {
        wire: Mutex::new(open(&wire_path)?),
        journal: Mutex::new(open(&journal_path)?),
    };
    files.journal(&Journal::Start);
    Ok((files, world))
}

/// The lines of a JSON-lines file that parse as `T` (none if it is not there).
fn json_lines<T: serde::de::DeserializeOwned>(path: &Path) -> impl Iterator<Item = T> {
    File::open(path)
        .into_iter()
        .flat_map(|f| BufReader::new(f).lines().map_while(Result::ok))
        .filter_map(|line| serde_json::from_str(&line).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_seen_reads_the_newest_time_of_the_wire_log() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(last_seen(dir.path()), None);
        let mut wire = String::new();
        // Past 64 KiB, so that only a tail is read and its first line is cut.
        for i in 0..2_000u32 {
            let at = 1_767_600_000.0 + f64::from(i) * 1.5;
            wire.push_str(&format!(
                "{{\"at\":{at},\"direction\":\"out\",\"text\":\"a line of some length to fill the log\"}}\n"
            ));
        }
        wire.push_str("{\"at\":17676"); // cut short by a kill
        std::fs::write(dir.path().join("wire.jsonl"), &wire).unwrap();
        assert!(wire.len() > 64 << 10);
        assert_eq!(
            last_seen(dir.path()),
            Some(Timestamp::from_secs_f64(1_767_600_000.0 + 1_999.0 * 1.5))
        );
    }
}
