//! What the exact layer stores of an answer, when it may store it, and how
//! one stored answer serves both kinds of request: a streamed answer keeps
//! its chunks (replayed with the same boundaries), a plain one its body; a
//! plain request is answered from chunks by assembling them, a streamed one
//! from a body by splitting it.

use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::request::Endpoint;
use super::sse;

/// The finish reasons of a complete answer. Anything else (`content_filter`,
/// a missing reason, an engine's own) is not stored.
pub const COMPLETE: [&str; 3] = ["stop", "length", "tool_calls"];

/// The two forms of a stored answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Form {
    /// A plain response's JSON body.
    Body(Value),
    /// A stream's `data:` payloads in order, without the final `[DONE]`.
    Chunks(Vec<String>),
}

/// One stored answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    /// When it was stored, in seconds since the Unix epoch (for `Age` and
    /// `max-age`).
    pub created: u64,
    /// The answer.
    pub form: Form,
}

/// Why an answer is not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotStored {
    /// The upstream answered with an error status.
    Status(u16),
    /// The body or a chunk is not the JSON object of an answer.
    NotAnswer,
    /// The upstream reported an error (an `error` object).
    Error,
    /// A choice ended for another reason than [`COMPLETE`], or never ended.
    Unfinished,
    /// The stream ended before `data: [DONE]`, or broke off.
    Truncated,
}

impl Stored {
    /// The JSON stored in Redis (behind the codec's format tag).
    pub fn to_json(&self) -> Value {
        match &self.form {
            Form::Body(body) => json!({"created": self.created, "body": body}),
            Form::Chunks(chunks) => json!({"created": self.created, "chunks": chunks}),
        }
    }

    /// The stored JSON read back; `None` for anything else (an older format,
    /// garbage), which the gateway treats as a miss.
    pub fn from_json(value: &Value) -> Option<Stored> {
        let created = value.get("created")?.as_u64()?;
        let form = match (value.get("body"), value.get("chunks")) {
            (Some(body), None) if body.is_object() => Form::Body(body.clone()),
            (None, Some(Value::Array(chunks))) => Form::Chunks(
                chunks
                    .iter()
                    .map(|c| c.as_str().map(str::to_owned))
                    .collect::<Option<_>>()?,
            ),
            _ => return None,
        };
        Some(Stored { created, form })
    }

    /// Its age in seconds at `now` (0 for a clock that went back).
    pub fn age(&self, now: u64) -> u64 {
        now.saturating_sub(self.created)
    }
}

/// Whether a plain response may be stored.
pub fn check_body(status: u16, body: &Value) -> Result<(), NotStored> {
    if status != 200 {
        return Err(NotStored::Status(status));
    }
    if body.get("error").is_some_and(|e| !e.is_null()) {
        return Err(NotStored::Error);
    }
    let choices = body
        .get("choices")
        .and_then(Value::as_array)
        .filter(|c| !c.is_empty())
        .ok_or(NotStored::NotAnswer)?;
    for choice in choices {
        let reason = choice.get("finish_reason").and_then(Value::as_str);
        if !reason.is_some_and(|r| COMPLETE.contains(&r)) {
            return Err(NotStored::Unfinished);
        }
    }
    Ok(())
}

/// Whether a stream's payloads may be stored: every chunk an answer's,
/// none an error, every choice finished for a [`COMPLETE`] reason, and the
/// stream ended by `[DONE]` (`done`).
pub fn check_chunks(chunks: &[String], done: bool) -> Result<(), NotStored> {
    if !done {
        return Err(NotStored::Truncated);
    }
    let mut finished: Vec<Option<bool>> = Vec::new();
    for chunk in chunks {
        let value: Value = serde_json::from_str(chunk).map_err(|_| NotStored::NotAnswer)?;
        if value.get("error").is_some_and(|e| !e.is_null()) {
            return Err(NotStored::Error);
        }
        let choices = value
            .get("choices")
            .and_then(Value::as_array)
            .ok_or(NotStored::NotAnswer)?;
        for choice in choices {
            let index = choice_index(choice);
            if finished.len() <= index {
                finished.resize(index + 1, None);
            }
            let slot = &mut finished[index];
            match choice.get("finish_reason").and_then(Value::as_str) {
                Some(r) if COMPLETE.contains(&r) => *slot = Some(true),
                Some(_) => *slot = Some(false),
                None => {
                    slot.get_or_insert(false);
                }
            }
        }
    }
    // Every index up to the highest must have appeared and finished.
    if finished.is_empty() || finished.iter().any(|f| *f != Some(true)) {
        return Err(NotStored::Unfinished);
    }
    Ok(())
}

