//! The Argo CD health check (`argocd/modelcache-health.lua`) run by a real
//! Lua interpreter (Debian's `lua5.4`; Argo CD's gopher-lua is Lua 5.1, and
//! the script keeps to the common subset) against ModelCache status fixtures
//! in `tests/fixtures/argocd/`.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// A Lua table constructor for a JSON value (null becomes an absent key).
fn lua(v: &Value) -> String {
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Array(a) => format!("{{{}}}", a.iter().map(lua).collect::<Vec<_>>().join(", ")),
        Value::Object(o) => format!(
            "{{{}}}",
            o.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| format!("[{k:?}] = {}", lua(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// What the health script returns for `object`: (status, message).
fn health(object: &Value) -> (String, String) {
    let script = std::fs::read_to_string("argocd/modelcache-health.lua").unwrap();
    // Argo CD runs the script as a chunk with `obj` set; so do we.
    let program = format!(
        "obj = {}\nlocal hs = (function()\n{script}\nend)()\nio.write(hs.status, \"\\n\", hs.message or \"\")\n",
        lua(object)
    );
    let out = Command::new("lua5.4")
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(program.as_bytes())?;
            child.wait_with_output()
        })
        .expect("lua5.4 runs (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "lua failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (status, message) = text.split_once('\n').unwrap_or((&text, ""));
    (status.to_owned(), message.to_owned())
}

#[test]
fn each_status_fixture_gets_its_health() {
    let dir = Path::new("tests/fixtures/argocd");
    let mut seen = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        let fixture: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let (status, message) = health(&fixture["object"]);
        let want = fixture["expect"]["status"].as_str().unwrap();
        let contains = fixture["expect"]["messageContains"].as_str().unwrap();
        assert_eq!(status, want, "{}: {message}", path.display());
        assert!(
            message.contains(contains),
            "{}: message {message:?} lacks {contains:?}",
            path.display()
        );
        seen.push(status);
    }
    // Every state Argo CD distinguishes is covered.
    for s in ["Healthy", "Progressing", "Degraded"] {
        assert!(seen.iter().any(|x| x == s), "no fixture is {s}");
    }
}

#[test]
fn fixtures_are_statuses_the_crd_accepts() {
    // The fixtures must be ModelCaches our types read, or the health check
    // would be tested against fields the controller never writes.
    for entry in std::fs::read_dir("tests/fixtures/argocd").unwrap() {
        let path = entry.unwrap().path();
        let fixture: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        if let Some(status) = fixture["object"].get("status") {
            let parsed: modelcache::crd::model_cache::ModelCacheStatus =
                serde_json::from_value(status.clone())
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            // Round trip: nothing in the fixture is unknown to the type.
            assert_eq!(
                serde_json::to_value(&parsed).unwrap()["versions"],
                status
                    .get("versions")
                    .cloned()
                    .unwrap_or(Value::Array(vec![])),
                "{}",
                path.display()
            );
        }
    }
}
