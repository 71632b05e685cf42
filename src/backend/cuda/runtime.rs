//! The one CUDA runtime that inference ([`super::CudaInferBackend`]) and training
//! ([`super::CudaTrainBackend`]) are two uses of: the executor that owns the device's
//! compute stream ([`Exec`]: allocation, copies, launches, profiling), the byte accounting
//! of its allocations ([`Runtime`], [`DevMem`]), and the launch trace.
//!
//! - One allocator: the device's stream-ordered memory pool (cuMemAllocAsync /
//!   cuMemFreeAsync on the compute stream, release threshold raised so the pool keeps its
//!   memory): a training step allocates and frees ~150 tensors without a device
//!   synchronization, and so does an inference pass (one tensor per stage, freed after
//!   its last reader), tile after tile, reusing the pool's memory.
//! - One device tensor type ([`DevTensor`]): shape, storage type ([`Precision`]) and
//!   allocation; channels-last (N·D·H·W voxels × C).
//! - [`Exec`] has two implementations: [`CudaExec`] (the CUDA device: everything on its
//!   compute stream) and, in the unit tests, the CPU emulation of every kernel
//!   (emulate_train.rs for the training kernels, emulate_infer.rs for the inference ones),
//!   which runs the whole host side without a GPU.
//! - Every launch goes through [`Runtime::launch`], with its parameters ([`Params`]:
//!   `KernelArgs` of the inference kernels, `TrainArgs` of the training kernels, or the
//!   three values of the predictor's f16↔f32 tile conversions); the CUDA executor times it when profiling, and the runtime appends a line
//!   per launch to the trace when tracing ([`trace_line`]: kernel, grid, block, shared
//!   memory and every argument that is not a pointer, pointers as `*` or null `0`). The
//!   baselines of tests/data/launch-trace/ are such traces, recorded on the emulation.

use super::device::{CuCheck, CudaDevice};
use super::launch::KernelArgs;
pub use super::params::{IoArgs, Params};
use super::train_launch::{self as tl, TrainArgs};
use super::Precision;
use crate::error::{Error, Result};
use crate::tensor::{Shape, Tensor};
use cudarc::driver::result as cu;
use cudarc::driver::sys;
use cudarc::driver::{CudaEvent, CudaStream};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// One kernel launch: what the trace records and the executor runs.
#[derive(Clone, Copy, Debug)]
pub struct Launch<'a> {
    pub name: &'a str,
    pub grid: (u32, u32, u32),
    pub block: u32,
    /// Dynamic shared memory (bytes).
    pub smem: usize,
    pub params: Params<'a>,
}

/// Where memory lives and kernels run: the CUDA device (one stream), or, in the crate's
/// unit tests, a CPU emulation of the kernels, which checks the host side (parameter
/// blocks, grids, buffers, reductions) of inference and training without a GPU.
pub(crate) trait Exec: Send + Sync {
    /// Allocation (uninitialized), ordered on the compute stream.
    fn alloc(&self, bytes: usize) -> Result<u64>;
    /// Returns an allocation (after all work queued so far).
    fn free(&self, ptr: u64);
    fn memset(&self, ptr: u64, v: u8, bytes: usize) -> Result<()>;
    /// Enqueues a copy to the device; `src` may be dropped when this returns.
    fn htod(&self, dst: u64, src: &[u8]) -> Result<()>;
    /// Copies from the device and waits for the copy.
    fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<()>;
    /// Copies `src` into staging slot `slot`'s pinned host buffer and enqueues its copy
    /// to `dst` on the copy stream, after the compute work marked by the slot's last
    /// [`Exec::staged_read`]; the compute stream's later work waits for the copy.
    /// Default: an ordered [`Exec::htod`].
    fn htod_staged(&self, _slot: usize, dst: u64, src: &[u8]) -> Result<()> {
        self.htod(dst, src)
    }
    /// Marks the compute work enqueued so far as the last reader of slot `slot`'s destination.
    fn staged_read(&self, _slot: usize) -> Result<()> {
        Ok(())
    }
    /// A training kernel (kernels/train_*.cu), `tl::THREADS` threads a block.
    fn launch(&self, name: &str, grid: (u32, u32, u32), smem: usize, args: &TrainArgs) -> Result<()>;
    /// An inference kernel (kernels/h*.cu).
    fn launch_infer(
        &self,
        name: &str,
        _grid: (u32, u32, u32),
        _block: u32,
        _smem: usize,
        _args: &KernelArgs,
    ) -> Result<()> {
        Err(Error::Cuda(format!(
            "this executor runs only the training kernels; {name} is an inference kernel"
        )))
    }
    /// A conversion kernel (kernels/io_half.cu).
    fn launch_io(&self, name: &str, _grid: (u32, u32, u32), _block: u32, _args: &IoArgs) -> Result<()> {
        Err(Error::Cuda(format!("this executor has no conversion kernel {name}")))
    }
    /// Waits for the compute stream.
    fn synchronize(&self) -> Result<()>;
    /// Waits for every stream of the device (before memory another stream may still
    /// use is freed).
    fn synchronize_device(&self) -> Result<()> {
        self.synchronize()
    }
    /// Returns the memory the pool holds but nothing uses to the device (so that the
    /// driver's free-memory count includes it).
    fn trim(&self) -> Result<()> {
        Ok(())
    }
    fn start_profile(&self) {}
    fn take_profile(&self) -> Result<Vec<(String, f64)>> {
        Ok(vec![])
    }

