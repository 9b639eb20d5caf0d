//! Offline validation of `ModelCache` and `CachePolicy` manifests against the
//! generated CRD schemas, the way the API server would check them: defaults
//! first, then the OpenAPI schema (types, enums, bounds, patterns, unknown
//! fields), then the CEL rules (`x-kubernetes-validations`).
//!
//! It lets users and CI catch a bad resource before `kubectl apply` or an Argo
//! CD sync, and it is how the examples are checked against the schemas.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::core::cel;
use serde_json::{Map, Value};

use crate::crd::{self, CachePolicy, ModelCache};

/// Why manifests could not be validated (an invalid resource is a report, not an error).
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum ValidateError {
    #[error("failed to parse {source_name} as YAML")]
    Yaml {
        source_name: String,
        #[source]
        source: Box<serde_saphyr::Error>,
    },
    #[error("failed to compile the schema of CRD {crd}: {message}")]
    Schema { crd: String, message: String },
}

/// One reason a resource is invalid, located at a field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Dotted path of the field, for example `spec.source.uri`; empty for the
    /// whole object.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// The verdict on one document of a YAML stream.
#[derive(Debug, Clone, PartialEq)]
pub struct DocumentReport {
    /// 1-based position in the stream.
    pub index: usize,
    /// `Kind/name` where known.
    pub resource: String,
    /// Empty when the document is valid.
    pub violations: Vec<Violation>,
}

struct KindSchema {
    /// The CRD's openAPIV3Schema as the API server stores it (used for defaults and CEL).
    openapi: Value,
    /// The same schema rewritten for a JSON Schema validator.
    structural: jsonschema::Validator,
    compiled_cel: cel::CompiledSchema,
}

/// Validates manifests against the CRDs that this build generates.
pub struct Validator {
    kinds: BTreeMap<String, KindSchema>,
}

impl Validator {
    /// A validator for both modelcache kinds.
    pub fn new() -> Result<Self, ValidateError> {
        Self::for_crds(&crd::definitions())
    }

    /// A validator for these CRDs.
    pub fn for_crds(crds: &[CustomResourceDefinition]) -> Result<Self, ValidateError> {
        let mut kinds = BTreeMap::new();
        for crd in crds {
            let crd_name = crd.metadata.name.clone().unwrap_or_default();
            let schema_error = |message: String| ValidateError::Schema {
                crd: crd_name.clone(),
                message,
            };
            let openapi = crd
                .spec
                .versions
                .iter()
                .find(|v| v.storage)
                .and_then(|v| v.schema.as_ref())
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .ok_or_else(|| schema_error("it has no openAPIV3Schema".into()))
                .and_then(|s| serde_json::to_value(s).map_err(|e| schema_error(e.to_string())))?;
            let structural = jsonschema::draft4::new(&to_json_schema(&with_object_meta(&openapi)))
                .map_err(|e| schema_error(e.to_string()))?;
            let compiled_cel = cel::compile_schema(&openapi);
            if let Some(e) = compiled_cel.compilation_errors().first() {
                return Err(schema_error(format!("a CEL rule does not compile: {e}")));
            }
            kinds.insert(
                crd.spec.names.kind.clone(),
                KindSchema {
                    openapi,
                    structural,
                    compiled_cel,
                },
            );
        }
        Ok(Validator { kinds })
    }

    /// Validates every document of a YAML stream. `source_name` names the
    /// stream in errors (a file path, or `-` for standard input).
    pub fn validate_yaml(
        &self,
        source_name: &str,
        yaml: &str,
    ) -> Result<Vec<DocumentReport>, ValidateError> {
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(yaml).map_err(|source| ValidateError::Yaml {
                source_name: source_name.to_owned(),
                source: Box::new(source),
            })?;
        Ok(docs
            .iter()
            .filter(|d| !d.is_null())
            .enumerate()
            .map(|(i, doc)| {
                let mut report = self.validate(doc);
                report.index = i + 1;
                report
            })
            .collect())
    }

