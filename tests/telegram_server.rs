//! The Telegram transport over the real protocol: the `colloquy` binary
//! against a local MTProto server (`../shared/mtproto-server`), with
//! contacts played by Telethon. Skipped, with one line saying how to run
//! it, where that server is not present; with `CI=true` it never skips.
//!
//! One test, so that one server serves every case:
//! - `funnel`: two accounts, contacts by username, phone and user id,
//!   a conversation to its outcome, typing and read marks, an opt-out, no
//!   contact opened twice, `status` showing the accounts ready.
//! - `crashes`: kill -9 before the first incoming message (replies while
//!   down are answered), SIGTERM and replies while down, kill -9 with a
//!   send on the wire (exactly one copy arrives).
//! - `revoked`: a session whose auth key the server does not know ends as
//!   `unauthorized`, not `connecting` forever.

mod mtproto;

use std::time::{Duration, Instant};

use mtproto::{eventually, Contacts, Project, Server, User};

/// Long enough for a host to start, connect and answer on a busy machine.
const PATIENCE: Duration = Duration::from_secs(60);

/// The config of a case; `campaign` adds lines to its campaign.
fn config(accounts: &[&str], campaign: &str, telegram: &str, safety: &str) -> String {
    let mut c = format!(
        r#"
[host]
data_dir = "data"
engines_dir = "engines"
scripts_dir = "scripts"

[transport]
kind = "telegram"

[telegram]
api_id = 12345
api_hash_env = "TG_API_HASH"
{telegram}

[safety]
max_per_hour = 100
max_per_day = 100
max_new_dialogs_per_day = 100
min_interval = "0s"
jitter = "0s"
{safety}

[[audiences]]
name = "leads"
file = "leads.csv"

[[campaigns]]
name = "spring"
status = "active"
audiences = ["leads"]
accounts = [{}]
{campaign}
"#,
        accounts
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for a in accounts {
        let phone = if *a == "alice" {
            "+15550001001"
        } else {
            "+15550001002"
        };
        c.push_str(&format!(
            "\n[[accounts]]\nname = \"{a}\"\nphone = \"{phone}\"\n"
        ));
    }
    c
}

struct People {
    alice: User,
    bob: User,
    carol: User,
    dave: User,
    erin: User,
    frank: User,
    gina: User,
    hank: User,
    ivy: User,
}

#[test]
fn real_protocol() {
    let Some(server) = Server::start() else {
        return;
    };
    let started = Instant::now();
    let people = People {
        alice: server.sign_up("+15550001001", "Alice", "alice_acct"),
        bob: server.sign_up("+15550001002", "Bob", "bob_account"),
        carol: server.sign_up("+15550002001", "Carol", "carol_contact"),
        dave: server.sign_up("+15550002002", "Dave", "dave_contact"),
        erin: server.sign_up("+15550002003", "Erin", "erin_contact"),
        frank: server.sign_up("+15550002004", "Frank", "frank_contact"),
        gina: server.sign_up("+15550002005", "Gina", "gina_contact"),
        hank: server.sign_up("+15550002006", "Hank", "hank_contact"),
        ivy: server.sign_up("+15550002007", "Ivy", "ivy_contact"),
    };
    eprintln!("server up, 9 users signed up: {:?}", started.elapsed());
    let mut contacts = Contacts::start(&server);
    for (name, user) in [
        ("carol", &people.carol),
        ("dave", &people.dave),
        ("erin", &people.erin),
        ("frank", &people.frank),
        ("gina", &people.gina),
        ("hank", &people.hank),
        ("ivy", &people.ivy),
    ] {
        contacts.add(name, user);
    }
    funnel(&server, &people, &mut contacts);
    eprintln!("funnel passed: {:?}", started.elapsed());
    crashes(&server, &people, &mut contacts);
    eprintln!("crashes passed: {:?}", started.elapsed());
    reimported(&people, &mut contacts);
    eprintln!(
        "reply missing from the updates passed: {:?}",
        started.elapsed()
    );
    revoked(&server);
    eprintln!("revoked session passed: {:?}", started.elapsed());
}

/// Which of the accounts wrote to the contact, and what it wrote.
fn openers(contacts: &mut Contacts, name: &str, accounts: &[&User]) -> Vec<(String, Vec<String>)> {
    accounts
        .iter()
        .map(|a| (a.username.clone(), contacts.received(name, &a.username)))
        .filter(|(_, got)| !got.is_empty())
        .collect()
}

/// Waits until the contact has `n` messages from `account`; returns them.
fn wait_for(contacts: &mut Contacts, name: &str, account: &str, n: usize) -> Vec<String> {
    eventually(
        &format!("{n} messages from {account} to {name}"),
        PATIENCE,
        || {
            let got = contacts.received(name, account);
            (got.len() >= n).then_some(got)
        },
    )
}

fn funnel(server: &Server, people: &People, contacts: &mut Contacts) {
    let stuck_after = 20;
    let project = Project::new(
        &config(
            &["alice", "bob"],
            "engine = \"scripted\"\nprompt_template = \"engines/prompts/spring.md\"\nparams = { product = \"Acme CRM\" }",
            "typing = true\ntyping_chars_per_second = 1000.0\nread_marks = true",
            &format!(
                "stuck_after = \"{stuck_after}s\"\nmax_follow_ups = 2\nreply_delay = \"0s..200ms\""
            ),
        ),
        &format!(
            "username,phone,user_id,first_name\ncarol_contact,,,Carol\n,{},,Dave\n,,{},Erin\nfrank_contact,,,Frank\n",
            people.dave.phone, people.erin.user_id
        ),
    );
    project.import("alice", &people.alice);
    project.import("bob", &people.bob);
    // Dave lets people find him by his number (Telegram's default; this
    // server's default is nobody). Erin wrote to both accounts before, so
    // each has her among its dialogs: that is how an account knows a bare
    // user id.
    contacts.findable_by_phone("dave");
    contacts.send("erin", "alice_acct", "hi from erin");
    contacts.send("erin", "bob_account", "hi from erin");

    let mut host = project.run();
    let accounts = [&people.alice, &people.bob];

    // 8. Both accounts show ready while the host runs.
    eventually("both accounts ready in `colloquy status`", PATIENCE, || {
        let s = project.read(&["status"]);
        (s.matches("Telegram connection ready").count() == 2).then_some(())
    });

    // 1. Openings arrive: by username, by phone, by user id.
    let mut opener = std::collections::HashMap::new();
    for name in ["carol", "dave", "erin", "frank"] {
        let got = eventually(&format!("an opening to {name}"), PATIENCE, || {
            let o = openers(contacts, name, &accounts);
            let has = o.iter().any(|(_, got)| {
                got.iter()
                    .any(|t| t.starts_with("Hi ") && t.contains("Acme CRM"))
            });
            has.then_some(o)
        });
        // 7. One account opened the contact, once.
        assert_eq!(got.len(), 1, "{name} was written to by {got:?}");
        let (account, texts) = &got[0];
        let openings = texts.iter().filter(|t| t.starts_with("Hi ")).count();
        assert_eq!(openings, 1, "{name} got {texts:?}");
        opener.insert(name, account.clone());
    }

    // 6. Frank opts out (first, so that the reviver's pass after it is
    // seen below while the other dialogs still get follow-ups).
    contacts.send("frank", &opener["frank"], "please stop writing to me");
    eventually("frank's dialog opted out", PATIENCE, || {
        (project.status_of("frank_contact")? == "opted_out").then_some(())
    });
    let opted_out_at = now_secs();

    // 2. Carol's replies are answered in order, to the engine's outcome.
    let to = opener["carol"].clone();
    contacts.send("carol", &to, "Tell me more");
    wait_for(contacts, "carol", &to, 2);
    contacts.send("carol", &to, "How much does it cost?");
    wait_for(contacts, "carol", &to, 4);
    contacts.send("carol", &to, "Book me for Thursday");
    let got = wait_for(contacts, "carol", &to, 5);
    let starts: Vec<&str> = got.iter().map(|t| &t[..t.len().min(20)]).collect();
    assert_eq!(
        starts,
        [
            "Hi Carol! I'm reachi",
            "Acme CRM keeps every",
            "Plans start at 29 EU",
            "The demo shows which",
            "Great, you're booked",
        ],
        "carol got {got:#?}"
    );
    eventually("carol's dialog finished:booked", PATIENCE, || {
        (project.status_of("carol_contact")? == "finished:booked").then_some(())
    });
    let (id, _) = project.dialog_of("carol_contact").unwrap();
    let transcript = project.read(&["dialog", &id]);
    assert_eq!(transcript.matches(" < ").count(), 3, "{transcript}");
    assert!(!transcript.contains("(pending)"), "{transcript}");

    // 9. The account showed "typing…" to carol, and read her messages.
    // Typing is ephemeral: a client may drop it in a gap of its update
    // sequence, so it is observed where it lands, in the server's log.
    let account_id = accounts
        .iter()
        .find(|a| a.username == to)
        .map(|a| a.user_id)
        .unwrap();
    let typing_to_carol = [
        "obj=SetTyping(".to_string(),
        format!("user_id=int({})", people.carol.user_id),
        "SendMessageTypingAction()".to_string(),
    ];
    let typing_to_carol: Vec<&str> = typing_to_carol.iter().map(String::as_str).collect();
    assert!(
        server.received_request(account_id, &typing_to_carol),
        "no typing from {to} to carol reached the server"
    );
    let last_sent = contacts
        .chat("carol", &to)
        .iter()
        .filter(|m| m.out)
        .map(|m| m.id)
        .max()
        .unwrap();
    eventually("carol's messages marked read", PATIENCE, || {
        (contacts.read_by("carol", &to) >= last_sent).then_some(())
    });

    // The reviver has followed up a dialog that went quiet after frank
    // opted out, so it has been past frank's dialog too.
    let witness = opener["dave"].clone();
    eventually(
        "a follow-up to dave after frank's opt-out",
        PATIENCE * 2,
        || {
            contacts
                .chat("dave", &witness)
                .iter()
                .any(|m| !m.out && m.date > opted_out_at + stuck_after)
                .then_some(())
        },
    );
    let frank = openers(contacts, "frank", &accounts);
    assert_eq!(frank.len(), 1, "{frank:?}");
    assert_eq!(
        frank[0].1.len(),
        1,
        "frank got more than the opening: {frank:?}"
    );

    // 7. At the end still: every contact heard from one account only.
    for name in ["carol", "dave", "erin", "frank"] {
        assert_eq!(openers(contacts, name, &accounts).len(), 1, "{name}");
    }
    assert_eq!(host.terminate(), Some(0), "{}", project.log());
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A project of one account on the `wordy` engine, without typing or read
/// marks, its session imported; `contacts` are CSV rows of
/// `username,phone,user_id,first_name`.
fn wordy_project((account, user): (&str, &User), safety: &str, contacts: &str) -> Project {
    let project = Project::new(
        &config(
            &[account],
            "engine = \"wordy\"",
            "typing = false\nread_marks = false",
            safety,
        ),
        &format!("username,phone,user_id,first_name\n{contacts}"),
    );
    project.add_engine(include_str!("mtproto/wordy.lua"), "wordy");
    project.import(account, user);
    project
}

fn crashes(server: &Server, people: &People, contacts: &mut Contacts) {
    let project = wordy_project(
        ("alice", &people.alice),
        "stuck_after = \"1h\"\nreply_delay = \"1s..1s\"",
        "gina_contact,,,Gina\nhank_contact,,,Hank\nivy_contact,,,Ivy\n",
    );
    let me = &people.alice.username;
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("  {:>5.1}s {what}", t0.elapsed().as_secs_f64());

    // 4. Killed before the account's first incoming message; a reply
    // while the host is down is answered after the restart.
    let mut host = project.run();
    for name in ["gina", "hank", "ivy"] {
        wait_for(contacts, name, me, 1);
    }
    step("openings arrived; kill -9");
    host.kill9();
    contacts.send("gina", me, "Tell me more");
    let mut host = project.run();
    let got = wait_for(contacts, "gina", me, 2);
    step("the reply sent while down is answered");
    assert!(
        got[1].starts_with("Answer 1 to \"Tell me more\""),
        "gina got {got:#?}"
    );

    // 5. SIGTERM, a reply while down, a restart: answered.
    assert_eq!(host.terminate(), Some(0), "{}", project.log());
    contacts.send("hank", me, "How much does it cost?");
    let host = project.run();
    let got = wait_for(contacts, "hank", me, 2);
    assert!(
        got[1].starts_with("Answer 1 to \"How much"),
        "hank got {got:#?}"
    );
    step("after SIGTERM, the reply sent while down is answered");

    // 3. kill -9 while a send is on the wire, twice: once the server never
    // answers it (frozen while the host dies: it drops the request), once
    // the server delivers it but the host never hears back (the host frozen
    // while the server answers). After each restart: one copy.
    let (id, _) = eventually("ivy's dialog", PATIENCE, || {
        project.dialog_of("ivy_contact")
    });
    let mut host = Some(host);
    for (round, (text, server_delivers)) in [("Tell me more", false), ("How much?", true)]
        .into_iter()
        .enumerate()
    {
        let running = host.as_mut().unwrap();
        contacts.send("ivy", me, text);
        eventually("ivy's message stored", PATIENCE, || {
            let t = project.read(&["dialog", &id]);
            (t.matches(" < ").count() == round + 1).then_some(())
        });
        step("ivy's message stored; the server frozen");
        let had = contacts.received("ivy", me).len();
        server.freeze();
        let before = server.unread_bytes();
        // The engine's answer is far larger than any request of the
        // library's own (acks, pings, getDifference).
        eventually("the host's send on the wire", PATIENCE, || {
            (server.unread_bytes() >= before + 600).then_some(())
        });
        step("the answer on the wire");
        if server_delivers {
            running.freeze();
            server.thaw();
            wait_for(contacts, "ivy", me, had + 1);
            running.kill9();
        } else {
            running.kill9();
            server.thaw();
        }
        host = Some(project.run());
        eventually("ivy's answer confirmed in the store", PATIENCE, || {
            let t = project.read(&["dialog", &id]);
            (t.matches(" > ").count() == contacts.received("ivy", me).len()
                && !t.contains("(pending)"))
            .then_some(())
        });
        step("restarted; the answer confirmed once");
    }
    let mut host = host.unwrap();
    let got = contacts.received("ivy", me);
    let starts: Vec<&str> = got.iter().map(|t| &t[..t.len().min(20)]).collect();
    assert_eq!(
        starts,
        [
            "Hello Ivy, a questio",
            "Answer 1 to \"Tell me",
            "Answer 2 to \"How muc",
        ],
        "ivy got {got:#?}"
    );
    assert_eq!(host.terminate(), Some(0), "{}", project.log());
}

/// Case 10: a reply that the account's updates never carry is answered: the
/// session is imported again while the host is down, so the account starts
/// from Telegram's present state and skips what came before. The reviver,
/// finding the dialog quiet, reads the chat and answers the reply (the
/// engine has no follow-ups: without that look, nothing would be sent).
fn reimported(people: &People, contacts: &mut Contacts) {
    let project = wordy_project(
        ("bob", &people.bob),
        "stuck_after = \"15s\"\nreply_delay = \"0s\"",
        "gina_contact,,,Gina\n",
    );
    let me = &people.bob.username;
    let mut host = project.run();
    wait_for(contacts, "gina", me, 1);
    assert_eq!(host.terminate(), Some(0), "{}", project.log());
    contacts.send("gina", me, "Tell me more");
    project.import("bob", &people.bob);
    let mut host = project.run();
    let got = wait_for(contacts, "gina", me, 2);
    assert!(
        got[1].starts_with("Answer 1 to \"Tell me more\""),
        "gina got {got:#?}"
    );
    assert!(
        project
            .log()
            .contains("a reply that never arrived was found in the chat"),
        "{}",
        project.log()
    );
    assert_eq!(host.terminate(), Some(0), "{}", project.log());
}

/// A Telethon string session for this server with an auth key it never
/// issued: what a session looks like after the server forgot it.
fn unknown_session(server: &Server) -> String {
    use base64::Engine;
    let mut b = vec![2u8, 127, 0, 0, 1];
    b.extend_from_slice(&server.port.to_be_bytes());
    b.extend((0..256u32).map(|i| (i * 7 + 3) as u8));
    format!("1{}", base64::engine::general_purpose::URL_SAFE.encode(b))
}

fn revoked(server: &Server) {
    let project = Project::new(
        &config(&["alice"], "engine = \"echo\"", "", ""),
        "username,phone,user_id,first_name\ngina_contact,,,Gina\n",
    );
    let forgotten = User {
        phone: "+15550001001".into(),
        username: "alice_acct".into(),
        user_id: 0,
        session: unknown_session(server),
    };
    project.import("alice", &forgotten);
    let mut host = project.run();
    let status = eventually("alice unauthorized in `colloquy status`", PATIENCE, || {
        let s = project.read(&["status"]);
        s.contains("Telegram connection unauthorized").then_some(s)
    });
    assert!(status.contains("account alice: unauthorized"), "{status}");
    assert!(
        project.log().contains("run `colloquy login alice`"),
        "{}",
        project.log()
    );
    assert_eq!(host.terminate(), Some(0), "{}", project.log());
}