    // ---- graphs: the compute stream's work recorded once and replayed ----
    /// Starts recording the work enqueued from now on into a graph instead of running it
    /// (allocations and frees included: memory allocated and freed inside the capture has
    /// the same address in every replay).
    fn begin_capture(&self) -> Result<()> {
        Err(Error::Cuda("this executor cannot capture graphs".into()))
    }
    /// Ends the recording: the graph's id, for [`Exec::replay`] and [`Exec::drop_graph`].
    fn end_capture(&self) -> Result<u64> {
        Err(Error::Cuda("this executor cannot capture graphs".into()))
    }
    /// Ends the recording and discards it (after a refused operation).
    fn abort_capture(&self) {}
    /// Enqueues one run of a captured graph on the compute stream.
    fn replay(&self, _graph: u64) -> Result<()> {
        Err(Error::Cuda("this executor cannot replay graphs".into()))
    }
    /// Releases a graph (after the work queued so far).
    fn drop_graph(&self, _graph: u64) {}
}

/// A captured graph of the CUDA executor. cudarc's graph holds raw driver handles and is
/// not `Send`; the executor keeps its graphs behind a mutex and touches each from one
/// thread at a time (the driver's rule for graph objects), so moving it between threads
/// is sound.
struct SendGraph(cudarc::driver::CudaGraph);
// SAFETY: see the type's comment: every access goes through CudaExec::graphs' mutex.
unsafe impl Send for SendGraph {}

/// One recorded launch of a profiled run: kernel name and its start/end events.
type ProfileEvents = Vec<(String, CudaEvent, CudaEvent)>;

/// A staging slot of [`Exec::htod_staged`]: its pinned buffer, the event after its last
/// copy (the buffer may be refilled after it) and the event after its destination's last
/// reader on the compute stream (the next copy waits for it).
#[derive(Default)]
struct Staging {
    pinned: Option<super::device::PinnedBuf>,
    copied: Option<CudaEvent>,
    read: Option<CudaEvent>,
}

impl Drop for Staging {
    fn drop(&mut self) {
        // the pinned memory may not be freed under a copy still in flight
        if let Some(e) = &self.copied {
            let _ = e.synchronize();
        }
    }
}

/// The CUDA device: every allocation, copy and launch on its compute stream.
pub(crate) struct CudaExec {
    dev: Arc<CudaDevice>,
    stream: Arc<CudaStream>,
    sync_each: bool,
    profile: Mutex<Option<ProfileEvents>>,
    /// Instantiated graphs by id.
    graphs: Mutex<std::collections::HashMap<u64, SendGraph>>,
    /// A capture is under way (no synchronization after a launch then).
    capturing: std::sync::atomic::AtomicBool,
    next_graph: std::sync::atomic::AtomicU64,
    /// Staging slots of the training loop's batch uploads, by slot.
    staging: Mutex<std::collections::HashMap<usize, Staging>>,
}

