use super::*;
use crate::audience;
use crate::clock::SeededRng;
use crate::model::Direction;

fn rows(csv: &str) -> Vec<ContactRow> {
    let a = audience::parse("t.csv", csv.as_bytes());
    assert!(a.problems.is_empty(), "{:?}", a.problems);
    a.rows
}

fn import(store: &Store, audience: &str, csv: &str) -> ImportStats {
    let rng = SeededRng::new(1);
    store
        .import_audience(audience, &rows(csv), &mut || rng.next_u64())
        .unwrap()
}

fn new_dialog(contact: ContactId) -> NewDialog {
    NewDialog {
        campaign: "c".into(),
        account: "a".into(),
        contact,
        at: Timestamp(1_000),
        variant: None,
    }
}

fn allow(_: &mut AccountRecord) -> Result<(), String> {
    Ok(())
}

fn opening(key: u64) -> Outbound {
    Outbound {
        kind: MessageKind::Opening,
        text: "hi".into(),
        key: IdempotencyKey(key),
    }
}

#[test]
fn import_is_idempotent_and_updates_fields() {
    let store = Store::temporary().unwrap();
    let csv = "username,first_name\nalice,Alice\nbobby,Bob\n";
    assert_eq!(
        import(&store, "l", csv),
        ImportStats {
            added: 2,
            updated: 0,
            unchanged: 0
        }
    );
    assert_eq!(
        import(&store, "l", csv),
        ImportStats {
            added: 0,
            updated: 0,
            unchanged: 2
        }
    );
    assert_eq!(store.uncontacted_count("l"), 2);
    assert_eq!(
        import(&store, "l", "username,first_name\nalice,Alicia\n"),
        ImportStats {
            added: 0,
            updated: 1,
            unchanged: 0
        }
    );
    let c = store
        .contact_by_identity(&Identity::Username("alice".into()))
        .unwrap()
        .unwrap();
    assert_eq!(c.first_name.as_deref(), Some("Alicia"));
    assert_eq!(store.uncontacted_count("l"), 2);
}

#[test]
fn claiming_is_exclusive_across_audiences_and_campaigns() {
    let store = Store::temporary().unwrap();
    import(&store, "a1", "username\nalice\n");
    import(&store, "a2", "username\nalice\n");
    let id = store.pick_uncontacted("a1", 0).unwrap().unwrap();
    assert_eq!(store.pick_uncontacted("a2", u64::MAX).unwrap(), Some(id));
    let (d, m) = store
        .open_dialog(&new_dialog(id), Some(&opening(7)), &allow)
        .unwrap();
    assert_eq!(m.unwrap().delivery, Some(Delivery::Pending));
    assert_eq!(store.dialog_of_contact(id).unwrap(), Some(d.id));
    // Gone from both audiences, and a second claim fails.
    assert_eq!(store.pick_uncontacted("a1", 0).unwrap(), None);
    assert_eq!(store.pick_uncontacted("a2", 0).unwrap(), None);
    let again = store.open_dialog(&new_dialog(id), None, &allow);
    assert!(matches!(again, Err(StoreError::Claimed(_))));
    // Re-importing does not list a claimed contact again.
    import(&store, "a1", "username\nalice\n");
    assert_eq!(store.uncontacted_count("a1"), 0);
}

#[test]
fn a_refused_reservation_leaves_nothing_behind() {
    let store = Store::temporary().unwrap();
    import(&store, "l", "username\nalice\n");
    let id = store.pick_uncontacted("l", 0).unwrap().unwrap();
    let deny = |_: &mut AccountRecord| Err("hourly limit reached".to_string());
    let r = store.open_dialog(&new_dialog(id), Some(&opening(1)), &deny);
    assert_eq!(r.unwrap_err().to_string(), "hourly limit reached");
    assert_eq!(store.dialog_of_contact(id).unwrap(), None);
    assert_eq!(store.uncontacted_count("l"), 1);
    assert!(store.pending_outbound().unwrap().is_empty());
}

#[test]
fn do_not_contact_removes_from_the_pick() {
    let store = Store::temporary().unwrap();
    import(&store, "l", "username\nalice\n");
    let id = store.pick_uncontacted("l", 0).unwrap().unwrap();
    store
        .add_do_not_contact(id, DoNotContact::OptedOut)
        .unwrap();
    assert_eq!(store.pick_uncontacted("l", 0).unwrap(), None);
    assert!(matches!(
        store.open_dialog(&new_dialog(id), None, &allow),
        Err(StoreError::Claimed(_))
    ));
    import(&store, "l", "username\nalice\n");
    assert_eq!(store.uncontacted_count("l"), 0);
    assert_eq!(
        store.do_not_contact(id).unwrap(),
        Some(DoNotContact::OptedOut)
    );
}

#[test]
fn random_pick_is_spread_over_the_audience() {
    let store = Store::temporary().unwrap();
    let mut csv = String::from("user_id\n");
    for i in 1..=100 {
        csv.push_str(&format!("{i}\n"));
    }
    import(&store, "l", &csv);
    let rng = SeededRng::new(9);
    let mut hits = std::collections::HashMap::new();
    let draws = 20_000;
    for _ in 0..draws {
        let id = store
            .pick_uncontacted("l", rng.next_u64())
            .unwrap()
            .unwrap();
        *hits.entry(id).or_insert(0usize) += 1;
    }
    // Every contact is reachable and none dominates: with random pick keys
    // the chance of each is its gap, on average 1/100.
    assert_eq!(hits.len(), 100);
    let max = *hits.values().max().unwrap();
    assert!(max < draws / 10, "one contact got {max} of {draws} picks");
}

#[test]
fn messages_outbox_and_inbound_dedupe() {
    let store = Store::temporary().unwrap();
    import(&store, "l", "username\nalice\n");
    let cid = store.pick_uncontacted("l", 0).unwrap().unwrap();
    let (d, _) = store
        .open_dialog(&new_dialog(cid), Some(&opening(1)), &allow)
        .unwrap();
    assert_eq!(store.pending_outbound().unwrap().len(), 1);
    assert_eq!(
        store.first_transport_id(d.id).unwrap(),
        None,
        "not on the wire yet"
    );
    let sent = store
        .settle_outbound(IdempotencyKey(1), Delivery::Sent, Some(55))
        .unwrap();
    assert_eq!(sent.transport_id, Some(55));
    assert_eq!(store.first_transport_id(d.id).unwrap(), Some(55));
    assert!(store.pending_outbound().unwrap().is_empty());
    // A repeated key is refused while pending.
    let reply = Outbound {
        kind: MessageKind::Reply,
        text: "r".into(),
        key: IdempotencyKey(2),
    };
    store
        .record_outbound(d.id, &reply, Timestamp(3_000))
        .unwrap();
    assert!(store
        .record_outbound(d.id, &reply, Timestamp(3_000))
        .is_err());

    let first = store
        .record_inbound(d.id, "a", 900, "hello", Timestamp(2_000))
        .unwrap();
    assert!(first.is_some());
    let dup = store
        .record_inbound(d.id, "a", 900, "hello", Timestamp(2_000))
        .unwrap();
    assert!(dup.is_none());
    let msgs = store.messages(d.id).unwrap();
    let seqs: Vec<u64> = msgs.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![0, 1, 2]);
    assert_eq!(msgs[2].direction, Direction::In);
    let d = store.dialog(d.id).unwrap().unwrap();
    assert_eq!(d.last_inbound_at, Some(Timestamp(2_000)));
    assert_eq!(d.next_seq, 3);
    // The same transport id sent to another account is another message,
    // and is deduplicated in its own right.
    assert!(store
        .record_inbound(d.id, "b", 900, "hello b", Timestamp(2_500))
        .unwrap()
        .is_some());
    assert!(store
        .record_inbound(d.id, "b", 900, "hello b", Timestamp(2_500))
        .unwrap()
        .is_none());
    // Dedupe reaches back past the newest page.
    for tid in 1000..1040 {
        store
            .record_inbound(d.id, "a", tid, "more", Timestamp(3_000))
            .unwrap()
            .unwrap();
    }
    assert!(store
        .record_inbound(d.id, "a", 900, "hello", Timestamp(2_000))
        .unwrap()
        .is_none());
    // An id below the highest seen is looked up, not taken as a repeat.
    assert_eq!(
        store.dialog(d.id).unwrap().unwrap().max_incoming_id,
        Some(1039)
    );
    assert!(store
        .record_inbound(d.id, "a", 950, "late", Timestamp(3_100))
        .unwrap()
        .is_some());
    assert_eq!(store.messages(d.id).unwrap().len(), 45);
}

