//! Server-sent events as OpenAI-compatible servers stream them, parsed
//! incrementally: bytes go in as the upstream sends them, whole events come
//! out with their original bytes, so the gateway relays each event the
//! moment it is complete (a client cannot use part of one) and stores the
//! same boundaries it relayed.
//!
//! Lines end in `\n`, `\r\n` or `\r`; a blank line ends an event; `data:`
//! lines are joined with `\n`; comments (`:`) and other fields are kept in
//! the raw bytes and otherwise ignored (the WHATWG parsing rules).

use bytes::{Bytes, BytesMut};

/// The `data:` of the event that ends an OpenAI stream.
pub const DONE: &str = "[DONE]";

/// One complete event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The event's bytes as received, its terminating blank line included.
    pub raw: Bytes,
    /// Its `data:` lines joined with `\n`; `None` for an event without any
    /// (a comment, a keep-alive).
    pub data: Option<String>,
}

/// Why a stream cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    /// An event grew past the limit without ending: not a stream this
    /// gateway relays event by event.
    #[error("failed to parse the event stream: an event exceeds {limit} bytes without ending")]
    TooLong {
        /// The limit in bytes.
        limit: usize,
    },
    /// A `data:` line is not UTF-8.
    #[error("failed to parse the event stream: a data line is not UTF-8")]
    NotUtf8,
}

/// An incremental parser: [`push`](Parser::push) the bytes as they come.
#[derive(Debug)]
pub struct Parser {
    buf: BytesMut,
    /// Where the next unparsed line starts in `buf`.
    line: usize,
    data: Option<String>,
    limit: usize,
}

impl Parser {
    /// A parser that refuses events longer than `limit` bytes.
    pub fn new(limit: usize) -> Parser {
        Parser {
            buf: BytesMut::new(),
            line: 0,
            data: None,
            limit,
        }
    }

    /// The events `bytes` completes, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<Event>, SseError> {
        self.buf.extend_from_slice(bytes);
        self.parse(false)
    }

    /// The events the end of the stream completes: a `\r` last in the
    /// stream ends its line. Whatever is still [`pending`](Self::pending)
    /// after this was cut off.
    pub fn finish(&mut self) -> Result<Vec<Event>, SseError> {
        self.parse(true)
    }

    fn parse(&mut self, eof: bool) -> Result<Vec<Event>, SseError> {
        let mut events = Vec::new();
        loop {
            let rest = &self.buf[self.line..];
            let Some(end) = rest.iter().position(|b| *b == b'\n' || *b == b'\r') else {
                break;
            };
            // A `\r` last in the buffer may be the first half of `\r\n`.
            let width = match (rest[end], rest.get(end + 1)) {
                (b'\r', Some(b'\n')) => 2,
                (b'\r', None) if !eof => break,
                _ => 1,
            };
            let line_start = self.line;
            self.line += end + width;
            let line = &self.buf[line_start..line_start + end];
            if line.is_empty() {
                let raw = self.buf.split_to(self.line).freeze();
                self.line = 0;
                events.push(Event {
                    raw,
                    data: self.data.take(),
                });
                continue;
            }
            if let Some(value) = field_value(line, b"data") {
                let value = std::str::from_utf8(value).map_err(|_| SseError::NotUtf8)?;
                match &mut self.data {
                    Some(data) => {
                        data.push('\n');
                        data.push_str(value);
                    }
                    None => self.data = Some(value.to_owned()),
                }
            }
        }
        if self.buf.len() > self.limit {
            return Err(SseError::TooLong { limit: self.limit });
        }
        Ok(events)
    }

    /// Whether bytes of an unfinished event are waiting (at the end of a
    /// stream: it was cut off).
    pub fn pending(&self) -> bool {
        !self.buf.is_empty()
    }
}

/// The value of `line` when it is the field `name` (`name:value`, one
/// leading space dropped, or `name` alone for an empty value).
fn field_value<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let rest = line.strip_prefix(name)?;
    if rest.is_empty() {
        return Some(rest);
    }
    let value = rest.strip_prefix(b":")?;
    Some(value.strip_prefix(b" ").unwrap_or(value))
}

/// The bytes of one `data:` event for `payload`, as the gateway writes them
/// when it replays or splits a stored answer.
pub fn data_event(payload: &str) -> Bytes {
    let mut out = String::with_capacity(payload.len() + 8);
    for line in payload.split('\n') {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn datas(events: &[Event]) -> Vec<Option<&str>> {
        events.iter().map(|e| e.data.as_deref()).collect()
    }

    #[test]
    fn events_come_out_whole_with_their_bytes_whatever_the_cut() {
        let stream = b"data: {\"a\":1}\n\n: keep-alive\n\nevent: x\r\ndata: two\r\ndata:lines\r\n\r\ndata: [DONE]\r\r\n";
        let mut whole = Parser::new(1 << 20);
        let expected = whole.push(stream).unwrap();
        assert_eq!(
            datas(&expected),
            [Some("{\"a\":1}"), None, Some("two\nlines"), Some(DONE)]
        );
        let raw: Vec<u8> = expected.iter().flat_map(|e| e.raw.to_vec()).collect();
        assert_eq!(raw, stream, "the raw bytes are the stream, cut at events");
        // The last `\r` may be half of `\r\n` until the stream ends.
        assert_eq!(whole.push(b"data: 1\n\r").unwrap(), []);
        assert_eq!(datas(&whole.finish().unwrap()), [Some("1")]);
        assert!(!whole.pending());
        // Every cut into two pushes, and byte by byte, gives the same events.
        for cut in 0..stream.len() {
            let mut p = Parser::new(1 << 20);
            let mut got = p.push(&stream[..cut]).unwrap();
            got.extend(p.push(&stream[cut..]).unwrap());
            assert_eq!(got, expected, "cut at {cut}");
        }
        let mut p = Parser::new(1 << 20);
        let got: Vec<Event> = stream.iter().flat_map(|b| p.push(&[*b]).unwrap()).collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn a_cut_off_event_stays_pending_and_a_runaway_one_is_refused() {
        let mut p = Parser::new(16);
        assert_eq!(p.push(b"data: {\"par").unwrap(), []);
        assert!(p.pending());
        let mut p = Parser::new(16);
        assert_eq!(
            p.push(b"data: 0123456789abcdef").unwrap_err(),
            SseError::TooLong { limit: 16 }
        );
        let mut p = Parser::new(16);
        assert_eq!(p.push(b"data: \xff\n\n").unwrap_err(), SseError::NotUtf8);
    }

    #[test]
    fn data_events_round_trip() {
        for payload in ["{\"a\":1}", "two\nlines", "", DONE] {
            let mut p = Parser::new(1 << 20);
            let events = p.push(&data_event(payload)).unwrap();
            assert_eq!(datas(&events), [Some(payload)]);
        }
    }
}
