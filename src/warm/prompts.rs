//! The shared prefixes to warm, from a file: a JSON array of strings; JSONL,
//! one JSON string per line (what the controller writes for a ModelCache's
//! inline `warmup.prompts`, and what `warmup.promptsConfigMapRef` keys hold);
//! or plain text with prompts separated by lines holding only `---`. Order is
//! priority: the first prompt matters most.

use std::path::{Path, PathBuf};

/// Why a warm-up prompts file could not be used.
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum PromptsError {
    #[error("failed to read the prompts file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "failed to parse the prompts file {path}: {why}; expected a JSON array of strings, one JSON string per line (JSONL), or prompts separated by lines holding only `---`"
    )]
    Parse { path: PathBuf, why: String },
}

/// The prompts in a file (a JSON array of strings, or prompts separated by `---` lines).
pub fn load(path: &Path) -> Result<Vec<String>, PromptsError> {
    let text = std::fs::read_to_string(path).map_err(|source| PromptsError::Read {
        path: path.into(),
        source,
    })?;
    parse(&text).map_err(|why| PromptsError::Parse {
        path: path.into(),
        why,
    })
}

/// The prompts in text of either form.
pub fn parse(text: &str) -> Result<Vec<String>, String> {
    let start = text.trim_start();
    let prompts: Vec<String> = if start.starts_with('[') {
        serde_json::from_str::<Vec<String>>(text).map_err(|e| e.to_string())?
    } else if start.starts_with('"') {
        text.lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(i, line)| {
                serde_json::from_str::<String>(line).map_err(|e| format!("line {}: {e}", i + 1))
            })
            .collect::<Result<_, _>>()?
    } else {
        let mut out = vec![String::new()];
        for line in text.split_inclusive('\n') {
            if line.trim_end_matches(['\n', '\r']) == "---" {
                out.push(String::new());
            } else {
                out.last_mut().expect("never empty").push_str(line);
            }
        }
        out.into_iter()
            .map(|p| p.strip_suffix('\n').map(str::to_string).unwrap_or(p))
            .collect()
    };
    let prompts: Vec<String> = prompts
        .into_iter()
        .filter(|p| !p.trim().is_empty())
        .collect();
    if prompts.is_empty() {
        return Err("it holds no prompt".into());
    }
    Ok(prompts)
}

/// Prompts as JSONL: one JSON string per line, newlines escaped.
pub fn to_jsonl(prompts: &[String]) -> String {
    prompts
        .iter()
        .map(|p| serde_json::to_string(p).expect("a string serializes") + "\n")
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_separated_text_both_work() {
        assert_eq!(parse(r#"["a", "b c"]"#).unwrap(), vec!["a", "b c"]);
        assert_eq!(
            parse("You are a bot.\nBe brief.\n---\nSecond prompt\n").unwrap(),
            vec!["You are a bot.\nBe brief.", "Second prompt"]
        );
        assert_eq!(parse("only one").unwrap(), vec!["only one"]);
        assert!(parse("---\n\n---\n").unwrap_err().contains("no prompt"));
        assert!(parse("[1, 2]").is_err());
    }

    #[test]
    fn jsonl_round_trips_what_the_controller_writes() {
        let prompts = vec![
            "You are a bot.\nBe brief.".to_string(),
            "---\n\"quoted\"".into(),
        ];
        assert_eq!(parse(&to_jsonl(&prompts)).unwrap(), prompts);
        let err = parse("\"ok\"\nnot json\n").unwrap_err();
        assert!(err.starts_with("line 2:"), "{err}");
    }
}
