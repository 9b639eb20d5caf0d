//! The fuzz targets' inputs, run in `cargo test` through the same entry
//! points (`modelcache::fuzzing`): every seed (`fuzz/seeds/<target>/`) must
//! be accepted, so that the fuzzer starts past the first checks, and every
//! input that once crashed a target (`fuzz/regressions/<target>/`, one file
//! each, named after what it found) must now be refused without a panic. The fuzzing
//! itself is `scripts/fuzz.sh`, not part of CI.

use std::path::{Path, PathBuf};

/// The targets, by directory name.
fn target(name: &str) -> fn(&[u8]) -> bool {
    use modelcache::fuzzing as f;
    match name {
        "manifest" => f::manifest,
        "gguf" => f::gguf,
        "prefix_block" => f::prefix_block,
        "admission_review" => f::admission_review,
        "resources" => f::resources,
        "scan_keys" => f::scan_keys,
        "redis_replies" => f::redis_replies,
        "prompts" => f::prompts,
        "upstream_answer" => f::upstream_answer,
        other => panic!("fuzz/{other}: no such target in tests/fuzz_regressions.rs"),
    }
}

/// `(target, file)` for every file under `fuzz/<kind>/<target>/`.
fn inputs(kind: &str) -> Vec<(String, PathBuf)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind);
    let Ok(dirs) = std::fs::read_dir(&root) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for dir in dirs.map(Result::unwrap) {
        let name = dir.file_name().to_string_lossy().into_owned();
        for file in std::fs::read_dir(dir.path()).unwrap().map(Result::unwrap) {
            out.push((name.clone(), file.path()));
        }
    }
    out.sort();
    out
}

#[test]
fn every_target_has_seeds_and_every_seed_is_accepted() {
    let seeds = inputs("seeds");
    let targets: std::collections::BTreeSet<&str> = seeds.iter().map(|(t, _)| t.as_str()).collect();
    let built: Vec<String> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/fuzz_targets"))
            .unwrap()
            .map(|e| {
                e.unwrap()
                    .path()
                    .file_stem()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
    for t in &built {
        assert!(targets.contains(t.as_str()), "fuzz target {t} has no seeds");
    }
    for (t, file) in &seeds {
        let bytes = std::fs::read(file).unwrap();
        assert!(target(t)(&bytes), "{t}: seed {} is refused", file.display());
    }
}

/// Each of these once ended in a panic (a division by zero in candle, a
/// capacity overflow, a wrapped sum, a slice out of range: issue 16) and is
/// input to refuse, so it must now be refused, not crash.
#[test]
fn inputs_that_once_crashed_a_target_are_refused() {
    let regressions = inputs("regressions");
    assert!(regressions.len() >= 4, "{regressions:?}");
    for (t, file) in regressions {
        let bytes = std::fs::read(&file).unwrap();
        assert!(!target(&t)(&bytes), "{t}: {} is accepted", file.display());
    }
}
