//! The download engine of `modelcache fetch`: every file is a set of byte
//! ranges that `--concurrency` workers download in place, with adaptive
//! splitting.
//!
//! A worker takes a range nobody holds (a whole file at first); when none is
//! left it splits the in-flight range with the longest time still to go, if
//! that time is well above what a new request costs (the measured time to
//! first byte). So a store that is fast per connection but slow to start a
//! request (moto reads the whole object for every range) gets one GET per
//! file, and one that caps each connection (S3, CDNs) gets as many parallel
//! ranges as there are connections. With `--part-size`, files are cut into
//! fixed parts up front instead, and nothing is split.
//!
//! What is written is journaled (`<start> <offset>` lines after the bytes are
//! in the file, every 8 MiB), so after a kill the next run downloads only the
//! gaps. Ranges that a split made overlap by at most a chunk; both writers
//! write the same bytes. Each file is hashed in order: the writer at the
//! hashing frontier hashes its own buffer, and bytes written ahead of it
//! (the later ranges of a split file) are read back from the page cache by a
//! blocking task once the gap before them is filled, so memory stays bounded
//! whatever the model's size. How many requests are in flight is fixed or
//! adaptive (`governor`).

use std::fs::File;
use std::io::Write as _;
use std::ops::Range;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt as _;

use super::governor::{Climb, Concurrency, Slots, govern};
use super::manifest::ManifestFile;
use super::progress::Counters;
use super::retry::Backoff;
use super::source::{Failure, Source, SourceError};
use crate::digest::Sha256;

const MIB: u64 = 1 << 20;

/// Bytes between two journal checkpoints of a range: at most this much is
/// downloaded again after a kill.
const CHECKPOINT: u64 = 8 * MIB;

/// Contiguous bytes that start a hashing task (the last bytes of a file always do).
const HASH_BATCH: u64 = 4 * MIB;

/// No range is split below this.
const MIN_SPLIT: u64 = 4 * MIB;

/// Split only when the time left on a range is this many times what a new
/// request costs to start.
const SPLIT_FACTOR: f64 = 4.0;

/// Sees each file's transfer as it opens, so that others can follow a
/// download in progress (the node agent's readers).
pub trait Observer: Send + Sync {
    /// A transfer opened; its bytes follow.
    fn transfer(&self, transfer: &Arc<Transfer>);
}

/// No one watching.
impl Observer for () {
    fn transfer(&self, _: &Arc<Transfer>) {}
}

/// What the workers share.
pub struct Engine {
    /// Where the bytes come from.
    pub source: Source,
    /// The model.
    pub model: String,
    /// The version.
    pub version: String,
    /// Progress counters.
    pub counters: Arc<Counters>,
    /// When the whole fetch must end.
    pub deadline: Instant,
    /// Attempts per request.
    pub max_attempts: u32,
    /// First retry delay.
    pub retry_base: Duration,
    /// A response silent this long is retried.
    pub idle: Duration,
    /// Fixed part size (no splitting), or adaptive when `None`.
    pub part_size: Option<u64>,
    /// Time to first byte of every request, smoothed: how long a new
    /// request takes to start, for the governor.
    pub ttfb: Mutex<Option<f64>>,
}

/// Why a file transfer failed.
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum TransferError {
    #[error("failed to fetch {file}")]
    Source {
        file: String,
        #[source]
        source: SourceError,
    },
    #[error("failed to {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> TransferError + 'a {
    move |source| TransferError::Io {
        what,
        path: path.into(),
        source,
    }
}

/// A range in flight. Its end may move down when another worker takes the
/// second half.
struct Segment {
    /// Where it started: the first field of its journal lines.
    start: u64,
    at: AtomicU64,
    end: AtomicU64,
    /// Bytes received and when the first arrived, for its rate.
    received: AtomicU64,
    first_byte: Mutex<Option<Instant>>,
}

impl Segment {
    fn new(range: Range<u64>) -> Arc<Segment> {
        Arc::new(Segment {
            start: range.start,
            at: AtomicU64::new(range.start),
            end: AtomicU64::new(range.end),
            received: AtomicU64::new(0),
            first_byte: Mutex::new(None),
        })
    }