#[test]
fn messages_of_the_older_layout_are_moved_into_pages() {
    let dir = tempfile::tempdir().unwrap();
    let msg = |dialog: DialogId, seq: u64| Message {
        dialog,
        seq,
        direction: Direction::In,
        kind: None,
        text: format!("{dialog}/{seq}"),
        at: Timestamp(seq as i64),
        key: None,
        delivery: None,
        transport_id: Some(seq as i64 + 1),
    };
    {
        let store = Store::open(dir.path()).unwrap();
        let old = store.db.open_tree("messages").unwrap();
        for (d, n) in [(1, 3), (2, 20)] {
            for seq in 0..n {
                old.insert(pair(u64_key(d), u64_key(seq)), encode(&msg(d, seq)))
                    .unwrap();
            }
        }
        store.flush().unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    assert!(!store.db.tree_names().iter().any(|n| n == b"messages"));
    assert_eq!(
        store.messages(1).unwrap(),
        (0..3).map(|s| msg(1, s)).collect::<Vec<_>>()
    );
    assert_eq!(
        store.messages(2).unwrap(),
        (0..20).map(|s| msg(2, s)).collect::<Vec<_>>()
    );
    assert_eq!(store.message_at(2, 17).unwrap(), Some(msg(2, 17)));
}

#[test]
fn status_and_activity_indexes_follow_the_dialog() {
    let store = Store::temporary().unwrap();
    import(&store, "l", "username\nalice\nbobby\n");
    let mut ids = Vec::new();
    for (i, r) in [0u64, u64::MAX].into_iter().enumerate() {
        let cid = store.pick_uncontacted("l", r).unwrap().unwrap();
        let mut nd = new_dialog(cid);
        nd.at = Timestamp(1_000 * (i as i64 + 1));
        ids.push(store.open_dialog(&nd, None, &allow).unwrap().0.id);
    }
    assert_eq!(store.dialogs_with_status("active").unwrap(), ids);
    assert_eq!(
        store.quietest_dialog().unwrap(),
        Some((Timestamp(1_000), ids[0]))
    );

    store
        .record_inbound(ids[0], "a", 1, "x", Timestamp(5_000))
        .unwrap();
    assert_eq!(
        store.quietest_dialog().unwrap(),
        Some((Timestamp(2_000), ids[1]))
    );

    let done = DialogStatus::Finished {
        outcome: "booked".into(),
    };
    store.set_dialog_status(ids[1], done).unwrap();
    assert_eq!(store.dialogs_with_status("finished").unwrap(), vec![ids[1]]);
    assert_eq!(store.dialogs_with_status("active").unwrap(), vec![ids[0]]);
    assert_eq!(
        store.quietest_dialog().unwrap(),
        Some((Timestamp(5_000), ids[0]))
    );
    // An illegal transition is an error and changes nothing.
    let err = store
        .set_dialog_status(ids[1], DialogStatus::Active)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "a dialog cannot go from finished to active"
    );
    let counts: std::collections::HashMap<_, _> =
        store.dialog_counts().unwrap().into_iter().collect();
    assert_eq!((counts["active"], counts["finished"]), (1, 1));
    // Nothing is recorded for sending in a finished dialog.
    let out = Outbound {
        kind: MessageKind::FollowUp,
        text: "?".into(),
        key: IdempotencyKey(3),
    };
    assert!(store.record_outbound(ids[1], &out, Timestamp(9)).is_err());
}

#[test]
fn records_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let did;
    {
        let store = Store::open(dir.path()).unwrap();
        import(&store, "l", "username\nalice\n");
        let cid = store.pick_uncontacted("l", 0).unwrap().unwrap();
        did = store
            .open_dialog(&new_dialog(cid), Some(&opening(4)), &allow)
            .unwrap()
            .0
            .id;
        store
            .update_account("a", &|r| r.first_send_at = Some(Timestamp(1)))
            .unwrap();
        store.flush().unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        store.dialog(did).unwrap().unwrap().status,
        DialogStatus::Active
    );
    assert_eq!(store.pending_outbound().unwrap().len(), 1);
    assert_eq!(
        store.account("a").unwrap().first_send_at,
        Some(Timestamp(1))
    );
}

#[test]
fn a_second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Store::open(dir.path()).unwrap();
    let second = Store::open(dir.path());
    assert!(
        matches!(second, Err(StoreError::Locked(_))),
        "{:?}",
        second.err()
    );
}

#[test]
fn a_store_of_a_newer_layout_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        store
            .t
            .meta
            .insert("record_version", &[RECORD_VERSION + 1])
            .unwrap();
        store.flush().unwrap();
    }
    let err = Store::open(dir.path()).err().expect("refused");
    assert!(err.needs_operator(), "{err}");
    let text = err.to_string();
    assert!(text.contains("was written by a newer colloquy"), "{text}");
    assert!(
        text.contains(&format!("layout {}", RECORD_VERSION + 1)),
        "{text}"
    );
    assert!(text.contains("colloquy restore"), "{text}");
    // Refused again: the refusal wrote nothing over the newer layout.
    assert!(Store::open(dir.path()).is_err());
}

/// A store of layout 3 keyed its status index by the dialog id in order:
/// opening rebuilds the index in the new key layout, and a rebuild done
/// again (a crash before the store named layout 4) changes nothing.
#[test]
fn a_status_index_of_layout_3_is_rebuilt_as_the_store_opens() {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<DialogId> = {
        let store = Store::open(dir.path()).unwrap();
        import(&store, "l", "username\nalice\nbobby\ncarol\n");
        let ids: Vec<DialogId> = (0..3)
            .map(|_| {
                let cid = store.pick_uncontacted("l", 0).unwrap().unwrap();
                store
                    .open_dialog(&new_dialog(cid), None, &allow)
                    .unwrap()
                    .0
                    .id
            })
            .collect();
        let done = DialogStatus::Finished {
            outcome: "booked".into(),
        };
        store.set_dialog_status(ids[1], done).unwrap();
        let old_key = |tag: u8, id: DialogId| [&[tag][..], &id.to_be_bytes()].concat();
        let mut batch = sled::Batch::default();
        for key in store.t.by_status.iter().keys() {
            let key = key.unwrap();
            batch.remove(key.clone());
            batch.insert(old_key(key[0], status_key_dialog(&key)), &[]);
        }
        store.t.by_status.apply_batch(batch).unwrap();
        store.t.meta.insert("record_version", &[3]).unwrap();
        store.flush().unwrap();
        ids
    };
    for _ in 0..2 {
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.dialogs_with_status("active").unwrap(),
            vec![ids[0], ids[2]]
        );
        assert_eq!(store.dialogs_with_status("finished").unwrap(), vec![ids[1]]);
        assert_eq!(store.t.by_status.len(), 3);
        assert_eq!(
            store.t.meta.get("record_version").unwrap().unwrap()[0],
            RECORD_VERSION
        );
        // As if a crash came after the rebuild, before layout 4 was named.
        store.t.meta.insert("record_version", &[3]).unwrap();
        store.flush().unwrap();
    }
}

