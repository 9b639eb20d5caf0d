//! modelcache: caches for ML serving on Kubernetes.
//!
//! - [`crd`]: the `ModelCache` and `CachePolicy` API (`modelcache.dev/v1alpha1`)
//!   and the CRD YAML generated from it.
//! - [`validate`]: offline validation of manifests against those CRDs.
//! - [`controller`]: `modelcache controller`, one Redis per ModelCache.
//! - [`store`]: the settings, live config and health of a model's Redis.
//! - [`quantity`]: exact bytes from Kubernetes quantities.
//!
//! The `modelcache` binary is a thin command line over this library.

pub mod artifact;
pub mod cache;
pub mod controller;
pub mod crd;
pub mod digest;
pub mod gpu;
pub mod keys;
pub mod model;
pub mod prefix_cache;
pub mod quantity;
pub mod registry;
pub mod store;
pub mod sweep;
pub mod validate;
pub mod warm;

/// One line naming this build and the API it serves.
pub fn version_line() -> String {
    format!(
        "modelcache {} (API {})",
        env!("CARGO_PKG_VERSION"),
        crd::API_VERSION
    )
}