    fn remaining(&self) -> u64 {
        self.end
            .load(Ordering::Acquire)
            .saturating_sub(self.at.load(Ordering::Acquire))
    }

    /// Seconds until it ends at its current rate, once that is known.
    fn time_left(&self, now: Instant) -> Option<f64> {
        let first = (*self.first_byte.lock())?;
        let elapsed = now.duration_since(first).as_secs_f64();
        let received = self.received.load(Ordering::Relaxed);
        if elapsed < 0.05 || received == 0 {
            return None;
        }
        Some(self.remaining() as f64 / (received as f64 / elapsed))
    }
}

/// One file being downloaded.
pub struct Transfer {
    /// The file, as the manifest lists it.
    pub file: ManifestFile,
    partial: PathBuf,
    data: File,
    journal: Journal,
    state: Mutex<State>,
    /// Time to first byte of this file's requests, smoothed; `None` until a
    /// response arrived. Per file, because some stores take longer to start
    /// a range of a bigger object (moto copies the whole object first).
    ttfb: Mutex<Option<f64>>,
    /// Notified when the file's digest is known.
    hashed: tokio::sync::Notify,
}

struct State {
    /// Written bytes: sorted, merged.
    covered: Vec<Range<u64>>,
    /// Ranges nobody holds yet.
    pending: Vec<Range<u64>>,
    segments: Vec<Arc<Segment>>,
    /// Bytes hashed so far, and the hasher when no task holds it.
    hashed: u64,
    hasher: Option<Sha256>,
    digest: Option<Result<String, String>>,
    /// Bytes found written by an earlier run.
    resumed: u64,
}

impl State {
    /// Bytes written contiguously from offset 0.
    fn prefix(&self) -> u64 {
        self.covered
            .first()
            .filter(|r| r.start == 0)
            .map_or(0, |r| r.end)
    }
}

impl Transfer {
    /// Open or resume the partial file of `file` in `partial_dir`.
    pub fn open(
        partial_dir: &Path,
        file: &ManifestFile,
        part_size: Option<u64>,
    ) -> Result<Arc<Transfer>, TransferError> {
        let partial = partial_dir.join(format!("{}.part", file.sha256));
        let journal_path = partial_dir.join(format!("{}.parts", file.sha256));
        let (covered, journal) = Journal::open(&journal_path, &partial, file.size)?;
        let data = File::options()
            .read(true)
            .write(true)
            .open(&partial)
            .map_err(io_err("open", &partial))?;
        let resumed = covered.iter().map(|r| r.end - r.start).sum();
        let mut pending = gaps(&covered, file.size);
        if let Some(part) = part_size {
            pending = pending
                .into_iter()
                .flat_map(|g| {
                    (g.start..g.end)
                        .step_by(part.max(MIB) as usize)
                        .map(move |s| s..(s + part.max(MIB)).min(g.end))
                })
                .collect();
        }
        let transfer = Arc::new(Transfer {
            file: file.clone(),
            partial,
            data,
            journal,
            state: Mutex::new(State {
                covered,
                pending,
                segments: Vec::new(),
                hashed: 0,
                hasher: Some(Sha256::default()),
                digest: None,
                resumed,
            }),
            ttfb: Mutex::new(None),
            hashed: tokio::sync::Notify::new(),
        });
        transfer.written(0..0, &[]);
        Ok(transfer)
    }

    /// Bytes reused from an interrupted earlier run.
    pub fn resumed(&self) -> u64 {
        self.state.lock().resumed
    }

    /// Remove the partial file and its journal (after a mismatch, or once the
    /// verified file has been moved).
    pub fn discard(&self) {
        let _ = std::fs::remove_file(&self.partial);
        let _ = std::fs::remove_file(self.journal_path());
    }

    fn journal_path(&self) -> PathBuf {
        self.partial.with_extension("parts")
    }

    /// Where the file is written until it is verified.
    pub fn partial_path(&self) -> &Path {
        &self.partial
    }

