//! The GPU context, its stream, and device buffers from plain `cuMemAlloc` (not the stream-ordered
//! pool, so the KV pool can later be exported with CUDA IPC and reached by peer copies).

use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::{result, sys, CudaContext, CudaStream};
use std::sync::Arc;

/// Is a CUDA driver with at least one GPU loadable here? Never panics.
pub fn gpu_available() -> bool {
    // SAFETY: only probes whether the shared library can be opened.
    if !unsafe { sys::is_culib_present() } {
        return false;
    }
    result::init().is_ok() && matches!(result::device::get_count(), Ok(n) if n > 0)
}

/// One GPU and the stream every kernel of this backend runs on.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
}

impl Gpu {
    pub fn new(ordinal: usize) -> Result<Self> {
        if !gpu_available() {
            bail!("no CUDA GPU found (libcuda could not be loaded or reports no device)");
        }
        let ctx = CudaContext::new(ordinal)
            .with_context(|| format!("cannot open CUDA device {ordinal}"))?;
        let (major, minor) = ctx.compute_capability()?;
        if (major, minor) < (9, 0) {
            bail!("the CUDA backend needs a Hopper GPU (compute capability 9.0), found {major}.{minor}");
        }
        let stream = ctx.new_stream()?;
        Ok(Self { ctx, stream })
    }

    /// Makes this context current on the calling thread (the engine may step from any thread).
    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread()?;
        Ok(())
    }

    pub fn cu_stream(&self) -> sys::CUstream {
        self.stream.cu_stream()
    }

    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize()?;
        Ok(())
    }

    /// (free, total) bytes of device memory.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        Ok(self.ctx.mem_get_info()?)
    }

    pub fn alloc(&self, bytes: usize) -> Result<DeviceBuffer> {
        DeviceBuffer::new(bytes)
    }

    pub fn upload<T: Copy>(&self, data: &[T]) -> Result<DeviceBuffer> {
        let buf = DeviceBuffer::new(std::mem::size_of_val(data))?;
        self.copy_to(&buf, 0, data)?;
        Ok(buf)
    }

    /// Host → device at `byte_offset` (waits for the copy: `data` may be freed right after).
    pub fn copy_to<T: Copy>(
        &self,
        buf: &DeviceBuffer,
        byte_offset: usize,
        data: &[T],
    ) -> Result<()> {
        let bytes = std::mem::size_of_val(data);
        if byte_offset + bytes > buf.bytes {
            bail!(
                "copy of {bytes} bytes at {byte_offset} overruns a buffer of {} bytes",
                buf.bytes
            );
        }
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: bounds checked above; the stream sync keeps `data` alive for the copy.
        unsafe { result::memcpy_htod_async(buf.ptr + byte_offset as u64, data, self.cu_stream())? };
        self.sync()
    }

    /// Device → host from `byte_offset`, after all queued work.
    pub fn copy_from<T: Copy>(
        &self,
        buf: &DeviceBuffer,
        byte_offset: usize,
        out: &mut [T],
    ) -> Result<()> {
        self.copy_from_ptr(
            buf.ptr + byte_offset as u64,
            out,
            buf.bytes.saturating_sub(byte_offset),
        )
    }

    pub fn copy_from_ptr<T: Copy>(&self, ptr: u64, out: &mut [T], available: usize) -> Result<()> {
        let bytes = std::mem::size_of_val(out);
        if bytes > available {
            bail!("read of {bytes} bytes overruns the {available} bytes available");
        }
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: bounds checked; synchronized before `out` is used.
        unsafe { result::memcpy_dtoh_async(out, ptr, self.cu_stream())? };
        self.sync()
    }

    pub fn download<T: Copy + Default>(&self, buf: &DeviceBuffer, len: usize) -> Result<Vec<T>> {
        let mut v = vec![T::default(); len];
        self.copy_from(buf, 0, &mut v)?;
        Ok(v)
    }

    /// Fills with a byte value (tests poison outputs with 0xFF: NaN in BF16/F32/e4m3).
    pub fn memset(&self, buf: &DeviceBuffer, value: u8) -> Result<()> {
        // SAFETY: the whole buffer is ours.
        unsafe { result::memset_d8_async(buf.ptr, value, buf.bytes, self.cu_stream())? };
        Ok(())
    }

    /// Host → device from pinned memory, queued on the stream (`src` must stay untouched until
    /// the stream passes this point).
    pub fn copy_to_queued(
        &self,
        dst: &DeviceBuffer,
        src: &mut PinnedI32,
        len: usize,
    ) -> Result<()> {
        ensure!(
            len <= src.len() && len * 4 <= dst.bytes,
            "queued copy of {len} i32s overruns"
        );
        // SAFETY: bounds checked; both buffers outlive the queued copy (their owner waits on the
        // step's event before it touches or frees them).
        unsafe {
            result::memcpy_htod_async(dst.ptr, &src.as_mut_slice()[..len], self.cu_stream())?
        };
        Ok(())
    }

    /// Device → pinned host memory, queued on the stream (read `dst` after the stream passes).
    pub fn copy_from_queued(
        &self,
        dst: &mut PinnedI32,
        src: &DeviceBuffer,
        len: usize,
    ) -> Result<()> {
        ensure!(
            len <= dst.len() && len * 4 <= src.bytes,
            "queued copy of {len} i32s overruns"
        );
        // SAFETY: as in `copy_to_queued`.
        unsafe {
            result::memcpy_dtoh_async(&mut dst.as_mut_slice()[..len], src.ptr, self.cu_stream())?
        };
        Ok(())
    }

    pub fn copy_dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        // SAFETY: callers pass ranges inside buffers they own.
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.cu_stream())? };
        Ok(())
    }
}

