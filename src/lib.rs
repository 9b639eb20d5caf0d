//! modelcache: caches for ML serving on Kubernetes.
//!
//! - [`crd`]: the `ModelCache` and `CachePolicy` API (`modelcache.dev/v1alpha1`)
//!   and the CRD YAML generated from it.
//! - [`validate`]: offline validation of manifests against those CRDs.
//!
//! The `modelcache` binary is a thin command line over this library.

pub mod crd;
pub mod validate;

/// One line naming this build and the API it serves.
pub fn version_line() -> String {
    format!(
        "modelcache {} (API {})",
        env!("CARGO_PKG_VERSION"),
        crd::API_VERSION
    )
}