/// The quiet-dialogs index is in memory since layout 5: opening a store
/// lists its live dialogs from their records, and a layout-4 store's index
/// tree goes once layout 5 is named.
#[test]
fn the_quiet_dialogs_index_is_built_from_the_dialogs_when_the_store_opens() {
    let dir = tempfile::tempdir().unwrap();
    let ids = {
        let store = Store::open(dir.path()).unwrap();
        import(&store, "l", "username\nalice\nbobby\ncarol\n");
        let mut ids = Vec::new();
        for i in 0..3 {
            let cid = store.pick_uncontacted("l", i).unwrap().unwrap();
            let mut nd = new_dialog(cid);
            nd.at = Timestamp(1_000 * (i as i64 + 1));
            ids.push(store.open_dialog(&nd, None, &|_| Ok(())).unwrap().0.id);
        }
        store
            .record_inbound(ids[0], "a", 1, "x", Timestamp(5_000))
            .unwrap();
        let done = DialogStatus::Finished {
            outcome: "booked".into(),
        };
        store.set_dialog_status(ids[1], done).unwrap();
        // As layout 4 left it: the index in a tree of its own.
        let old = store.db.open_tree("dialogs_by_activity").unwrap();
        old.insert([1u8; 16], &[]).unwrap();
        store.t.meta.insert("record_version", &[4]).unwrap();
        store.flush().unwrap();
        ids
    };
    for _ in 0..2 {
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.quietest_dialog().unwrap(),
            Some((Timestamp(3_000), ids[2]))
        );
        store.set_dialog_status(ids[2], DialogStatus::Dead).unwrap();
        assert_eq!(
            store.quietest_dialog().unwrap(),
            Some((Timestamp(5_000), ids[0]))
        );
        assert!(!store
            .db
            .tree_names()
            .iter()
            .any(|n| n == b"dialogs_by_activity"));
        assert_eq!(
            store.t.meta.get("record_version").unwrap().unwrap()[0],
            RECORD_VERSION
        );
        // Undone for the second opening, which lists it again.
        store
            .t
            .dialogs
            .insert(u64_key(ids[2]), {
                let mut d = store.dialog(ids[2]).unwrap().unwrap();
                d.status = DialogStatus::Active;
                d.indexed_at = None;
                encode_dialog(&d)
            })
            .unwrap();
        store.flush().unwrap();
    }
}

/// One unreadable dialog record does not keep the store from opening: the
/// other dialogs are listed, and reading that one is refused as before.
#[test]
fn a_damaged_dialog_record_is_left_out_of_the_quiet_dialogs_index() {
    let dir = tempfile::tempdir().unwrap();
    let (good, bad) = {
        let store = Store::open(dir.path()).unwrap();
        let good = one_dialog(&store);
        import(&store, "b", "username\nbobby\n");
        let bob = store.pick_uncontacted("b", 0).unwrap().unwrap();
        let (bad, _) = store
            .open_dialog(&new_dialog(bob), None, &|_| Ok(()))
            .unwrap();
        store.t.dialogs.insert(u64_key(bad.id), &[2, 0xFF]).unwrap();
        store.flush().unwrap();
        (good, bad.id)
    };
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        store.quietest_dialog().unwrap(),
        Some((good.last_activity(), good.id))
    );
    assert!(store.dialog(bad).is_err());
}

#[test]
fn a_store_that_lost_its_identity_is_damaged_not_new() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        import(&store, "a", "username\nalice\n");
        store.t.meta.remove("store_id").unwrap();
        store.flush().unwrap();
    }
    let err = Store::open(dir.path()).err().expect("refused");
    assert!(err.needs_operator(), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("is damaged (it holds records but lost its identity)"),
        "{text}"
    );
    assert!(text.contains("colloquy restore"), "{text}");
}

#[test]
fn dialogs_and_contacts_are_stored_binary_and_the_older_json_is_read() {
    let store = Store::temporary().unwrap();
    let dialog = one_dialog(&store);
    let contact = store.contact(dialog.contact).unwrap().unwrap();
    let stored = store.t.contacts.get(u64_key(contact.id)).unwrap().unwrap();
    assert_ne!(stored[0], records::JSON);
    assert_eq!(decode_contact(&stored).unwrap(), contact);
    let stored = store.t.dialogs.get(u64_key(dialog.id)).unwrap().unwrap();
    assert_ne!(stored[0], records::JSON);
    assert_eq!(decode_dialog(&stored).unwrap(), dialog);
    // As earlier versions wrote them: JSON, every field, nulls included.
    let mut older = serde_json::to_value(&dialog).unwrap();
    older["last_inbound_at"] = serde_json::Value::Null;
    older["reviewed_at"] = serde_json::Value::Null;
    older["follow_ups_sent"] = 0.into();
    older["state"] = serde_json::json!({});
    let bytes = [&[records::JSON][..], older.to_string().as_bytes()].concat();
    assert_eq!(decode_dialog(&bytes).unwrap(), dialog);
    let mut older = serde_json::to_value(&contact).unwrap();
    older["phone"] = serde_json::Value::Null;
    older["fields"] = serde_json::json!({});
    let bytes = [&[records::JSON][..], older.to_string().as_bytes()].concat();
    assert_eq!(decode_contact(&bytes).unwrap(), contact);
}

/// A store of the first layout (every record JSON) opens, reads its
/// records and rewrites each in binary when it changes.
#[test]
fn a_store_of_json_records_is_read_and_moved_on() {
    let dir = tempfile::tempdir().unwrap();
    let (contact, dialog) = {
        let store = Store::open(dir.path()).unwrap();
        let dialog = one_dialog(&store);
        let alice = store.contact(dialog.contact).unwrap().unwrap();
        import(&store, "b", "username\nbobby\n");
        for c in store.t.contacts.iter().values() {
            let c = decode_contact(&c.unwrap()).unwrap();
            store
                .t
                .contacts
                .insert(u64_key(c.id), encode_json(&c))
                .unwrap();
        }
        store
            .t
            .dialogs
            .insert(u64_key(dialog.id), encode_json(&dialog))
            .unwrap();
        store.t.meta.insert("record_version", &[1]).unwrap();
        store.flush().unwrap();
        (alice, dialog)
    };
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.contact(contact.id).unwrap().unwrap(), contact);
    assert_eq!(store.dialog(dialog.id).unwrap().unwrap(), dialog);
    assert_eq!(
        store.dialog_summaries(false).next().unwrap().unwrap(),
        DialogSummary::from(&dialog)
    );
    let bob = store
        .contact_by_identity(&Identity::Username("bobby".into()))
        .unwrap()
        .unwrap();
    let (_, _) = store
        .open_dialog(&new_dialog(bob.id), None, &|_| Ok(()))
        .unwrap();
    let changed = store
        .set_dialog_status(dialog.id, DialogStatus::Dead)
        .unwrap();
    let stored = store.t.dialogs.get(u64_key(dialog.id)).unwrap().unwrap();
    assert_ne!(stored[0], records::JSON);
    assert_eq!(decode_dialog(&stored).unwrap(), changed);
    assert_eq!(
        store.t.meta.get("record_version").unwrap().unwrap()[0],
        RECORD_VERSION
    );
}

#[test]
fn unknown_record_versions_are_reported() {
    let err = decode_dialog(&[9, b'{', b'}']).unwrap_err();
    assert_eq!(
        err.to_string(),
        "a stored dialog record is unreadable (unknown record version 9)"
    );
}

#[test]
fn a_reply_confirmed_in_a_batch_reads_back_as_sent() {
    let store = Store::temporary().unwrap();
    import(&store, "l", "username\nalice\n");
    let cid = store.pick_uncontacted("l", 0).unwrap().unwrap();
    let (d, _) = store.open_dialog(&new_dialog(cid), None, &allow).unwrap();
    for key in [7, 8] {
        let out = Outbound {
            kind: MessageKind::Reply,
            text: format!("r{key}"),
            key: IdempotencyKey(key),
        };
        store.record_outbound(d.id, &out, Timestamp(2_000)).unwrap();
    }
    let sent = took(7);
    store
        .settle_batch(&Flight::default(), &[sent], &|_, _| {})
        .unwrap();
    let deliveries = deliveries(&store, d.id);
    assert_eq!(deliveries, [Some(Delivery::Sent), Some(Delivery::Pending)]);
    assert_eq!(store.pending_of(d.id).unwrap().len(), 1);
    assert_eq!(
        store.pending_outbound().unwrap()[0].key,
        Some(IdempotencyKey(8))
    );
    // Settling it again is a no-op; the other one is still pending.
    store
        .settle_batch(&Flight::default(), &[took(7)], &|_, _| {})
        .unwrap();
    assert!(store.is_pending(IdempotencyKey(8)).unwrap());
}