/// Page-locked host memory (`cuMemHostAlloc`) of `i32`s: copies between it and the device run
/// asynchronously, so a step is launched and read back without the host waiting on the stream.
pub struct PinnedI32 {
    ptr: *mut i32,
    len: usize,
}

impl PinnedI32 {
    pub fn new(len: usize) -> Result<Self> {
        let len = len.max(1);
        // SAFETY: a fresh allocation, owned here and freed once on drop.
        let ptr = unsafe { result::malloc_host(len * 4, 0)? } as *mut i32;
        Ok(Self { ptr, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The host's view: only while no copy to or from this buffer is queued.
    pub fn as_mut_slice(&mut self) -> &mut [i32] {
        // SAFETY: `len` i32s allocated above; `&mut self` excludes other host views.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PinnedI32 {
    fn drop(&mut self) {
        // SAFETY: allocated by `malloc_host`, freed once.
        unsafe {
            let _ = result::free_host(self.ptr as *mut std::ffi::c_void);
        }
    }
}

// SAFETY: plain host memory; the owner serializes access.
unsafe impl Send for PinnedI32 {}

/// A CUDA event without timing: recorded after a step's last copy, it is what the host waits on.
pub struct Event(sys::CUevent);

impl Event {
    pub fn new() -> Result<Self> {
        let flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING;
        Ok(Self(result::event::create(flags)?))
    }

    // The driver checks the stream handle; nothing here dereferences it.
    #[allow(clippy::not_unsafe_ptr_arg_deref)]
    pub fn record(&self, stream: sys::CUstream) -> Result<()> {
        // SAFETY: a live event and stream.
        unsafe { result::event::record(self.0, stream)? };
        Ok(())
    }

    /// Blocks until the work queued before the last `record` is done.
    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: a live event.
        unsafe { result::event::synchronize(self.0)? };
        Ok(())
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        unsafe {
            let _ = result::event::destroy(self.0);
        }
    }
}

// SAFETY: event handles are not tied to a thread; the owner serializes access.
unsafe impl Send for Event {}

/// Device memory from `cuMemAlloc`, freed on drop.
pub struct DeviceBuffer {
    pub ptr: u64,
    pub bytes: usize,
}

impl DeviceBuffer {
    pub fn new(bytes: usize) -> Result<Self> {
        // cuMemAlloc refuses 0 bytes; keep a valid pointer anyway.
        let n = bytes.max(256);
        // SAFETY: plain allocation in the current context.
        let ptr = unsafe { result::malloc_sync(n) }.with_context(|| {
            format!(
                "cuMemAlloc of {:.2} GiB failed",
                n as f64 / (1u64 << 30) as f64
            )
        })?;
        Ok(Self { ptr, bytes })
    }

    /// Address `offset` bytes in.
    pub fn at(&self, offset: usize) -> u64 {
        debug_assert!(offset <= self.bytes);
        self.ptr + offset as u64
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated by cuMemAlloc in `new`, freed once.
        unsafe {
            let _ = result::free_sync(self.ptr);
        }
    }
}

// The raw pointer is only an address; access goes through the owning backend.
unsafe impl Send for DeviceBuffer {}
unsafe impl Sync for DeviceBuffer {}

/// Optional per-kernel timing with CUDA events: `mark(label)` after each launch attributes the GPU
/// time since the previous mark to `label`. Off by default (one branch per mark).
#[derive(Default)]
pub struct Profiler {
    pub enabled: bool,
    marks: Vec<(&'static str, sys::CUevent)>,
    spare: Vec<sys::CUevent>,
    /// label -> (total ms, count)
    totals: std::collections::BTreeMap<&'static str, (f64, usize)>,
}

impl Profiler {
    // CUDA handles are opaque to Rust: the driver checks them, nothing here dereferences them.
    #[allow(clippy::not_unsafe_ptr_arg_deref)]
    pub fn mark(&mut self, label: &'static str, stream: sys::CUstream) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let ev = match self.spare.pop() {
            Some(e) => e,
            None => result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)?,
        };
        // SAFETY: a live event and stream.
        unsafe { result::event::record(ev, stream)? };
        self.marks.push((label, ev));
        Ok(())
    }

    /// After the stream is synchronized: adds the intervals between marks to the totals.
    pub fn collect(&mut self) -> Result<()> {
        for w in self.marks.windows(2) {
            // SAFETY: both events were recorded and have completed.
            let ms = unsafe { result::event::elapsed(w[0].1, w[1].1)? } as f64;
            let e = self.totals.entry(w[1].0).or_insert((0.0, 0));
            e.0 += ms;
            e.1 += 1;
        }
        self.spare.extend(self.marks.drain(..).map(|(_, e)| e));
        Ok(())
    }

    /// (label, total ms, count), largest first; clears the totals.
    pub fn take(&mut self) -> Vec<(&'static str, f64, usize)> {
        let mut v: Vec<_> = std::mem::take(&mut self.totals)
            .into_iter()
            .map(|(l, (ms, n))| (l, ms, n))
            .collect();
        v.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap());
        v
    }
}

impl Drop for Profiler {
    fn drop(&mut self) {
        for e in self
            .spare
            .drain(..)
            .chain(self.marks.drain(..).map(|(_, e)| e))
        {
            // SAFETY: created by this profiler, destroyed once.
            unsafe {
                let _ = result::event::destroy(e);
            }
        }
    }
}

unsafe impl Send for Profiler {}
