//! One CUDA device, the one owner of its context and streams: the context, three streams
//! (compute, host→device, device→host), the embedded kernel modules loaded once, pinned
//! host memory, copies and launches. Device memory and the launches of the networks go
//! through [`super::runtime::Runtime`] on the compute stream. Every driver call is checked; failures become
//! [`Error::Cuda`] naming what failed, or [`Error::OutOfMemory`] when memory ran out.

use super::kernels::{self, MODULES};
use super::launch::{self, CONV_KERNELS};
use super::params::Params;
use super::Precision;
use crate::error::{Error, Result};
use cudarc::driver::result::{self as cu, DriverError};
use cudarc::driver::sys::{self, CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg};
use std::collections::HashMap;
use std::sync::Arc;

/// A driver error as an [`Error`]: CUDA_ERROR_OUT_OF_MEMORY becomes the typed
/// [`Error::OutOfMemory`] (callers shrink their work or say what to lower), every other
/// code [`Error::Cuda`].
pub fn driver_error(what: &str, e: DriverError) -> Error {
    if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        // named without asking the driver, so this also holds where none is loaded (the
        // emulated device of the unit tests)
        return Error::OutOfMemory(format!(
            "{what}: CUDA_ERROR_OUT_OF_MEMORY: the device has too little free memory for this size"
        ));
    }
    let name = e
        .error_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", e.0));
    let text = e
        .error_string()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Error::Cuda(format!("{what}: {name} ({text})"))
}

/// Extension to map cudarc results with a description of the failed step.
pub trait CuCheck<T> {
    fn check(self, what: &str) -> Result<T>;
}
impl<T> CuCheck<T> for std::result::Result<T, DriverError> {
    fn check(self, what: &str) -> Result<T> {
        self.map_err(|e| driver_error(what, e))
    }
}

