//! Spintax: `{Hi|Hello|Hey} there` renders one of its alternatives, so that
//! many accounts do not send the same text.
//!
//! The rules, exactly:
//! - A group is `{` … `}` with at least one `|` at its own level; each
//!   rendering takes one alternative. Groups nest: `{a|{b|c}}`.
//! - Braces with no `|` at their level are plain text: `{note}` stays
//!   `{note}`, so ordinary text with braces needs no escaping.
//! - `\{`, `\}`, `\|` and `\\` are a literal brace, bar and backslash;
//!   any other backslash is kept as written.
//! - Mustache tags are never spun: `{{name}}`, `{{{raw}}}`, sections and
//!   comments are copied through as written, inside an alternative too,
//!   and a set-delimiter tag (`{{=<% %>=}}`) changes what a tag is for the
//!   rest of the text, as in Mustache. Spintax runs on the template's own
//!   text before Mustache renders it, so values (a contact's name with a
//!   `|` in it) are never spun.
//! - An unclosed `{` or a `}` that closes nothing is an error with its line.
//! - The choice is a function of the text and a seed: the host seeds it
//!   with the dialog and the message, so a retry or a restart renders the
//!   same text.

use std::fmt;

/// A spintax text that cannot be rendered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpinError {
    /// 1-based line of the offending brace.
    pub line: usize,
    pub column: usize,
    pub what: &'static str,
}

impl fmt::Display for SpinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}, column {}: {}",
            self.line, self.column, self.what
        )
    }
}

impl std::error::Error for SpinError {}

/// Text and groups, in order.
type Seq = Vec<Node>;

#[derive(Debug, Clone, PartialEq)]
enum Node {
    Text(String),
    /// One alternative is taken.
    Group(Vec<Seq>),
    /// Braces without alternatives: `{` + the inside + `}`.
    Braced(Seq),
}

/// Parses `text`, or says where it is unbalanced.
fn parse(text: &str) -> Result<Seq, SpinError> {
    let mut p = Parser {
        text,
        pos: 0,
        open: "{{".into(),
        close: "}}".into(),
    };
    let (mut alts, end) = p.alternatives(true)?;
    match end {
        End::Eof => Ok(alts.pop().unwrap_or_default()),
        End::Close(at) => Err(p.error(at, "this } closes no {; write \\} for a literal brace")),
    }
}

struct Parser<'a> {
    text: &'a str,
    pos: usize,
    /// Mustache's current delimiters.
    open: String,
    close: String,
}

enum End {
    Eof,
    /// A `}` at this byte offset.
    Close(usize),
}

impl Parser<'_> {
    fn error(&self, at: usize, what: &'static str) -> SpinError {
        let before = &self.text[..at];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        SpinError { line, column, what }
    }

    /// Reads alternatives separated by `|` until a `}` or the end; at the
    /// `top` level, outside any braces, a `|` is plain text.
    fn alternatives(&mut self, top: bool) -> Result<(Vec<Seq>, End), SpinError> {
        let mut alts = vec![Seq::new()];
        loop {
            let rest = &self.text[self.pos..];
            let Some(c) = rest.chars().next() else {
                return Ok((alts, End::Eof));
            };
            let seq = alts.last_mut().expect("one alternative at least");
            if rest.starts_with(self.open.as_str()) {
                let tag = self.tag();
                push_text(seq, tag);
                continue;
            }
            match c {
                '\\' => {
                    let next = rest[1..].chars().next();
                    match next {
                        Some(e @ ('{' | '}' | '|' | '\\')) => {
                            push_text(seq, &e.to_string());
                            self.pos += 2;
                        }
                        _ => {
                            push_text(seq, "\\");
                            self.pos += 1;
                        }
                    }
                }
                '{' => {
                    let start = self.pos;
                    self.pos += 1;
                    let (inner, end) = self.alternatives(false)?;
                    match end {
                        End::Eof => {
                            return Err(self.error(
                                start,
                                "this { is never closed; write \\{ for a literal brace",
                            ))
                        }
                        End::Close(_) => self.pos += 1,
                    }
                    let seq = alts.last_mut().expect("one alternative at least");
                    if inner.len() == 1 {
                        seq.push(Node::Braced(inner.into_iter().next().unwrap_or_default()));
                    } else {
                        seq.push(Node::Group(inner));
                    }
                }
                '}' => return Ok((alts, End::Close(self.pos))),
                '|' if !top => {
                    alts.push(Seq::new());
                    self.pos += 1;
                }
                c => {
                    push_text(seq, &rest[..c.len_utf8()]);
                    self.pos += c.len_utf8();
                }
            }
        }
    }

    /// A Mustache tag at `pos`, returned whole; a set-delimiter tag changes
    /// the delimiters. An unclosed tag is left to Mustache to report: the
    /// rest of the text is returned as it is.
    fn tag(&mut self) -> &str {
        let start = self.pos;
        let after_open = start + self.open.len();
        let rest = &self.text[after_open..];
        let triple = self.open == "{{" && rest.starts_with('{');
        let closing = if triple {
            format!("}}{}", self.close)
        } else {
            self.close.clone()
        };
        let end = match rest.find(closing.as_str()) {
            Some(i) => after_open + i + closing.len(),
            None => self.text.len(),
        };
        let inner = &self.text[after_open..end.saturating_sub(closing.len()).max(after_open)];
        if let Some(body) = inner.strip_prefix('=').and_then(|s| s.strip_suffix('=')) {
            let mut parts = body.split_whitespace();
            if let (Some(o), Some(c), None) = (parts.next(), parts.next(), parts.next()) {
                self.open = o.to_string();
                self.close = c.to_string();
            }
        }
        self.pos = end;
        &self.text[start..end]
    }
}