    /// Where the written bytes that run on from `at` end (`at` itself when
    /// the byte at `at` is not written yet): what a reader of that offset
    /// may follow while the file is still downloading. The node agent
    /// streams it to the pods that joined its download, each range as far
    /// as it is written, not only the prefix: the download splits a file
    /// into ranges that fill side by side, and a pod's later ranges would
    /// otherwise wait for the first one.
    pub fn written_from(&self, at: u64) -> u64 {
        let st = self.state.lock();
        let i = st.covered.partition_point(|r| r.end <= at);
        st.covered
            .get(i)
            .filter(|r| r.start <= at)
            .map_or(at, |r| r.end)
    }

    /// Bytes written so far, wherever they are in the file.
    pub fn written_bytes(&self) -> u64 {
        let st = self.state.lock();
        st.covered.iter().map(|r| r.end - r.start).sum()
    }

    /// Whether the whole file matched its manifest digest; `None` until it
    /// is all written and hashed.
    pub fn verified(&self) -> Option<bool> {
        let st = self.state.lock();
        let digest = st.digest.as_ref()?;
        Some(digest.as_ref().is_ok_and(|d| *d == self.file.sha256))
    }

    /// The partial file, to read written bytes from. The handle stays valid
    /// after the verified file is renamed into the node cache (the same inode).
    pub fn data(&self) -> &File {
        &self.data
    }

    /// Flushes the partial file's data to disk.
    pub fn sync(&self) -> Result<(), TransferError> {
        self.data.sync_data().map_err(io_err("sync", &self.partial))
    }

    /// Record `range` as written with the bytes `data`, and hash what that
    /// makes contiguous (an empty range only checks: a resumed file may be
    /// contiguous already).
    ///
    /// The writer at the hashing frontier hashes its own buffer, so the
    /// bytes of a file downloaded in order (one GET, the common case) are
    /// never read back; bytes written beyond the frontier are read back from
    /// the page cache by a blocking task once the gap before them is filled.
    fn written(self: &Arc<Self>, range: Range<u64>, data: &[Bytes]) {
        let frontier = {
            let mut st = self.state.lock();
            insert_merged(&mut st.covered, range.clone());
            let at = st.hashed;
            if range.start <= at && at < range.end && st.digest.is_none() {
                st.hasher.take().map(|h| (h, at))
            } else {
                None
            }
        };
        if let Some((mut hasher, at)) = frontier {
            // At most a chunk (256 KiB), hashed in place: well under a
            // millisecond, cheaper than a task and a read back.
            let mut skip = (at - range.start) as usize;
            for chunk in data {
                let n = skip.min(chunk.len());
                hasher.update(&chunk[n..]);
                skip -= n;
            }
            let mut st = self.state.lock();
            st.hashed = range.end;
            if st.hashed == self.file.size {
                st.digest = Some(Ok(hasher.finish_hex()));
                drop(st);
                self.hashed.notify_waiters();
                self.hashed.notify_one();
                return;
            }
            st.hasher = Some(hasher);
        }
        let start_hashing = {
            let st = self.state.lock();
            // Writes come every 256 KiB: a hashing task for each would cost
            // more than it hashes, so wait for a batch, or for the end.
            let prefix = st.prefix();
            st.hasher.is_some()
                && prefix > st.hashed
                && (prefix - st.hashed >= HASH_BATCH || prefix == self.file.size)
        };
        if start_hashing {
            let t = self.clone();
            tokio::task::spawn_blocking(move || t.hash_available());
        }
    }

    /// Hash the contiguous written prefix; whoever holds the hasher works
    /// until nothing more is contiguous, then puts it back.
    fn hash_available(&self) {
        let Some(mut hasher) = self.state.lock().hasher.take() else {
            return;
        };
        let mut buf = vec![0u8; MIB as usize];
        loop {
            let (from, to) = {
                let mut st = self.state.lock();
                let to = st.prefix();
                if to <= st.hashed {
                    if st.hashed == self.file.size && st.digest.is_none() {
                        st.digest = Some(Ok(hasher.finish_hex()));
                        drop(st);
                        self.hashed.notify_waiters();
                        self.hashed.notify_one();
                    } else {
                        st.hasher = Some(hasher);
                    }
                    return;
                }
                (st.hashed, to)
            };
            let mut at = from;
            while at < to {
                let n = ((to - at) as usize).min(buf.len());
                if let Err(e) = self.data.read_exact_at(&mut buf[..n], at) {
                    let mut st = self.state.lock();
                    st.digest = Some(Err(e.to_string()));
                    drop(st);
                    self.hashed.notify_waiters();
                    self.hashed.notify_one();
                    return;
                }
                hasher.update(&buf[..n]);
                at += n as u64;
            }
            self.state.lock().hashed = to;
        }
    }