fn choice_index(choice: &Value) -> usize {
    // Bounded so that a hostile `index` cannot make us allocate.
    choice
        .get("index")
        .and_then(Value::as_u64)
        .map_or(0, |i| i.min(127) as usize)
}

/// Whether a chunk is the usage-only chunk that `stream_options:
/// {include_usage: true}` adds at the end (no choices, a usage object).
pub fn is_usage_chunk(chunk: &Value) -> bool {
    chunk
        .get("choices")
        .and_then(Value::as_array)
        .is_some_and(Vec::is_empty)
        && chunk.get("usage").is_some_and(Value::is_object)
}

/// Token counts of an answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt (input) tokens.
    pub prompt: u64,
    /// Completion (output) tokens.
    pub completion: u64,
}

impl Usage {
    fn of(value: &Value) -> Option<Usage> {
        let usage = value.get("usage")?;
        Some(Usage {
            prompt: usage.get("prompt_tokens")?.as_u64()?,
            completion: usage.get("completion_tokens")?.as_u64()?,
        })
    }
}

impl Form {
    /// The answer's usage, where the upstream reported it.
    pub fn usage(&self) -> Option<Usage> {
        match self {
            Form::Body(body) => Usage::of(body),
            Form::Chunks(chunks) => chunks
                .iter()
                .rev()
                .filter_map(|c| serde_json::from_str::<Value>(c).ok())
                .find_map(|c| Usage::of(&c)),
        }
    }

    /// The plain response body of this answer.
    pub fn body(&self, endpoint: Endpoint) -> Value {
        match self {
            Form::Body(body) => body.clone(),
            Form::Chunks(chunks) => assemble(endpoint, chunks),
        }
    }

    /// The SSE bytes of this answer, `data: [DONE]` last; the usage chunk
    /// only when the client asked for it (`include_usage`).
    pub fn events(&self, endpoint: Endpoint, include_usage: bool) -> Vec<Bytes> {
        let chunks = match self {
            Form::Chunks(chunks) => chunks.clone(),
            Form::Body(body) => split(endpoint, body),
        };
        chunks
            .iter()
            .filter(|c| include_usage || !chunk_is_usage(c))
            .map(|c| sse::data_event(c))
            .chain(std::iter::once(sse::data_event(sse::DONE)))
            .collect()
    }
}

/// [`is_usage_chunk`] of a payload.
pub fn chunk_is_usage(payload: &str) -> bool {
    // Cheap test first: most chunks carry no usage object (with
    // include_usage, OpenAI's carry `"usage":null`).
    (payload.contains("\"usage\":{") || payload.contains("\"usage\": {"))
        && serde_json::from_str::<Value>(payload).is_ok_and(|c| is_usage_chunk(&c))
}

/// The plain response a stream's chunks add up to: the same id, model and
/// creation time, each choice's content (or text), tool calls and logprobs
/// concatenated, its last finish reason, and the usage.
pub fn assemble(endpoint: Endpoint, chunks: &[String]) -> Value {
    let mut head = Map::new();
    let mut choices: Vec<Map<String, Value>> = Vec::new();
    let mut usage = Value::Null;
    for chunk in chunks {
        let Ok(Value::Object(chunk)) = serde_json::from_str::<Value>(chunk) else {
            continue;
        };
        for field in ["id", "created", "model", "system_fingerprint"] {
            if let Some(v) = chunk.get(field).filter(|v| !v.is_null()) {
                head.entry(field).or_insert_with(|| v.clone());
            }
        }
        if let Some(u) = chunk.get("usage").filter(|u| u.is_object()) {
            usage = u.clone();
        }
        for choice in chunk
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let index = choice_index(choice);
            if choices.len() <= index {
                choices.resize_with(index + 1, Map::new);
            }
            merge_choice(endpoint, &mut choices[index], choice);
        }
    }
    let object = match endpoint {
        Endpoint::Chat => "chat.completion",
        Endpoint::Completions => "text_completion",
    };
    let mut body = head;
    body.insert("object".into(), json!(object));
    let choices: Vec<Value> = choices
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            c.insert("index".into(), json!(i));
            c.entry("finish_reason").or_insert(Value::Null);
            c.entry("logprobs").or_insert(Value::Null);
            Value::Object(c)
        })
        .collect();
    body.insert("choices".into(), Value::Array(choices));
    body.insert("usage".into(), usage);
    Value::Object(body)
}

