//! The lexical guard a semantic hit must also pass: same numbers, same
//! negation. Shared by the semantic cache and its calibration, which scores
//! pairs the guard refuses as misses.

/// Words that negate. Embeddings of "is it safe" and "is it not safe" are
/// nearly equal (0.99 with all-MiniLM-L6-v2, above real paraphrases), so no
/// threshold separates them: the guard below does.
const NEGATIONS: &[&str] = &[
    "not", "no", "never", "nobody", "nothing", "neither", "nor", "none", "cannot", "without",
];

/// The lexical guard applied on top of similarity: a stored answer is served
/// only when both questions name the same numbers and are both negated or
/// both not. "5 km" and "50 km", "safe" and "not safe" embed within a hair
/// of each other but want different answers.
pub fn guard_allows(stored: &str, query: &str) -> bool {
    fn numbers(q: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let mut current = String::new();
        for c in q.chars().chain(std::iter::once(' ')) {
            if c.is_ascii_digit() || (!current.is_empty() && (c == '.' || c == ',')) {
                current.push(c);
            } else if !current.is_empty() {
                out.push(current.trim_end_matches(['.', ',']).replace(',', ""));
                current.clear();
            }
        }
        out.sort();
        out
    }
    fn negated(q: &str) -> bool {
        let lower = q.to_lowercase().replace('\u{2019}', "'");
        let count = lower
            .split(|c: char| !(c.is_alphanumeric() || c == '\''))
            .filter(|w| NEGATIONS.contains(w) || w.ends_with("n't"))
            .count();
        count % 2 == 1
    }
    numbers(stored) == numbers(query) && negated(stored) == negated(query)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guard_refuses_other_numbers_and_negations() {
        assert!(guard_allows(
            "How can I lose weight quickly?",
            "How can I lose weight fast?"
        ));
        assert!(!guard_allows(
            "How do I convert 5 km to miles?",
            "How do I convert 50 km to miles?"
        ));
        assert!(guard_allows("Is 1,000 a lot?", "is 1000 a lot"));
        assert!(guard_allows("Version 2.5 notes?", "Notes for version 2.5"));
        assert!(!guard_allows(
            "Is it safe to eat raw eggs?",
            "Is it not safe to eat raw eggs?"
        ));
        assert!(!guard_allows("Why can't I log in?", "Why can I log in?"));
        assert!(guard_allows("Why can't I log in?", "Why cannot I log in?"));
        assert!(guard_allows("Is it not unsafe?", "Isn't it unsafe?"));
    }
}
