//! A proxy on loopback between a client and an HTTP server, shared by the
//! fetch tests and the fetch benchmark.
//!
//! - **HTTP mode** (tests): understands HTTP/1.1 framing (Content-Length),
//!   counts requests and response bytes per path, and injects faults into a
//!   set share of GETs: a 503, a reset (RST) in the middle of the body, or a
//!   body cut short (FIN before Content-Length bytes).
//! - **Shaping mode** (benchmark): bytes only, each direction of each
//!   connection delayed by half the round-trip time and capped in bandwidth,
//!   the way S3 caps a single connection. This kernel has no netem qdisc, so
//!   the shaping happens here.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy does to traffic.
#[derive(Debug, Clone, Default)]
pub struct ProxyConfig {
    /// Share of GETs that fail (0.0 to 1.0), spread over the three kinds.
    pub fault_rate: f64,
    /// Seed of the fault choice, for reproducible runs.
    pub seed: u64,
    /// Shaping: added round-trip time.
    pub rtt: Option<Duration>,
    /// Shaping: bytes per second per connection and direction.
    pub bandwidth: Option<u64>,
}

/// What went through.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub requests: AtomicU64,
    pub body_bytes: AtomicU64,
    pub faults: AtomicU64,
    pub connections: AtomicU64,
    /// Requests per (method, path without query).
    pub paths: Mutex<BTreeMap<String, u64>>,
    /// Every request head, as received.
    pub heads: Mutex<Vec<String>>,
}

impl ProxyStats {
    pub fn requests_for(&self, needle: &str) -> u64 {
        self.paths
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.contains(needle))
            .map(|(_, v)| v)
            .sum()
    }
}

pub struct Proxy {
    pub port: u16,
    pub stats: Arc<ProxyStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    /// Listen on a free loopback port and forward to `upstream_port`.
    pub async fn start(upstream_port: u16, config: ProxyConfig) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let stats = Arc::new(ProxyStats::default());
        let rng = Arc::new(Mutex::new(fastrand::Rng::with_seed(config.seed)));
        let shared = stats.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let (stats, config, rng) = (shared.clone(), config.clone(), rng.clone());
                stats.connections.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let Ok(upstream) = TcpStream::connect(("127.0.0.1", upstream_port)).await
                    else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = upstream.set_nodelay(true);
                    if config.rtt.is_some() || config.bandwidth.is_some() {
                        shape(client, upstream, &config).await;
                    } else {
                        let _ = http(client, upstream, &config, &stats, &rng).await;
                    }
                });
            }
        });
        Ok(Proxy { port, stats, task })
    }

    /// Start on a runtime of its own (for callers that are not async).
    pub fn start_blocking(
        upstream_port: u16,
        config: ProxyConfig,
    ) -> (tokio::runtime::Runtime, Proxy) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("proxy runtime");
        let proxy = rt
            .block_on(Proxy::start(upstream_port, config))
            .expect("proxy listens");
        (rt, proxy)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Unavailable,
    Reset,
    Truncate,
}

/// Read one HTTP head (through the blank line).
async fn read_head<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    loop {
        let before = head.len();
        let n = r.read_until(b'\n', &mut head).await?;
        if n == 0 {
            return Ok(if head.is_empty() { None } else { Some(head) });
        }
        if &head[before..] == b"\r\n" || &head[before..] == b"\n" {
            return Ok(Some(head));
        }
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Copies up to `n` bytes (until EOF), adding each chunk to `counted` before
/// it is written: the count includes every byte a client may have received,
/// also when the client closes mid-body (a fetcher that split the range) and
/// when it reads the last byte before this task runs again.
async fn copy_exact<R, W>(
    r: &mut R,
    w: &mut W,
    mut n: u64,
    counted: Option<&AtomicU64>,
) -> std::io::Result<u64>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    let mut copied = 0;
    while n > 0 {
        let want = (n as usize).min(buf.len());
        let got = r.read(&mut buf[..want]).await?;
        if got == 0 {
            break;
        }
        if let Some(c) = counted {
            c.fetch_add(got as u64, Ordering::Relaxed);
        }
        w.write_all(&buf[..got]).await?;
        n -= got as u64;
        copied += got as u64;
    }
    Ok(copied)
}