/// A store's one dialog (with alice), as stored.
fn one_dialog(store: &Store) -> Dialog {
    import(store, "l", "username\nalice\n");
    let cid = store.pick_uncontacted("l", 0).unwrap().unwrap();
    let (d, _) = store.open_dialog(&new_dialog(cid), None, &allow).unwrap();
    store.dialog(d.id).unwrap().unwrap()
}

/// How each message of a dialog stands.
fn deliveries(store: &Store, dialog: DialogId) -> Vec<Option<Delivery>> {
    store
        .messages(dialog)
        .unwrap()
        .into_iter()
        .map(|m| m.delivery)
        .collect()
}

/// The keys of the messages waiting in the outbox.
fn outbox_keys(store: &Store) -> Vec<Option<IdempotencyKey>> {
    store
        .pending_outbound()
        .unwrap()
        .into_iter()
        .map(|m| m.key)
        .collect()
}

/// The transport took the reply with this key.
fn took(key: u64) -> Settle {
    Settle {
        account: "a".into(),
        key: IdempotencyKey(key),
        delivered: crate::transport::Delivered {
            transport_id: 70,
            at: Timestamp(2_100),
        },
    }
}

/// An answer to `dialog`'s next message with two replies, keys 1 and 2.
fn answer<'a>(
    dialog: &'a Dialog,
    transport_id: i64,
    state: &'a serde_json::Value,
    outbound: &'a [Outbound],
) -> Answer<'a> {
    Answer {
        dialog: dialog.id,
        seen: dialog,
        account: "a",
        transport_id,
        text: "hello",
        at: Timestamp(2_000),
        now: Timestamp(2_000),
        reply: Some(EngineAnswer {
            state,
            outbound,
            ending: None,
        }),
        reserve: true,
        plan: None,
    }
}

fn replies() -> Vec<Outbound> {
    (1..=2)
        .map(|k| Outbound {
            kind: MessageKind::Reply,
            text: format!("r{k}"),
            key: IdempotencyKey(k),
        })
        .collect()
}

/// A dialog answered with two replies, both flying.
fn one_flight(store: &Store) -> (Dialog, Flight) {
    let d = one_dialog(store);
    let (state, out) = (serde_json::json!({}), replies());
    let (_, flight) = store
        .answer_batch(&[answer(&d, 5, &state, &out)], &["a"], &|_, _| true)
        .unwrap();
    (d, flight)
}

/// A batch's accounts are found by a binary search: out of order, one
/// would get no slot, so the caller's mistake stops the batch.
#[test]
#[should_panic(expected = "sorted, each once")]
fn a_batch_names_its_accounts_sorted() {
    let store = Store::temporary().unwrap();
    let _ = store.answer_batch(&[], &["b", "a"], &|_, _| true);
}

#[test]
fn replies_in_flight_are_pending_until_their_batch_settles() {
    let store = Store::temporary().unwrap();
    let d = one_dialog(&store);
    let (state, out) = (serde_json::json!({}), replies());
    // Only the first reply gets a slot: it flies, the second waits in the
    // outbox.
    let only_first = |_: &mut AccountRecord, k: IdempotencyKey| k == IdempotencyKey(1);
    let (answered, flight) = store
        .answer_batch(&[answer(&d, 5, &state, &out)], &["a"], &only_first)
        .unwrap();
    assert!(matches!(answered[0], AnswerOutcome::Done { slots: 1, .. }));
    assert!(store.is_pending(IdempotencyKey(1)).unwrap());
    assert!(store.is_pending(IdempotencyKey(2)).unwrap());
    assert_eq!(store.pending_of(d.id).unwrap().len(), 2);
    assert_eq!(store.pending_outbound().unwrap().len(), 1);
    // A key in flight cannot be recorded again.
    let again = store.record_outbound(
        d.id,
        &Outbound {
            kind: MessageKind::Reply,
            text: "dup".into(),
            key: IdempotencyKey(1),
        },
        Timestamp(2_001),
    );
    assert!(matches!(again, Err(StoreError::Refused(_))), "{again:?}");

    let sent = took(1);
    let confirmed = std::cell::Cell::new(0);
    store
        .settle_batch(&flight, &[sent], &|_, _| confirmed.set(confirmed.get() + 1))
        .unwrap();
    assert_eq!(confirmed.get(), 1);
    assert!(!store.is_pending(IdempotencyKey(1)).unwrap());
    let deliveries = deliveries(&store, d.id);
    assert_eq!(
        deliveries,
        [None, Some(Delivery::Sent), Some(Delivery::Pending)]
    );
}

#[test]
fn a_reply_of_a_flight_not_sent_moves_to_the_outbox() {
    let store = Store::temporary().unwrap();
    let (_, flight) = one_flight(&store);
    assert!(store.pending_outbound().unwrap().is_empty());
    // The first was sent, the second failed.
    let sent = took(1);
    store.settle_batch(&flight, &[sent], &|_, _| {}).unwrap();
    assert_eq!(outbox_keys(&store), [Some(IdempotencyKey(2))]);
    store
        .transact(|tx| tx.cancel(&[IdempotencyKey(2)], "opted out"))
        .unwrap();
    assert!(outbox_keys(&store).is_empty());
    assert!(!store.is_pending(IdempotencyKey(2)).unwrap());
}

#[test]
fn a_flight_out_when_the_host_stopped_lands_in_the_outbox_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let did;
    {
        let store = Store::open(dir.path()).unwrap();
        let d = one_dialog(&store);
        let d = store.dialog(d.id).unwrap().unwrap();
        did = d.id;
        let (state, out) = (serde_json::json!({}), replies());
        let (_, flight) = store
            .answer_batch(&[answer(&d, 5, &state, &out)], &["a"], &|_, _| true)
            .unwrap();
        assert_eq!(flight.replies.len(), 2);
        // A cancelled one (an opt-out came in meanwhile) is not landed.
        store
            .transact(|tx| tx.cancel(&[IdempotencyKey(2)], "opted out"))
            .unwrap();
        store.flush().unwrap();
        // The host dies here: nothing settles the flight.
    }
    let store = Store::open(dir.path()).unwrap();
    let pending: Vec<_> = store
        .pending_outbound()
        .unwrap()
        .into_iter()
        .map(|m| (m.dialog, m.key))
        .collect();
    assert_eq!(pending, [(did, Some(IdempotencyKey(1)))]);
    assert!(store.is_pending(IdempotencyKey(1)).unwrap());
    assert_eq!(outbox_keys(&store), [Some(IdempotencyKey(1))]);
    assert_eq!(
        store.messages(did).unwrap()[2].delivery,
        Some(Delivery::Cancelled {
            reason: "opted out".into()
        })
    );
}