    /// Validates one resource given as JSON.
    pub fn validate(&self, doc: &Value) -> DocumentReport {
        let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("");
        let name = doc
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        let mut report = DocumentReport {
            index: 1,
            resource: format!("{}/{}", if kind.is_empty() { "?" } else { kind }, name),
            violations: Vec::new(),
        };
        let violations = &mut report.violations;

        let api_version = doc.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        if api_version != crd::API_VERSION {
            violations.push(Violation {
                field: "apiVersion".into(),
                message: format!("expected {}, found {api_version:?}", crd::API_VERSION),
            });
        }
        let Some(schema) = self.kinds.get(kind) else {
            let known: Vec<&str> = self.kinds.keys().map(String::as_str).collect();
            violations.push(Violation {
                field: "kind".into(),
                message: format!("expected one of {known:?}, found {kind:?}"),
            });
            return report;
        };
        check_name(doc, violations);

        let defaulted = cel::apply_defaults(&schema.openapi, doc);
        for error in schema.structural.iter_errors(&defaulted) {
            let pointer = error.instance_path().to_string();
            let mut message = error.to_string();
            // The default message lists two options and counts the rest; list all.
            if let jsonschema::error::ValidationErrorKind::Enum { options } = error.kind() {
                let allowed: Vec<String> = options
                    .as_array()
                    .map(|o| o.iter().map(Value::to_string).collect())
                    .unwrap_or_default();
                message = format!("{} is not one of {}", error.instance(), allowed.join(", "));
            }
            // A regex says little to a user; the field's own description says
            // what is expected.
            if matches!(
                error.kind(),
                jsonschema::error::ValidationErrorKind::Pattern { .. }
            ) && let Some(description) = description_at(&schema.openapi, &pointer)
            {
                message = format!("{message}; expected {description}");
            }
            violations.push(Violation {
                field: pointer_to_field(&pointer),
                message,
            });
        }
        // CEL rules assume a structurally valid object, as they do on the API
        // server, which evaluates them only after the schema check passes.
        if violations.is_empty()
            && let Err(errors) =
                cel::Validator::new().validate_compiled(&schema.compiled_cel, &defaulted, None)
        {
            violations.extend(errors.into_vec().into_iter().map(|e| Violation {
                field: e.field_path.clone(),
                message: e.message.clone(),
            }));
        }
        if violations.is_empty() {
            let typed = match kind {
                "ModelCache" => serde_json::from_value::<ModelCache>(defaulted).err(),
                "CachePolicy" => serde_json::from_value::<CachePolicy>(defaulted).err(),
                _ => None,
            };
            if let Some(e) = typed {
                violations.push(Violation {
                    field: String::new(),
                    message: format!("does not match the {kind} type: {e}"),
                });
            }
        }
        report
    }
}

/// metadata.name must be a DNS-1123 subdomain, as for any namespaced object.
fn check_name(doc: &Value, violations: &mut Vec<Violation>) {
    let field = "metadata.name".to_owned();
    match doc.pointer("/metadata/name").and_then(Value::as_str) {
        None => violations.push(Violation {
            field,
            message: "is required".into(),
        }),
        Some(name) if !is_dns_subdomain(name) => violations.push(Violation {
            field,
            message: format!(
                "{name:?} must be a DNS-1123 subdomain: lower-case letters, digits, '-' and '.', at most 253 characters, starting and ending with a letter or digit"
            ),
        }),
        Some(_) => {}
    }
}

fn is_dns_subdomain(name: &str) -> bool {
    let bytes = name.as_bytes();
    !name.is_empty()
        && name.len() <= 253
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-' || *b == b'.')
}