impl CudaExec {
    /// The executor on `dev`'s compute stream. Allocations come from the device's
    /// default memory pool, whose release threshold is raised so that freed memory stays
    /// in the pool.
    pub fn new(dev: Arc<CudaDevice>, sync_each: bool) -> Result<Self> {
        let ctx = dev.ctx.clone();
        ctx.bind_to_thread().check("binding the CUDA context")?;
        if !ctx.has_async_alloc() {
            return Err(Error::Cuda(format!(
                "{} does not support stream-ordered allocation (cuMemAllocAsync), which the CUDA backend needs",
                dev.name
            )));
        }
        // SAFETY: the device handle comes from the live context; the attribute is a u64.
        unsafe {
            let pool = Self::pool(&dev)?;
            let mut threshold: u64 = u64::MAX;
            cu::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut threshold as *mut u64 as *mut std::ffi::c_void,
            )
            .check("raising the memory pool's release threshold")?;
        }
        Ok(CudaExec {
            stream: dev.compute.clone(),
            dev,
            sync_each,
            profile: Mutex::new(None),
            graphs: Mutex::new(Default::default()),
            capturing: Default::default(),
            next_graph: std::sync::atomic::AtomicU64::new(1),
            staging: Mutex::new(Default::default()),
        })
    }

    /// The device's default memory pool.
    fn pool(dev: &CudaDevice) -> Result<sys::CUmemoryPool> {
        // SAFETY: the device handle comes from the live context.
        unsafe { cu::device::get_default_mem_pool(dev.ctx.cu_device()) }.check("getting the default memory pool")
    }

    /// The one launch path of every kernel: an event pair around it when profiling.
    fn run(&self, name: &str, grid: (u32, u32, u32), block: u32, smem: usize, args: Params<'_>) -> Result<()> {
        let mut prof = self.profile.lock().unwrap();
        let start = match prof.as_ref() {
            Some(_) => {
                let e = self.dev.event(true)?;
                e.record(&self.stream).check("recording an event")?;
                Some(e)
            }
            None => None,
        };
        self.dev.launch(
            &self.stream,
            name,
            grid,
            block,
            smem,
            args,
            self.sync_each && !self.capturing.load(Ordering::Relaxed),
        )?;
        if let (Some(a), Some(p)) = (start, prof.as_mut()) {
            let b = self.dev.event(true)?;
            b.record(&self.stream).check("recording an event")?;
            p.push((name.to_string(), a, b));
        }
        Ok(())
    }
}