fn push_text(seq: &mut Seq, s: &str) {
    match seq.last_mut() {
        Some(Node::Text(t)) => t.push_str(s),
        _ => seq.push(Node::Text(s.to_string())),
    }
}

/// Says where `text` is unbalanced, if it is.
pub fn check(text: &str) -> Result<(), SpinError> {
    parse(text).map(|_| ())
}

/// Renders `text` with the alternatives `seed` picks.
pub fn render(text: &str, seed: u64) -> Result<String, SpinError> {
    let seq = parse(text)?;
    let mut out = String::with_capacity(text.len());
    let mut rng = SplitMix(seed);
    write_seq(&seq, &mut rng, &mut out);
    Ok(out)
}

/// The seed of one message: the dialog (or, before it exists, the contact)
/// and how many messages the dialog already has.
pub fn seed_of(dialog: u64, contact: u64, messages: u64) -> u64 {
    let mut s = SplitMix(dialog ^ contact.rotate_left(21) ^ messages.rotate_left(42));
    s.next()
}

fn write_seq(seq: &Seq, rng: &mut SplitMix, out: &mut String) {
    for node in seq {
        match node {
            Node::Text(t) => out.push_str(t),
            Node::Group(alts) => {
                let i = (rng.next() % alts.len() as u64) as usize;
                write_seq(&alts[i], rng, out);
            }
            Node::Braced(inner) => {
                out.push('{');
                write_seq(inner, rng, out);
                out.push('}');
            }
        }
    }
}

/// SplitMix64: a small, well-mixed stream from one seed.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every text `text` can render as, in order, for small texts.
    fn expansions(text: &str) -> Vec<String> {
        fn of_seq(seq: &Seq) -> Vec<String> {
            let mut outs = vec![String::new()];
            for node in seq {
                let parts: Vec<String> = match node {
                    Node::Text(t) => vec![t.clone()],
                    Node::Group(alts) => alts.iter().flat_map(of_seq).collect(),
                    Node::Braced(inner) => of_seq(inner)
                        .into_iter()
                        .map(|s| format!("{{{s}}}"))
                        .collect(),
                };
                outs = outs
                    .iter()
                    .flat_map(|o| parts.iter().map(move |p| format!("{o}{p}")))
                    .collect();
            }
            outs
        }
        of_seq(&parse(text).unwrap())
    }

    #[test]
    fn groups_nest_and_plain_braces_stay() {
        let mut all = expansions("{Hi|Hello|Hey} {a|{b|c}}");
        all.sort();
        assert_eq!(all.len(), 9);
        assert!(all.contains(&"Hey c".to_string()));
        assert_eq!(expansions("Hi {note}!"), ["Hi {note}!"]);
        assert_eq!(expansions("{x|}y"), ["xy", "y"]);
        assert_eq!(
            expansions("a | b {c|d} | e"),
            ["a | b c | e", "a | b d | e"]
        );
    }

    #[test]
    fn escapes_are_literal() {
        assert_eq!(render(r"\{a\|b\} \\ \n", 1).unwrap(), r"{a|b} \ \n");
    }

    #[test]
    fn mustache_tags_pass_through() {
        let t = "{Hi|Hello} {{#vip}}{dear|valued} {{/vip}}{{{raw}}} {{name}}";
        for seed in 0..20 {
            let out = render(t, seed).unwrap();
            assert!(out.ends_with("{{{raw}}} {{name}}"), "{out}");
            assert!(
                out.contains("{{#vip}}") && out.contains("{{/vip}}"),
                "{out}"
            );
        }
        assert_eq!(
            expansions("{a {{x|y}}|b}").len(),
            2,
            "a tag's | is not spintax"
        );
        // New delimiters: `{{` is plain text (and balanced braces) after them.
        let t = "{{=<% %>=}}<%name|x%> {a|b}";
        for out in expansions(t) {
            assert!(out.starts_with("{{=<% %>=}}<%name|x%> "), "{out}");
        }
    }

    #[test]
    fn unbalanced_text_says_where() {
        let e = check("line one\n  {Hi|Hello\n").unwrap_err();
        assert_eq!((e.line, e.column), (2, 3));
        assert!(e.to_string().contains("never closed"), "{e}");
        let e = check("ok}").unwrap_err();
        assert_eq!((e.line, e.column), (1, 3));
        assert!(e.to_string().contains("closes no {"), "{e}");
    }

    #[test]
    fn the_same_seed_renders_the_same_text() {
        let t = "{a|b|c|d|e|f|g|h}{1|2|3|4|5|6|7|8}";
        let seen: std::collections::HashSet<String> = (0..200)
            .map(|s| render(t, seed_of(s, 0, 0)).unwrap())
            .collect();
        assert!(
            seen.len() > 40,
            "seeds spread over the choices: {}",
            seen.len()
        );
        assert_eq!(render(t, 7).unwrap(), render(t, 7).unwrap());
    }

    /// Random spintax: text, groups and plain braces, a few levels deep.
    fn spintax() -> impl Strategy<Value = String> {
        let leaf = prop::sample::select(vec!["a", "b", " ", "xy", "\\|", "{{n}}", ""])
            .prop_map(str::to_string);
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 1..4).prop_map(|v| v.concat()),
                prop::collection::vec(inner.clone(), 2..4)
                    .prop_map(|v| format!("{{{}}}", v.join("|"))),
                inner.prop_map(|s| format!("{{{s}}}")),
            ]
        })
    }

    proptest! {
        #[test]
        fn every_rendering_is_one_of_the_expansions(text in spintax(), seed: u64) {
            prop_assume!(check(&text).is_ok());
            let out = render(&text, seed).unwrap();
            prop_assert!(expansions(&text).contains(&out), "{text:?} rendered {out:?}");
        }
    }
}