/// Two stores answer the same messages, one from plans worked out ahead,
/// one in the transaction: they must hold the same records throughout,
/// also when a plan is outdated (a reply cancelled under it).
#[test]
fn a_planned_answer_writes_what_the_transaction_would() {
    let stores = [Store::temporary().unwrap(), Store::temporary().unwrap()];
    let mut ids = Vec::new();
    for store in &stores {
        ids.push(one_dialog(store).id);
    }
    assert_eq!(ids[0], ids[1]);
    let id = ids[0];
    let mut written: Option<Box<Written>> = None;
    let mut planned = 0;
    for round in 0..40u64 {
        let state = serde_json::json!({ "round": round });
        let out: Vec<Outbound> = (0..1 + round % 3)
            .map(|k| Outbound {
                kind: MessageKind::Reply,
                text: format!("r{round}.{k}"),
                key: IdempotencyKey(1000 * (round + 1) + k),
            })
            .collect();
        if round % 7 == 3 {
            // Something else writes the last page: the plan is outdated.
            for store in &stores {
                let last = store.pending_of(id).unwrap().into_iter().next_back();
                if let Some(key) = last.and_then(|m| m.key) {
                    store.transact(|tx| tx.cancel(&[key], "test")).unwrap();
                }
            }
        }
        for (n, store) in stores.iter().enumerate() {
            let seen = store.dialog(id).unwrap().unwrap();
            let mut a = answer(&seen, 10 + round as i64, &state, &out);
            a.reserve = round % 2 == 0;
            let plan = match n {
                0 => written.take().and_then(|w| plan(&a, *w)),
                _ => None,
            };
            planned += plan.is_some() as usize;
            let plan = plan.map(|p| PlanCell::new(Some(p)));
            a.plan = plan.as_ref();
            let (answered, flight) = store.answer_batch(&[a], &["a"], &|_, _| true).unwrap();
            let AnswerOutcome::Done { written: w, .. } = &answered[0] else {
                panic!("round {round}: {:?}", answered[0]);
            };
            if n == 0 {
                written = Some(w.clone());
            }
            store.settle_batch(&flight, &[], &|_, _| {}).unwrap();
        }
        assert_eq!(
            stores[0].dialog(id).unwrap(),
            stores[1].dialog(id).unwrap(),
            "round {round}"
        );
        assert_eq!(
            stores[0].messages(id).unwrap(),
            stores[1].messages(id).unwrap(),
            "round {round}"
        );
        assert_eq!(
            outbox_keys(&stores[0]),
            outbox_keys(&stores[1]),
            "round {round}"
        );
    }
    assert_eq!(planned, 39);
    // The planned store kept its dialog deferred; written out, it holds
    // the same records still.
    assert_eq!(stores[0].deferred(), 1);
    assert_eq!(stores[0].write_out_deferred(10).unwrap(), 0);
    assert!(
        stores[0].t.journal.is_empty(),
        "no journal record outlives its dialogs"
    );
    assert_eq!(stores[0].dialog(id).unwrap(), stores[1].dialog(id).unwrap());
    assert_eq!(
        stores[0].messages(id).unwrap(),
        stores[1].messages(id).unwrap()
    );
}

/// Answers each dialog's next message as planned, in one batch, from what
/// the last answer wrote; returns what this one wrote.
fn answer_planned(
    store: &Store,
    round: u64,
    dialogs: &[(DialogId, Option<Box<Written>>)],
) -> Vec<(DialogId, Option<Box<Written>>)> {
    let state = serde_json::json!({ "round": round });
    let seen: Vec<Dialog> = dialogs
        .iter()
        .map(|(id, _)| store.dialog(*id).unwrap().unwrap())
        .collect();
    let outs: Vec<Vec<Outbound>> = dialogs
        .iter()
        .map(|(id, _)| {
            vec![Outbound {
                kind: MessageKind::Reply,
                text: format!("r{round}"),
                key: IdempotencyKey(1000 * round + id),
            }]
        })
        .collect();
    let mut plans = Vec::new();
    let mut answers = Vec::new();
    for (((_, written), seen), out) in dialogs.iter().zip(&seen).zip(&outs) {
        let a = answer(seen, 10 + round as i64, &state, out);
        plans.push(PlanCell::new(written.clone().and_then(|w| plan(&a, *w))));
        answers.push(a);
    }
    for (a, p) in answers.iter_mut().zip(&plans) {
        a.plan = Some(p);
    }
    let (answered, flight) = store.answer_batch(&answers, &["a"], &|_, _| true).unwrap();
    let sent: Vec<Settle> = flight.replies.iter().map(|r| took(r.key.0)).collect();
    store.settle_batch(&flight, &sent, &|_, _| {}).unwrap();
    dialogs
        .iter()
        .zip(answered)
        .map(|((id, _), a)| match a {
            AnswerOutcome::Done { written, .. } => (*id, Some(written)),
            other => panic!("{other:?}"),
        })
        .collect()
}

/// The pipeline's read of dialogs it did not answer last
/// (`latest_dialogs`, outside any transaction) sees what the answers wrote
/// as they returned it, deferred or written out, and a write since.
#[test]
fn latest_dialogs_read_what_the_answers_wrote() {
    let store = Store::temporary().unwrap();
    let mut dialogs = open_dialogs(&store, 3);
    for round in 1..=3 {
        dialogs = answer_planned(&store, round, &dialogs);
    }
    assert_eq!(store.deferred(), 3);
    let ids: Vec<DialogId> = dialogs.iter().map(|(id, _)| *id).collect();
    let as_answered = |read: Vec<Option<batch::AsWritten>>| {
        for ((id, written), found) in dialogs.iter().zip(read) {
            let (dialog, w) = found.expect("stored");
            assert_eq!(Some(dialog), store.dialog(*id).unwrap());
            assert_eq!(Some(w), *written);
        }
    };
    as_answered(store.latest_dialogs(&ids).unwrap());
    assert_eq!(store.write_out_deferred(10).unwrap(), 0);
    as_answered(store.latest_dialogs(&ids).unwrap());
    assert!(store.latest_dialogs(&[ids[2] + 100]).unwrap()[0].is_none());
    // A write since counts: a plan from the earlier read would not hold.
    store.reindex(ids[0]).unwrap();
    let read = store.latest_dialogs(&ids[..1]).unwrap();
    assert_ne!(read[0].as_ref().map(|(_, w)| w), dialogs[0].1.as_ref());
}

/// Opens `n` dialogs (at most five) in a new store, none answered yet.
fn open_dialogs(store: &Store, n: usize) -> Vec<(DialogId, Option<Box<Written>>)> {
    import(store, "l", "username\nalice\nbobby\ncarol\ndavid\nerika\n");
    (0..n)
        .map(|_| {
            let cid = store.pick_uncontacted("l", 0).unwrap().unwrap();
            let (d, _) = store.open_dialog(&new_dialog(cid), None, &allow).unwrap();
            (d.id, None)
        })
        .collect()
}

/// What a reader sees of some dialogs: records and messages.
fn snapshot(store: &Store, ids: &[DialogId]) -> Vec<(Option<Dialog>, Vec<Message>)> {
    ids.iter()
        .map(|id| (store.dialog(*id).unwrap(), store.messages(*id).unwrap()))
        .collect()
}

/// Deferred answers survive a stop without being written out: the journal
/// is replayed on open, except where something wrote the dialog after
/// (its version is further on than the journal's).
#[test]
fn deferred_answers_are_replayed_from_the_journal_but_never_over_newer_records() {
    let dir = tempfile::tempdir().unwrap();
    let (ids, before) = {
        let store = Store::open(dir.path()).unwrap();
        let mut dialogs = open_dialogs(&store, 3);
        let ids: Vec<DialogId> = dialogs.iter().map(|(id, _)| *id).collect();
        // Enough rounds to fill a page: a full page is written at once.
        for round in 1..=12 {
            dialogs = answer_planned(&store, round, &dialogs);
        }
        assert_eq!(store.deferred(), 3);
        // Another writer takes the first dialog out of the deferred set:
        // its newer records are in the trees, the journal's are older.
        let first = ids[0];
        store
            .transact(|tx| {
                let old = tx.dialog(first)?;
                let mut d = old.clone();
                d.state = serde_json::json!({ "edited": true });
                tx.put_dialog(Some(&old), &d)?;
                Ok(())
            })
            .unwrap();
        assert_eq!(store.deferred(), 2);
        let before = snapshot(&store, &ids);
        assert_eq!(before[0].0.as_ref().unwrap().state["edited"], true);
        assert_eq!(
            before[1].1.len(),
            12 * 2,
            "in and reply, twelve times: {:?}",
            before[1]
                .1
                .iter()
                .map(|m| (m.seq, m.text.clone()))
                .collect::<Vec<_>>()
        );
        store.flush().unwrap();
        (ids, before)
    };
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.deferred(), 0);
    assert!(store.t.journal.is_empty());
    assert_eq!(snapshot(&store, &ids), before);
    // Opening again changes nothing.
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(snapshot(&store, &ids), before);
}