impl Exec for CudaExec {
    fn alloc(&self, bytes: usize) -> Result<u64> {
        self.dev.ctx.bind_to_thread().check("binding the CUDA context")?;
        // SAFETY: stream-ordered allocation on this stream; the memory is used only
        // through DevMem, on this stream or (the predictor's copies) on others after a
        // synchronization.
        unsafe { cu::malloc_async(self.stream.cu_stream(), bytes) }
            .check(&format!("allocating {} MiB of device memory", bytes.div_ceil(1 << 20)))
    }
    fn free(&self, ptr: u64) {
        // errors cannot be reported from drop; a failed free leaks, nothing worse
        let _ = self.dev.ctx.bind_to_thread();
        // SAFETY: ptr came from malloc_async and is freed once; every use of it was
        // enqueued on this stream before this free, or has completed.
        let _ = unsafe { cu::free_async(ptr, self.stream.cu_stream()) };
    }
    fn memset(&self, ptr: u64, v: u8, bytes: usize) -> Result<()> {
        self.dev.memset(&self.stream, ptr, v, bytes)
    }
    fn htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        // pageable source: the driver stages it before returning, so `src` may go away
        self.dev.copy_htod(&self.stream, dst, src, "data")
    }
    fn dtoh(&self, dst: &mut [u8], src: u64) -> Result<()> {
        self.dev.copy_dtoh(&self.stream, dst, src, "data")?;
        self.synchronize()
    }
    fn htod_staged(&self, slot: usize, dst: u64, src: &[u8]) -> Result<()> {
        let mut all = self.staging.lock().unwrap();
        let s = all.entry(slot).or_default();
        if let Some(e) = &s.copied {
            // the previous copy from this buffer (two steps ago: long done when the loop
            // runs ahead by one step) must be done before the buffer is refilled or freed
            e.synchronize()
                .check("waiting for the previous upload from a pinned buffer")?;
        }
        let words = src.len().div_ceil(4);
        if s.pinned.as_ref().is_none_or(|p| p.len() < words) {
            s.pinned = Some(self.dev.alloc_pinned(words)?);
        }
        let pinned = s.pinned.as_mut().expect("allocated above");
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(pinned.as_mut_slice());
        bytes[..src.len()].copy_from_slice(src);
        let h2d = &self.dev.h2d;
        if let Some(e) = &s.read {
            h2d.wait(e)
                .check("ordering a batch upload after the step that read its buffer")?;
        }
        self.dev
            .copy_htod(h2d, dst, &bytes[..src.len()], "a batch (pinned, copy stream)")?;
        let ev = match s.copied.take() {
            Some(e) => e,
            None => self.dev.event(false)?,
        };
        ev.record(h2d).check("recording an event")?;
        self.stream
            .wait(&ev)
            .check("ordering the step after its batch upload")?;
        s.copied = Some(ev);
        Ok(())
    }
    fn staged_read(&self, slot: usize) -> Result<()> {
        let mut all = self.staging.lock().unwrap();
        let s = all.entry(slot).or_default();
        let ev = match s.read.take() {
            Some(e) => e,
            None => self.dev.event(false)?,
        };
        ev.record(&self.stream).check("recording an event")?;
        s.read = Some(ev);
        Ok(())
    }
    fn launch(&self, name: &str, grid: (u32, u32, u32), smem: usize, args: &TrainArgs) -> Result<()> {
        self.run(name, grid, tl::THREADS, smem, Params::Train(args))
    }
    fn launch_infer(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        smem: usize,
        args: &KernelArgs,
    ) -> Result<()> {
        self.run(name, grid, block, smem, Params::Infer(args))
    }
    fn launch_io(&self, name: &str, grid: (u32, u32, u32), block: u32, args: &IoArgs) -> Result<()> {
        self.run(name, grid, block, 0, Params::Io(args))
    }
    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().check("waiting for the device")
    }
    fn synchronize_device(&self) -> Result<()> {
        self.dev
            .ctx
            .synchronize()
            .check("waiting for the device before growing a buffer")
    }
    fn trim(&self) -> Result<()> {
        // frees enqueued on the stream return their memory to the pool when they run
        self.synchronize()?;
        // SAFETY: the pool is the live device's default pool.
        unsafe { cu::mem_pool::trim_to(Self::pool(&self.dev)?, 0) }.check("trimming the memory pool")
    }
    fn start_profile(&self) {
        *self.profile.lock().unwrap() = Some(Vec::new());
    }
    fn take_profile(&self) -> Result<Vec<(String, f64)>> {
        let Some(p) = self.profile.lock().unwrap().take() else {
            return Ok(vec![]);
        };
        self.synchronize()?;
        p.iter()
            .map(|(n, a, b)| Ok((n.clone(), a.elapsed_ms(b).check("reading kernel timings")? as f64)))
            .collect()
    }
    fn begin_capture(&self) -> Result<()> {
        // thread-local mode: the host threads that cut batches meanwhile make no CUDA
        // calls, and a call of this thread that is illegal in a capture fails at once
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .check("starting a graph capture")?;
        self.capturing.store(true, Ordering::Relaxed);
        Ok(())
    }
    fn end_capture(&self) -> Result<u64> {
        self.capturing.store(false, Ordering::Relaxed);
        let g = self
            .stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .check("ending the graph capture")?
            .ok_or_else(|| Error::Cuda("the graph capture recorded nothing".into()))?;
        // the graph's first launch would otherwise upload it
        g.upload().check("uploading the captured graph")?;
        let id = self.next_graph.fetch_add(1, Ordering::Relaxed);
        self.graphs.lock().unwrap().insert(id, SendGraph(g));
        Ok(id)
    }
    fn abort_capture(&self) {
        self.capturing.store(false, Ordering::Relaxed);
        // an invalidated capture ends with an error; either way nothing is kept
        let _ = self.stream.end_capture(sys::CUgraphInstantiate_flags(0));
    }
    fn replay(&self, graph: u64) -> Result<()> {
        let graphs = self.graphs.lock().unwrap();
        let g = graphs
            .get(&graph)
            .ok_or_else(|| Error::Cuda(format!("no captured graph {graph}")))?;
        g.0.launch().check("launching the captured graph")?;
        if self.sync_each {
            self.synchronize()?;
        }
        Ok(())
    }
    fn drop_graph(&self, graph: u64) {
        // a graph still running is freed when it completes (cuGraphExecDestroy)
        drop(self.graphs.lock().unwrap().remove(&graph));
    }
}

/// The executor, the byte accounting of its allocations, and the launch trace.
pub struct Runtime {
    exec: Arc<dyn Exec>,
    dev: Option<Arc<CudaDevice>>,
    /// Fill every new allocation with 0xFF bytes (NaN in f32 and f16), so that a kernel
    /// that leaves an element unwritten shows up as a non-finite value (tests).
    poison: bool,
    live: AtomicUsize,
    peak: AtomicUsize,
    trace: Mutex<Option<Vec<String>>>,
    /// Launches recorded by the capture under way.
    capture_launches: AtomicUsize,
    /// The capture under way (see [`Runtime::begin_capture`]).
    capture: Mutex<Option<CaptureBook>>,
}

/// What a capture under way has allocated, and the first thing it did that a graph
/// cannot do.
#[derive(Default)]
struct CaptureBook {
    /// Allocations made during the capture and not yet freed.
    allocated: std::collections::HashSet<u64>,
    /// Frees, during the capture, of memory allocated before it: each replay would free
    /// it again.
    foreign_frees: usize,
}