/// The API server validates apiVersion, kind and metadata itself; CRD schemas
/// leave them out, so they are added here before unknown fields are closed off.
fn with_object_meta(schema: &Value) -> Value {
    let mut schema = schema.clone();
    if let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) {
        props
            .entry("apiVersion")
            .or_insert_with(|| serde_json::json!({"type": "string"}));
        props
            .entry("kind")
            .or_insert_with(|| serde_json::json!({"type": "string"}));
        props.entry("metadata").or_insert_with(
            || serde_json::json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
        );
    }
    schema
}

/// The description of the field at a JSON pointer, first line only.
fn description_at(schema: &Value, pointer: &str) -> Option<String> {
    let mut node = schema;
    for token in pointer.split('/').skip(1) {
        node = if token.bytes().all(|b| b.is_ascii_digit()) {
            node.get("items")?
        } else {
            node.get("properties")?.get(token)?
        };
    }
    let description = node.get("description")?.as_str()?;
    let sentence = description.split(". ").next().unwrap_or(description);
    Some(
        sentence
            .replace('\n', " ")
            .trim_end_matches('.')
            .to_string(),
    )
}

/// `/spec/warmup/prompts/0` becomes `spec.warmup.prompts[0]`.
fn pointer_to_field(pointer: &str) -> String {
    let mut field = String::new();
    for token in pointer.split('/').skip(1) {
        let token = token.replace("~1", "/").replace("~0", "~");
        if !token.is_empty() && token.bytes().all(|b| b.is_ascii_digit()) {
            field.push_str(&format!("[{token}]"));
        } else {
            if !field.is_empty() {
                field.push('.');
            }
            field.push_str(&token);
        }
    }
    field
}

