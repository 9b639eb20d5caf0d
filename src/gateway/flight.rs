//! Coalescing: identical concurrent misses share one upstream call. The
//! first request's call is a [`Flight`] under the entry's key; every request
//! that misses the same key while it is in the air reads the same flight,
//! from its first byte, as it arrives (streamed too), so N identical misses
//! cost one upstream call and nobody waits longer than the first.
//!
//! A flight is driven by its own task, not by the first client's
//! connection: a client that goes away does not cut the answer off for the
//! others, and the answer is still stored once it completes.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::http::{HeaderMap, StatusCode};
use parking_lot::Mutex;
use tokio::sync::watch;

use super::sse::Event;

/// The upstream's response head, as every reader of a flight answers it.
#[derive(Debug, Clone)]
pub struct Head {
    /// The upstream's status.
    pub status: StatusCode,
    /// The upstream's headers that reach the client.
    pub headers: HeaderMap,
    /// Whether the body is an event stream (its pieces are whole events).
    pub events: bool,
}

/// How a flight ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The upstream's body arrived whole.
    Complete,
    /// It broke off (a reset, a read error, a stream that cannot be parsed).
    Broken,
}

#[derive(Default)]
struct State {
    head: Option<Head>,
    pieces: Vec<Event>,
    end: Option<End>,
}

/// One upstream call and what has arrived of it so far.
pub struct Flight {
    state: Mutex<State>,
    tick: watch::Sender<u64>,
    readers: AtomicUsize,
}

impl Flight {
    fn new() -> Arc<Flight> {
        Arc::new(Flight {
            state: Mutex::new(State::default()),
            tick: watch::Sender::new(0),
            readers: AtomicUsize::new(0),
        })
    }

    /// A flight no other request can join (a request that must not share:
    /// `no-cache`).
    pub fn alone() -> Arc<Flight> {
        Flight::new()
    }

    fn changed(&self) {
        self.tick.send_modify(|t| *t = t.wrapping_add(1));
    }

    /// The upstream's head arrived.
    pub fn start(&self, head: Head) {
        self.state.lock().head = Some(head);
        self.changed();
    }

    /// A piece of the body arrived: a whole event, or bytes of a plain body.
    pub fn push(&self, piece: Event) {
        self.state.lock().pieces.push(piece);
        self.changed();
    }

    /// The body ended.
    pub fn end(&self, end: End) {
        self.state.lock().end.get_or_insert(end);
        self.changed();
    }

    /// How many requests have read this flight.
    pub fn readers(&self) -> usize {
        self.readers.load(Ordering::Relaxed)
    }

    /// A new reader, from the first piece.
    pub fn reader(self: &Arc<Self>) -> Reader {
        self.readers.fetch_add(1, Ordering::Relaxed);
        Reader {
            flight: Arc::clone(self),
            tick: self.tick.subscribe(),
            next: 0,
        }
    }

    /// Ends the flight as broken when `guard` drops before the driver ended
    /// it (a panic): its readers must not wait forever.
    pub fn guard(self: &Arc<Self>) -> Guard {
        Guard(Arc::clone(self))
    }
}

/// See [`Flight::guard`].
pub struct Guard(Arc<Flight>);

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.end(End::Broken);
    }
}

/// One request's position in a flight.
pub struct Reader {
    flight: Arc<Flight>,
    tick: watch::Receiver<u64>,
    next: usize,
}

impl Reader {
    /// Waits until `ready` returns something.
    async fn wait<T>(&mut self, mut ready: impl FnMut(&State, usize) -> Option<T>) -> T {
        loop {
            // Marked seen before the check, so a change after it wakes us.
            self.tick.borrow_and_update();
            if let Some(out) = ready(&self.flight.state.lock(), self.next) {
                return out;
            }
            if self.tick.changed().await.is_err() {
                // Unreachable: the flight holds the sender. Checked anyway.
                if let Some(out) = ready(&self.flight.state.lock(), self.next) {
                    return out;
                }
                std::future::pending::<()>().await;
            }
        }
    }

