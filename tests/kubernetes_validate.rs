//! The generated CRDs pass `kubernetes-validate --strict` for the oldest and
//! newest Kubernetes versions we support.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

fn kubernetes_validate(args: &[&str], files: &[PathBuf]) -> std::process::Output {
    Command::new(support::python())
        .args(["-m", "kubernetes_validate"])
        .args(args)
        .args(files)
        .output()
        .unwrap_or_else(|e| {
            panic!("failed to run python3 -m kubernetes_validate ({e}); run scripts/setup.sh")
        })
}

fn crds() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

#[test]
fn crds_pass_strict_validation_for_1_30_and_1_37() {
    let files = crds();
    assert_eq!(files.len(), 2);
    for version in ["1.30.0", "1.37.0"] {
        let out = kubernetes_validate(&["--strict", "-k", version], &files);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "Kubernetes {version}: {stdout}{stderr}"
        );
        assert_eq!(
            stdout.matches("passed").count(),
            2,
            "Kubernetes {version}: {stdout}{stderr}"
        );
    }
}

/// The check above could pass by checking nothing; a CRD with a misspelt field
/// must fail it.
#[test]
fn strict_validation_rejects_a_broken_crd() {
    let dir = tempfile::tempdir().unwrap();
    let source = std::fs::read_to_string(&crds()[0]).unwrap();
    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        source.replacen("  scope: Namespaced", "  scopes: Namespaced", 1),
    )
    .unwrap();
    let out = kubernetes_validate(&["--strict", "-k", "1.37.0"], &[broken]);
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The objects the controller builds for each ModelCache (the golden files of
/// tests/builders.rs) are valid Kubernetes objects.
#[test]
fn owned_objects_pass_strict_validation() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/builders");
    let mut files = Vec::new();
    for case in std::fs::read_dir(root).unwrap() {
        let expected = case.unwrap().path().join("expected");
        for f in std::fs::read_dir(expected).unwrap() {
            files.push(f.unwrap().path());
        }
    }
    files.sort();
    assert!(files.len() >= 8, "{files:?}");
    for version in ["1.30.0", "1.37.0"] {
        let out = kubernetes_validate(&["--strict", "-k", version], &files);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "Kubernetes {version}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout.matches("passed").count(), files.len(), "{stdout}");
    }
}