    /// The digest of the whole file, once every byte is written and hashed.
    pub async fn digest(self: &Arc<Self>) -> Result<String, TransferError> {
        if self.file.size == 0 {
            return Ok(crate::digest::sha256_hex(b""));
        }
        loop {
            let notified = self.hashed.notified();
            if let Some(d) = self.state.lock().digest.clone() {
                return d.map_err(|e| io_err("read back", &self.partial)(std::io::Error::other(e)));
            }
            notified.await;
        }
    }
}

impl Engine {
    /// Download every transfer with `workers` requests in flight at most.
    pub async fn run(
        self: &Arc<Self>,
        transfers: &[Arc<Transfer>],
        concurrency: Concurrency,
    ) -> Result<(), TransferError> {
        // Largest first: the long pole starts early, small files fill the gaps.
        let mut order: Vec<Arc<Transfer>> = transfers.to_vec();
        order.sort_by(|a, b| {
            b.file
                .size
                .cmp(&a.file.size)
                .then(a.file.path.cmp(&b.file.path))
        });
        let order = Arc::new(order);
        let changed = Arc::new(tokio::sync::Notify::new());
        let slots = Arc::new(Slots::new(match concurrency {
            Concurrency::Fixed(n) => n,
            Concurrency::Adaptive { start, .. } => start,
        }));
        let finished = Arc::new(AtomicBool::new(false));
        // The governor moves the slots' limit; a worker without a slot idles.
        // A JoinSet, so that it is aborted however this returns.
        let mut governor = tokio::task::JoinSet::new();
        if let Concurrency::Adaptive { start, max } = concurrency {
            let (engine, slots) = (self.clone(), slots.clone());
            governor.spawn(async move {
                let climb = Climb::new(start, max);
                let counters = engine.counters.clone();
                govern(
                    &slots,
                    climb,
                    || counters.done.load(Ordering::Relaxed),
                    || *engine.ttfb.lock(),
                )
                .await
            });
        }
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..concurrency.max() {
            let (engine, order, changed) = (self.clone(), order.clone(), changed.clone());
            let (slots, finished) = (slots.clone(), finished.clone());
            tasks.spawn(async move {
                loop {
                    if finished.load(Ordering::Acquire) {
                        return Ok::<(), TransferError>(());
                    }
                    if !slots.acquire() {
                        let _ = tokio::time::timeout(Duration::from_millis(25), changed.notified())
                            .await;
                        continue;
                    }
                    let work = engine.next_work(&order);
                    let result = match work {
                        Work::Range(t, seg) => {
                            let c = &engine.counters;
                            let now = c.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
                            c.peak_in_flight.fetch_max(now, Ordering::AcqRel);
                            let result = engine.download(&t, &seg).await;
                            c.in_flight.fetch_sub(1, Ordering::AcqRel);
                            t.state.lock().segments.retain(|s| !Arc::ptr_eq(s, &seg));
                            result
                        }
                        Work::Wait => {
                            slots.release();
                            let _ =
                                tokio::time::timeout(Duration::from_millis(25), changed.notified())
                                    .await;
                            continue;
                        }
                        Work::Done => {
                            finished.store(true, Ordering::Release);
                            Ok(())
                        }
                    };
                    slots.release();
                    changed.notify_waiters();
                    result?;
                }
            });
        }
        while let Some(joined) = tasks.join_next().await {
            joined.expect("download worker panicked")?;
        }
        Ok(())
    }