    /// The upstream's head; `None` if the flight ended without one.
    pub async fn head(&mut self) -> Option<Head> {
        self.wait(|s, _| match (&s.head, s.end) {
            (Some(head), _) => Some(Some(head.clone())),
            (None, Some(_)) => Some(None),
            (None, None) => None,
        })
        .await
    }

    /// The next piece, or how the flight ended once all are read.
    pub async fn next(&mut self) -> Result<Event, End> {
        let out = self
            .wait(|s, next| match (s.pieces.get(next), s.end) {
                (Some(piece), _) => Some(Ok(piece.clone())),
                (None, Some(end)) => Some(Err(end)),
                (None, None) => None,
            })
            .await;
        if out.is_ok() {
            self.next += 1;
        }
        out
    }

    /// Every piece not read yet, once the flight has ended, and how.
    pub async fn rest(&mut self) -> (Vec<Event>, End) {
        let out = self
            .wait(|s, next| {
                s.end
                    .map(|end| (s.pieces[next.min(s.pieces.len())..].to_vec(), end))
            })
            .await;
        self.next += out.0.len();
        out
    }
}

/// The flights in the air, by entry key.
#[derive(Default)]
pub struct Flights {
    map: Mutex<HashMap<String, Arc<Flight>>>,
}

/// A request's place in a flight.
pub enum Join {
    /// It makes the upstream call.
    Leader(Arc<Flight>),
    /// It reads the call another request made.
    Follower(Arc<Flight>),
}

impl Flights {
    /// Joins the flight for `key`, or starts it.
    pub fn join(&self, key: &str) -> Join {
        let mut map = self.map.lock();
        if let Some(flight) = map.get(key) {
            return Join::Follower(Arc::clone(flight));
        }
        let flight = Flight::new();
        map.insert(key.to_owned(), Arc::clone(&flight));
        Join::Leader(flight)
    }

    /// Takes `flight` off `key` (once its answer is stored, so that a
    /// request that misses after that finds the entry): later misses start
    /// a new one.
    pub fn land(&self, key: &str, flight: &Arc<Flight>) {
        let mut map = self.map.lock();
        if map.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            map.remove(key);
        }
    }

    /// How many flights are in the air.
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn piece(s: &'static str) -> Event {
        Event {
            raw: Bytes::from_static(s.as_bytes()),
            data: None,
        }
    }

    #[tokio::test]
    async fn readers_see_every_piece_from_the_first_whenever_they_join() {
        let flights = Flights::default();
        let Join::Leader(flight) = flights.join("k") else {
            panic!("first is the leader")
        };
        let Join::Follower(same) = flights.join("k") else {
            panic!("second follows")
        };
        assert!(Arc::ptr_eq(&flight, &same));
        let mut early = flight.reader();
        let waiting = tokio::spawn(async move {
            let head = early.head().await.unwrap();
            let mut got = Vec::new();
            let end = loop {
                match early.next().await {
                    Ok(p) => got.push(p.raw),
                    Err(end) => break end,
                }
            };
            (head.status, got, end)
        });
        flight.start(Head {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            events: true,
        });
        flight.push(piece("a"));
        let mut late = flight.reader();
        flight.push(piece("b"));
        flight.end(End::Complete);
        let (status, got, end) = waiting.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(got, [Bytes::from("a"), Bytes::from("b")]);
        assert_eq!(end, End::Complete);
        let (rest, end) = late.rest().await;
        assert_eq!(rest.len(), 2, "a late reader starts at the first piece");
        assert_eq!(end, End::Complete);
        assert_eq!(flight.readers(), 2);
        flights.land("k", &flight);
        assert!(flights.is_empty());
        assert!(matches!(flights.join("k"), Join::Leader(_)));
    }

    #[tokio::test]
    async fn a_dropped_driver_ends_the_flight_broken() {
        let flight = Flight::alone();
        let mut reader = flight.reader();
        drop(flight.guard());
        assert!(reader.head().await.is_none());
        assert_eq!(reader.next().await.unwrap_err(), End::Broken);
    }
}