fn merge_choice(endpoint: Endpoint, into: &mut Map<String, Value>, choice: &Value) {
    if let Some(reason) = choice.get("finish_reason").filter(|r| !r.is_null()) {
        into.insert("finish_reason".into(), reason.clone());
    }
    if let Some(content) = choice.get("logprobs").and_then(|l| l.get("content"))
        && let Some(items) = content.as_array()
    {
        let logprobs = into
            .entry("logprobs")
            .or_insert_with(|| json!({"content": []}));
        if let Some(all) = logprobs.get_mut("content").and_then(Value::as_array_mut) {
            all.extend(items.iter().cloned());
        }
    }
    match endpoint {
        Endpoint::Completions => {
            if let Some(text) = choice.get("text").and_then(Value::as_str) {
                append_str(into, "text", text);
            } else {
                into.entry("text").or_insert(json!(""));
            }
        }
        Endpoint::Chat => {
            let message = into
                .entry("message")
                .or_insert_with(|| json!({"role": "assistant", "content": null}));
            let (Some(message), Some(delta)) = (
                message.as_object_mut(),
                choice.get("delta").and_then(Value::as_object),
            ) else {
                return;
            };
            for (field, value) in delta {
                match (field.as_str(), value) {
                    (_, Value::Null) => {}
                    ("role", role) => {
                        message.insert("role".into(), role.clone());
                    }
                    ("tool_calls", Value::Array(calls)) => merge_tool_calls(message, calls),
                    (_, Value::String(s)) => append_str(message, field, s),
                    (_, other) => {
                        message.insert(field.clone(), other.clone());
                    }
                }
            }
        }
    }
}

fn append_str(into: &mut Map<String, Value>, field: &str, s: &str) {
    match into.get_mut(field) {
        Some(Value::String(existing)) => existing.push_str(s),
        _ => {
            into.insert(field.into(), json!(s));
        }
    }
}

/// Tool-call deltas come keyed by `index`: the first names the call, later
/// ones carry pieces of its arguments.
fn merge_tool_calls(message: &mut Map<String, Value>, deltas: &[Value]) {
    let calls = message
        .entry("tool_calls")
        .or_insert_with(|| json!([]))
        .as_array_mut();
    let Some(calls) = calls else { return };
    for delta in deltas {
        let index = choice_index(delta);
        while calls.len() <= index {
            calls.push(
                json!({"id": null, "type": "function", "function": {"name": "", "arguments": ""}}),
            );
        }
        let Some(call) = calls[index].as_object_mut() else {
            continue;
        };
        for field in ["id", "type"] {
            if let Some(v) = delta.get(field).filter(|v| !v.is_null()) {
                call.insert(field.into(), v.clone());
            }
        }
        let (Some(function), Some(piece)) = (
            call.get_mut("function").and_then(Value::as_object_mut),
            delta.get("function").and_then(Value::as_object),
        ) else {
            continue;
        };
        for (field, value) in piece {
            if let Some(s) = value.as_str() {
                append_str(function, field, s);
            }
        }
    }
}