/// A deferred dialog reads the same through every path, before and after
/// it is written out, and a write to it builds on its deferred version.
#[test]
fn a_deferred_dialog_reads_as_its_latest_and_writes_build_on_it() {
    let store = Store::temporary().unwrap();
    let d = one_dialog(&store);
    let mut dialogs = vec![(d.id, None)];
    for round in 1..=3 {
        dialogs = answer_planned(&store, round, &dialogs);
    }
    assert_eq!(store.deferred(), 1);
    let deferred = snapshot(&store, &[d.id]);
    assert_eq!(deferred[0].1.len(), 6);
    let all: Vec<Dialog> = store.all_dialogs().map(|d| d.unwrap()).collect();
    assert_eq!(Some(&all[0]), deferred[0].0.as_ref());
    // A message stored the one-at-a-time way lands after the deferred ones.
    store
        .record_inbound(d.id, "a", 99, "later", Timestamp(3_000))
        .unwrap();
    assert_eq!(store.deferred(), 0);
    let messages = store.messages(d.id).unwrap();
    assert_eq!(messages.len(), 7);
    assert_eq!(messages[..6], deferred[0].1[..]);
    assert_eq!(messages[6].text, "later");
}

/// AnswerOutcome many times over without a write-out, dialogs keep the journal
/// small: past its bound, the dialogs of the oldest record are written to
/// their trees with the next batch. What readers see, and what a reopen
/// replays, stays the same.
#[test]
fn the_journal_stays_small_and_replays_what_it_keeps() {
    let dir = tempfile::tempdir().unwrap();
    let (ids, before) = {
        let store = Store::open(dir.path()).unwrap();
        let mut dialogs = open_dialogs(&store, 3);
        let ids: Vec<DialogId> = dialogs.iter().map(|(id, _)| *id).collect();
        let (mut most, mut trimmed) = (0, 0);
        for round in 1..=40 {
            dialogs = answer_planned(&store, round, &dialogs);
            most = most.max(store.deferred.journal_bytes());
            trimmed += usize::from(store.deferred() < 3);
        }
        // One batch over the bound at most, and trimmed back under it.
        assert!(most < 2 * deferred::JOURNAL_MOST, "{most}");
        assert!(trimmed > 0);
        let before = snapshot(&store, &ids);
        for (dialog, messages) in &before {
            assert_eq!(messages.len(), 80);
            assert_eq!(dialog.as_ref().unwrap().next_seq, 80);
            assert_eq!(dialog.as_ref().unwrap().state["round"], 40);
        }
        store.flush().unwrap();
        (ids, before)
    };
    let store = Store::open(dir.path()).unwrap();
    assert!(store.t.journal.is_empty());
    assert_eq!(snapshot(&store, &ids), before);
}

/// What a transaction does to the deferred set waits for its commit: one
/// that wrote deferred dialogs out and journaled, then failed, leaves the
/// set, the journal and what readers see as they were.
#[test]
fn a_transaction_that_fails_leaves_the_deferred_set_as_it_was() {
    let store = Store::temporary().unwrap();
    let mut dialogs = open_dialogs(&store, 3);
    let ids: Vec<DialogId> = dialogs.iter().map(|(id, _)| *id).collect();
    for round in 1..=3 {
        dialogs = answer_planned(&store, round, &dialogs);
    }
    assert_eq!(store.deferred(), 3);
    let before = snapshot(&store, &ids);
    let journal = store.t.journal.len();
    let failed = store.transact(|tx| {
        tx.write_out(3)?;
        tx.finish_deferred()?;
        abort::<()>(StoreError::Storage("the commit failed".into()))
    });
    assert!(failed.is_err());
    assert_eq!(store.deferred(), 3);
    assert_eq!(store.t.journal.len(), journal);
    assert_eq!(snapshot(&store, &ids), before);
    // The set still serves the next batch and the next write-out.
    answer_planned(&store, 4, &dialogs);
    assert_eq!(store.write_out_deferred(3).unwrap(), 0);
    let after = snapshot(&store, &ids);
    assert!(after
        .iter()
        .all(|(d, m)| d.as_ref().unwrap().next_seq == 8 && m.len() == 8));
}

/// sled may run a transaction's closure again on a conflict; the store's
/// single writer leaves it none, so a second run is refused, not let the
/// records mirrored in memory follow two runs.
#[test]
fn a_transaction_runs_once() {
    let store = Store::temporary().unwrap();
    let d = one_dialog(&store);
    let runs = std::cell::Cell::new(0);
    let result = store.transact(|tx| {
        runs.set(runs.get() + 1);
        tx.dialog(d.id)?;
        if runs.get() == 1 {
            return Err(ConflictableTransactionError::Conflict);
        }
        Ok(())
    });
    assert_eq!(runs.get(), 1);
    let e = result.unwrap_err().to_string();
    assert!(e.contains("sled ran a transaction a second time"), "{e}");
    assert_eq!(store.dialog(d.id).unwrap().unwrap(), d);
}

/// A journal left by an earlier version (whole dialog records and pages)
/// is replayed by its own rule: a record further on than the stored one
/// is taken.
#[test]
fn a_journal_of_whole_records_from_an_earlier_version_is_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let (id, expected) = {
        let store = Store::open(dir.path()).unwrap();
        import(&store, "l", "username\nalice\n");
        let cid = store.pick_uncontacted("l", 0).unwrap().unwrap();
        let (d, _) = store.open_dialog(&new_dialog(cid), None, &allow).unwrap();
        let message = Incoming {
            transport_id: 3,
            text: "hello",
            at: Timestamp(5),
        };
        let event = Event::Incoming {
            message,
            handled: true,
        };
        let change = transition::apply(store.dialog(d.id).unwrap().unwrap(), event).unwrap();
        let (ahead, m) = (change.dialog, change.appended[0].clone());
        let page = pages::put(None, &m).unwrap();
        let record = encode_json(&ahead);
        let mut chunk = Vec::new();
        chunk.extend_from_slice(&d.id.to_be_bytes());
        chunk.extend_from_slice(&(record.len() as u32).to_le_bytes());
        chunk.extend_from_slice(&record);
        chunk.push(1);
        chunk.extend_from_slice(&pages::page_key(d.id, m.seq));
        chunk.extend_from_slice(&(page.len() as u32).to_le_bytes());
        chunk.extend_from_slice(&page);
        store.t.journal.insert([0u8; 12], chunk).unwrap();
        store.flush().unwrap();
        (d.id, (ahead, vec![m]))
    };
    let store = Store::open(dir.path()).unwrap();
    assert!(store.t.journal.is_empty());
    assert_eq!(store.dialog(id).unwrap().unwrap(), expected.0);
    assert_eq!(store.messages(id).unwrap(), expected.1);
}

/// Planned answers to some dialogs, other writes, write-outs and crashes
/// (the store dropped with dialogs deferred) in a random order: what a
/// reader sees is the same after every reopen, and a reopened store
/// answers on from it.
#[test]
fn deferred_dialogs_survive_any_order_of_answers_writes_and_crashes() {
    const N: usize = 5;
    for seed in 1..=4 {
        let dir = tempfile::tempdir().unwrap();
        let rng = SeededRng::new(seed);
        let mut store = Store::open(dir.path()).unwrap();
        let mut dialogs = open_dialogs(&store, N);
        let ids: Vec<DialogId> = dialogs.iter().map(|(id, _)| *id).collect();
        let (mut crashes, mut answers) = (0, 0);
        for round in 1..=80u64 {
            match rng.next_u64() % 8 {
                0 => {
                    let d = ids[(rng.next_u64() % N as u64) as usize];
                    store
                        .transact(|tx| {
                            let old = tx.dialog(d)?;
                            let mut x = old.clone();
                            x.state = serde_json::json!({ "edited": round });
                            tx.put_dialog(Some(&old), &x)?;
                            Ok(())
                        })
                        .unwrap();
                }
                1 => {
                    store
                        .write_out_deferred((rng.next_u64() % 3) as usize)
                        .unwrap();
                }
                2 => {
                    let before = snapshot(&store, &ids);
                    store.flush().unwrap();
                    drop(store);
                    store = Store::open(dir.path()).unwrap();
                    assert_eq!(snapshot(&store, &ids), before, "seed {seed} round {round}");
                    assert!(store.t.journal.is_empty());
                    for d in &mut dialogs {
                        d.1 = None;
                    }
                    crashes += 1;
                }
                _ => {
                    let some: Vec<usize> = (0..N).filter(|_| rng.next_u64() % 2 == 0).collect();
                    let batch: Vec<_> = some.iter().map(|&i| dialogs[i].clone()).collect();
                    if batch.is_empty() {
                        continue;
                    }
                    for (i, d) in some.into_iter().zip(answer_planned(&store, round, &batch)) {
                        dialogs[i] = d;
                        answers += 1;
                    }
                }
            }
        }
        assert!(
            crashes > 3 && answers > 100,
            "{crashes} crashes, {answers} answers"
        );
        let before = snapshot(&store, &ids);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(snapshot(&store, &ids), before, "seed {seed} at the end");
    }
}

