//! What the semantic layer makes of a request: the question it embeds (the
//! last user message, or the prompt) and the partition it may match in.
//!
//! Only the question is compared by meaning. Everything else (the caller's
//! scope, model, system prompt, earlier turns, tools, sampling parameters)
//! must match exactly, so it names the partition: the same question asked
//! under another system prompt or in another conversation never hits
//! (GPTCache and LiteLLM embed the whole conversation, or only its last
//! message with nothing else compared).

use serde_json::Value;

use super::request::{self, Endpoint, Scope};

/// The question and where its entry lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// The text embedded.
    pub text: String,
    /// The partition: a digest of the scope and of the canonical request
    /// with the question taken out.
    pub partition: String,
}

/// The text of a message's content: a string, or the text parts of an
/// array; `None` for content with anything but text (an image changes the
/// question in a way its text does not show).
fn content_text(content: &Value) -> Option<String> {
    match content {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => parts
            .iter()
            .map(
                |p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("text"), Some(Value::String(t))) => Some(t.as_str()),
                    _ => None,
                },
            )
            .collect::<Option<Vec<_>>>()
            .map(|texts| texts.join("\n")),
        _ => None,
    }
}

/// The question of `body` under `scope`; `None` when it has none the layer
/// can compare (no user message last, non-text content, an empty text).
pub fn question(endpoint: Endpoint, body: &Value, scope: &Scope) -> Option<Question> {
    let mut rest = request::canonical(body)?;
    let text = match endpoint {
        Endpoint::Completions => {
            let prompt = rest.get_mut("prompt")?;
            let text = prompt.as_str()?.to_owned();
            *prompt = Value::Null;
            text
        }
        Endpoint::Chat => {
            let last = rest.get_mut("messages")?.as_array_mut()?.last_mut()?;
            if last.get("role").and_then(Value::as_str) != Some("user") {
                return None;
            }
            let text = content_text(last.get("content")?)?;
            last["content"] = Value::Null;
            text
        }
    };
    if text.trim().is_empty() {
        return None;
    }
    let digest = request::key_digest(endpoint, &rest)?;
    Some(Question {
        text,
        partition: crate::digest::sha256_hex(format!("{}\n{digest}", scope.tag()).as_bytes()),
    })
}

/// `question` as compared in the embedding space `space` (the model's
/// [fingerprint](crate::model::bert::SentenceEmbedder::fingerprint)): a
/// partition of its own, so that vectors stored under another embedding
/// model, or another version of it, are never matched against.
pub fn in_space(space: &str, question: Question) -> Question {
    Question {
        partition: crate::digest::sha256_hex(format!("{space}\n{}", question.partition).as_bytes()),
        ..question
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat(system: &str, q: &str) -> Value {
        json!({"model": "m", "temperature": 0, "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": q}]})
    }

    #[test]
    fn the_question_is_compared_by_meaning_and_everything_else_exactly() {
        let alice = Scope::Caller("a".into());
        let q = question(
            Endpoint::Chat,
            &chat("HR bot", "How many PTO days?"),
            &alice,
        )
        .unwrap();
        assert_eq!(q.text, "How many PTO days?");
        let paraphrase = question(
            Endpoint::Chat,
            &chat("HR bot", "PTO days: how many?"),
            &alice,
        )
        .unwrap();
        assert_eq!(
            paraphrase.partition, q.partition,
            "only the question differs"
        );
        let other_prompt = question(
            Endpoint::Chat,
            &chat("IT bot", "How many PTO days?"),
            &alice,
        )
        .unwrap();
        assert_ne!(other_prompt.partition, q.partition);
        let bob = Scope::Caller("b".into());
        let other_caller =
            question(Endpoint::Chat, &chat("HR bot", "How many PTO days?"), &bob).unwrap();
        assert_ne!(other_caller.partition, q.partition);
        let mut sampled = chat("HR bot", "How many PTO days?");
        sampled["top_p"] = json!(0.5);
        assert_ne!(
            question(Endpoint::Chat, &sampled, &alice)
                .unwrap()
                .partition,
            q.partition
        );
        let mut turns = chat("HR bot", "And sick days?");
        turns["messages"]
            .as_array_mut()
            .unwrap()
            .insert(1, json!({"role": "user", "content": "How many PTO days?"}));
        assert_ne!(
            question(Endpoint::Chat, &turns, &alice).unwrap().partition,
            q.partition,
            "another conversation"
        );
        // Delivery fields do not matter, as in the exact layer.
        let mut streamed = chat("HR bot", "PTO days?");
        streamed["stream"] = json!(true);
        assert_eq!(
            question(Endpoint::Chat, &streamed, &alice)
                .unwrap()
                .partition,
            q.partition
        );
    }

    #[test]
    fn another_embedding_model_is_another_partition() {
        let q = question(Endpoint::Chat, &chat("HR bot", "PTO?"), &Scope::Anonymous).unwrap();
        let (a, b) = (
            in_space("model-a", q.clone()),
            in_space("model-b", q.clone()),
        );
        assert_ne!(a.partition, b.partition);
        assert_ne!(a.partition, q.partition);
        assert_eq!(a, in_space("model-a", q.clone()), "deterministic");
        assert_eq!(a.text, q.text);
    }

    #[test]
    fn requests_without_a_comparable_question_skip_the_layer() {
        let s = Scope::Anonymous;
        let mut assistant_last = chat("x", "q");
        assistant_last["messages"]
            .as_array_mut()
            .unwrap()
            .push(json!({"role": "assistant", "content": "a"}));
        assert_eq!(question(Endpoint::Chat, &assistant_last, &s), None);
        let image = json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]});
        assert_eq!(question(Endpoint::Chat, &image, &s), None);
        let parts = json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What"}, {"type": "text", "text": "is PTO?"}]}]});
        assert_eq!(
            question(Endpoint::Chat, &parts, &s).unwrap().text,
            "What\nis PTO?"
        );
        assert_eq!(question(Endpoint::Chat, &chat("x", "  "), &s), None);
        let prompt = json!({"model": "m", "prompt": "Define PTO", "temperature": 0});
        assert_eq!(
            question(Endpoint::Completions, &prompt, &s).unwrap().text,
            "Define PTO"
        );
        let batch = json!({"model": "m", "prompt": ["a", "b"]});
        assert_eq!(question(Endpoint::Completions, &batch, &s), None);
    }
}
