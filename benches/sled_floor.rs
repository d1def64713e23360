//! What sled 0.34 alone costs for the least the store must write, with none
//! of colloquy's store around it: the floor under the throughput bench's
//! figures.
//!
//!     cargo bench --bench sled_floor -- --dialogs 100000 --mode answer
//!
//! Modes:
//! - `answer`: messages to `--dialogs` dialogs, ten a dialog, each round
//!   over every dialog in a shuffled order. A message reads and rewrites
//!   its dialog's record (100 bytes) and appends itself and its reply
//!   (60 bytes each) to the dialog's last page, sixteen messages to a page:
//!   the records an answer changes, without the store's deferral. One
//!   transaction and one flush per batch of 2,048 messages, as the answer
//!   pipeline batches.
//! - `plain`: the same writes as `apply_batch`es (no read inside a
//!   transaction before each write), reads outside.
//! - `read`: the same reads, nothing written.
//! - `idle`: `--dialogs` contacts imported in batches of 1,000 (a 24-byte
//!   contact, its identity, its entry in the uncontacted index), then each
//!   opened in a transaction of its own as the campaign runner does
//!   (uncontacted entry removed; the claim, a 36-byte dialog, its status
//!   and activity index entries written): 137 bytes of keys and values a
//!   dialog, as colloquy's idle dialog has 136. Prints the store's file
//!   bytes and its keys' and values' bytes per dialog.
//! - `idle-plain`: the openings as five plain inserts and removals each.
//! - `idle-lean` and `idle-fewest`: layouts the store does not have, for
//!   what fewer writes and keys in random order would save (see [`Layout`]).
//!
//! Prints one JSON object: `cpu_us_per_msg` and `msgs_per_s` (the
//! message modes), `file_bytes_per_dialog` and `live_bytes_per_dialog`
//! (the idle modes).

use std::path::Path;
use std::time::Instant;

use sled::transaction::ConflictableTransactionError;
use sled::Transactional;

mod common;
use colloquy::clock::SeededRng;
use common::{bytes_under, cpu_seconds};

/// The binary's allocator (see src/main.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 2048;
const PAGE: u64 = 16;

type TxResult = Result<(), ConflictableTransactionError<()>>;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    let at = args.iter().position(|a| a == name)?;
    args.get(at + 1).cloned()
}

fn page_key(dialog: u64, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&dialog.to_be_bytes());
    k[8..].copy_from_slice(&(seq / PAGE).to_be_bytes());
    k
}

fn main() {
    let dialogs: u64 = arg("--dialogs")
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let mode = arg("--mode").unwrap_or_else(|| "answer".into());
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new()
        .path(dir.path().join("store"))
        .open()
        .unwrap();
    let report = match mode.as_str() {
        "answer" | "plain" | "read" => messages(&db, dialogs, &mode),
        "idle" => idle(&db, dir.path(), dialogs, Layout::Store),
        "idle-plain" => idle(&db, dir.path(), dialogs, Layout::Plain),
        "idle-lean" => idle(&db, dir.path(), dialogs, Layout::Lean),
        "idle-fewest" => idle(&db, dir.path(), dialogs, Layout::Fewest),
        other => panic!(
            "--mode {other}: answer, plain, read, idle, idle-plain, idle-lean or idle-fewest"
        ),
    };
    println!("{{\"dialogs\":{dialogs},\"mode\":\"{mode}\",{report}}}");
}

