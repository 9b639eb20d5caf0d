//! The `modelcache.dev/v1alpha1` API: `ModelCache` and `CachePolicy`, and the
//! CRD YAML generated from them.
//!
//! `crds/` in the repository holds exactly what [`render`] produces, so that
//! `kubectl apply -f crds/` and Argo CD install the same schema the controller
//! was built with. A test fails when they drift. [`validate`] checks
//! manifests offline against these schemas.

pub mod cache_policy;
pub mod condition;
pub mod load;
pub mod model_cache;
pub mod validate;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

pub use cache_policy::{CachePolicy, CachePolicySpec, CachePolicyStatus};
pub use model_cache::{ModelCache, ModelCacheSpec, ModelCacheStatus};

/// API group of both kinds.
pub const GROUP: &str = "modelcache.dev";
/// API version of both kinds.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` as written in manifests.
pub const API_VERSION: &str = "modelcache.dev/v1alpha1";

/// First line of every generated file, so nobody edits them by hand.
const HEADER: &str =
    "# Generated from the Rust types in src/crd by `modelcache crd --out-dir crds`. Do not edit.\n";

/// Why the CRDs could not be rendered, written or compared.
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum CrdError {
    #[error("failed to render the CRD {name} as YAML")]
    Render {
        name: String,
        #[source]
        source: serde_saphyr::SerializeError,
    },
    #[error("failed to read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Both CRDs, in the order of their file names.
pub fn definitions() -> Vec<CustomResourceDefinition> {
    vec![CachePolicy::crd(), ModelCache::crd()]
}

/// One generated CRD file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrdFile {
    /// `<plural>.<group>.yaml`
    pub file_name: String,
    /// The CRD as YAML.
    pub yaml: String,
}

/// Renders each CRD as one YAML document that starts with `---`, so that the
/// files concatenated in name order equal `modelcache crd` byte for byte.
pub fn render() -> Result<Vec<CrdFile>, CrdError> {
    definitions()
        .into_iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let body = serde_saphyr::to_string(&crd).map_err(|source| CrdError::Render {
                name: name.clone(),
                source,
            })?;
            Ok(CrdFile {
                file_name: format!("{name}.yaml"),
                yaml: format!("---\n{HEADER}{body}"),
            })
        })
        .collect()
}

/// All CRDs as one multi-document YAML stream (what `modelcache crd` prints).
pub fn render_stream() -> Result<String, CrdError> {
    Ok(render()?.into_iter().map(|f| f.yaml).collect())
}

/// Writes the CRD files into `dir`. Each file is written beside its final path
/// and renamed into place, so a reader never sees half a file.
pub fn write_dir(dir: &Path) -> Result<Vec<PathBuf>, CrdError> {
    fs::create_dir_all(dir).map_err(|source| CrdError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let mut written = Vec::new();
    for file in render()? {
        let path = dir.join(&file.file_name);
        let partial = dir.join(format!(".{}.partial", file.file_name));
        let write = || -> std::io::Result<()> {
            let mut out = fs::File::create(&partial)?;
            out.write_all(file.yaml.as_bytes())?;
            out.sync_all()?;
            fs::rename(&partial, &path)
        };
        write().map_err(|source| {
            let _ = fs::remove_file(&partial);
            CrdError::Write {
                path: path.clone(),
                source,
            }
        })?;
        written.push(path);
    }
    Ok(written)
}

/// A difference between the generated CRDs and the files in a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drift {
    /// A generated CRD has no file.
    Missing {
        /// The file it would be written to.
        file_name: String,
    },
    /// The file differs from the generated CRD.
    Differs {
        /// The file.
        file_name: String,
        /// The first differing line (1-based).
        line: usize,
    },
    /// A YAML file that no type generates.
    Unexpected {
        /// The file.
        file_name: String,
    },
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Drift::Missing { file_name } => write!(f, "{file_name}: missing"),
            Drift::Differs { file_name, line } => {
                write!(
                    f,
                    "{file_name}: differs from the Rust types from line {line}"
                )
            }
            Drift::Unexpected { file_name } => {
                write!(f, "{file_name}: no Rust type generates this file")
            }
        }
    }
}