/// A step recorded once by [`Runtime::begin_capture`] / [`Runtime::end_capture`] and
/// replayed by [`StepGraph::replay`]: every kernel with the parameters it had when it
/// was captured, on the same addresses (the memory it allocated and freed inside the
/// capture included). What changes between replays must be written into fixed device
/// buffers before each replay (the batch, lr_t).
pub struct StepGraph {
    id: u64,
    rt: Arc<Runtime>,
    /// Launches recorded.
    launches: usize,
}

impl StepGraph {
    /// Enqueues one run of the graph (no synchronization).
    pub fn replay(&self) -> Result<()> {
        if self.rt.capture.lock().unwrap().is_some() {
            return Err(Error::Cuda(
                "a captured graph cannot be replayed inside another capture".into(),
            ));
        }
        self.rt.exec.replay(self.id)
    }
    /// Kernel launches in the graph.
    pub fn launches(&self) -> usize {
        self.launches
    }
}

impl crate::backend::StepReplay for StepGraph {
    fn replay(&self) -> Result<()> {
        StepGraph::replay(self)
    }
    fn launches(&self) -> usize {
        self.launches
    }
}

impl Drop for StepGraph {
    fn drop(&mut self) {
        self.rt.exec.drop_graph(self.id);
    }
}

/// An allocation of a [`Runtime`], returned to it (in stream order) on drop.
pub struct DevMem {
    ptr: u64,
    bytes: usize,
    rt: Arc<Runtime>,
}

impl DevMem {
    /// The device address of the first byte.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// The runtime it belongs to.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.rt
    }
}

/// A tensor on the device: channels-last (N·D·H·W voxels × C), values stored as `dtype`.
pub struct DevTensor {
    /// (Read directly by the backends of this module.)
    pub(super) shape: Shape,
    dtype: Precision,
    mem: DevMem,
}

impl DevTensor {
    pub fn shape(&self) -> Shape {
        self.shape
    }
    pub fn dtype(&self) -> Precision {
        self.dtype
    }
    /// The device address of the first value.
    pub fn ptr(&self) -> u64 {
        self.mem.ptr
    }
    /// A tensor of `shape` stored as `dtype` in `mem`, an allocation at least its size (a
    /// buffer reused from tile to tile).
    pub fn in_mem(mem: DevMem, shape: Shape, dtype: Precision) -> Result<DevTensor> {
        let need = shape.len() * dtype.bytes();
        if mem.bytes < need {
            return Err(Error::invalid(format!(
                "a {shape} tensor of {dtype:?} needs {need} bytes; the buffer holds {}",
                mem.bytes
            )));
        }
        Ok(DevTensor { shape, dtype, mem })
    }
    /// The allocation back (to reuse it).
    pub fn into_mem(self) -> DevMem {
        self.mem
    }
}

