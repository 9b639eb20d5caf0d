//! The `modelcache controller` process: probes and metrics over real HTTP,
//! leader election that keeps it out while the API server is unreachable, and
//! a clean exit on SIGTERM.

#![allow(unsafe_code)] // SIGTERM to the child, as Kubernetes sends it

mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{free_port, raw_request};

fn get(port: u16, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    String::from_utf8_lossy(&raw_request(port, request.as_bytes()).unwrap_or_default()).into_owned()
}

#[test]
fn serves_probes_and_metrics_and_stops_on_sigterm() {
    // A kubeconfig whose API server is a closed loopback port: the client is
    // built, every API call fails, and the controller stays a candidate.
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let mut f = std::fs::File::create(&kubeconfig).unwrap();
    write!(
        f,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:{}\n\
         contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\n    namespace: default\n\
         current-context: c\nusers:\n- name: u\n  user: {{}}\n",
        free_port()
    )
    .unwrap();
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_modelcache"))
        .args(["controller", "--http-addr", &format!("127.0.0.1:{port}")])
        .env("KUBECONFIG", &kubeconfig)
        .env("POD_NAMESPACE", "modelcache-system")
        .env("POD_NAME", "controller-test")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    while !get(port, "/healthz").contains("200 OK") {
        assert!(Instant::now() < deadline, "no /healthz within 30s");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the controller exited early"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(get(port, "/readyz").contains("200 OK"));
    let metrics = get(port, "/metrics");
    assert!(
        metrics.contains("application/openmetrics-text"),
        "{metrics}"
    );
    assert!(
        metrics.contains("# HELP modelcache_reconciles Reconciles of ModelCaches"),
        "{metrics}"
    );
    assert!(metrics.contains("# EOF"), "{metrics}");

    let started = Instant::now();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no exit within 10s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "exit {status}: {stderr}");
    assert!(stderr.contains("waiting for the leader lease"), "{stderr}");
    assert!(stderr.contains("shutting down"), "{stderr}");
}