/// Compares the generated CRDs with the files in `dir`.
pub fn check_dir(dir: &Path) -> Result<Vec<Drift>, CrdError> {
    let expected = render()?;
    let mut drift = Vec::new();
    for file in &expected {
        let path = dir.join(&file.file_name);
        match fs::read_to_string(&path) {
            Ok(actual) if actual == file.yaml => {}
            Ok(actual) => drift.push(Drift::Differs {
                file_name: file.file_name.clone(),
                line: first_differing_line(&actual, &file.yaml),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => drift.push(Drift::Missing {
                file_name: file.file_name.clone(),
            }),
            Err(source) => return Err(CrdError::Read { path, source }),
        }
    }
    let entries = fs::read_dir(dir).map_err(|source| CrdError::Read {
        path: dir.to_owned(),
        source,
    })?;
    let mut unexpected: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml") || name.ends_with(".yml"))
        .filter(|name| !expected.iter().any(|f| &f.file_name == name))
        .collect();
    unexpected.sort();
    drift.extend(
        unexpected
            .into_iter()
            .map(|file_name| Drift::Unexpected { file_name }),
    );
    Ok(drift)
}

fn first_differing_line(a: &str, b: &str) -> usize {
    let mut a_lines = a.lines();
    let mut b_lines = b.lines();
    let mut line = 1;
    loop {
        match (a_lines.next(), b_lines.next()) {
            (Some(x), Some(y)) if x == y => line += 1,
            (None, None) => return line,
            _ => return line,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema_of(crd: &CustomResourceDefinition) -> serde_json::Value {
        serde_json::to_value(
            crd.spec.versions[0]
                .schema
                .as_ref()
                .unwrap()
                .open_api_v3_schema
                .as_ref()
                .unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn names_short_names_and_status_subresource() {
        let mc = ModelCache::crd();
        assert_eq!(
            mc.metadata.name.as_deref(),
            Some("modelcaches.modelcache.dev")
        );
        assert_eq!(mc.spec.scope, "Namespaced");
        assert_eq!(mc.spec.names.short_names, Some(vec!["mc".to_string()]));
        let v = &mc.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(v.subresources.as_ref().unwrap().status.is_some());

        let cp = CachePolicy::crd();
        assert_eq!(
            cp.metadata.name.as_deref(),
            Some("cachepolicies.modelcache.dev")
        );
        assert_eq!(cp.spec.names.short_names, Some(vec!["cp".to_string()]));
        assert!(
            cp.spec.versions[0]
                .subresources
                .as_ref()
                .unwrap()
                .status
                .is_some()
        );
    }

    #[test]
    fn model_cache_printer_columns() {
        let crd = ModelCache::crd();
        let columns: Vec<String> = crd.spec.versions[0]
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.clone())
            .collect();
        for wanted in ["Model", "Version", "Ready", "Hit Rate", "Age"] {
            assert!(
                columns.iter().any(|c| c == wanted),
                "no {wanted} column in {columns:?}"
            );
        }
    }

    /// Walks a schema and returns the paths of properties without a description.
    fn undocumented(schema: &serde_json::Value, path: &str, out: &mut Vec<String>) {
        if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
            for (name, prop) in props {
                let here = format!("{path}.{name}");
                // metadata, apiVersion and kind are documented by Kubernetes itself.
                let standard =
                    path.is_empty() && ["metadata", "apiVersion", "kind"].contains(&name.as_str());
                if !standard && prop.get("description").is_none() {
                    out.push(here.clone());
                }
                undocumented(prop, &here, out);
            }
        }
        if let Some(items) = schema.get("items") {
            undocumented(items, &format!("{path}[]"), out);
        }
        if let Some(extra) = schema.get("additionalProperties").filter(|v| v.is_object()) {
            undocumented(extra, &format!("{path}{{}}"), out);
        }
    }

    #[test]
    fn every_field_is_documented() {
        for crd in definitions() {
            let mut missing = Vec::new();
            undocumented(&schema_of(&crd), "", &mut missing);
            assert!(
                missing.is_empty(),
                "{}: undocumented fields {missing:?}",
                crd.spec.names.kind
            );
        }
    }

    #[test]
    fn enums_defaults_and_bounds_are_in_the_schema() {
        let cp = schema_of(&CachePolicy::crd());
        let spec = &cp["properties"]["spec"]["properties"];
        assert_eq!(spec["evictionPolicy"]["default"], "allkeys-lru");
        let policies = spec["evictionPolicy"]["enum"].as_array().unwrap();
        assert!(policies.contains(&"volatile-ttl".into()) && policies.len() == 8);
        assert_eq!(spec["maxmemoryRatio"]["default"], 0.8);
        assert_eq!(spec["maxmemoryRatio"]["maximum"], 0.95);
        assert_eq!(spec["fragmentationThreshold"]["default"], 1.5);
        let strategies = spec["invalidation"]["properties"]["strategy"]["enum"]
            .as_array()
            .unwrap();
        assert_eq!(
            strategies,
            &vec!["VersionKeyed".into(), "Flush".into(), "TTLOnly".into()]
                as &Vec<serde_json::Value>
        );
    }

    #[test]
    fn every_cel_rule_compiles() {
        for crd in definitions() {
            let compiled = kube::core::cel::compile_schema(&schema_of(&crd));
            let errors: Vec<String> = compiled
                .compilation_errors()
                .iter()
                .map(|e| e.to_string())
                .collect();
            assert!(errors.is_empty(), "{}: {errors:?}", crd.spec.names.kind);
        }
    }

    #[test]
    fn conditions_are_a_list_map_keyed_by_type() {
        let mc = schema_of(&ModelCache::crd());
        let conditions = &mc["properties"]["status"]["properties"]["conditions"];
        assert_eq!(conditions["x-kubernetes-list-type"], "map");
        assert_eq!(
            conditions["x-kubernetes-list-map-keys"],
            serde_json::json!(["type"])
        );
    }

    #[test]
    fn stream_is_the_files_concatenated() {
        let files = render().unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.file_name.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted, "files must be rendered in name order");
        let joined: String = files.iter().map(|f| f.yaml.as_str()).collect();
        assert_eq!(render_stream().unwrap(), joined);
    }

    #[test]
    fn drift_is_reported_for_changed_missing_and_extra_files() {
        let dir = tempfile::tempdir().unwrap();
        write_dir(dir.path()).unwrap();
        assert_eq!(check_dir(dir.path()).unwrap(), vec![]);

        // A type change without regeneration looks like this: the file no longer
        // matches what the types produce.
        let path = dir.path().join("modelcaches.modelcache.dev.yaml");
        let edited = fs::read_to_string(&path)
            .unwrap()
            .replace("maxLength: 128", "maxLength: 129");
        fs::write(&path, edited).unwrap();
        fs::remove_file(dir.path().join("cachepolicies.modelcache.dev.yaml")).unwrap();
        fs::write(dir.path().join("stale.yaml"), "---\n").unwrap();

        let drift = check_dir(dir.path()).unwrap();
        assert_eq!(drift.len(), 3, "{drift:?}");
        assert!(
            matches!(&drift[0], Drift::Missing { file_name } if file_name == "cachepolicies.modelcache.dev.yaml")
        );
        assert!(
            matches!(&drift[1], Drift::Differs { file_name, line } if file_name == "modelcaches.modelcache.dev.yaml" && *line > 2)
        );
        assert!(matches!(&drift[2], Drift::Unexpected { file_name } if file_name == "stale.yaml"));
    }

    #[test]
    fn repository_crds_match_the_types() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
        let drift = check_dir(&dir).unwrap();
        assert!(
            drift.is_empty(),
            "crds/ drifted from the Rust types: {}. Run `cargo run -- crd --out-dir crds` and commit the result.",
            drift
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
}
