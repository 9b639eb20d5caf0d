//! The pure builders, from YAML fixtures, against golden objects in
//! `tests/fixtures/builders/<case>/expected/`. After an intended change,
//! regenerate with `MODELCACHE_BLESS=1 cargo test --test builders` and review
//! the diff.

use std::path::{Path, PathBuf};

use modelcache::controller::builders;
use modelcache::controller::validate::{RedisBackend, validate};
use modelcache::crd::{CachePolicy, ModelCache};

fn case_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/builders")
        .join(case)
}

fn check_golden(case: &str, file: &str, actual: &str) {
    let path = case_dir(case).join("expected").join(file);
    if std::env::var_os("MODELCACHE_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run with MODELCACHE_BLESS=1 to create it",
            path.display()
        )
    });
    assert!(
        expected == actual,
        "{} differs from the builder's output:\n{actual}\nrun with MODELCACHE_BLESS=1 after an intended change",
        path.display()
    );
}

fn render_case(case: &str) {
    let dir = case_dir(case);
    let mc: ModelCache =
        serde_saphyr::from_str(&std::fs::read_to_string(dir.join("modelcache.yaml")).unwrap())
            .unwrap();
    let policy = std::fs::read_to_string(dir.join("cachepolicy.yaml"))
        .ok()
        .map(|t| serde_saphyr::from_str::<CachePolicy>(&t).unwrap().spec);
    let spec = validate(&mc, Ok(policy)).unwrap();
    let RedisBackend::Provisioned(settings) = spec.redis else {
        panic!("{case} should provision a Redis")
    };
    let yaml = |v: &dyn erased::Yaml| v.to_yaml();
    check_golden(
        case,
        "configmap.yaml",
        &yaml(&builders::config_map(&mc, &settings)),
    );
    check_golden(
        case,
        "statefulset.yaml",
        &yaml(&builders::stateful_set(&mc, &settings, "secret-uid-1")),
    );
    check_golden(case, "service.yaml", &yaml(&builders::service(&mc)));
    check_golden(
        case,
        "headless-service.yaml",
        &yaml(&builders::headless_service(&mc)),
    );
    if let Some(prompts) = builders::warmup_config_map(&mc) {
        check_golden(case, "warmup-configmap.yaml", &yaml(&prompts));
    }
    check_golden(
        case,
        "secret.yaml",
        &yaml(&builders::secret(
            &mc,
            "not-a-real-admin-password",
            "not-a-real-password",
        )),
    );
}

mod erased {
    pub trait Yaml {
        fn to_yaml(&self) -> String;
    }
    impl<T: serde::Serialize> Yaml for T {
        fn to_yaml(&self) -> String {
            serde_saphyr::to_string(self).unwrap()
        }
    }
}

#[test]
fn chat_with_a_policy_and_a_2gi_limit() {
    render_case("chat");
    // The reference design's figure, exact: 0.8 x 2Gi.
    let conf = std::fs::read_to_string(case_dir("chat").join("expected/configmap.yaml")).unwrap();
    assert!(conf.contains("maxmemory 1717986918"), "{conf}");
}

#[test]
fn inline_warmup_prompts_reach_the_pods_as_jsonl() {
    let mc: ModelCache = serde_saphyr::from_str(
        &std::fs::read_to_string(case_dir("chat").join("modelcache.yaml")).unwrap(),
    )
    .unwrap();
    let cm = builders::warmup_config_map(&mc).expect("inline prompts make a ConfigMap");
    assert_eq!(cm.metadata.name.as_deref(), Some("chat-warmup"));
    let jsonl = &cm.data.unwrap()[builders::WARMUP_PROMPTS_KEY];
    // What `modelcache warm --prompts` reads back is what the spec says.
    assert_eq!(
        modelcache::warm::prompts::parse(jsonl).unwrap(),
        mc.spec.warmup.unwrap().prompts
    );
}

#[test]
fn no_inline_prompts_no_warmup_config_map() {
    let mc: ModelCache = serde_saphyr::from_str(
        &std::fs::read_to_string(case_dir("defaults").join("modelcache.yaml")).unwrap(),
    )
    .unwrap();
    assert!(builders::warmup_config_map(&mc).is_none());
}

#[test]
fn defaults_without_a_policy() {
    render_case("defaults");
    let conf =
        std::fs::read_to_string(case_dir("defaults").join("expected/configmap.yaml")).unwrap();
    assert!(conf.contains("maxmemory 858993459"), "0.8 x 1Gi: {conf}");
}
