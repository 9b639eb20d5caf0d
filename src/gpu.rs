//! The GPU probe: NVIDIA devices, their memory and compute capability,
//! through the driver loaded at run time (cudarc's dynamic loading), so one
//! binary serves machines with and without CUDA.
//!
//! The driver's presence is checked before any call: asking cudarc for the
//! device count without a driver panics.

use serde::Serialize;

use crate::model::kv_size::KvSize;

/// One device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuDevice {
    /// CUDA device ordinal.
    pub ordinal: usize,
    /// Device name.
    pub name: String,
    /// Compute capability, `major.minor`.
    pub compute_capability: String,
    /// Memory in bytes.
    pub total_bytes: u64,
    /// Free memory in bytes, now.
    pub free_bytes: u64,
}

/// What the probe found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GpuReport {
    /// Whether libcuda could be loaded at all.
    pub driver_present: bool,
    /// Every device the driver reports.
    pub devices: Vec<GpuDevice>,
}

impl GpuReport {
    /// One line per device, or why there is none.
    pub fn describe(&self) -> String {
        if !self.driver_present {
            return "no GPU: the NVIDIA driver (libcuda.so) is not present".into();
        }
        if self.devices.is_empty() {
            return "no GPU: the NVIDIA driver is present but reports no device".into();
        }
        self.devices
            .iter()
            .map(|d| {
                format!(
                    "GPU {}: {}, compute capability {}, {:.1} GiB total, {:.1} GiB free",
                    d.ordinal,
                    d.name,
                    d.compute_capability,
                    d.total_bytes as f64 / (1u64 << 30) as f64,
                    d.free_bytes as f64 / (1u64 << 30) as f64
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Why the GPU probe failed (a missing driver is not an error).
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum GpuError {
    #[error("failed to query GPU {ordinal}: {detail}")]
    Driver { ordinal: usize, detail: String },
    #[error(
        "failed to start the warm-up on GPU {ordinal}: the weights ({weights} bytes) plus the planned KV cache ({kv} bytes) need {need} bytes ({need_gib:.2} GiB), but only {free} bytes ({free_gib:.2} GiB) are free; warm fewer tokens, a smaller batch or a smaller dtype, or free the GPU"
    )]
    DoesNotFit {
        ordinal: usize,
        weights: u64,
        kv: u64,
        need: u64,
        need_gib: f64,
        free: u64,
        free_gib: f64,
    },
}

#[cfg(all(feature = "gpu-probe", feature = "cuda"))]
compile_error!(
    "the `cuda` feature links CUDA, which cannot sit beside the run-time loading of `gpu-probe`: build with `--no-default-features --features cuda`"
);

/// Probe the machine. No driver is a report, not an error.
pub fn probe() -> Result<GpuReport, GpuError> {
    if !driver_present() {
        return Ok(GpuReport {
            driver_present: false,
            devices: Vec::new(),
        });
    }
    devices().map(|devices| GpuReport {
        driver_present: true,
        devices,
    })
}

#[cfg(feature = "gpu-probe")]
#[allow(unsafe_code)] // cudarc's loader is an FFI call
fn driver_present() -> bool {
    // SAFETY: only tries to load libcuda; nothing is called through it.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// The `cuda` build links libcuda: it does not start without the driver.
#[cfg(all(feature = "cuda", not(feature = "gpu-probe")))]
fn driver_present() -> bool {
    true
}

#[cfg(not(any(feature = "gpu-probe", feature = "cuda")))]
fn driver_present() -> bool {
    false
}

#[cfg(any(feature = "gpu-probe", feature = "cuda"))]
fn devices() -> Result<Vec<GpuDevice>, GpuError> {
    let driver = |ordinal: usize| {
        move |e: cudarc::driver::DriverError| GpuError::Driver {
            ordinal,
            detail: e.to_string(),
        }
    };
    let count = cudarc::driver::CudaContext::device_count().map_err(driver(0))?;
    let mut devices = Vec::new();
    for ordinal in 0..count.max(0) as usize {
        let ctx = cudarc::driver::CudaContext::new(ordinal).map_err(driver(ordinal))?;
        let (major, minor) = ctx.compute_capability().map_err(driver(ordinal))?;
        let (free, total) = ctx.mem_get_info().map_err(driver(ordinal))?;
        devices.push(GpuDevice {
            ordinal,
            name: ctx.name().map_err(driver(ordinal))?,
            compute_capability: format!("{major}.{minor}"),
            total_bytes: total as u64,
            free_bytes: free as u64,
        });
    }
    Ok(devices)
}

#[cfg(not(any(feature = "gpu-probe", feature = "cuda")))]
fn devices() -> Result<Vec<GpuDevice>, GpuError> {
    Ok(Vec::new())
}

/// Refuse a warm-up whose weights plus planned KV cache exceed the free memory
/// of the device, naming both numbers.
pub fn check_fits(device: &GpuDevice, weights: u64, kv: &KvSize) -> Result<(), GpuError> {
    let need = weights.saturating_add(kv.bytes);
    if need > device.free_bytes {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        return Err(GpuError::DoesNotFit {
            ordinal: device.ordinal,
            weights,
            kv: kv.bytes,
            need,
            need_gib: gib(need),
            free: device.free_bytes,
            free_gib: gib(device.free_bytes),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kv_size::{KvDtype, KvShape, kv_size};

    fn device(free: u64) -> GpuDevice {
        GpuDevice {
            ordinal: 0,
            name: "test".into(),
            compute_capability: "9.0".into(),
            total_bytes: free,
            free_bytes: free,
        }
    }

    #[test]
    fn warm_ups_that_do_not_fit_are_refused_with_both_numbers() {
        let shape = KvShape {
            layers: 32,
            kv_heads: 8,
            head_dim: 128,
            value_dim: 128,
        };
        let kv = kv_size(shape, KvDtype::F16, 8192, 4).unwrap(); // 4 GiB
        check_fits(&device(20 << 30), 16 << 30, &kv).unwrap();
        let err = check_fits(&device(19 << 30), 16 << 30, &kv)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("17179869184 bytes") && err.contains("4294967296 bytes"),
            "{err}"
        );
        assert!(
            err.contains("20.00 GiB") && err.contains("19.00 GiB"),
            "{err}"
        );
    }

    #[test]
    fn reports_describe_the_absence_of_a_driver() {
        let r = GpuReport {
            driver_present: false,
            devices: vec![],
        };
        assert!(r.describe().starts_with("no GPU"));
    }
}
