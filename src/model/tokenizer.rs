//! A byte-level BPE tokenizer rebuilt from a GGUF file's own vocabulary and
//! merges (`tokenizer.ggml.model = gpt2`), for models shipped without a
//! tokenizer.json (SmolLM2's GGUF is one).
//!
//! The steps are those of the Hugging Face tokenizer the GGUF was converted
//! from: split out special (control and user-defined) tokens; pre-tokenize
//! (for `pre = smollm`, every digit alone, then the GPT-2 pattern); map each
//! piece's bytes to GPT-2's printable characters; apply merges by rank.

use std::collections::HashMap;

use super::gguf::{Metadata, Value};

/// Why a tokenizer could not be built from GGUF metadata.
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum TokenizerError {
    #[error(
        "failed to build a tokenizer from the GGUF metadata: {what} is missing or not {expected}"
    )]
    Missing {
        what: &'static str,
        expected: &'static str,
    },
    #[error(
        "failed to build a tokenizer from the GGUF metadata: tokenizer model {model:?} is not supported; expected `gpt2` (byte-level BPE), or use the model's tokenizer.json"
    )]
    Model { model: String },
    #[error(
        "failed to build a tokenizer from the GGUF metadata: pre-tokenizer {pre:?} is not supported; expected one of smollm, gpt2, default"
    )]
    Pre { pre: String },
    #[error(
        "failed to build a tokenizer from the GGUF metadata: merge {merge:?} is not two tokens"
    )]
    Merge { merge: String },
    #[error("failed to read the GGUF metadata for its tokenizer")]
    Gguf(#[from] super::gguf::GgufError),
    #[error("failed to load the tokenizer {path}: {why}; expected a Hugging Face tokenizer.json")]
    Json {
        path: std::path::PathBuf,
        why: String,
    },
    #[error("failed to tokenize: {why}")]
    Encode { why: String },
}

/// A model's tokenizer: its tokenizer.json, or for a GGUF without one, the
/// byte-level BPE rebuilt from the GGUF.
pub enum Tokenizer {
    /// A Hugging Face tokenizer.json.
    Json(Box<tokenizers::Tokenizer>),
    /// A byte-level BPE rebuilt from GGUF metadata.
    Gguf(Box<ByteLevelBpe>),
}

impl Tokenizer {
    /// A tokenizer.json (JSON only: nothing in it runs).
    pub fn from_json(path: &std::path::Path) -> Result<Tokenizer, TokenizerError> {
        tokenizers::Tokenizer::from_file(path)
            .map(|t| Tokenizer::Json(Box::new(t)))
            .map_err(|e| TokenizerError::Json {
                path: path.into(),
                why: e.to_string(),
            })
    }

    /// The vocabulary and merges inside a GGUF file.
    pub fn from_gguf_file(path: &std::path::Path) -> Result<Tokenizer, TokenizerError> {
        let meta = super::gguf::read(path)?;
        Ok(Tokenizer::Gguf(Box::new(ByteLevelBpe::from_gguf(&meta)?)))
    }

    /// Token ids of `text`, without added special tokens (a prefix is
    /// cached exactly as the serving code tokenizes it).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match self {
            Tokenizer::Gguf(bpe) => Ok(bpe.encode(text)),
            Tokenizer::Json(t) => t
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| TokenizerError::Encode { why: e.to_string() }),
        }
    }
}

/// GPT-2's pre-tokenizer pattern.
const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// A GPT-2 style byte-level BPE, as the GGUF files of Llama-3 and SmolLM2 carry it.
pub struct ByteLevelBpe {
    vocab: HashMap<String, u32>,
    tokens: Vec<String>,
    ranks: HashMap<(String, String), usize>,
    /// Special tokens, longest first, so that the longest matches.
    specials: Vec<(String, u32)>,
    split_digits: bool,
    pattern: fancy_regex::Regex,
    byte_char: [char; 256],
    char_byte: HashMap<char, u8>,
}

fn strings(meta: &Metadata, key: &'static str) -> Result<Vec<String>, TokenizerError> {
    match meta.get(key) {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or(TokenizerError::Missing {
                what: key,
                expected: "an array of strings",
            }),
        _ => Err(TokenizerError::Missing {
            what: key,
            expected: "an array of strings",
        }),
    }
}

/// GPT-2's map from bytes to printable characters: printable Latin-1 bytes
/// stand for themselves, the others take the code points from 256 on.
fn bytes_to_unicode() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable =
            (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        map[b as usize] = if printable {
            b as char
        } else {
            let c = char::from_u32(next).expect("below the surrogates");
            next += 1;
            c
        };
    }
    map
}