impl Drop for DevMem {
    fn drop(&mut self) {
        if let Some(book) = self.rt.capture.lock().unwrap().as_mut() {
            if !book.allocated.remove(&self.ptr) {
                book.foreign_frees += 1;
            }
        }
        self.rt.exec.free(self.ptr);
        self.rt.live.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl Runtime {
    /// The runtime on an opened device: with `sync_each`, a synchronization after every
    /// launch (a fault is reported against its kernel); with `poison`, NaN-filled
    /// allocations.
    pub fn cuda(dev: Arc<CudaDevice>, sync_each: bool, poison: bool) -> Result<Arc<Runtime>> {
        let exec = CudaExec::new(dev.clone(), sync_each)?;
        Ok(Arc::new(Runtime {
            exec: Arc::new(exec),
            dev: Some(dev),
            poison,
            live: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            trace: Mutex::new(None),
            capture_launches: AtomicUsize::new(0),
            capture: Mutex::new(None),
        }))
    }

    /// The runtime on another executor (the CPU emulation of the unit tests).
    #[cfg(test)]
    pub(crate) fn on_exec(exec: Arc<dyn Exec>, poison: bool) -> Arc<Runtime> {
        Arc::new(Runtime {
            exec,
            dev: None,
            poison,
            live: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            trace: Mutex::new(None),
            capture_launches: AtomicUsize::new(0),
            capture: Mutex::new(None),
        })
    }

    /// The CUDA device (None for the emulation of the unit tests).
    /// Whether new allocations are NaN-filled (see [`Runtime::cuda`]).
    pub fn poisons(&self) -> bool {
        self.poison
    }
    pub fn device(&self) -> Option<&Arc<CudaDevice>> {
        self.dev.as_ref()
    }

    /// "NVIDIA H100 … (sm_90, 132 SMs)", or what the emulation is.
    pub fn describe(&self) -> String {
        self.dev
            .as_ref()
            .map(|d| d.describe())
            .unwrap_or_else(|| "CPU emulation of the CUDA kernels".into())
    }

    /// `bytes` of device memory (at least 16), uninitialized (NaN bytes when poisoning).
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<DevMem> {
        let bytes = bytes.max(16);
        let ptr = self.exec.alloc(bytes)?;
        if let Some(book) = self.capture.lock().unwrap().as_mut() {
            book.allocated.insert(ptr);
        }
        let mem = DevMem {
            ptr,
            bytes,
            rt: self.clone(),
        };
        let now = self.live.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
        if self.poison {
            self.exec.memset(ptr, 0xFF, bytes)?;
        }
        Ok(mem)
    }

    /// An uninitialized tensor (NaN when poisoning).
    pub fn tensor(self: &Arc<Self>, shape: Shape, dtype: Precision) -> Result<DevTensor> {
        Ok(DevTensor {
            shape,
            dtype,
            mem: self.alloc(shape.len() * dtype.bytes())?,
        })
    }

    /// A host tensor (N×C×D×H×W) on the device: channels-last, stored as `dtype` (f16:
    /// rounded to nearest even). The copy is enqueued.
    pub fn upload_tensor(self: &Arc<Self>, t: &Tensor<f32>, dtype: Precision) -> Result<DevTensor> {
        let dt = self.tensor(t.shape, dtype)?;
        let cl = t.to_ndhwc();
        match dtype {
            Precision::F32 => self.htod(dt.ptr(), &cl)?,
            Precision::F16 | Precision::Bf16 => {
                let h: Vec<u16> = cl.iter().map(|&v| dtype.bits16(v)).collect();
                self.htod(dt.ptr(), &h)?
            }
        }
        Ok(dt)
    }

    /// A device tensor on the host (N×C×D×H×W, f32); waits for the device.
    pub fn download_tensor(&self, x: &DevTensor) -> Result<Tensor<f32>> {
        let data: Vec<f32> = match x.dtype {
            Precision::F32 => {
                let mut v = vec![0f32; x.shape.len()];
                self.dtoh(&mut v, x.ptr())?;
                v
            }
            Precision::F16 | Precision::Bf16 => {
                let mut h = vec![0u16; x.shape.len()];
                self.dtoh(&mut h, x.ptr())?;
                h.iter().map(|&b| x.dtype.from_bits16(b)).collect()
            }
        };
        Tensor::from_ndhwc(x.shape, &data)
    }

    /// A new allocation holding `data` (the copy is enqueued; `data` may go away).
    pub fn upload<T: bytemuck::Pod>(self: &Arc<Self>, data: &[T]) -> Result<DevMem> {
        let m = self.alloc(std::mem::size_of_val(data))?;
        self.htod(m.ptr, data)?;
        Ok(m)
    }

    /// Enqueues a copy of `src` to device address `dst`.
    pub fn htod<T: bytemuck::Pod>(&self, dst: u64, src: &[T]) -> Result<()> {
        self.refuse_in_capture(|| format!("an upload of {} bytes", std::mem::size_of_val(src)))?;
        self.exec.htod(dst, bytemuck::cast_slice(src))
    }

    /// [`Exec::htod_staged`]: an upload of `src` into the fixed buffer at `dst` through
    /// staging slot `slot` (pinned memory, copy stream), ordered after the slot's last
    /// [`Runtime::staged_read`] and before the work enqueued afterwards.
    pub fn htod_staged<T: bytemuck::Pod>(&self, slot: usize, dst: u64, src: &[T]) -> Result<()> {
        self.refuse_in_capture(|| format!("an upload of {} bytes", std::mem::size_of_val(src)))?;
        self.exec.htod_staged(slot, dst, bytemuck::cast_slice(src))
    }

    /// Marks the work enqueued so far as the last reader of staging slot `slot`'s buffer.
    pub fn staged_read(&self, slot: usize) -> Result<()> {
        self.refuse_in_capture(|| "recording a batch buffer's last reader".to_string())?;
        self.exec.staged_read(slot)
    }

    /// Copies from device address `src` into `dst` and waits for the copy.
    pub fn dtoh<T: bytemuck::Pod>(&self, dst: &mut [T], src: u64) -> Result<()> {
        self.refuse_in_capture(|| {
            format!(
                "a device-to-host copy of {} bytes (and the wait for it)",
                std::mem::size_of_val(dst)
            )
        })?;
        self.exec.dtoh(bytemuck::cast_slice_mut(dst), src)
    }

    /// Starts capturing: from now on this runtime's allocations, frees, memsets and
    /// launches are recorded into a graph (see [`StepGraph`]) instead of run. A copy to
    /// or from host memory or a wait for the device during the capture is refused with an
    /// error (and ends the capture): a graph runs without the host, and uploads go into
    /// fixed device buffers before each replay.
    pub fn begin_capture(&self) -> Result<()> {
        let mut cap = self.capture.lock().unwrap();
        if cap.is_some() {
            return Err(Error::Cuda("a graph capture is already under way".into()));
        }
        self.exec.begin_capture()?;
        *cap = Some(CaptureBook::default());
        Ok(())
    }

    /// Whether a capture is under way.
    pub fn capturing(&self) -> bool {
        self.capture.lock().unwrap().is_some()
    }

    /// Ends the capture: the graph, ready to replay. Refused (and the recording dropped)
    /// when the captured work left memory it allocated alive (a replay could not reuse
    /// its addresses) or freed memory allocated before the capture.
    pub fn end_capture(self: &Arc<Self>) -> Result<StepGraph> {
        let book = self
            .capture
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| Error::Cuda("no graph capture is under way".into()))?;
        if !book.allocated.is_empty() || book.foreign_frees > 0 {
            self.exec.abort_capture();
            return Err(Error::Cuda(format!(
                "the captured work cannot be a graph: {} allocation(s) made during the capture are still alive and {} \
                 allocation(s) made before it were freed in it (allocate the step's lasting buffers before capturing)",
                book.allocated.len(),
                book.foreign_frees
            )));
        }
        let launches = self.capture_launches.swap(0, Ordering::Relaxed);
        let id = self.exec.end_capture()?;
        Ok(StepGraph {
            id,
            rt: self.clone(),
            launches,
        })
    }

    /// An error, and the capture dropped, when `what` is attempted during a capture.
    fn refuse_in_capture(&self, what: impl FnOnce() -> String) -> Result<()> {
        let mut cap = self.capture.lock().unwrap();
        if cap.is_none() {
            return Ok(());
        }
        *cap = None;
        self.capture_launches.store(0, Ordering::Relaxed);
        self.exec.abort_capture();
        Err(Error::Cuda(format!(
            "{} during a graph capture: a captured step must run on the device alone, without \
             host copies or waits (upload into fixed buffers before the replay, read results after it); \
             the capture was abandoned",
            what()
        )))
    }

    pub fn memset(&self, ptr: u64, v: u8, bytes: usize) -> Result<()> {
        self.exec.memset(ptr, v, bytes)
    }

    /// Runs one kernel (and records it when tracing).
    pub fn launch(&self, l: &Launch<'_>) -> Result<()> {
        if let Some(t) = self.trace.lock().unwrap().as_mut() {
            t.push(trace_line(l));
        }
        if self.capture.lock().unwrap().is_some() {
            self.capture_launches.fetch_add(1, Ordering::Relaxed);
        }
        match l.params {
            Params::Infer(a) => self.exec.launch_infer(l.name, l.grid, l.block, l.smem, a),
            Params::Train(a) => {
                if l.block != tl::THREADS {
                    return Err(Error::Cuda(format!(
                        "{}: the training kernels run {} threads a block, not {}",
                        l.name,
                        tl::THREADS,
                        l.block
                    )));
                }
                self.exec.launch(l.name, l.grid, l.smem, a)
            }
            Params::Io(a) => self.exec.launch_io(l.name, l.grid, l.block, a),
        }
    }

    /// Waits for all work queued on the compute stream.
    pub fn synchronize(&self) -> Result<()> {
        self.refuse_in_capture(|| "a wait for the device".into())?;
        self.exec.synchronize()
    }

    /// Waits for every stream of the device.
    pub fn synchronize_device(&self) -> Result<()> {
        self.refuse_in_capture(|| "a wait for the device".into())?;
        self.exec.synchronize_device()
    }

    /// Waits for the compute stream and returns the pool's unused memory to the device,
    /// so that the driver's count of free memory includes it (before planning sizes).
    pub fn trim(&self) -> Result<()> {
        self.refuse_in_capture(|| "trimming the memory pool".into())?;
        self.exec.trim()
    }

    /// Bytes allocated now, and at most since the last [`Self::reset_peak`].
    pub fn mem_bytes(&self) -> (usize, usize) {
        (self.live.load(Ordering::Relaxed), self.peak.load(Ordering::Relaxed))
    }
    pub fn reset_peak(&self) {
        self.peak.store(self.live.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// Starts recording an event pair around every launch (see [`Self::take_profile`]).
    pub fn start_profile(&self) {
        self.exec.start_profile()
    }

    /// Waits for the profiled launches; returns (kernel, milliseconds) in launch order.
    pub fn take_profile(&self) -> Result<Vec<(String, f64)>> {
        self.exec.take_profile()
    }

    /// Starts recording one [`trace_line`] per launch.
    pub fn start_trace(&self) {
        *self.trace.lock().unwrap() = Some(Vec::new());
    }

    /// The lines recorded since [`Self::start_trace`] (and stops recording).
    pub fn take_trace(&self) -> Vec<String> {
        self.trace.lock().unwrap().take().unwrap_or_default()
    }
}

/// A pointer as the trace shows it: null or not.
fn ptr(p: u64) -> &'static str {
    if p == 0 {
        "0"
    } else {
        "*"
    }
}

/// A list of values as the trace shows it: `[a,b,…]`, a run of equal values at the end
/// as `v×k`.
fn list<T: std::fmt::Debug + PartialEq>(v: &[T]) -> String {
    let mut end = v.len();
    while end > 1 && v[end - 1] == v[end - 2] {
        end -= 1;
    }
    let mut s = String::from("[");
    for (i, x) in v[..end].iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(s, "{x:?}");
    }
    if end < v.len() {
        let _ = write!(s, "×{}", v.len() - end + 1);
    }
    s.push(']');
    s
}

/// One launch as a line of text: kernel, grid, block, shared memory, then every field of
/// the parameter block (pointers as `*`, or `0` when null; floats in Rust's shortest
/// round-trip form).
pub fn trace_line(l: &Launch<'_>) -> String {
    let (gx, gy, gz) = l.grid;
    let mut s = format!("{} grid={gx},{gy},{gz} block={} smem={}", l.name, l.block, l.smem);
    match l.params {
        Params::Infer(a) => {
            let _ = write!(
                s,
                " in={},{},{} wt={} bias={} aux={} out={} out_raw={} ndhw={},{},{},{} post={:?},{:?} eps={:?}",
                ptr(a.in0),
                ptr(a.in1),
                ptr(a.in2),
                ptr(a.wt),
                ptr(a.bias),
                ptr(a.aux),
                ptr(a.out),
                ptr(a.out_raw),
                a.n,
                a.d,
                a.h,
                a.w,
                a.post_scale,
                a.post_shift,
                a.eps
            );
        }
        Params::Train(a) => {
            let _ = write!(
                s,
                " inp={},{},{},{} out={},{},{} wt={} part={} stat={} count={} ndhw={},{},{},{} c={},{},{},{} mode={} k={},{},{} f={} dc={}",
                ptr(a.inp[0]),
                ptr(a.inp[1]),
                ptr(a.inp[2]),
                ptr(a.inp[3]),
                ptr(a.out[0]),
                ptr(a.out[1]),
                ptr(a.out[2]),
                ptr(a.wt),
                ptr(a.part),
                ptr(a.stat),
                a.count,
                a.n,
                a.d,
                a.h,
                a.w,
                a.ca,
                a.cb,
                a.cc,
                a.cout,
                a.mode,
                a.k0,
                a.k1,
                a.k2,
                list(&a.f),
                list(&a.dc)
            );
            for (i, p) in a.p.iter().enumerate() {
                let _ = write!(s, " p{i}={}", list(p));
            }
        }
        Params::Io(a) => {
            let _ = write!(s, " src={} dst={} n={}", ptr(a.src), ptr(a.dst), a.n);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_lines_show_every_value_and_no_address() {
        let a = KernelArgs {
            in0: 0x7f00_1000,
            out: 0x7f00_2000,
            n: 1,
            d: 2,
            h: 3,
            w: 4,
            post_scale: 0.5,
            post_shift: -1.25,
            eps: 1e-4,
            ..Default::default()
        };
        let l = Launch {
            name: "k",
            grid: (1, 2, 3),
            block: 256,
            smem: 96,
            params: Params::Infer(&a),
        };
        assert_eq!(
            trace_line(&l),
            "k grid=1,2,3 block=256 smem=96 in=*,0,0 wt=0 bias=0 aux=0 out=* out_raw=0 ndhw=1,2,3,4 post=0.5,-1.25 eps=0.0001"
        );
        let mut t = TrainArgs::default();
        t.p[0] = [1.0; 16];
        t.p[1][0] = 2.5;
        t.dc[1] = 3.0;
        let l = Launch {
            params: Params::Train(&t),
            ..l
        };
        let s = trace_line(&l);
        assert!(s.contains(" dc=[0.0,3.0,0.0×6]"), "{s}");
        assert!(s.contains(" p0=[1.0×16] p1=[2.5,0.0×15]"), "{s}");
        assert_eq!(list(&[1, 2]), "[1,2]");
        let io = IoArgs { src: 8, dst: 0, n: 5 };
        let l = Launch {
            params: Params::Io(&io),
            ..l
        };
        assert!(trace_line(&l).ends_with(" src=* dst=0 n=5"), "{}", trace_line(&l));
    }
}