async fn http(
    client: TcpStream,
    upstream: TcpStream,
    config: &ProxyConfig,
    stats: &ProxyStats,
    rng: &Mutex<fastrand::Rng>,
) -> std::io::Result<()> {
    let (cr, mut cw) = client.into_split();
    let (ur, mut uw) = upstream.into_split();
    let mut cr = BufReader::new(cr);
    let mut ur = BufReader::new(ur);
    loop {
        let Some(head) = read_head(&mut cr).await? else {
            return Ok(());
        };
        let text = String::from_utf8_lossy(&head).into_owned();
        let mut first = text.lines().next().unwrap_or("").split(' ');
        let method = first.next().unwrap_or("").to_string();
        let path = first
            .next()
            .unwrap_or("")
            .split('?')
            .next()
            .unwrap_or("")
            .to_string();
        stats.requests.fetch_add(1, Ordering::Relaxed);
        stats.heads.lock().unwrap().push(text.clone());
        *stats
            .paths
            .lock()
            .unwrap()
            .entry(format!("{method} {path}"))
            .or_default() += 1;
        let fault = {
            let mut rng = rng.lock().unwrap();
            (method == "GET" && rng.f64() < config.fault_rate).then(|| match rng.u8(0..3) {
                0 => Fault::Unavailable,
                1 => Fault::Reset,
                _ => Fault::Truncate,
            })
        };
        if fault.is_some() {
            stats.faults.fetch_add(1, Ordering::Relaxed);
        }
        if fault == Some(Fault::Unavailable) {
            cw.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .await?;
            return Ok(());
        }
        uw.write_all(&head).await?;
        if header(&text, "transfer-encoding").is_some() {
            // Not framed by length: pass everything through, no more faults.
            let up = tokio::io::copy(&mut cr, &mut uw);
            let down = tokio::io::copy(&mut ur, &mut cw);
            let _ = tokio::join!(up, down);
            return Ok(());
        }
        let request_body: u64 = header(&text, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        copy_exact(&mut cr, &mut uw, request_body, None).await?;

        let Some(response) = read_head(&mut ur).await? else {
            return Ok(());
        };
        let rtext = String::from_utf8_lossy(&response).into_owned();
        let status: u16 = rtext
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let length: Option<u64> = header(&rtext, "content-length").and_then(|v| v.parse().ok());
        let no_body = method == "HEAD" || status == 204 || status == 304;
        cw.write_all(&response).await?;
        match (length, no_body) {
            (_, true) => {}
            (Some(n), false) => match fault {
                Some(Fault::Reset) | Some(Fault::Truncate) if n > 1 => {
                    copy_exact(&mut ur, &mut cw, n / 2, Some(&stats.body_bytes)).await?;
                    cw.flush().await?;
                    let client = cr.into_inner().reunite(cw).expect("same stream");
                    if fault == Some(Fault::Reset) {
                        let _ = client.set_zero_linger();
                    }
                    drop(client);
                    return Ok(());
                }
                _ => {
                    copy_exact(&mut ur, &mut cw, n, Some(&stats.body_bytes)).await?;
                }
            },
            (None, false) => {
                copy_exact(&mut ur, &mut cw, u64::MAX, Some(&stats.body_bytes)).await?;
                return Ok(());
            }
        }
    }
}

/// Each direction through a delay line with a bandwidth cap.
async fn shape(client: TcpStream, upstream: TcpStream, config: &ProxyConfig) {
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let delay = config.rtt.unwrap_or_default() / 2;
    let rate = config.bandwidth;
    let up = delay_line(cr, uw, delay, rate);
    let down = delay_line(ur, cw, delay, rate);
    let _ = tokio::join!(up, down);
}

async fn delay_line<R, W>(mut r: R, mut w: W, delay: Duration, rate: Option<u64>)
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // The reader timestamps chunks as they arrive; the writer releases each
    // `delay` later, no faster than `rate`: latency without losing throughput.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(256);
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send((tokio::time::Instant::now(), buf[..n].to_vec()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    // When the link is free again; idle time earns no credit for bursts.
    let mut free_at = tokio::time::Instant::now();
    while let Some((at, chunk)) = rx.recv().await {
        tokio::time::sleep_until(at + delay).await;
        if let Some(rate) = rate {
            free_at = free_at.max(tokio::time::Instant::now())
                + Duration::from_secs_f64(chunk.len() as f64 / rate as f64);
            tokio::time::sleep_until(free_at).await;
        }
        if w.write_all(&chunk).await.is_err() {
            break;
        }
    }
    let _ = w.shutdown().await;
    reader.abort();
}
