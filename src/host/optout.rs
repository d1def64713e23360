//! Opt-out detection: `compliance.opt_out_patterns`, matched as whole words,
//! case-insensitive, in any script.

/// Compiled opt-out patterns.
#[derive(Debug, Clone, Default)]
pub struct OptOut {
    /// Each pattern as its sequence of lower-case words.
    patterns: Vec<Vec<String>>,
}

fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
}

fn lower(word: &str) -> impl Iterator<Item = char> + '_ {
    word.chars().flat_map(char::to_lowercase)
}

impl OptOut {
    pub fn new(patterns: &[String]) -> OptOut {
        OptOut {
            patterns: patterns
                .iter()
                .map(|p| words(p).map(|w| lower(w).collect()).collect::<Vec<_>>())
                .filter(|w| !w.is_empty())
                .collect(),
        }
    }

    /// Whether the message asks to stop.
    pub fn matches(&self, text: &str) -> bool {
        if self.patterns.is_empty() {
            return false;
        }
        // Compared as they are, lower-cased char by char: no word copied.
        let w: Vec<&str> = words(text).collect();
        self.patterns.iter().any(|p| {
            w.windows(p.len()).any(|window| {
                window
                    .iter()
                    .zip(p)
                    .all(|(word, pattern)| lower(word).eq(pattern.chars()))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_words_any_case_any_script() {
        let o = OptOut::new(&["stop".into(), "unsubscribe".into(), "не пишите".into()]);
        assert!(o.matches("STOP"));
        assert!(o.matches("please stop writing to me"));
        assert!(o.matches("Stop!"));
        assert!(o.matches("Пожалуйста, НЕ ПИШИТЕ мне"));
        assert!(!o.matches("unstoppable growth"));
        assert!(!o.matches("a stopwatch"));
        assert!(!o.matches("не надо, пишите"));
    }
}
