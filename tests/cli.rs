//! The `modelcache` binary: CRD generation and drift, manifest validation.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn modelcache(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_modelcache"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run modelcache")
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn crd_prints_the_checked_in_files_byte_for_byte() {
    let out = modelcache(&["crd"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let files = yaml_files(&repo("crds"));
    assert_eq!(files.len(), 2, "{files:?}");
    let concatenated: Vec<u8> = files
        .iter()
        .flat_map(|f| std::fs::read(f).unwrap())
        .collect();
    assert!(
        out.stdout == concatenated,
        "`modelcache crd` differs from crds/*.yaml: run `cargo run -- crd --out-dir crds`"
    );
}

#[test]
fn crd_check_reports_drift_and_out_dir_repairs_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = modelcache(&["crd", "--out-dir", d]);
    assert!(out.status.success());
    assert!(modelcache(&["crd", "--check", d]).status.success());

    let path = dir.path().join("cachepolicies.modelcache.dev.yaml");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("default: allkeys-lru", "default: allkeys-lfu");
    std::fs::write(&path, text).unwrap();
    let out = modelcache(&["crd", "--check", d]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cachepolicies.modelcache.dev.yaml: differs"),
        "{stderr}"
    );
    assert!(stderr.contains("modelcache crd --out-dir"), "{stderr}");

    assert!(modelcache(&["crd", "--out-dir", d]).status.success());
    assert!(modelcache(&["crd", "--check", d]).status.success());
}

#[test]
fn version_names_the_api() {
    let out = modelcache(&["version"]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("modelcache ") && stdout.contains("modelcache.dev/v1alpha1"),
        "{stdout}"
    );
}

#[test]
fn examples_validate_against_the_generated_schemas() {
    let examples = yaml_files(&repo("examples"));
    assert!(examples.len() >= 2, "{examples:?}");
    let mut args = vec!["validate"];
    let names: Vec<String> = examples
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    args.extend(names.iter().map(String::as_str));
    let out = modelcache(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("valid    ")
            && stdout.contains("ModelCache/chat")
            && stdout.contains("CachePolicy/llm-default"),
        "{stdout}"
    );
}

/// Each fixture under tests/fixtures/invalid declares, in a `# expect:` line,
/// the field its mistake is in; the validator must reject it naming that field.
#[test]
fn bad_resources_are_rejected_naming_the_field() {
    let fixtures = yaml_files(&repo("tests/fixtures/invalid"));
    assert!(fixtures.len() >= 5, "{fixtures:?}");
    for fixture in fixtures {
        let text = std::fs::read_to_string(&fixture).unwrap();
        let field = text
            .lines()
            .find_map(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} has no `# expect:` line", fixture.display()))
            .trim()
            .to_string();
        let out = modelcache(&["validate", fixture.to_str().unwrap()]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}: {stdout}",
            fixture.display()
        );
        assert!(stdout.contains("INVALID"), "{stdout}");
        assert!(
            stdout.contains(&format!("  - {field}: ")),
            "{} should be rejected at {field}: {stdout}",
            fixture.display()
        );
    }
}

#[test]
fn unreadable_and_malformed_input_fail_clearly() {
    let out = modelcache(&["validate", "does/not/exist.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("failed to read does/not/exist.yaml"),
        "{stderr}"
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "kind: [unclosed\n").unwrap();
    let out = modelcache(&["validate", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("failed to parse") && stderr.contains("bad.yaml"),
        "{stderr}"
    );

    let out = modelcache(&["no-such-command"]);
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
}

#[test]
fn the_webhook_without_an_image_to_inject_is_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_modelcache"))
        .args(["controller", "--webhook-addr", "127.0.0.1:0"])
        .env_remove("MODELCACHE_IMAGE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--webhook-addr needs --image"), "{stderr}");
}

#[test]
fn node_agent_arguments_that_cannot_work_are_usage_errors() {
    let stderr = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();
    // No node name: the agent could not tell its pods from others.
    let o = modelcache(&["node", "--node-name", ""]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--node-name"), "{}", stderr(&o));
    let o = modelcache(&["node", "--node-name", "n1", "--listen", "node-1:8095"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("is not ip:port"), "{}", stderr(&o));
    // A fetch given an agent must be given the token to show it, and a URL.
    let dest = tempfile::tempdir().unwrap();
    let fetch = |extra: &[&str]| {
        let mut args = vec![
            "fetch",
            "--source",
            "s3://models/prod",
            "--model",
            "m",
            "--version",
            "v1",
            "--dest",
        ];
        args.push(dest.path().to_str().unwrap());
        args.extend(extra);
        modelcache(&args)
    };
    let o = fetch(&["--node-agent", "http://10.0.0.7:8095"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--node-token-file"), "{}", stderr(&o));
    let token = dest.path().join("token");
    std::fs::write(&token, "").unwrap();
    let token = token.to_str().unwrap();
    let o = fetch(&[
        "--node-agent",
        "http://10.0.0.7:8095",
        "--node-token-file",
        token,
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("missing or empty"), "{}", stderr(&o));
    let o = fetch(&["--node-agent", "10.0.0.7:8095", "--node-token-file", token]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("is not an http(s) URL"),
        "{}",
        stderr(&o)
    );
    let o = fetch(&["--manifest-digest", "abc"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    // Nothing was written for any of them.
    let left: Vec<_> = std::fs::read_dir(dest.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("token")]);
}
