//! Opt-out detection: `compliance.opt_out_patterns`, matched as whole words,
//! case-insensitive, in any script.

/// Compiled opt-out patterns.
#[derive(Debug, Clone, Default)]
pub struct OptOut {
    /// Each pattern as its sequence of lower-case words.
    patterns: Vec<Vec<String>>,
}

fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

impl OptOut {
    pub fn new(patterns: &[String]) -> OptOut {
        OptOut {
            patterns: patterns
                .iter()
                .map(|p| words(p))
                .filter(|w| !w.is_empty())
                .collect(),
        }
    }

    /// Whether the message asks to stop.
    pub fn matches(&self, text: &str) -> bool {
        let w = words(text);
        self.patterns
            .iter()
            .any(|p| w.windows(p.len()).any(|window| window == p.as_slice()))
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
