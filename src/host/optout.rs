//! Opt-out detection: `compliance.opt_out_patterns`, case-insensitive, in
//! any script. Three kinds of pattern:
//!
//! - a phrase of two or more words (`stop writing`, `не пишите`) matches
//!   where its words appear in a row as whole words: a phrase says what it
//!   means wherever it stands;
//! - a single word (`stop`, `unsubscribe`) matches only a message that is
//!   that word alone, give or take politeness (`STOP!`, `stop it`, `pls
//!   stop`), so that "does the trial stop automatically?" is a question,
//!   not an opt-out;
//! - `/regex/` is a regular expression searched in the message, with
//!   `(?i)`: for anything else.

use rustc_hash::{FxHashMap, FxHashSet};

/// What the host ships: opt-outs in English and Russian, each
/// unambiguous as written.
pub const DEFAULT_PATTERNS: &[&str] = &[
    "stop",
    "unsubscribe",
    "stop writing",
    "stop messaging",
    "stop texting",
    "stop contacting",
    "stop sending",
    "stop spamming",
    "stop emailing",
    "unsubscribe me",
    "remove me",
    "take me off",
    "opt out",
    "opt me out",
    "don't write me",
    "don't write to me",
    "don't message me",
    "don't text me",
    "don't contact me",
    "do not write me",
    "do not write to me",
    "do not message me",
    "do not text me",
    "do not contact me",
    "leave me alone",
    "no more messages",
    "стоп",
    "отписаться",
    "отстаньте",
    "не пишите",
    "не пиши",
    "отпишите меня",
    "удалите меня",
    "хватит писать",
    "хватит мне писать",
    "перестаньте писать",
    "перестаньте мне писать",
    "прекратите писать",
    "прекратите мне писать",
    "не беспокойте",
    "больше не пишите",
    "отстаньте от меня",
];

/// Words a one-word opt-out may come with: "stop please", "pls stop".
const POLITE: &[&str] = &[
    "please",
    "pls",
    "plz",
    "it",
    "now",
    "thanks",
    "thank",
    "you",
    "пожалуйста",
    "уже",
    "спасибо",
];

/// Compiled opt-out patterns.
#[derive(Debug, Clone, Default)]
pub struct OptOut {
    /// Single words: the whole message, politeness aside.
    words: FxHashSet<String>,
    /// Phrases, as their lower-case words: anywhere, in a row. Kept by
    /// their first word, each with the words that must follow it.
    phrases: FxHashMap<String, Vec<Vec<String>>>,
    regexes: Vec<regex::Regex>,
}

fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
}

fn lower(word: &str) -> String {
    word.chars().flat_map(char::to_lowercase).collect()
}

/// The regular expression of a `/…/` pattern, or `None` for a plain one.
pub fn regex_of(pattern: &str) -> Option<Result<regex::Regex, String>> {
    let body = pattern.trim().strip_prefix('/')?.strip_suffix('/')?;
    Some(
        regex::RegexBuilder::new(body)
            .case_insensitive(true)
            .build()
            .map_err(|e| e.to_string()),
    )
}

impl OptOut {
    /// Compiles the patterns; a `/regex/` that does not compile is left out
    /// (`check` reports it).
    pub fn new(patterns: &[String]) -> OptOut {
        let mut o = OptOut::default();
        for p in patterns {
            if let Some(re) = regex_of(p) {
                o.regexes.extend(re.ok());
                continue;
            }
            let mut w = words(p).map(lower);
            match (w.next(), w.collect::<Vec<String>>()) {
                (None, _) => {}
                (Some(word), rest) if rest.is_empty() => {
                    o.words.insert(word);
                }
                (Some(first), rest) => o.phrases.entry(first).or_default().push(rest),
            }
        }
        o
    }

    /// Whether the message asks to stop. Runs for every incoming message
    /// the answer pipeline routes, so the message's words are lowered into
    /// one string rather than a string each, and each word is looked up
    /// once among the phrases' first words.
    pub fn matches(&self, text: &str) -> bool {
        let lowered = lowered_words(text);
        let said = || lowered.split(' ').filter(|w| !w.is_empty());
        self.has_phrase(said())
            || self.is_word_alone(said())
            || self.regexes.iter().any(|r| r.is_match(text))
    }

    /// Whether a phrase's words come in a row among `said`.
    fn has_phrase<'a>(&self, mut said: impl Iterator<Item = &'a str> + Clone) -> bool {
        while let Some(first) = said.next() {
            let follows = |tail: &Vec<String>| {
                said.clone()
                    .take(tail.len())
                    .eq(tail.iter().map(String::as_str))
            };
            if self
                .phrases
                .get(first)
                .is_some_and(|tails| tails.iter().any(follows))
            {
                return true;
            }
        }
        false
    }

    /// Whether `said` is one single-word pattern, politeness aside (said
    /// once or more).
    fn is_word_alone<'a>(&self, said: impl Iterator<Item = &'a str>) -> bool {
        let mut words = said.filter(|w| !POLITE.contains(w));
        words
            .next()
            .is_some_and(|first| self.words.contains(first) && words.all(|w| w == first))
    }
}