/// The chunks a plain response splits into: per choice, one chunk with its
/// whole message (or text) and one with its finish reason; then the usage
/// chunk. The same id, model and creation time as the body.
pub fn split(endpoint: Endpoint, body: &Value) -> Vec<String> {
    let (object, content_field) = match endpoint {
        Endpoint::Chat => ("chat.completion.chunk", "delta"),
        Endpoint::Completions => ("text_completion", "text"),
    };
    let mut head = Map::new();
    for field in ["id", "created", "model", "system_fingerprint"] {
        if let Some(v) = body.get(field) {
            head.insert(field.into(), v.clone());
        }
    }
    head.insert("object".into(), json!(object));
    let chunk = |choice: Value| {
        let mut c = head.clone();
        c.insert("choices".into(), json!([choice]));
        Value::Object(c).to_string()
    };
    let mut out = Vec::new();
    for (i, choice) in body
        .get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let index = choice.get("index").cloned().unwrap_or(json!(i));
        let reason = choice.get("finish_reason").cloned().unwrap_or(Value::Null);
        let logprobs = choice.get("logprobs").cloned().unwrap_or(Value::Null);
        match endpoint {
            Endpoint::Chat => {
                let mut delta = choice.get("message").cloned().unwrap_or(json!({}));
                if let Some(calls) = delta.get_mut("tool_calls").and_then(Value::as_array_mut) {
                    for (n, call) in calls.iter_mut().enumerate() {
                        call["index"] = json!(n);
                    }
                }
                out.push(chunk(json!({"index": index, content_field: delta,
                    "logprobs": logprobs, "finish_reason": null})));
                out.push(chunk(
                    json!({"index": index, content_field: {}, "finish_reason": reason}),
                ));
            }
            Endpoint::Completions => {
                let text = choice.get("text").cloned().unwrap_or(json!(""));
                out.push(chunk(json!({"index": index, content_field: text,
                    "logprobs": logprobs, "finish_reason": null})));
                out.push(chunk(
                    json!({"index": index, content_field: "", "finish_reason": reason}),
                ));
            }
        }
    }
    if let Some(usage) = body.get("usage").filter(|u| u.is_object()) {
        let mut c = head.clone();
        c.insert("choices".into(), json!([]));
        c.insert("usage".into(), usage.clone());
        out.push(Value::Object(c).to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(values: &[Value]) -> Vec<String> {
        values.iter().map(Value::to_string).collect()
    }

    fn chat_stream() -> Vec<String> {
        let head = |choice: Value| {
            json!({"id": "c1", "object": "chat.completion.chunk", "created": 7,
                   "model": "smollm2", "choices": [choice]})
        };
        chunks(&[
            head(
                json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}),
            ),
            head(json!({"index": 0, "delta": {"content": "Fifteen"}, "finish_reason": null})),
            head(json!({"index": 0, "delta": {"content": " days."}, "finish_reason": null})),
            head(json!({"index": 0, "delta": {}, "finish_reason": "stop"})),
            json!({"id": "c1", "object": "chat.completion.chunk", "created": 7, "model": "smollm2",
                   "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}}),
        ])
    }

    #[test]
    fn chunks_assemble_into_the_plain_answer() {
        let body = assemble(Endpoint::Chat, &chat_stream());
        assert_eq!(body["id"], "c1");
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["created"], 7);
        assert_eq!(body["choices"][0]["message"]["content"], "Fifteen days.");
        assert_eq!(body["choices"][0]["message"]["role"], "assistant");
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert_eq!(body["usage"]["completion_tokens"], 3);
        assert_eq!(check_body(200, &body), Ok(()));
    }

    #[test]
    fn tool_call_pieces_join_by_index() {
        let head = |delta: Value, reason: Value| json!({"id": "c2", "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]});
        let stream = chunks(&[
            head(
                json!({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "pto", "arguments": ""}}]}),
                Value::Null,
            ),
            head(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"year\":"}}]}),
                Value::Null,
            ),
            head(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "2026}"}}]}),
                Value::Null,
            ),
            head(json!({}), json!("tool_calls")),
        ]);
        let body = assemble(Endpoint::Chat, &stream);
        let call = &body["choices"][0]["message"]["tool_calls"][0];
        assert_eq!(call["id"], "call_1");
        assert_eq!(call["function"]["name"], "pto");
        assert_eq!(call["function"]["arguments"], "{\"year\":2026}");
        assert_eq!(check_chunks(&stream, true), Ok(()));
        // Split again and assembled, the answer is the same.
        let again = assemble(Endpoint::Chat, &split(Endpoint::Chat, &body));
        assert_eq!(again["choices"], body["choices"]);
    }

    #[test]
    fn a_body_splits_into_chunks_that_assemble_back() {
        for (endpoint, body) in [
            (
                Endpoint::Chat,
                json!({"id": "x", "object": "chat.completion", "created": 3, "model": "m",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"},
                                 "logprobs": null, "finish_reason": "length"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}),
            ),
            (
                Endpoint::Completions,
                json!({"id": "y", "object": "text_completion", "created": 3, "model": "m",
                    "choices": [{"index": 0, "text": "Hi", "logprobs": null, "finish_reason": "stop"},
                                {"index": 1, "text": "Ho", "logprobs": null, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}),
            ),
        ] {
            let stream = split(endpoint, &body);
            assert_eq!(check_chunks(&stream, true), Ok(()), "{endpoint:?}");
            assert_eq!(assemble(endpoint, &stream), body, "{endpoint:?}");
            assert!(chunk_is_usage(stream.last().unwrap()));
        }
    }

    #[test]
    fn only_complete_answers_are_stored() {
        let stream = chat_stream();
        assert_eq!(check_chunks(&stream, true), Ok(()));
        assert_eq!(check_chunks(&stream, false), Err(NotStored::Truncated));
        assert_eq!(
            check_chunks(&stream[..3], true),
            Err(NotStored::Unfinished),
            "no finish reason"
        );
        let mut filtered = stream.clone();
        filtered[3] = filtered[3].replace("\"stop\"", "\"content_filter\"");
        assert_eq!(check_chunks(&filtered, true), Err(NotStored::Unfinished));
        let mut errored = stream.clone();
        errored.insert(2, json!({"error": {"message": "overloaded"}}).to_string());
        assert_eq!(check_chunks(&errored, true), Err(NotStored::Error));
        assert_eq!(
            check_chunks(&["not json".into()], true),
            Err(NotStored::NotAnswer)
        );
        let body = assemble(Endpoint::Chat, &stream);
        assert_eq!(check_body(500, &body), Err(NotStored::Status(500)));
        assert_eq!(
            check_body(200, &json!({"error": {"message": "x"}})),
            Err(NotStored::Error)
        );
        assert_eq!(
            check_body(200, &json!({"choices": []})),
            Err(NotStored::NotAnswer)
        );
    }

    #[test]
    fn replay_keeps_chunk_boundaries_and_the_usage_chunk_on_request() {
        let stream = chat_stream();
        let form = Form::Chunks(stream.clone());
        let with = form.events(Endpoint::Chat, true);
        assert_eq!(with.len(), stream.len() + 1);
        let mut parser = sse::Parser::new(1 << 20);
        let replayed: Vec<String> = with
            .iter()
            .flat_map(|e| parser.push(e).unwrap())
            .filter_map(|e| e.data)
            .collect();
        assert_eq!(replayed[..stream.len()], stream[..]);
        assert_eq!(replayed.last().unwrap(), sse::DONE);
        let without = form.events(Endpoint::Chat, false);
        assert_eq!(without.len(), stream.len(), "no usage chunk");
        assert_eq!(
            form.usage(),
            Some(Usage {
                prompt: 12,
                completion: 3
            })
        );
    }

    #[test]
    fn stored_json_round_trips_and_garbage_is_none() {
        for form in [
            Form::Chunks(chat_stream()),
            Form::Body(json!({"choices": []})),
        ] {
            let stored = Stored { created: 9, form };
            assert_eq!(Stored::from_json(&stored.to_json()), Some(stored));
        }
        for garbage in [
            json!({}),
            json!({"created": 1}),
            json!({"created": "1", "body": {}}),
            json!({"created": 1, "chunks": [1]}),
            json!({"created": 1, "body": {}, "chunks": []}),
        ] {
            assert_eq!(Stored::from_json(&garbage), None, "{garbage}");
        }
        assert_eq!(
            Stored {
                created: 10,
                form: Form::Chunks(vec![])
            }
            .age(4),
            0
        );
    }
}