    fn next_work(&self, order: &[Arc<Transfer>]) -> Work {
        for t in order {
            let mut st = t.state.lock();
            if !st.pending.is_empty() {
                let range = st.pending.remove(0);
                let seg = Segment::new(range);
                st.segments.push(seg.clone());
                return Work::Range(t.clone(), seg);
            }
        }
        let mut in_flight = false;
        let now = Instant::now();
        let mut best: Option<(f64, Arc<Transfer>, Arc<Segment>)> = None;
        for t in order {
            let st = t.state.lock();
            for seg in &st.segments {
                in_flight = true;
                if seg.remaining() < 2 * MIN_SPLIT {
                    continue;
                }
                if let Some(left) = seg.time_left(now)
                    && best.as_ref().is_none_or(|(b, _, _)| left > *b)
                {
                    best = Some((left, t.clone(), seg.clone()));
                }
            }
        }
        if !in_flight {
            return Work::Done;
        }
        if self.part_size.is_some() {
            return Work::Wait;
        }
        let Some((left, t, seg)) = best else {
            return Work::Wait;
        };
        let Some(ttfb) = *t.ttfb.lock() else {
            return Work::Wait;
        };
        if left <= SPLIT_FACTOR * ttfb + 0.05 {
            // Not worth a new request: it would end about when this one does.
            return Work::Wait;
        }
        let mut st = t.state.lock();
        let (at, end) = (
            seg.at.load(Ordering::Acquire),
            seg.end.load(Ordering::Acquire),
        );
        if end.saturating_sub(at) < 2 * MIN_SPLIT {
            return Work::Wait;
        }
        let mid = (at + (end - at) / 2).div_ceil(MIB) * MIB;
        seg.end.store(mid, Ordering::Release);
        let second = Segment::new(mid..end);
        st.segments.push(second.clone());
        Work::Range(t.clone(), second)
    }

    /// Download a segment, retrying transient failures from where the last
    /// attempt stopped, until it reaches its (possibly moved) end.
    async fn download(&self, t: &Arc<Transfer>, seg: &Segment) -> Result<(), TransferError> {
        let f = &t.file;
        let mut backoff = Backoff::new(self.max_attempts, self.deadline)
            .with_base(self.retry_base, Duration::from_secs(10));
        let url = || self.source.url(&self.model, &self.version, &f.path);
        let mut checkpointed = seg.at.load(Ordering::Acquire);
        loop {
            let from = seg.at.load(Ordering::Acquire);
            let to = seg.end.load(Ordering::Acquire);
            if from >= to {
                return Ok(());
            }
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            // The chunks as they came off the connection, written together
            // (one pwritev) without being copied into a buffer first.
            let mut buf = Chunks::default();
            // Write what is buffered at the segment's offset, record it.
            let flush = |buf: &mut Chunks, checkpointed: &mut u64| -> std::io::Result<()> {
                if buf.is_empty() {
                    return Ok(());
                }
                let at = seg.at.load(Ordering::Acquire);
                buf.write_at(&t.data, at)?;
                let next = at + buf.len() as u64;
                seg.at.store(next, Ordering::Release);
                self.counters
                    .done
                    .fetch_add(buf.len() as u64, Ordering::Relaxed);
                t.written(at..next, &buf.parts);
                buf.clear();
                // Journaled only after the bytes are written: after a kill the
                // journal never claims bytes that are not in the file.
                if next - *checkpointed >= CHECKPOINT || next >= seg.end.load(Ordering::Acquire) {
                    t.journal.record(seg.start, next)?;
                    *checkpointed = next;
                }
                Ok(())
            };
            let mut write_error = None;
            let sent = Instant::now();
            let outcome: Result<(), SourceError> = async {
                let mut body = self
                    .source
                    .get(&self.model, &self.version, &f.path, Some(from..to))
                    .await?;
                observe_ttfb(&t.ttfb, sent.elapsed().as_secs_f64());
                observe_ttfb(&self.ttfb, sent.elapsed().as_secs_f64());
                seg.first_byte.lock().get_or_insert_with(Instant::now);
                let mut requested_end = from;
                loop {
                    let next =
                        tokio::time::timeout(self.idle, body.next())
                            .await
                            .map_err(|_| SourceError {
                                failure: Failure::Transient,
                                url: url(),
                                detail: format!("no data for {} s", self.idle.as_secs()),
                            })?;
                    let Some(chunk) = next else { break };
                    let chunk = chunk?;
                    requested_end += chunk.len() as u64;
                    if requested_end > to {
                        return Err(SourceError {
                            failure: Failure::Transient,
                            url: url(),
                            detail: "the body is longer than the range asked for".into(),
                        });
                    }
                    seg.received
                        .fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    buf.push(chunk);
                    let reached = seg.at.load(Ordering::Acquire) + buf.len() as u64
                        >= seg.end.load(Ordering::Acquire);
                    if buf.len() >= 256 * 1024 || reached {
                        if let Err(e) = flush(&mut buf, &mut checkpointed) {
                            write_error = Some(e);
                            break;
                        }
                        if reached {
                            // Another worker took the rest: stop reading.
                            break;
                        }
                    }
                }
                Ok(())
            }
            .await;
            if let Some(e) = write_error {
                return Err(io_err("write", &t.partial)(e));
            }
            // Whatever arrived before a failure is kept.
            flush(&mut buf, &mut checkpointed).map_err(io_err("write", &t.partial))?;
            let at = seg.at.load(Ordering::Acquire);
            let error = match outcome {
                Ok(()) if at >= seg.end.load(Ordering::Acquire) => return Ok(()),
                Ok(()) => SourceError {
                    failure: Failure::Transient,
                    url: url(),
                    detail: format!("the body ended {} bytes early", to.saturating_sub(at)),
                },
                Err(e) => e,
            };
            if error.failure != Failure::Transient {
                return Err(TransferError::Source {
                    file: f.path.clone(),
                    source: error,
                });
            }
            if at > from {
                // Progress: a fresh budget for the rest of the range.
                backoff.reset();
            }
            self.counters.retries.fetch_add(1, Ordering::Relaxed);
            match backoff.next_delay() {
                Some(delay) => {
                    tracing::debug!(file = %f.path, url = %error.url, offset = at,
                        "retrying in {} ms: {}", delay.as_millis(), error.detail);
                    tokio::time::sleep(delay).await;
                }
                None => {
                    return Err(TransferError::Source {
                        file: f.path.clone(),
                        source: error,
                    });
                }
            }
        }
    }
}