fn messages(db: &sled::Db, dialogs: u64, mode: &str) -> String {
    let records = db.open_tree("dialogs").unwrap();
    let pages = db.open_tree("pages").unwrap();
    for chunk in (0..dialogs).collect::<Vec<_>>().chunks(10_000) {
        let (mut r, mut p) = (sled::Batch::default(), sled::Batch::default());
        for &d in chunk {
            r.insert(&d.to_be_bytes(), vec![7u8; 100]);
            p.insert(&page_key(d, 0), vec![1u8; 60]);
        }
        records.apply_batch(r).unwrap();
        pages.apply_batch(p).unwrap();
    }
    db.flush().unwrap();
    let mut next_seq = vec![1u64; dialogs as usize];
    let mut order: Vec<u64> = (0..dialogs).collect();
    let rng = SeededRng::new(1);
    let changed = |record: &[u8], page: Option<&[u8]>| {
        let mut record = record.to_vec();
        record[0] = record[0].wrapping_add(1);
        let mut page = page.map(<[u8]>::to_vec).unwrap_or_default();
        page.extend_from_slice(&[3u8; 120]);
        (record, page)
    };
    let (cpu, started) = (cpu_seconds().1, Instant::now());
    for _round in 0..10 {
        for i in (1..order.len()).rev() {
            order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        for batch in order.chunks(BATCH) {
            match mode {
                "read" => {
                    for &d in batch {
                        let record = records.get(d.to_be_bytes()).unwrap();
                        let page = pages.get(page_key(d, next_seq[d as usize])).unwrap();
                        std::hint::black_box((record, page));
                    }
                    continue;
                }
                "plain" => {
                    let (mut r, mut p) = (sled::Batch::default(), sled::Batch::default());
                    for &d in batch {
                        let key = page_key(d, next_seq[d as usize]);
                        let record = records.get(d.to_be_bytes()).unwrap().unwrap();
                        let page = pages.get(key).unwrap();
                        let (record, page) = changed(&record, page.as_deref());
                        r.insert(&d.to_be_bytes(), record);
                        p.insert(&key, page);
                    }
                    records.apply_batch(r).unwrap();
                    pages.apply_batch(p).unwrap();
                }
                _ => (&records, &pages)
                    .transaction(|(r, p)| -> TxResult {
                        for &d in batch {
                            let key = page_key(d, next_seq[d as usize]);
                            let record = r.get(d.to_be_bytes())?.unwrap();
                            let page = p.get(key)?;
                            let (record, page) = changed(&record, page.as_deref());
                            r.insert(&d.to_be_bytes(), record)?;
                            p.insert(&key, page)?;
                        }
                        Ok(())
                    })
                    .unwrap(),
            }
            for &d in batch {
                next_seq[d as usize] += 2;
            }
            db.flush().unwrap();
        }
    }
    let n = (dialogs * 10) as f64;
    format!(
        "\"cpu_us_per_msg\":{:.2},\"msgs_per_s\":{:.0}",
        (cpu_seconds().1 - cpu) / n * 1e6,
        n / started.elapsed().as_secs_f64()
    )
}

/// How the idle modes lay an idle dialog's records out.
#[derive(Clone, Copy, PartialEq)]
enum Layout {
    /// As the store does (`idle`): eight writes an idle dialog, an opening
    /// in a transaction of its own.
    Store,
    /// The same writes as plain inserts and removals (`idle-plain`).
    Plain,
    /// The store's writes but the quiet-dialogs index (kept in memory
    /// instead), with contact and dialog ids bit-reversed in their keys so
    /// that they arrive in random order (`idle-lean`): seven writes.
    Lean,
    /// The fewest writes (`idle-fewest`): the contact keyed by its
    /// identity's hash (no identities tree) and its uncontacted entry; an
    /// opening that removes that entry and writes the dialog keyed by its
    /// contact (the claim itself) and its status entry: five writes.
    Fewest,
}

impl Layout {
    fn contact_key(self, id: u64) -> u64 {
        match self {
            Layout::Store | Layout::Plain => id,
            Layout::Lean => id.reverse_bits(),
            // The identity's hash.
            Layout::Fewest => id.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        }
    }

    fn dialog_key(self, id: u64) -> u64 {
        match self {
            Layout::Lean => id.reverse_bits(),
            _ => id,
        }
    }
}

fn idle(db: &sled::Db, dir: &Path, dialogs: u64, layout: Layout) -> String {
    let tree = |name: &str| db.open_tree(name).unwrap();
    let (contacts, identities, uncontacted) =
        (tree("contacts"), tree("identities"), tree("uncontacted"));
    let (claims, records) = (tree("dialog_of_contact"), tree("dialogs"));
    let (by_status, by_activity) = (tree("dialogs_by_status"), tree("dialogs_by_activity"));
    db.flush().unwrap();
    let before = bytes_under(dir);
    let rng = SeededRng::new(2);
    let mut pick_keys = Vec::with_capacity(dialogs as usize);
    for chunk in (0..dialogs).collect::<Vec<_>>().chunks(1_000) {
        let (mut c, mut i, mut u) = (
            sled::Batch::default(),
            sled::Batch::default(),
            sled::Batch::default(),
        );
        for &id in chunk {
            let pick = rng.next_u64();
            pick_keys.push(pick);
            c.insert(&layout.contact_key(id).to_be_bytes(), vec![5u8; 24]);
            i.insert(
                format!("u:{}", 3_000_000_000 + id).as_bytes(),
                &id.to_be_bytes(),
            );
            u.insert(
                [&b"idle\0"[..], &pick.to_be_bytes(), &id.to_be_bytes()].concat(),
                &[],
            );
        }
        contacts.apply_batch(c).unwrap();
        if layout != Layout::Fewest {
            identities.apply_batch(i).unwrap();
        }
        uncontacted.apply_batch(u).unwrap();
    }
    // Opened in the order of their pick keys, as the campaign runner picks.
    let mut order: Vec<u64> = (0..dialogs).collect();
    order.sort_by_key(|&id| pick_keys[id as usize]);
    for (n, &contact) in order.iter().enumerate() {
        let id = match layout {
            Layout::Fewest => layout.contact_key(contact),
            _ => 1_000_000_000 + n as u64,
        };
        let dialog = layout.dialog_key(id);
        let unlisted = [
            &b"idle\0"[..],
            &pick_keys[contact as usize].to_be_bytes(),
            &contact.to_be_bytes(),
        ]
        .concat();
        let status = [&[1u8][..], &id.reverse_bits().to_be_bytes()].concat();
        let activity = [(n as u64).to_be_bytes(), dialog.to_be_bytes()].concat();
        let claimed = layout != Layout::Fewest;
        let listed = matches!(layout, Layout::Store | Layout::Plain);
        if layout == Layout::Plain {
            uncontacted.remove(unlisted).unwrap();
            claims
                .insert(contact.to_be_bytes(), &dialog.to_be_bytes())
                .unwrap();
            records.insert(dialog.to_be_bytes(), vec![9u8; 36]).unwrap();
            by_status.insert(status, &[]).unwrap();
            by_activity.insert(activity, &[]).unwrap();
            continue;
        }
        (&uncontacted, &claims, &records, &by_status, &by_activity)
            .transaction(|(u, c, r, s, a)| -> TxResult {
                u.remove(unlisted.as_slice())?;
                if claimed {
                    c.insert(&contact.to_be_bytes(), &dialog.to_be_bytes())?;
                }
                r.insert(&dialog.to_be_bytes(), vec![9u8; 36])?;
                s.insert(status.as_slice(), &[])?;
                if listed {
                    a.insert(activity.as_slice(), &[])?;
                }
                Ok(())
            })
            .unwrap();
    }
    db.flush().unwrap();
    let live: u64 = db
        .tree_names()
        .iter()
        .map(|name| db.open_tree(name).unwrap())
        .flat_map(|t| {
            t.iter()
                .map(|kv| kv.map(|(k, v)| (k.len() + v.len()) as u64).unwrap())
                .collect::<Vec<_>>()
        })
        .sum();
    format!(
        "\"file_bytes_per_dialog\":{},\"live_bytes_per_dialog\":{}",
        (bytes_under(dir) - before) / dialogs,
        live / dialogs
    )
}
