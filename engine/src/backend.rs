//! The burn backends the engine runs on, chosen at run time.

use std::fmt;
use std::str::FromStr;

use burn::tensor::Device;

/// A compiled-in burn backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// burn-flex on the CPU, with the engine's quantized kernels for linear layers.
    Cpu,
    /// burn-wgpu: Vulkan/Metal/DX12 natively (Mesa lavapipe where there is no GPU), WebGPU in
    /// the browser.
    Wgpu,
}

impl Backend {
    /// Every backend this build has.
    pub fn available() -> Vec<Backend> {
        let mut all = Vec::new();
        if cfg!(feature = "cpu") {
            all.push(Backend::Cpu);
        }
        if cfg!(feature = "wgpu") {
            all.push(Backend::Wgpu);
        }
        all
    }

    /// The burn device for this backend (natively; in the browser, wgpu must be initialised
    /// asynchronously first).
    pub fn device(self) -> Result<Device, crate::EngineError> {
        match self {
            #[cfg(feature = "cpu")]
            Backend::Cpu => Ok(Device::flex()),
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
            #[allow(unreachable_patterns)]
            other => Err(crate::EngineError::Unsupported(format!("backend {other} is not compiled in"))),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Cpu => "cpu",
            Backend::Wgpu => "wgpu",
        })
    }
}

impl FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" | "flex" => Ok(Backend::Cpu),
            "wgpu" | "gpu" | "webgpu" | "vulkan" => Ok(Backend::Wgpu),
            _ => Err(format!("unknown backend {s:?} (expected \"cpu\" or \"wgpu\")")),
        }
    }
}