/// The words of `text` in lower case, as [`lower`] makes them, one space
/// between each (lowering never makes a space).
fn lowered_words(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for word in words(text) {
        if !out.is_empty() {
            out.push(' ');
        }
        if word.is_ascii() {
            let start = out.len();
            out.push_str(word);
            out[start..].make_ascii_lowercase();
        } else {
            out.extend(word.chars().flat_map(char::to_lowercase));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> OptOut {
        OptOut::new(
            &DEFAULT_PATTERNS
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn the_defaults_read_real_phrasings_right() {
        let o = defaults();
        let opt_outs = [
            "stop",
            "STOP!",
            "Stop.",
            "stop it",
            "pls stop",
            "Stop please",
            "STOP STOP STOP",
            "stop writing to me",
            "Please stop messaging me",
            "stop texting me!!",
            "Stop contacting me, I'm not interested",
            "stop spamming me",
            "can you stop sending me these?",
            "unsubscribe",
            "Unsubscribe me please",
            "remove me from your list",
            "Please remove me",
            "take me off your mailing list",
            "opt out",
            "I want to opt out",
            "don't message me again",
            "Don’t write to me anymore",
            "do not contact me",
            "Leave me alone",
            "no more messages please",
            "не пишите мне",
            "Не пишите мне больше!",
            "отпишите меня",
            "стоп",
            "Стоп!",
            "отписаться",
            "хватит мне писать",
            "хватит писать уже",
            "больше не пишите",
            "удалите меня из рассылки",
            "перестаньте мне писать",
            "прекратите писать",
            "не беспокойте меня",
            "отстаньте",
            "отстаньте от меня пожалуйста",
        ];
        let questions = [
            "does the trial stop automatically?",
            "Does the free trial stop automatically or do I have to cancel?",
            "what's your unsubscribe rate?",
            "how do I stop the sync?",
            "can I unsubscribe anytime from the paid plan?",
            "is there a bus stop near your office?",
            "we had to stop using our old CRM",
            "Nonstop support?",
            "what happens if I stop paying?",
            "how do I remove a user from the list?",
            "Unsubscribe links in your emails, do they work?",
            "we never stop growing",
            "I don't write code myself, my team does",
            "does it opt users out automatically?",
            "когда остановится пробный период?",
            "как отписаться от платного тарифа потом?",
            "можно ли остановить синхронизацию?",
            "стоп-лист у вас есть?",
            "пишите мне в телеграм",
        ];
        for m in opt_outs {
            assert!(o.matches(m), "missed the opt-out {m:?}");
        }
        for m in questions {
            assert!(!o.matches(m), "took {m:?} for an opt-out");
        }
        assert!(opt_outs.len() + questions.len() >= 40);
    }

    proptest::proptest! {
        #[test]
        fn the_words_lowered_in_one_string_are_the_words_lowered_one_by_one(
            text in "([a-zA-Z]{1,6}|STOP|Stop|İ|Σ|ß|ǅ|Стоп|ПИШИТЕ|[ !,.?’'-]{1,3}|\\PC){0,12}",
        ) {
            let one_by_one: Vec<String> = words(&text).map(lower).collect();
            let lowered = lowered_words(&text);
            let split: Vec<&str> = lowered.split(' ').filter(|w| !w.is_empty()).collect();
            proptest::prop_assert_eq!(split, one_by_one, "{:?}", text);
        }
    }

    /// The patterns read the plain way: every phrase tried at every word.
    fn matches_plainly(patterns: &[String], text: &str) -> bool {
        let said: Vec<String> = words(text).map(lower).collect();
        let plain: Vec<Vec<String>> = patterns
            .iter()
            .map(|p| words(p).map(lower).collect())
            .collect();
        let phrase = plain
            .iter()
            .filter(|p| p.len() > 1)
            .any(|p| said.windows(p.len()).any(|w| w == p.as_slice()));
        let mut rest = said.iter().filter(|w| !POLITE.contains(&w.as_str()));
        let alone = rest.next().is_some_and(|first| {
            plain.iter().any(|p| p.len() == 1 && &p[0] == first) && rest.all(|w| w == first)
        });
        phrase || alone
    }

    proptest::proptest! {
        #[test]
        fn a_phrase_found_by_its_first_word_is_a_phrase_found_anywhere(
            text in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::sample::select(DEFAULT_PATTERNS),
                    proptest::sample::select(POLITE),
                    proptest::sample::select(&["me", "to", "not", "do", "Stop", "НЕ", "yes", "m17", ",", "!"][..]),
                ],
                0..8,
            ),
        ) {
            let patterns: Vec<String> = DEFAULT_PATTERNS.iter().map(|p| p.to_string()).collect();
            let o = OptOut::new(&patterns);
            let text = text.join(" ");
            proptest::prop_assert_eq!(o.matches(&text), matches_plainly(&patterns, &text), "{:?}", text);
        }
    }

    #[test]
    fn words_phrases_and_regexes() {
        let o = OptOut::new(&[
            "halt".into(),
            "no thanks bye".into(),
            r"/\bgo away\b/".into(),
            "/(unclosed/".into(),
        ]);
        assert!(o.matches("HALT!"));
        assert!(!o.matches("halt the sync?"));
        assert!(o.matches("well, no thanks, bye"));
        assert!(o.matches("Just GO AWAY"));
        assert!(!o.matches("unstoppable growth"));
        assert!(regex_of("/(unclosed/").unwrap().is_err());
        assert!(regex_of("stop").is_none());
    }
}