/// Received bytes not yet written, as the connection gave them.
#[derive(Default)]
struct Chunks {
    parts: Vec<Bytes>,
    len: usize,
}

impl Chunks {
    fn push(&mut self, chunk: Bytes) {
        self.len += chunk.len();
        self.parts.push(chunk);
    }

    fn clear(&mut self) {
        self.parts.clear();
        self.len = 0;
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Write them all at `offset`: pwritev, again for what a short write
    /// left (at most 1024 slices per call, the kernel's IOV_MAX).
    fn write_at(&self, file: &File, mut offset: u64) -> std::io::Result<()> {
        let mut slices: Vec<&[u8]> = self.parts.iter().map(|c| &c[..]).collect();
        let mut from = 0;
        while from < slices.len() {
            let io: Vec<std::io::IoSlice<'_>> = slices[from..(from + 1024).min(slices.len())]
                .iter()
                .map(|s| std::io::IoSlice::new(s))
                .collect();
            let mut n = match rustix::io::pwritev(file, &io, offset) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            };
            offset += n as u64;
            while n > 0 {
                let s = &mut slices[from];
                let k = n.min(s.len());
                *s = &s[k..];
                n -= k;
                if s.is_empty() {
                    from += 1;
                }
            }
            while from < slices.len() && slices[from].is_empty() {
                from += 1;
            }
        }
        Ok(())
    }
}

fn observe_ttfb(ttfb: &Mutex<Option<f64>>, seconds: f64) {
    let mut ttfb = ttfb.lock();
    *ttfb = Some(match *ttfb {
        None => seconds,
        Some(old) => 0.7 * old + 0.3 * seconds,
    });
}

enum Work {
    Range(Arc<Transfer>, Arc<Segment>),
    Wait,
    Done,
}