/// Page-locked host memory (cuMemAllocHost) for asynchronous copies, freed on drop.
pub struct PinnedBuf {
    ptr: *mut f32,
    len: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: the buffer is plain memory owned by this value.
unsafe impl Send for PinnedBuf {}

impl PinnedBuf {
    pub fn as_slice(&self) -> &[f32] {
        // SAFETY: ptr points to len f32 owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for PinnedBuf {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: ptr came from malloc_host and is freed once.
        let _ = unsafe { cu::free_host(self.ptr as *mut std::ffi::c_void) };
    }
}

/// The device, its streams and its kernels.
pub struct CudaDevice {
    pub ctx: Arc<CudaContext>,
    /// Where the network runs.
    pub compute: Arc<CudaStream>,
    /// Host→device copies of the next tile.
    pub h2d: Arc<CudaStream>,
    /// Device→host copies of the previous tile's result.
    pub d2h: Arc<CudaStream>,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub multiprocessors: i32,
    /// How each module was loaded ("sm_90 cubin", "compute_80 PTX (JIT)", "NVRTC").
    pub module_sources: Vec<(String, &'static str)>,
    functions: HashMap<String, CudaFunction>,
    _modules: Vec<Arc<CudaModule>>,
}

impl CudaDevice {
    /// Opens device `ordinal`: context, streams, every kernel module, and the shared
    /// memory limits of the conv kernels. Fails with a clear message when there is no
    /// driver or no device.
    pub fn open(ordinal: usize) -> Result<Arc<CudaDevice>> {
        let ctx = kernels::open_context(ordinal)?;
        let compute = ctx.new_stream().check("creating the compute stream")?;
        let h2d = ctx.new_stream().check("creating the host-to-device stream")?;
        let d2h = ctx.new_stream().check("creating the device-to-host stream")?;
        let name = ctx.name().check("reading the device name")?;
        let cc = ctx.compute_capability().check("reading the compute capability")?;
        let multiprocessors = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .check("reading the SM count")?;
        let smem_optin = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .check("reading the shared memory limit")? as usize;
        if cc < (8, 0) {
            return Err(Error::Cuda(format!(
                "{name} has compute capability {}.{}; the RLN kernels need 8.0 or newer (Ampere, Ada, Hopper)",
                cc.0, cc.1
            )));
        }
        let mut modules = Vec::new();
        let mut module_sources = Vec::new();
        let mut functions = HashMap::new();
        for m in MODULES {
            let (module, how) = kernels::load(&ctx, m)?;
            module_sources.push((m.name.to_string(), how));
            modules.push((m.name, module));
        }
        // every kernel either precision may launch, with its shared memory
        let mut wanted: Vec<(&'static str, String, usize)> = Vec::new();
        for k in CONV_KERNELS.iter() {
            for (p, tc) in launch::MODES {
                let smem = if k.uses_mma(p, tc) {
                    launch::mma_smem_bytes(k.c_in())
                } else {
                    launch::ffma_smem_bytes(k.c_in(), k.c_out)
                };
                let entry = (k.module, k.name(p, tc), smem);
                if !wanted.contains(&entry) {
                    wanted.push(entry);
                }
            }
        }
        for p in [Precision::F32, Precision::F16, Precision::Bf16] {
            wanted.push(("h1_up", launch::up_kernel(p), 0));
        }
        wanted.push(("h1_fp", launch::POOL_KERNEL.to_string(), 0));
        // the predictor's f16↔f32 tile conversions
        for k in launch::IO_KERNELS {
            wanted.push((launch::IO_MODULE, k.to_string(), 0));
        }
        // the training kernels (kernels/train_*.cu)
        wanted.extend(super::train_launch::kernel_list());
        wanted.extend(super::train::ADAM_KERNELS.map(|k| (super::train::ADAM_MODULE, k.to_string(), 0)));
        for (module, name, smem) in wanted {
            let m = &modules
                .iter()
                .find(|(n, _)| *n == module)
                .ok_or_else(|| Error::Cuda(format!("kernel module {module} is not embedded")))?
                .1;
            let f = m
                .load_function(&name)
                .check(&format!("finding kernel {name} in kernels/{module}.cu"))?;
            if smem > smem_optin {
                return Err(Error::Cuda(format!(
                    "{name} needs {smem} B of shared memory per block; the device allows {smem_optin}"
                )));
            }
            if smem > 0 {
                f.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                )
                .check(&format!("raising the shared memory limit of {name} to {smem} B"))?;
            }
            functions.insert(name, f);
        }
        Ok(Arc::new(CudaDevice {
            ctx,
            compute,
            h2d,
            d2h,
            name,
            compute_capability: cc,
            multiprocessors,
            module_sources,
            functions,
            _modules: modules.into_iter().map(|(_, m)| m).collect(),
        }))
    }

    pub fn describe(&self) -> String {
        format!(
            "{} (sm_{}{}, {} SMs)",
            self.name, self.compute_capability.0, self.compute_capability.1, self.multiprocessors
        )
    }

    /// (free, total) device memory in bytes (cuMemGetInfo).
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().check("querying free device memory")
    }

    pub fn func(&self, name: &str) -> Result<&CudaFunction> {
        self.functions
            .get(name)
            .ok_or_else(|| Error::Cuda(format!("kernel {name} was not loaded")))
    }

    /// Allocates page-locked host memory for `len` f32.
    pub fn alloc_pinned(&self, len: usize) -> Result<PinnedBuf> {
        self.ctx.bind_to_thread().check("binding the CUDA context")?;
        // SAFETY: plain allocation, owned by the returned PinnedBuf.
        let ptr = unsafe { cu::malloc_host(len.max(1) * 4, 0) }.check(&format!(
            "allocating {} MiB of pinned host memory",
            (len * 4).div_ceil(1 << 20)
        ))?;
        Ok(PinnedBuf {
            ptr: ptr as *mut f32,
            len,
            ctx: self.ctx.clone(),
        })
    }

