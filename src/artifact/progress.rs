//! Progress: a bar on a TTY, otherwise a log line every few seconds.

use std::io::{IsTerminal as _, Write as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// A bar when stderr is a terminal, log lines otherwise.
    Auto,
    /// A progress bar on stderr.
    Bar,
    /// A log line every interval.
    Log,
    /// Nothing.
    Off,
}

/// Counters shared by the downloads.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes the version needs from the origin in this run.
    pub total: AtomicU64,
    /// Bytes received so far.
    pub done: AtomicU64,
    /// Requests made.
    pub requests: AtomicU64,
    /// Requests retried.
    pub retries: AtomicU64,
    /// Ranges being downloaded now.
    pub in_flight: AtomicU64,
    /// The most ranges downloaded at once.
    pub peak_in_flight: AtomicU64,
}

/// Draws until dropped.
pub struct Reporter {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Reporter {
    /// Starts showing progress of `counters`.
    pub fn start(mode: ProgressMode, interval: Duration, counters: Arc<Counters>) -> Reporter {
        let bar = match mode {
            ProgressMode::Off => {
                return Reporter {
                    stop: None,
                    task: None,
                };
            }
            ProgressMode::Bar => true,
            ProgressMode::Log => false,
            ProgressMode::Auto => std::io::stderr().is_terminal(),
        };
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let tick = if bar {
                Duration::from_millis(200)
            } else {
                interval
            };
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(tick) => {}
                    _ = &mut stopped => break,
                }
                let line = describe(&counters, started.elapsed());
                if bar {
                    let mut err = std::io::stderr().lock();
                    let _ = write!(err, "\r\x1b[2K{line}");
                    let _ = err.flush();
                } else {
                    tracing::info!("{line}");
                }
            }
            if bar {
                let _ = writeln!(std::io::stderr().lock());
            }
        });
        Reporter {
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops, with a last line or a finished bar.
    pub async fn finish(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// `[#####     ] 48% 1.2 GiB / 2.5 GiB, 310.0 MB/s, ETA 4s`
pub fn describe(counters: &Counters, elapsed: Duration) -> String {
    let total = counters.total.load(Ordering::Relaxed);
    let done = counters.done.load(Ordering::Relaxed).min(total);
    let fraction = if total == 0 {
        1.0
    } else {
        done as f64 / total as f64
    };
    let filled = (fraction * 20.0).round() as usize;
    let rate = done as f64 / elapsed.as_secs_f64().max(1e-3);
    let eta = if rate > 0.0 && done < total {
        format!("{:.0}s", (total - done) as f64 / rate)
    } else {
        "-".into()
    };
    format!(
        "[{}{}] {:>3.0}% {} / {}, {:.1} MB/s, ETA {eta}",
        "#".repeat(filled),
        " ".repeat(20 - filled),
        fraction * 100.0,
        human_bytes(done),
        human_bytes(total),
        rate / 1e6,
    )
}

/// Bytes in binary units (`1.5 GiB`).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_show_bytes_percent_rate_and_eta() {
        let c = Counters::default();
        c.total.store(4 << 30, Ordering::Relaxed);
        c.done.store(1 << 30, Ordering::Relaxed);
        let line = describe(&c, Duration::from_secs(2));
        assert_eq!(
            line,
            "[#####               ]  25% 1.0 GiB / 4.0 GiB, 536.9 MB/s, ETA 6s"
        );
        assert_eq!(human_bytes(512), "512 B");
    }
}