/// Insert `r` into sorted, merged ranges, merging what touches it.
fn insert_merged(ranges: &mut Vec<Range<u64>>, r: Range<u64>) {
    if r.is_empty() {
        return;
    }
    let i = ranges.partition_point(|x| x.end < r.start);
    let mut merged = r;
    while i < ranges.len() && ranges[i].start <= merged.end {
        let x = ranges.remove(i);
        merged = merged.start.min(x.start)..merged.end.max(x.end);
    }
    ranges.insert(i, merged);
}

/// What `covered` leaves of `0..size`.
fn gaps(covered: &[Range<u64>], size: u64) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let mut at = 0;
    for r in covered {
        if r.start > at {
            out.push(at..r.start.min(size));
        }
        at = at.max(r.end);
    }
    if at < size {
        out.push(at..size);
    }
    out
}

/// The journal of a partial file: lines `<start> <offset>`, each saying that
/// `start..offset` is in the file.
struct Journal(File);

impl Journal {
    /// Open the journal and return what it says is written, or start the file
    /// over when the journal is missing or was made for another size.
    fn open(
        journal: &Path,
        partial: &Path,
        size: u64,
    ) -> Result<(Vec<Range<u64>>, Journal), TransferError> {
        let header = format!("modelcache-ranges v1 size={size}");
        let usable = std::fs::read_to_string(journal).ok().and_then(|text| {
            let mut lines = text.lines();
            (lines.next() == Some(header.as_str())).then(|| {
                let mut covered = Vec::new();
                for line in lines {
                    // A line torn by a kill holds a prefix of the offset's
                    // digits, hence a smaller offset: never more than was written.
                    let Some((start, at)) = line.split_once(' ') else {
                        continue;
                    };
                    if let (Ok(start), Ok(at)) = (start.parse::<u64>(), at.parse::<u64>()) {
                        insert_merged(&mut covered, start..at.min(size));
                    }
                }
                covered
            })
        });
        let partial_ok = std::fs::metadata(partial).is_ok_and(|m| m.len() == size);
        let covered = match usable {
            Some(covered) if partial_ok => covered,
            _ => {
                let f = File::create(partial).map_err(io_err("create", partial))?;
                f.set_len(size).map_err(io_err("allocate", partial))?;
                super::disk::write_atomic(journal, format!("{header}\n").as_bytes())
                    .map_err(io_err("write", journal))?;
                Vec::new()
            }
        };
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(journal)
            .map_err(io_err("open", journal))?;
        Ok((covered, Journal(file)))
    }

    fn record(&self, start: u64, offset: u64) -> std::io::Result<()> {
        // One short O_APPEND write: lines of parallel ranges never interleave.
        (&self.0).write_all(format!("{start} {offset}\n").as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_leave_gaps() {
        let mut c = Vec::new();
        insert_merged(&mut c, 10..20);
        insert_merged(&mut c, 30..40);
        insert_merged(&mut c, 0..5);
        assert_eq!(c, vec![0..5, 10..20, 30..40]);
        insert_merged(&mut c, 18..31);
        assert_eq!(c, vec![0..5, 10..40]);
        insert_merged(&mut c, 5..10);
        assert_eq!(c, vec![0..40]);
        assert_eq!(gaps(&[10..20, 30..40], 50), vec![0..10, 20..30, 40..50]);
        assert_eq!(gaps(&[], 5), std::iter::once(0..5).collect::<Vec<_>>());
        let whole = std::iter::once(0..5).collect::<Vec<_>>();
        assert_eq!(gaps(&whole, 5), Vec::<Range<u64>>::new());
    }

    #[test]
    fn journals_resume_only_when_they_match() {
        let dir = tempfile::tempdir().unwrap();
        let j = dir.path().join("x.parts");
        let p = dir.path().join("x.part");
        let (covered, journal) = Journal::open(&j, &p, 100).unwrap();
        assert!(covered.is_empty());
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 100);
        journal.record(0, 20).unwrap();
        journal.record(0, 35).unwrap();
        journal.record(60, 80).unwrap();
        // A line torn by a kill ("60 9" of "60 95"): a smaller offset.
        (&journal.0).write_all(b"60 9").unwrap();
        drop(journal);
        let (covered, _) = Journal::open(&j, &p, 100).unwrap();
        assert_eq!(covered, vec![0..35, 60..80]);
        let (covered, _) = Journal::open(&j, &p, 200).unwrap();
        assert!(covered.is_empty(), "another size starts over");
    }

    #[tokio::test]
    async fn the_frontier_is_hashed_from_buffers_and_the_rest_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let content: Vec<u8> = (0..6 * MIB).map(|i| (i * 7 % 251) as u8).collect();
        let f = ManifestFile {
            path: "w".into(),
            size: content.len() as u64,
            sha256: crate::digest::sha256_hex(&content),
        };
        let t = Transfer::open(dir.path(), &f, None).unwrap();
        let half = 3 * MIB;
        // The second half lands first, ahead of the frontier: only the file
        // has it, to be read back.
        t.data
            .write_all_at(&content[half as usize..], half)
            .unwrap();
        t.written(
            half..2 * half,
            &[Bytes::copy_from_slice(&content[half as usize..])],
        );
        assert_eq!(t.state.lock().hashed, 0);
        // The first half is hashed from its buffer: the file still holds
        // zeros there, so a read back would give another digest.
        let first = Bytes::copy_from_slice(&content[..half as usize]);
        t.written(
            0..half,
            &[first.slice(..MIB as usize), first.slice(MIB as usize..)],
        );
        assert_eq!(t.digest().await.unwrap(), f.sha256);
        assert_eq!(t.verified(), Some(true));
        let on_disk = std::fs::read(t.partial_path()).unwrap();
        assert!(on_disk[..half as usize].iter().all(|b| *b == 0));
    }