#[test]
fn a_full_disk_and_a_damaged_store_get_one_sentence() {
    let full = StoreError::from(sled::Error::Io(std::io::Error::from_raw_os_error(
        libc::ENOSPC,
    )));
    assert_eq!(
        full.to_string(),
        "the disk holding data_dir is full: free space on it (the store needs room to write), then start the host again; nothing already stored is lost"
    );
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path()).unwrap());
    std::fs::write(dir.path().join("store/conf"), b"\x00garbage\xff").unwrap();
    let e = Store::open(dir.path())
        .err()
        .expect("a damaged store is refused");
    let text = e.to_string();
    assert!(text.contains("is damaged"), "{text}");
    assert!(
        text.ends_with("restore a backup with `colloquy restore`"),
        "{text}"
    );
}

#[test]
fn an_errored_dialog_that_never_got_a_message_gives_its_contact_back() {
    let store = Store::temporary().unwrap();
    import(&store, "a1", "username\nalice\nbobby\n");
    import(&store, "a2", "username\nalice\n");
    let error = || DialogStatus::Error {
        reason: "engine broken, get_opening: boom".into(),
    };
    let alice = store
        .contact_by_identity(&Identity::Username("alice".into()))
        .unwrap()
        .unwrap()
        .id;
    let bob = store
        .contact_by_identity(&Identity::Username("bobby".into()))
        .unwrap()
        .unwrap()
        .id;
    // What a broken engine left: a claim and an error, no message.
    let (burned, _) = store.open_dialog(&new_dialog(alice), None, &allow).unwrap();
    store.set_dialog_status(burned.id, error()).unwrap();
    // An error after the opening was written: the contact may have it.
    let (sent, _) = store
        .open_dialog(&new_dialog(bob), Some(&opening(3)), &allow)
        .unwrap();
    store.set_dialog_status(sent.id, error()).unwrap();
    assert_eq!(store.uncontacted_count("a1"), 0);

    assert!(store.release_unreached(burned.id).unwrap());
    assert!(!store.release_unreached(sent.id).unwrap());
    assert_eq!(store.dialog(burned.id).unwrap(), None);
    assert_eq!(store.dialog_of_contact(alice).unwrap(), None);
    assert_eq!(store.pick_uncontacted("a1", 0).unwrap(), Some(alice));
    assert_eq!(store.pick_uncontacted("a2", 0).unwrap(), Some(alice));
    assert_eq!(store.dialog_of_contact(bob).unwrap(), Some(sent.id));
    let counts = store.dialog_counts().unwrap();
    assert!(counts.contains(&("error", 1)), "{counts:?}");
    // Claimable again.
    store
        .open_dialog(&new_dialog(alice), Some(&opening(4)), &allow)
        .unwrap();
}

#[test]
fn the_count_of_account_writes_only_grows_across_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let mut last = 0;
    for round in 0..4 {
        for at in 0..3 {
            store
                .update_account("a", &|r| r.next_send_at = Timestamp(round * 10 + at + 1))
                .unwrap();
        }
        let writes = store.mark().account_writes;
        assert!(writes >= last + 3, "round {round}: {writes} after {last}");
        last = writes;
        store.flush().unwrap();
        drop(store);
        store = Store::open(dir.path()).unwrap();
        assert_eq!(store.mark().account_writes, last, "round {round}");
    }
}

#[test]
fn a_mark_names_what_it_lacks() {
    use super::witness::Mark;
    let had = Mark {
        account_writes: 618,
        identities: 2000,
        claims: 300,
    };
    assert_eq!(had.lacks(&had), None);
    let cut = Mark {
        identities: 1024,
        ..had
    };
    assert_eq!(
        cut.lacks(&had).as_deref(),
        Some("1024 contacts where it had 2000")
    );
    let ahead = Mark {
        account_writes: 700,
        ..had
    };
    assert_eq!(ahead.lacks(&had), None);
}

#[test]
fn a_search_sieve_keeps_every_contact_that_mentions_the_text() {
    let store = Store::temporary().unwrap();
    let csv = "username,first_name,last_name,city\n\
               alice,Alice,O\"\"Hara,Cork\n\
               bobby,Борис,Иванов,Tver\n\
               carol,Carol,King,\"Back\\slash\"\n";
    import(&store, "l", csv);
    let found = |text: &str| -> Vec<String> {
        let mut names: Vec<String> = store
            .contacts_mentioning(text)
            .map(|c| c.unwrap().identity.to_string())
            .collect();
        names.sort();
        names
    };
    assert_eq!(found("ALI"), ["alice"]);
    assert_eq!(found("борис"), ["bobby"]);
    assert_eq!(found("ИВАН"), ["bobby"]);
    assert_eq!(found("cork"), ["alice"]);
    // Text JSON escapes is kept for the caller to check.
    assert_eq!(found("o\"hara"), ["alice", "bobby", "carol"]);
    assert_eq!(found("k\\s"), ["alice", "bobby", "carol"]);
    assert!(found("nobody").is_empty());
}

#[test]
fn live_bytes_count_what_a_dialog_adds() {
    let store = Store::temporary().unwrap();
    import(&store, "l", "username,company\nalice_a,Acme\n");
    let before = store.live_bytes().unwrap();
    assert!(before > 0);
    let id = store
        .contact_id_of(&Identity::Username("alice_a".into()))
        .unwrap()
        .unwrap();
    store.open_dialog(&new_dialog(id), None, &allow).unwrap();
    let added = store.live_bytes().unwrap() - before;
    // The dialog's binary record and its index entries: tens of bytes.
    assert!((30..128).contains(&added), "{added}");
}

/// Random events on three dialogs through every way the store changes a
/// dialog (the conductor's one at a time, the pipeline's planned and
/// deferred answers, sends confirmed, statuses, opt-outs, write-outs) with
/// crashes between them (the store dropped with answers only in its
/// journal, then opened again): after every step each dialog's records
/// are exactly what [`transition::apply`] says of the same events.
#[test]
fn the_store_holds_what_the_transitions_say_through_every_path_and_crash() {
    for seed in 1..=6 {
        let mut play = Play::new(seed);
        for step in 1..=200u64 {
            play.step(step);
            play.check(&format!("seed {seed} step {step}"));
        }
        let (crashes, planned) = (play.crashes, play.planned);
        assert!(
            crashes > 3 && planned > 10,
            "{crashes} crashes, {planned} planned"
        );
    }
}

/// Three dialogs in play in a store, each beside its model: the records
/// [`transition`] says it has.
struct Play {
    dir: tempfile::TempDir,
    store: Store,
    rng: SeededRng,
    models: Vec<crate::transition::tests::DialogModel>,
    /// The models of the dialogs in play: an ended one is replaced by a
    /// new dialog, and stays checked.
    playing: [usize; 3],
    /// What the pipeline wrote last of each dialog in play, to plan from.
    written: [Option<Box<Written>>; 3],
    crashes: usize,
    planned: usize,
}

