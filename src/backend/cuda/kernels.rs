//! The kernels build.rs embedded, and loading them into a CUDA context.

use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, CudaModule};
use cudarc::nvrtc::Ptx;
use std::sync::Arc;

/// One kernels/*.cu file as embedded by build.rs.
pub struct KernelModule {
    pub name: &'static str,
    /// PTX for compute_80 (None when built without nvcc).
    pub ptx: Option<&'static str>,
    /// Cubin for sm_90 (None when built without nvcc).
    pub cubin_sm90: Option<&'static [u8]>,
    /// The CUDA source with kernels/*.cuh inlined, for NVRTC.
    pub source: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

pub fn module(name: &str) -> Option<&'static KernelModule> {
    MODULES.iter().find(|m| m.name == name)
}

fn cuda_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Cuda(format!("{what}: {e:?}"))
}

/// True when the CUDA driver library can be loaded (it says nothing about devices).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Opens device `ordinal`, or explains why there is none.
pub fn open_context(ordinal: usize) -> Result<Arc<CudaContext>> {
    if !driver_present() {
        return Err(Error::Cuda(
            "no CUDA driver found (libcuda.so could not be loaded): this machine has no NVIDIA GPU driver; use --device cpu".into(),
        ));
    }
    let count = CudaContext::device_count().map_err(|e| cuda_err("counting devices", e))?;
    if count <= 0 {
        return Err(Error::Cuda(
            "the CUDA driver reports no devices; use --device cpu".into(),
        ));
    }
    if ordinal >= count as usize {
        return Err(Error::Cuda(format!(
            "device {ordinal} requested but only {count} present"
        )));
    }
    CudaContext::new(ordinal).map_err(|e| cuda_err("creating the CUDA context", e))
}

/// Loads module `m` into `ctx`: the sm_90 cubin on compute capability 9.0, else the
/// compute_80 PTX (JIT-compiled by the driver), else the source through NVRTC. Returns
/// the module and how it was loaded.
pub fn load(ctx: &Arc<CudaContext>, m: &KernelModule) -> Result<(Arc<CudaModule>, &'static str)> {
    let cc = ctx
        .compute_capability()
        .map_err(|e| cuda_err("compute capability", e))?;
    if let (Some(cubin), (9, 0)) = (m.cubin_sm90, cc) {
        if let Ok(module) = ctx.load_module(Ptx::from_binary(cubin.to_vec())) {
            return Ok((module, "sm_90 cubin"));
        }
    }
    let (ptx, how) = match m.ptx {
        Some(p) => (Ptx::from_src(p), "compute_80 PTX (driver JIT)"),
        None => {
            let arch = format!("compute_{}{}", cc.0, cc.1);
            let opts = cudarc::nvrtc::CompileOptions {
                arch: Some(Box::leak(arch.into_boxed_str())),
                ..Default::default()
            };
            let ptx = cudarc::nvrtc::compile_ptx_with_opts(m.source, opts)
                .map_err(|e| cuda_err(&format!("NVRTC compiling kernels/{}.cu", m.name), e))?;
            (ptx, "NVRTC")
        }
    };
    let module = ctx
        .load_module(ptx)
        .map_err(|e| cuda_err(&format!("loading kernels/{}.cu", m.name), e))?;
    Ok((module, how))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The NVRTC fallback compiles `source` as one file: every kernels/*.cuh must be inlined
    /// once (a header included twice would define its types and functions twice).
    #[test]
    fn embedded_sources_inline_each_header_once() {
        assert!(!MODULES.is_empty());
        for m in MODULES {
            assert!(
                !m.source.contains("#include \""),
                "kernels/{}.cu: an include was not inlined",
                m.name
            );
            assert!(!m.source.contains("#pragma once"), "kernels/{}.cu", m.name);
            for def in [
                "struct RlnArgs {",
                "struct TrainArgs {",
                "namespace conv3 {",
                "namespace mmac {",
            ] {
                assert!(
                    m.source.matches(def).count() <= 1,
                    "kernels/{}.cu defines `{def}` twice",
                    m.name
                );
            }
        }
        // the modules the host loads are there; rl_nodes.cu (never launched) is gone
        for name in [
            "h1_bp",
            "h1_fp",
            "h1_up",
            "h2",
            "h3",
            "io_half",
            "train_conv",
            "train_ops",
        ] {
            assert!(module(name).is_some(), "kernels/{name}.cu");
        }
        assert!(module("rl_nodes").is_none());
    }
}