/// Rewrites a Kubernetes structural schema (OpenAPI v3 with `x-kubernetes-*`
/// extensions) into draft-4 JSON Schema with the API server's semantics:
/// - `nullable: true` admits null;
/// - objects with `properties` reject unknown fields, as `kubectl apply`'s
///   strict field validation does, unless they preserve unknown fields;
/// - `x-kubernetes-int-or-string` admits an integer or a string.
fn to_json_schema(schema: &Value) -> Value {
    let Value::Object(map) = schema else {
        return schema.clone();
    };
    let mut out = Map::new();
    for (key, value) in map {
        let rewritten = match key.as_str() {
            "properties" => Value::Object(
                value
                    .as_object()
                    .map(|props| {
                        props
                            .iter()
                            .map(|(k, v)| (k.clone(), to_json_schema(v)))
                            .collect()
                    })
                    .unwrap_or_default(),
            ),
            "items" | "additionalProperties" | "not" => to_json_schema(value),
            "allOf" | "anyOf" | "oneOf" => Value::Array(
                value
                    .as_array()
                    .map(|items| items.iter().map(to_json_schema).collect())
                    .unwrap_or_default(),
            ),
            _ => value.clone(),
        };
        out.insert(key.clone(), rewritten);
    }
    let preserve = map
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if map.contains_key("properties") && !map.contains_key("additionalProperties") && !preserve {
        out.insert("additionalProperties".into(), Value::Bool(false));
    }
    if map
        .get("x-kubernetes-int-or-string")
        .and_then(Value::as_bool)
        .unwrap_or(false)
    {
        out.remove("type");
        out.insert("type".into(), serde_json::json!(["integer", "string"]));
    }
    if map
        .get("nullable")
        .and_then(Value::as_bool)
        .unwrap_or(false)
        && let Some(Value::String(ty)) = out.get("type").cloned()
    {
        out.insert("type".into(), serde_json::json!([ty, "null"]));
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pointers_become_dotted_fields() {
        assert_eq!(pointer_to_field(""), "");
        assert_eq!(
            pointer_to_field("/spec/maxmemoryRatio"),
            "spec.maxmemoryRatio"
        );
        assert_eq!(
            pointer_to_field("/spec/warmup/prompts/0"),
            "spec.warmup.prompts[0]"
        );
        assert_eq!(
            pointer_to_field("/spec/cdn/headers/a~1b"),
            "spec.cdn.headers.a/b"
        );
    }

    #[test]
    fn dns_subdomains() {
        assert!(is_dns_subdomain("faq-bot.v2"));
        assert!(!is_dns_subdomain("FAQ"));
        assert!(!is_dns_subdomain("-a"));
        assert!(!is_dns_subdomain(""));
        assert!(!is_dns_subdomain(&"a".repeat(254)));
    }

    #[test]
    fn rewrite_closes_objects_and_admits_nulls() {
        let schema = json!({
            "type": "object",
            "properties": {
                "a": {"type": "string", "nullable": true},
                "q": {"x-kubernetes-int-or-string": true},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true, "properties": {"x": {"type": "integer"}}}
            }
        });
        let validator = jsonschema::draft4::new(&to_json_schema(&schema)).unwrap();
        assert!(validator.is_valid(&json!({"a": null, "q": "1Gi"})));
        assert!(validator.is_valid(&json!({"q": 3, "free": {"y": 1}})));
        assert!(!validator.is_valid(&json!({"b": 1})));
        assert!(!validator.is_valid(&json!({"q": 1.5})));
    }

    fn policy(spec: Value) -> Value {
        json!({"apiVersion": "modelcache.dev/v1alpha1", "kind": "CachePolicy", "metadata": {"name": "p"}, "spec": spec})
    }

    fn fields(report: &DocumentReport) -> Vec<&str> {
        report.violations.iter().map(|v| v.field.as_str()).collect()
    }

    #[test]
    fn defaults_fill_an_empty_policy() {
        let v = Validator::new().unwrap();
        let report = v.validate(&policy(json!({})));
        assert_eq!(report.violations, vec![]);
        assert_eq!(report.resource, "CachePolicy/p");
    }

    #[test]
    fn bounds_enums_and_unknown_fields_name_the_field() {
        let v = Validator::new().unwrap();
        let r = v.validate(&policy(json!({"maxmemoryRatio": 1.5})));
        assert_eq!(fields(&r), vec!["spec.maxmemoryRatio"], "{r:?}");
        assert!(r.violations[0].message.contains("0.95"), "{r:?}");

        let r = v.validate(&policy(json!({"evictionPolicy": "allkeys-lrx"})));
        assert_eq!(fields(&r), vec!["spec.evictionPolicy"], "{r:?}");
        assert!(r.violations[0].message.contains("allkeys-lru"), "{r:?}");

        let r = v.validate(&policy(json!({"evictionPolcy": "allkeys-lru"})));
        assert_eq!(fields(&r), vec!["spec"], "{r:?}");
        assert!(r.violations[0].message.contains("evictionPolcy"), "{r:?}");
    }

    #[test]
    fn cel_rules_catch_cross_field_mistakes() {
        let v = Validator::new().unwrap();
        let r = v.validate(&policy(
            json!({"evictionPolicy": "volatile-lru", "ttlSeconds": {"feature": 0}}),
        ));
        assert_eq!(r.violations.len(), 1, "{r:?}");
        assert!(r.violations[0].message.contains("volatile-*"), "{r:?}");

        let r = v.validate(&policy(
            json!({"invalidation": {"strategy": "TTLOnly"}, "ttlSeconds": {"result": 0}}),
        ));
        assert_eq!(r.violations.len(), 1, "{r:?}");
        assert!(r.violations[0].message.contains("TTLOnly"), "{r:?}");
    }

    #[test]
    fn wrong_kind_and_api_version_are_reported() {
        let v = Validator::new().unwrap();
        let r = v
            .validate(&json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}));
        assert_eq!(fields(&r), vec!["apiVersion", "kind"]);
        let r = v.validate(&json!({"apiVersion": "modelcache.dev/v1alpha1", "kind": "CachePolicy", "metadata": {"name": "Bad_Name"}, "spec": {}}));
        assert_eq!(fields(&r), vec!["metadata.name"]);
    }
}
