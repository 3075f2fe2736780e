//! KV blocks from one CUDA pool straight into another on the same node: same GPU, a peer GPU of
//! this process (`cuCtxEnablePeerAccess`), or another process's pool opened from its CUDA IPC
//! handle (`cuIpcOpenMemHandle`). Nothing is staged through the host.
//!
//! A [`CudaKvCopier`] lives on the source GPU and pushes: one `kv_copy_blocks` launch moves every
//! (source block, destination block) pair for all layers, K and V, of one [`HeadRoute`] (a run of
//! heads; TP1 → TP2 is two routes, TP2 → TP1 two, see [`plan::head_routes`]). The kernel writes
//! through NVLink into the peer's memory (or, for [`staged::DeviceKv::copy_into`], a copier on the
//! destination GPU pulls from the source). `docs/kv-transfer.md` has the measured rates.

pub mod plan;
pub mod pool;
pub mod staged;

pub use pool::{device_by_uuid, device_uuid, export_ipc, read_blocks, CudaIpcPool, OwnedKvPool};
pub use staged::{device_kv_imports, live_staging_buffers, DeviceKv};

use crate::backend::cuda::backend::LayerKvHook;
use crate::backend::cuda::device::DeviceBuffer;
use crate::backend::cuda::kernels::{cubin_cached, launch, Arg, Kernel, MODULES};
use crate::backend::CudaKvPool;
use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::driver::{result, sys, CudaContext, CudaStream};
use parking_lot::Mutex;
use plan::{flatten_pairs, geometry, HeadRoute};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::ops::Range;
use std::sync::Arc;

const THREADS: u32 = 256;
/// Bytes one thread block of the kernel copies (its `KV_COPY_CHUNK`).
const CHUNK: usize = THREADS as usize * 4 * 16;

/// A mapping of another process's pool, closed on drop.
struct IpcMapping {
    ptr: u64,
    ctx: Arc<CudaContext>,
}

impl Drop for IpcMapping {
    fn drop(&mut self) {
        // SAFETY: opened by cuIpcOpenMemHandle in this context, closed once.
        unsafe {
            if self.ctx.bind_to_thread().is_ok() {
                let _ = sys::cuIpcCloseMemHandle(self.ptr);
            }
        }
    }
}

/// Copies KV blocks from pools on one GPU into pools it can reach. Not `Sync`: one stream.
pub struct CudaKvCopier {
    // Field order is drop order: device memory and mappings before the contexts.
    pairs: Option<DeviceBuffer>,
    num_pairs: usize,
    mappings: HashMap<Vec<u8>, (IpcMapping, CudaKvPool)>,
    module: sys::CUmodule,
    func: sys::CUfunction,
    stream: Arc<CudaStream>,
    peers: HashMap<usize, Arc<CudaContext>>,
    ctx: Arc<CudaContext>,
}

// The raw handles belong to this copier and are used through `&mut self` or its stream.
unsafe impl Send for CudaKvCopier {}

impl CudaKvCopier {
    /// A copier on GPU `device` (the source pools' GPU), with its own stream.
    pub fn new(device: usize) -> Result<Self> {
        let ctx =
            CudaContext::new(device).with_context(|| format!("opening CUDA device {device}"))?;
        ctx.bind_to_thread()?;
        let src = MODULES
            .iter()
            .find(|(name, _)| *name == "kv_copy")
            .map(|(_, src)| *src)
            .ok_or_else(|| anyhow!("kv_copy kernel module not registered"))?;
        let cubin = cubin_cached("kv_copy", src)?;
        // SAFETY: a cubin NVRTC produced; the name exists in the module or this is an error.
        let (module, func) = unsafe {
            let module = result::module::load_data(cubin.as_ptr() as *const c_void)?;
            let func = result::module::get_function(module, CString::new("kv_copy_blocks")?)?;
            (module, func)
        };
        let stream = ctx.new_stream()?;
        Ok(Self {
            pairs: None,
            num_pairs: 0,
            mappings: HashMap::new(),
            module,
            func,
            stream,
            peers: HashMap::new(),
            ctx,
        })
    }

    pub fn device(&self) -> usize {
        self.ctx.ordinal()
    }

    pub fn stream(&self) -> sys::CUstream {
        self.stream.cu_stream()
    }