impl Play {
    fn new(seed: u64) -> Play {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let names: Vec<String> = (0..60).map(|n| format!("user{n:03}")).collect();
        import(&store, "l", &format!("username\n{}\n", names.join("\n")));
        let mut play = Play {
            dir,
            store,
            rng: SeededRng::new(seed),
            models: Vec::new(),
            playing: [0, 1, 2],
            written: Default::default(),
            crashes: 0,
            planned: 0,
        };
        for key in 900..903 {
            play.open(key);
        }
        play
    }

    fn roll(&self, n: u64) -> u64 {
        self.rng.next_u64() % n
    }

    /// Opens a dialog with an opening; its model's index.
    fn open(&mut self, key: u64) -> usize {
        let cid = self.store.pick_uncontacted("l", 0).unwrap().unwrap();
        let (d, _) = self
            .store
            .open_dialog(&new_dialog(cid), Some(&opening(key)), &allow)
            .unwrap();
        let messages = self.store.messages(d.id).unwrap();
        self.models
            .push(crate::transition::tests::DialogModel::new(d, messages));
        self.models.len() - 1
    }

    /// One random event on a random dialog in play.
    fn step(&mut self, step: u64) {
        let i = self.roll(3) as usize;
        if self.models[self.playing[i]].dialog.status.tag() > 1 {
            self.playing[i] = self.open(500_000 + step);
            self.written[i] = None;
        }
        let at = Timestamp(10_000 + step as i64);
        let outs: Vec<Outbound> = (0..self.roll(3))
            .map(|k| Outbound {
                kind: MessageKind::Reply,
                text: format!("r{step}.{k}"),
                key: IdempotencyKey(1_000 * step + k),
            })
            .collect();
        match self.roll(14) {
            2..=7 => self.answer_in_a_batch(i, step, &outs),
            8 => self.confirm_a_send(i, step),
            12 | 13 if self.roll(4) != 0 => {
                let most = self.roll(3) as usize;
                self.store.write_out_deferred(most).unwrap();
            }
            12 | 13 => self.crash(),
            n => self.one_at_a_time(i, n, step, at, &outs),
        }
    }

    /// The conductor's, reviver's and operator's events.
    fn one_at_a_time(&mut self, i: usize, n: u64, step: u64, at: Timestamp, outs: &[Outbound]) {
        use crate::transition::tests::status;
        let id = self.models[self.playing[i]].dialog.id;
        let model = self.models[self.playing[i]].clone();
        let (stored, change) = match n {
            0 => {
                let stored = self.store.record_inbound(id, "a", step as i64, "hello", at);
                let message = Incoming {
                    transport_id: step as i64,
                    text: "hello",
                    at,
                };
                let event = Event::Incoming {
                    message,
                    handled: false,
                };
                (stored.is_ok(), transition::apply(model.dialog, event))
            }
            1 => {
                let a = Apply {
                    at,
                    handled: model.unhandled.first().copied(),
                    outbound: outs,
                    ending: (self.roll(6) == 0).then(|| status(self.roll(7) as u8)),
                    reviewed: self.roll(2) == 0,
                    ..Apply::default()
                };
                let stored = self.store.apply(id, &a).is_ok();
                (stored, transition::apply(model.dialog, Event::Handled(&a)))
            }
            9 => {
                // Mostly a handoff and back, now and then an end.
                let next = match self.roll(4) {
                    0 => status(self.roll(7) as u8),
                    _ => status(self.roll(2) as u8),
                };
                let stored = self.store.set_dialog_status(id, next.clone()).is_ok();
                (
                    stored,
                    transition::apply(model.dialog, Event::Status(&next)),
                )
            }
            10 => {
                let kind = [MessageKind::FollowUp, MessageKind::Human][self.roll(2) as usize];
                let text = format!("by hand {step}");
                let key = IdempotencyKey(1_000 * step + 999);
                let out = Outbound { kind, text, key };
                let stored = self.store.record_outbound(id, &out, at).is_ok();
                let event = Event::Outbound { out: &out, at };
                (stored, transition::apply(model.dialog, event))
            }
            11 if self.roll(4) == 0 => {
                let stored = self.store.opt_out(id).is_ok();
                let (waiting, unhandled) = (model.waiting(), model.unhandled.clone());
                let event = Event::OptedOut {
                    waiting: &waiting,
                    unhandled: &unhandled,
                };
                (stored, transition::apply(model.dialog, event))
            }
            _ => {
                let stored = self.store.complete_ending(id).is_ok();
                (
                    stored,
                    transition::apply(model.dialog, Event::EndingReached),
                )
            }
        };
        assert_eq!(
            stored,
            change.is_ok(),
            "the store and the transition disagree"
        );
        if let Ok(change) = change {
            self.models[self.playing[i]].take(change);
        }
        self.written[i] = None;
    }

    /// The answer pipeline's way: a batch of one, planned from what it
    /// wrote last when it can, its replies sent and settled.
    fn answer_in_a_batch(&mut self, i: usize, step: u64, outs: &[Outbound]) {
        let at = Timestamp(10_000 + step as i64);
        let state = serde_json::json!({ "step": step });
        let id = self.models[self.playing[i]].dialog.id;
        let seen = self.store.dialog(id).unwrap().unwrap();
        let mut a = answer(&seen, step as i64, &state, outs);
        (a.at, a.now) = (at, at);
        let plan = self.written[i].take().and_then(|w| plan(&a, *w));
        self.planned += plan.is_some() as usize;
        let cell = PlanCell::new(plan);
        a.plan = Some(&cell);
        let (done, flight) = self.store.answer_batch(&[a], &["a"], &|_, _| true).unwrap();
        if let AnswerOutcome::Done { written, .. } = &done[0] {
            self.written[i] = Some(written.clone());
        }
        let sent: Vec<Settle> = flight.replies.iter().map(|r| took(r.key.0)).collect();
        self.store.settle_batch(&flight, &sent, &|_, _| {}).unwrap();
        let m = &mut self.models[self.playing[i]];
        let message = Incoming {
            transport_id: step as i64,
            text: "hello",
            at,
        };
        let change = match m.dialog.status.is_live() && m.dialog.ending.is_none() {
            true => {
                let applied = Apply {
                    at,
                    state: Some(&state),
                    outbound: outs,
                    ..Apply::default()
                };
                transition::answer(m.dialog.clone(), message, &applied)
            }
            false => {
                let event = Event::Incoming {
                    message,
                    handled: false,
                };
                transition::apply(m.dialog.clone(), event)
            }
        };
        m.take(change.unwrap());
        for r in &flight.replies {
            let msg = m.messages[r.seq as usize].clone();
            m.messages[r.seq as usize] = transition::settle(msg, Delivery::Sent, None);
        }
    }

    /// The first message waiting in a dialog sent one at a time.
    fn confirm_a_send(&mut self, i: usize, step: u64) {
        let m = &mut self.models[self.playing[i]];
        if let Some(first) = m.waiting().into_iter().next() {
            let key = first.key.unwrap();
            self.store
                .settle_sent(key, step as i64, "a", &|_| {})
                .unwrap();
            let seq = first.seq as usize;
            m.messages[seq] = transition::settle(first, Delivery::Sent, Some(step as i64));
        }
    }

    /// The store dropped with whatever it deferred, and opened again.
    fn crash(&mut self) {
        self.store.flush().unwrap();
        drop(std::mem::replace(
            &mut self.store,
            Store::temporary().unwrap(),
        ));
        self.store = Store::open(self.dir.path()).unwrap();
        self.written = Default::default();
        self.crashes += 1;
    }

    /// Every dialog, its messages and its unhandled marks, as modelled.
    fn check(&self, at: &str) {
        let unhandled = self.store.unhandled().unwrap();
        for m in &self.models {
            let mut stored = self.store.dialog(m.dialog.id).unwrap().unwrap();
            stored.indexed_at = None;
            let mut model = m.dialog.clone();
            model.indexed_at = None;
            assert_eq!(stored, model, "{at}");
            assert_eq!(self.store.messages(model.id).unwrap(), m.messages, "{at}");
            let marks: Vec<u64> = unhandled
                .iter()
                .filter(|(d, _)| *d == model.id)
                .map(|(_, s)| *s)
                .collect();
            assert_eq!(marks, m.unhandled, "{at}");
        }
    }
}