impl ByteLevelBpe {
    /// Rebuilt from `tokenizer.ggml.tokens` and `tokenizer.ggml.merges`.
    pub fn from_gguf(meta: &Metadata) -> Result<Self, TokenizerError> {
        let model = meta
            .get("tokenizer.ggml.model")
            .and_then(Value::as_str)
            .ok_or(TokenizerError::Missing {
                what: "tokenizer.ggml.model",
                expected: "a string",
            })?;
        if model != "gpt2" {
            return Err(TokenizerError::Model {
                model: model.into(),
            });
        }
        let pre = meta
            .get("tokenizer.ggml.pre")
            .and_then(Value::as_str)
            .unwrap_or("default");
        let split_digits = match pre {
            "smollm" => true,
            "gpt2" | "default" => false,
            other => return Err(TokenizerError::Pre { pre: other.into() }),
        };
        let tokens = strings(meta, "tokenizer.ggml.tokens")?;
        let merges = strings(meta, "tokenizer.ggml.merges")?;
        let types: Vec<u64> = match meta.get("tokenizer.ggml.token_type") {
            Some(Value::Array(items)) => items.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
        };
        let vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let mut ranks = HashMap::with_capacity(merges.len());
        for (rank, merge) in merges.iter().enumerate() {
            let (a, b) = merge.split_once(' ').ok_or_else(|| TokenizerError::Merge {
                merge: merge.clone(),
            })?;
            ranks.entry((a.to_string(), b.to_string())).or_insert(rank);
        }
        // llama.cpp's token types: 3 control, 4 user-defined.
        let mut specials: Vec<(String, u32)> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (t, ty))| matches!(ty, 3 | 4) && !t.is_empty())
            .map(|(i, (t, _))| (t.clone(), i as u32))
            .collect();
        specials.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        let byte_char = bytes_to_unicode();
        let char_byte = byte_char
            .iter()
            .enumerate()
            .map(|(b, c)| (*c, b as u8))
            .collect();
        Ok(ByteLevelBpe {
            vocab,
            tokens,
            ranks,
            specials,
            split_digits,
            pattern: fancy_regex::Regex::new(GPT2_PATTERN).expect("the GPT-2 pattern compiles"),
            byte_char,
            char_byte,
        })
    }

    /// Tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// Token ids of `text`; special tokens written in the text are matched.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            // The earliest special token, the longest at that position.
            let next = self
                .specials
                .iter()
                .filter_map(|(s, id)| rest.find(s.as_str()).map(|at| (at, s.len(), *id)))
                .min_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
            match next {
                Some((at, len, id)) => {
                    self.encode_ordinary(&rest[..at], &mut ids);
                    ids.push(id);
                    rest = &rest[at + len..];
                }
                None => {
                    self.encode_ordinary(rest, &mut ids);
                    break;
                }
            }
        }
        ids
    }

    fn encode_ordinary(&self, text: &str, ids: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let mut pieces: Vec<&str> = Vec::new();
        if self.split_digits {
            let mut start = 0;
            for (i, c) in text.char_indices() {
                if c.is_numeric() {
                    if start < i {
                        pieces.push(&text[start..i]);
                    }
                    pieces.push(&text[i..i + c.len_utf8()]);
                    start = i + c.len_utf8();
                }
            }
            if start < text.len() {
                pieces.push(&text[start..]);
            }
        } else {
            pieces.push(text);
        }
        for piece in pieces {
            for m in self.pattern.find_iter(piece) {
                let Ok(m) = m else { continue };
                self.bpe(m.as_str(), ids);
            }
        }
    }

    fn bpe(&self, word: &str, ids: &mut Vec<u32>) {
        let mut parts: Vec<String> = word
            .bytes()
            .map(|b| self.byte_char[b as usize].to_string())
            .collect();
        loop {
            let best = parts
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| {
                    self.ranks
                        .get(&(w[0].clone(), w[1].clone()))
                        .map(|r| (*r, i))
                })
                .min();
            let Some((_, i)) = best else { break };
            let merged = format!("{}{}", parts[i], parts[i + 1]);
            parts.splice(i..i + 2, [merged]);
        }
        for p in parts {
            match self.vocab.get(&p) {
                Some(id) => ids.push(*id),
                // Byte-level vocabularies hold every single byte; a piece
                // that is missing anyway falls back to its bytes.
                None => ids.extend(
                    p.chars()
                        .filter_map(|c| self.vocab.get(&c.to_string()).copied()),
                ),
            }
        }
    }

    /// The text of `ids` (bytes that are not UTF-8 become U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for id in ids {
            let Some(token) = self.tokens.get(*id as usize) else {
                continue;
            };
            if self.specials.iter().any(|(s, sid)| sid == id && s == token) {
                bytes.extend_from_slice(token.as_bytes());
                continue;
            }
            bytes.extend(
                token
                    .chars()
                    .filter_map(|c| self.char_byte.get(&c).copied()),
            );
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_map_is_gpt2s() {
        let m = bytes_to_unicode();
        assert_eq!(m[b' ' as usize], 'Ġ');
        assert_eq!(m[b'\n' as usize], 'Ċ');
        assert_eq!(m[b'a' as usize], 'a');
        let distinct: std::collections::HashSet<char> = m.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn the_pattern_keeps_the_last_space_with_the_next_word() {
        let re = fancy_regex::Regex::new(GPT2_PATTERN).unwrap();
        let pieces: Vec<&str> = re
            .find_iter("a   b\n")
            .map(|m| m.unwrap().as_str())
            .collect();
        assert_eq!(pieces, vec!["a", "  ", " b", "\n"]);
    }
}