    /// Lets kernels on this GPU read and write memory of GPU `peer` (same process).
    pub fn enable_peer(&mut self, peer: usize) -> Result<()> {
        if peer == self.device() || self.peers.contains_key(&peer) {
            return Ok(());
        }
        let (dev, peer_dev) = (
            result::device::get(self.device() as i32)?,
            result::device::get(peer as i32)?,
        );
        let mut can = 0;
        // SAFETY: plain out-parameter.
        unsafe { sys::cuDeviceCanAccessPeer(&mut can, dev, peer_dev) }.result()?;
        ensure!(
            can == 1,
            "GPU {} cannot access GPU {peer} as a peer",
            self.device()
        );
        let peer_ctx = CudaContext::new(peer)?;
        self.ctx.bind_to_thread()?;
        // SAFETY: both contexts are live; enabling twice reports ALREADY_ENABLED, which is fine.
        match unsafe { sys::cuCtxEnablePeerAccess(peer_ctx.cu_ctx(), 0) } {
            sys::CUresult::CUDA_SUCCESS | sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => {
            }
            e => bail!("cuCtxEnablePeerAccess {} -> {peer}: {e:?}", self.device()),
        }
        self.peers.insert(peer, peer_ctx);
        Ok(())
    }

    /// Maps another process's pool (once; later calls reuse the mapping) and returns it as a pool
    /// this copier can write.
    pub fn open_ipc(&mut self, remote: &CudaIpcPool) -> Result<CudaKvPool> {
        if let Some((_, pool)) = self.mappings.get(&remote.handle) {
            return Ok(*pool);
        }
        ensure!(
            remote.handle.len() == 64,
            "a CUDA IPC handle has 64 bytes, got {}",
            remote.handle.len()
        );
        let device = device_by_uuid(&remote.device_uuid)?.ok_or_else(|| {
            anyhow!(
                "GPU {} of the KV pool is not visible here",
                remote.device_uuid
            )
        })?;
        let mut handle = sys::CUipcMemHandle { reserved: [0; 64] };
        for (d, s) in handle.reserved.iter_mut().zip(&remote.handle) {
            *d = *s as _;
        }
        self.ctx.bind_to_thread()?;
        let mut ptr = 0u64;
        let flags = sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
        // SAFETY: `handle` came from cuIpcGetMemHandle in another process (an error otherwise).
        unsafe { sys::cuIpcOpenMemHandle_v2(&mut ptr, handle, flags) }
            .result()
            .context("cuIpcOpenMemHandle (a handle of this same process cannot be opened)")?;
        let pool = CudaKvPool {
            device,
            base: ptr,
            bytes: remote.bytes,
            num_blocks: remote.num_blocks,
            layout: remote.layout,
        };
        let mapping = IpcMapping {
            ptr,
            ctx: self.ctx.clone(),
        };
        self.mappings.insert(remote.handle.clone(), (mapping, pool));
        Ok(pool)
    }

    fn reachable(&self, pool: &CudaKvPool) -> bool {
        pool.device == self.device()
            || self.peers.contains_key(&pool.device)
            || self.mappings.values().any(|(_, p)| p == pool)
    }

    /// Uploads the (source block, destination block) pairs of the next launches (synchronous).
    pub fn set_pairs(
        &mut self,
        pairs: &[(u32, u32)],
        src_blocks: usize,
        dst_blocks: usize,
    ) -> Result<()> {
        let flat = flatten_pairs(pairs, src_blocks, dst_blocks)?;
        self.ctx.bind_to_thread()?;
        self.stream.synchronize()?; // the previous pairs may still be read
        let bytes = flat.len() * 4;
        if self.pairs.as_ref().is_none_or(|b| b.bytes < bytes) {
            self.pairs = Some(DeviceBuffer::new(bytes.max(4096))?);
        }
        if !flat.is_empty() {
            let buf = self.pairs.as_ref().expect("allocated");
            // SAFETY: `buf` holds `bytes`; synchronized below, so `flat` outlives the copy.
            unsafe { result::memcpy_htod_async(buf.ptr, &flat, self.stream())? };
            self.stream.synchronize()?;
        }
        self.num_pairs = pairs.len();
        Ok(())
    }