    #[tokio::test]
    async fn a_reader_follows_each_written_range_not_only_the_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let f = ManifestFile {
            path: "w".into(),
            size: 10 * MIB,
            sha256: "0".repeat(64),
        };
        let t = Transfer::open(dir.path(), &f, None).unwrap();
        assert_eq!(t.written_from(0), 0, "nothing written");
        let zeros = Bytes::from(vec![0u8; MIB as usize]);
        // A split download: the second range is ahead of the first.
        t.written(0..MIB, std::slice::from_ref(&zeros));
        t.written(5 * MIB..7 * MIB, &[zeros.clone(), zeros.clone()]);
        assert_eq!(t.written_from(0), MIB);
        assert_eq!(t.written_from(MIB / 2), MIB);
        assert_eq!(t.written_from(MIB), MIB, "the gap is not written");
        assert_eq!(t.written_from(3 * MIB), 3 * MIB);
        assert_eq!(
            t.written_from(5 * MIB),
            7 * MIB,
            "followed ahead of the prefix"
        );
        assert_eq!(t.written_from(6 * MIB), 7 * MIB);
        assert_eq!(t.written_from(7 * MIB), 7 * MIB);
        assert_eq!(t.written_bytes(), 3 * MIB);
        // The gap fills: one range from 0.
        t.written(MIB..5 * MIB, &vec![zeros.clone(); 4]);
        assert_eq!(t.written_from(0), 7 * MIB);
        assert_eq!(t.written_from(2 * MIB), 7 * MIB);
    }

    #[test]
    fn chunks_are_written_whole_past_the_slice_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let mut chunks = Chunks::default();
        let mut want = vec![0u8; 5];
        for i in 0..3000u32 {
            let chunk: Vec<u8> = (0..(i % 7)).map(|j| (i + j) as u8).collect();
            want.extend_from_slice(&chunk);
            chunks.push(Bytes::from(chunk));
        }
        assert_eq!(chunks.len(), want.len() - 5);
        chunks.write_at(&file, 5).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), want);
        chunks.clear();
        assert!(chunks.is_empty());
    }

    #[test]
    fn fixed_parts_cut_the_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let f = ManifestFile {
            path: "w".into(),
            size: 5 * MIB + 1,
            sha256: "a".repeat(64),
        };
        let t = Transfer::open(dir.path(), &f, Some(2 * MIB)).unwrap();
        let st = t.state.lock();
        assert_eq!(
            st.pending,
            vec![0..2 * MIB, 2 * MIB..4 * MIB, 4 * MIB..5 * MIB + 1]
        );
    }
}