    /// Enqueues a host→device copy on `stream` (`data` must stay alive and unchanged until
    /// the stream has passed it: pinned memory, or synchronize before returning).
    pub fn copy_htod<T: Copy>(&self, stream: &CudaStream, dst: u64, data: &[T], what: &str) -> Result<()> {
        self.ctx.bind_to_thread().check("binding the CUDA context")?;
        // SAFETY: dst is a live allocation of at least size_of_val(data) bytes (callers
        // size buffers from the same shapes).
        unsafe { cu::memcpy_htod_async(dst, data, stream.cu_stream()) }.check(&format!("copying {what} to the device"))
    }

    /// Enqueues a device→host copy on `stream` (see [`CudaDevice::copy_htod`]).
    pub fn copy_dtoh<T: Copy>(&self, stream: &CudaStream, dst: &mut [T], src: u64, what: &str) -> Result<()> {
        self.ctx.bind_to_thread().check("binding the CUDA context")?;
        // SAFETY: src is a live allocation of at least size_of_val(dst) bytes.
        unsafe { cu::memcpy_dtoh_async(dst, src, stream.cu_stream()) }.check(&format!("copying {what} to the host"))
    }

    /// Fills `bytes` at `dst` with the byte `v` (poisoning in tests: 0xFF gives NaN).
    pub fn memset(&self, stream: &CudaStream, dst: u64, v: u8, bytes: usize) -> Result<()> {
        self.ctx.bind_to_thread().check("binding the CUDA context")?;
        // SAFETY: dst is a live allocation of at least `bytes` bytes.
        unsafe { cu::memset_d8_async(dst, v, bytes, stream.cu_stream()) }.check("memset on the device")
    }

    pub fn event(&self, timing: bool) -> Result<CudaEvent> {
        let flags = if timing {
            sys::CUevent_flags::CU_EVENT_DEFAULT
        } else {
            sys::CUevent_flags::CU_EVENT_DISABLE_TIMING
        };
        self.ctx.new_event(Some(flags)).check("creating a CUDA event")
    }

    /// Launches kernel `name` on `stream` with its parameters (the one parameter block
    /// `KernelArgs` of the inference kernels or `TrainArgs` of the training kernels, or
    /// the conversion kernels' three values); with `sync`, waits for it so that a fault
    /// is reported against this kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn launch(
        &self,
        stream: &CudaStream,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: usize,
        params: Params<'_>,
        sync: bool,
    ) -> Result<()> {
        let f = self.func(name)?;
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (block, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let mut b = stream.launch_builder(f);
        match params {
            Params::Infer(a) => b.arg(a),
            Params::Train(a) => b.arg(a),
            Params::Io(a) => b.arg(&a.src).arg(&a.dst).arg(&a.n),
        };
        // SAFETY: the parameters match the kernel's: the single RlnArgs / TrainArgs
        // parameter (same layout, checked size), or (in, out, n) of the conversions; every
        // pointer is a live device allocation sized for the launch's volume (infer.rs,
        // train.rs and predictor.rs size buffers from the same dims).
        unsafe { b.launch(cfg) }.check(&format!(
            "launching {name} (grid {grid:?}, {block} threads, {smem} B shared)"
        ))?;
        if sync {
            stream.synchronize().check(&format!("running {name} (grid {grid:?})"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The device's out-of-memory code is the typed error, found without a driver.
    #[test]
    fn out_of_memory_is_the_typed_error() {
        let e = driver_error("allocating 4 MiB", DriverError(sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY));
        assert!(matches!(e, Error::OutOfMemory(_)), "{e:?}");
        assert!(e.is_out_of_memory());
        assert!(e.to_string().contains("allocating 4 MiB"), "{e}");
        // CheckResult maps it the same way
        let r: std::result::Result<(), DriverError> = Err(DriverError(sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY));
        assert!(r.check("allocating").unwrap_err().is_out_of_memory());
    }
}