    /// Queues the copy of `layers` of the current pairs along `route` (asynchronous).
    pub fn launch(
        &self,
        src: &CudaKvPool,
        dst: &CudaKvPool,
        route: &HeadRoute,
        layers: Range<usize>,
    ) -> Result<()> {
        let g = geometry(src, dst, route)?;
        // The source may be a peer's too: a decode engine pulls staged KV onto its own GPU.
        ensure!(
            self.reachable(src),
            "the source pool is on GPU {}, which the copier's GPU {} cannot reach",
            src.device,
            self.device()
        );
        ensure!(self.reachable(dst), "GPU {} cannot reach the destination pool on GPU {} (enable peer access or open its IPC handle)", self.device(), dst.device);
        ensure!(
            layers.start <= layers.end && layers.end <= g.num_layers,
            "layers {layers:?} of {}",
            g.num_layers
        );
        let Some(pairs) = self.pairs.as_ref().filter(|_| self.num_pairs > 0) else {
            return Ok(());
        };
        if layers.is_empty() {
            return Ok(());
        }
        let units = self.num_pairs * layers.len() * 2;
        let chunks = g.run_bytes.div_ceil(CHUNK);
        ensure!(
            units < u32::MAX as usize && chunks <= 65535,
            "KV copy too large for one launch"
        );
        self.ctx.bind_to_thread()?;
        launch(
            Kernel {
                f: self.func,
                pdl: false,
            },
            (units as u32, chunks as u32, 1),
            (THREADS, 1, 1),
            0,
            self.stream(),
            &[
                Arg::Ptr(src.base),
                Arg::Ptr(dst.base),
                Arg::Ptr(pairs.ptr),
                Arg::I32(layers.len() as i32),
                Arg::I32(layers.start as i32),
                Arg::U64(g.src.part as u64),
                Arg::U64(g.src.block as u64),
                Arg::U64(g.dst.part as u64),
                Arg::U64(g.dst.block as u64),
                Arg::U64(g.src_head_off as u64),
                Arg::U64(g.dst_head_off as u64),
                Arg::U64(g.run_bytes as u64),
            ],
        )
    }

    /// Copies `pairs` of every layer along each (source, destination, route), then waits.
    pub fn copy(
        &mut self,
        jobs: &[(CudaKvPool, CudaKvPool, HeadRoute)],
        pairs: &[(u32, u32)],
    ) -> Result<()> {
        let Some((src, dst, _)) = jobs.first() else {
            return Ok(());
        };
        let dst_blocks = jobs
            .iter()
            .map(|j| j.1.num_blocks)
            .min()
            .unwrap_or(dst.num_blocks);
        self.set_pairs(pairs, src.num_blocks, dst_blocks)?;
        for (src, dst, route) in jobs {
            self.launch(src, dst, route, 0..src.layout.num_layers)?;
        }
        self.synchronize()
    }

    /// Makes later launches wait for `event` (recorded on another stream of this GPU).
    fn wait_event(&self, event: sys::CUevent) -> Result<()> {
        // SAFETY: live stream and event.
        unsafe {
            result::stream::wait_event(
                self.stream(),
                event,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }?;
        Ok(())
    }

    /// Makes the copier's GPU context current on this thread.
    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread()?;
        Ok(())
    }

    pub fn synchronize(&self) -> Result<()> {
        self.ctx.bind_to_thread()?;
        self.stream.synchronize()?;
        Ok(())
    }
}

impl Drop for CudaKvCopier {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        let _ = self.stream.synchronize();
        self.pairs = None;
        self.mappings.clear();
        // SAFETY: loaded in `new`, unloaded once.
        unsafe {
            let _ = result::module::unload(self.module);
        }
    }
}

/// Events recorded once per layer, destroyed on drop.
struct LayerEvents(Vec<sys::CUevent>);

impl Drop for LayerEvents {
    fn drop(&mut self) {
        for e in self.0.drain(..) {
            // SAFETY: created by `layer_streaming_hook`, destroyed once.
            unsafe {
                let _ = result::event::destroy(e);
            }
        }
    }
}

unsafe impl Send for LayerEvents {}

/// A [`LayerKvHook`] for `CudaBackend::set_layer_kv_hook`: after the step queues layer `l`'s KV
/// write, the copier's stream waits for it and copies layer `l` of the current pairs along each
/// job, so the transfer runs while later layers compute. Set the pairs first; synchronize the
/// copier after the step.
pub fn layer_streaming_hook(
    copier: Arc<Mutex<CudaKvCopier>>,
    jobs: Vec<(CudaKvPool, CudaKvPool, HeadRoute)>,
) -> Result<LayerKvHook> {
    let layers = jobs.first().map_or(0, |j| j.0.layout.num_layers);
    copier.lock().bind()?; // the events belong to the copier's (and the backend's) context
    let events = (0..layers)
        .map(|_| result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
        .collect::<Result<Vec<_>, _>>()?;
    let events = LayerEvents(events);
    Ok(Box::new(move |layer, stream| {
        let event = *events
            .0
            .get(layer)
            .ok_or_else(|| anyhow!("layer {layer} out of range"))?;
        // SAFETY: a live event and the backend's live stream.
        unsafe { result::event::record(event, stream) }?;
        let copier = copier.lock();
        copier.wait_event(event)?;
        for (src, dst, route) in &jobs {
            copier.launch(src, dst, route, layer..layer + 1)?;
        }
        Ok(())
    }))
}
