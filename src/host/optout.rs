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
    words: Vec<String>,
    /// Phrases, as their lower-case words: anywhere, in a row.
    phrases: Vec<Vec<String>>,
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
            let w: Vec<String> = words(p).map(lower).collect();
            match w.len() {
                0 => {}
                1 => o.words.extend(w),
                _ => o.phrases.push(w),
            }
        }
        o
    }

    /// Whether the message asks to stop. Runs for every incoming message
    /// the answer pipeline routes (again each time one waits for its
    /// dialog's previous batch), so the message's words are lowered into
    /// one string rather than a string each.
    pub fn matches(&self, text: &str) -> bool {
        let lowered = lowered_words(text);
        let w: Vec<&str> = lowered.split(' ').filter(|w| !w.is_empty()).collect();
        let phrase = self.phrases.iter().any(|p| {
            w.windows(p.len())
                .any(|window| window.iter().zip(p).all(|(a, b)| a == b))
        });
        let alone = {
            let mut said = w.iter().filter(|x| !POLITE.contains(x));
            match said.next() {
                Some(first) => {
                    self.words.iter().any(|word| word == first) && said.all(|x| x == first)
                }
                None => false,
            }
        };
        phrase || alone || self.regexes.iter().any(|r| r.is_match(text))
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
