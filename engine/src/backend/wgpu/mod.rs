//! The GPU backend on wgpu (Vulkan, Metal, DX12): one device per process, chosen once (discrete GPUs
//! first; `prefer_adapter` or `QS_GPU` picks another), with every limit the adapter offers. Kernels are
//! WGSL files in `engine/shaders/` compiled once per (kernel, entry point, constants) and cached
//! ([`kernels`]); weights are uploaded once in their stored form and kept under a byte budget
//! ([`weights`]). Failures (no adapter, out of memory, a lost device, a wait that never ends) are engine
//! errors; [`super::Backend`] turns a failed GPU call into the CPU's result and a notice.

pub mod gptq;
mod hqq;
pub use hqq::solved_on_device as hqq_solved_on_device;
mod grouped;
pub mod kernels;
pub mod ops;
pub mod quant;
pub mod weights;

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use ::wgpu as wg;

use crate::{Error, Result};

/// What a user sees of an adapter.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AdapterSummary {
    pub name: String,
    /// `"Vulkan"`, `"Metal"`, `"Dx12"`.
    pub api: String,
    /// `"DiscreteGpu"`, `"IntegratedGpu"`, `"Cpu"` (a software rasteriser such as lavapipe), …
    pub kind: String,
    pub driver: String,
    /// The optional features the kernels use that it offers (`"shader-f16"`, `"subgroups"`).
    pub features: Vec<String>,
}

/// The optional features the kernels use where offered, with their names.
const OPTIONAL: [(wg::Features, &str); 2] = [
    (wg::Features::SHADER_F16, "shader-f16"),
    (wg::Features::SUBGROUP, "subgroups"),
];

impl AdapterSummary {
    fn of(adapter: &wg::Adapter) -> Self {
        let info = adapter.get_info();
        let has = adapter.features();
        Self {
            name: info.name.clone(),
            api: format!("{:?}", info.backend),
            kind: format!("{:?}", info.device_type),
            driver: format!("{} {}", info.driver, info.driver_info)
                .trim()
                .to_string(),
            features: OPTIONAL
                .iter()
                .filter(|(f, _)| has.contains(*f))
                .map(|(_, n)| (*n).to_string())
                .collect(),
        }
    }

    /// Whether this is a software implementation (lavapipe, WARP, SwiftShader): correct, slower than our
    /// CPU kernels.
    pub fn is_software(&self) -> bool {
        self.kind == "Cpu"
    }

    /// `"NVIDIA H100 (Vulkan)"`.
    pub fn label(&self) -> String {
        format!("{} ({})", self.name, self.api)
    }
}

/// The process's GPU: device, queue, what it allows, and the caches every call shares.
pub struct Gpu {
    pub(crate) device: wg::Device,
    pub(crate) queue: wg::Queue,
    pub summary: AdapterSummary,
    pub(crate) limits: wg::Limits,
    pub(crate) pipelines: Mutex<HashMap<kernels::Key, wg::ComputePipeline>>,
    pub(crate) weights: Mutex<weights::WeightCache>,
    /// The low-bit types' lookup tables on the device.
    pub(crate) tables: Mutex<HashMap<crate::codecs::GgmlType, wg::Buffer>>,
    lost: std::sync::Arc<Mutex<Option<String>>>,
    /// One GPU call at a time: the caches and scratch buffers are shared.
    work: Mutex<()>,
    /// The optional features the device was opened with, and whether the kernels use them now.
    features: wg::Features,
    use_features: std::sync::atomic::AtomicBool,
    pub(crate) pool: Mutex<Pool>,
    /// Bind groups of the forward pass's dispatches, reused from token to token (see [`BindCache`]).
    pub(crate) binds: Mutex<BindCache>,
    /// Whether binds go through [`Gpu::binds`] now (inside a forward pass's session).
    pub(crate) binds_cached: std::sync::atomic::AtomicBool,
    /// Counts frees of buffers a cached bind group may hold (non-pooled arrays, pool overflow, weights
    /// leaving the cache): the bind cache empties when it changes, so it never keeps memory alive.
    pub(crate) frees: std::sync::atomic::AtomicU64,
}

/// A forward pass's bind groups by pipeline and bound buffers: the same dispatches over the same pooled
/// scratch, weights and KV cache recur every token, and creating a bind group is most of a dispatch's
/// recording cost once the parameters are batched.
#[derive(Default)]
pub(crate) struct BindCache {
    /// [`Gpu::frees`] when the map was last emptied.
    pub(crate) stamp: u64,
    pub(crate) map: HashMap<(wg::ComputePipeline, Vec<(u32, wg::Buffer)>), wg::BindGroup>,
}

/// Most bind groups kept.
pub(crate) const BIND_CACHE_MAX: usize = 16_384;

/// Device buffers kept for reuse: scratch arrays of the forward pass and uniform parameter blocks, so
/// decoding a token creates no buffers once warm.
#[derive(Default)]
pub(crate) struct Pool {
    /// By (size, usage bits).
    free: HashMap<(u64, u32), Vec<wg::Buffer>>,
    bytes: u64,
    /// Uniform buffers handed out under the current [`Work`].
    pub(crate) in_use: Vec<wg::Buffer>,
    /// Their contents, not yet on the device: one blob, and per buffer (buffer, offset in the blob, size).
    /// The next submission uploads the blob once and copies each part (see [`Gpu::submit`]).
    pub(crate) uniform_data: Vec<u8>,
    pub(crate) uniform_parts: Vec<(wg::Buffer, u64, u64)>,
}

#[cfg(test)]
thread_local! {
    /// Buffers this thread had to create because the pool had none (tests check decoding reuses).
    pub(crate) static POOL_MISSES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Command submissions this thread made (tests check a decoded token is one).
    pub(crate) static SUBMISSIONS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Bind groups this thread created (tests check decoding reuses them).
    pub(crate) static BIND_GROUPS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Count a submission (tests).
pub(crate) fn count_submission() {
    #[cfg(test)]
    SUBMISSIONS.with(|m| m.set(m.get() + 1));
}

/// Most bytes the pool keeps.
const POOL_BYTES: u64 = 512 << 20;

/// Exclusive use of the device for one call ([`Gpu::begin`]).
pub(crate) struct Work<'g> {
    gpu: &'g Gpu,
    _lock: MutexGuard<'g, ()>,
}

impl Drop for Work<'_> {
    fn drop(&mut self) {
        let used = {
            let mut p = lock(&self.gpu.pool);
            // Parameters of work never submitted are dropped with it.
            p.uniform_data.clear();
            p.uniform_parts.clear();
            std::mem::take(&mut p.in_use)
        };
        for b in used {
            self.gpu.recycle(b);
        }
    }
}

static PREFERENCE: Mutex<Option<String>> = Mutex::new(None);
static GPU: OnceLock<std::result::Result<Gpu, String>> = OnceLock::new();

/// How long one wait for the device may take before the call fails (software adapters are slow; a hung
/// driver must not hang the program).
pub(crate) const WAIT: Duration = Duration::from_secs(300);

/// Choose the adapter by name (a case-insensitive part of it) or by its index in [`adapters`]; must be
/// called before the GPU is first used. `QS_GPU` in the environment does the same.
pub fn prefer_adapter(name: &str) {
    *lock(&PREFERENCE) = Some(name.trim().to_string());
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn instance() -> wg::Instance {
    let mut desc = wg::InstanceDescriptor::new_without_display_handle();
    desc.backends = wg::Backends::PRIMARY;
    wg::Instance::new(desc)
}

fn rank(t: wg::DeviceType) -> u8 {
    match t {
        wg::DeviceType::DiscreteGpu => 0,
        wg::DeviceType::IntegratedGpu => 1,
        wg::DeviceType::VirtualGpu => 2,
        wg::DeviceType::Other => 3,
        wg::DeviceType::Cpu => 4,
    }
}

/// Every adapter wgpu finds (Vulkan, Metal, DX12), best first: discrete, integrated, virtual, software.
pub fn adapters() -> Vec<AdapterSummary> {
    sorted_adapters(&instance())
        .iter()
        .map(AdapterSummary::of)
        .collect()
}

fn sorted_adapters(inst: &wg::Instance) -> Vec<wg::Adapter> {
    let mut v = pollster::block_on(inst.enumerate_adapters(wg::Backends::PRIMARY));
    v.sort_by_key(|a| {
        let i = a.get_info();
        (rank(i.device_type), i.backend != wg::Backend::Vulkan)
    });
    v
}

/// The GPU, opened on first use.
pub fn gpu() -> Result<&'static Gpu> {
    GPU.get_or_init(open)
        .as_ref()
        .map_err(|e| Error::Gpu(e.clone()))
}

/// The adapter the GPU backend uses (opening it), or why there is none.
pub fn adapter() -> Result<AdapterSummary> {
    gpu().map(|g| g.summary.clone())
}

fn open() -> std::result::Result<Gpu, String> {
    let inst = instance();
    let all = sorted_adapters(&inst);
    if all.is_empty() {
        return Err("no GPU adapter found (Vulkan, Metal or DX12); on Linux without a GPU, Mesa's lavapipe \
                    (Debian package mesa-vulkan-drivers) provides a software one"
            .into());
    }
    let want = lock(&PREFERENCE)
        .clone()
        .or_else(|| std::env::var("QS_GPU").ok())
        .filter(|s| !s.trim().is_empty());
    let adapter = match want {
        None => all.into_iter().next(),
        Some(w) => {
            let names: Vec<String> = all.iter().map(|a| a.get_info().name).collect();
            let pick = match w.parse::<usize>() {
                Ok(i) => all.into_iter().nth(i),
                Err(_) => {
                    let w = w.to_lowercase();
                    all.into_iter()
                        .find(|a| a.get_info().name.to_lowercase().contains(&w))
                }
            };
            if pick.is_none() {
                return Err(format!(
                    "no GPU adapter matches {w:?}; found: {}",
                    names.join(", ")
                ));
            }
            pick
        }
    }
    .ok_or("no GPU adapter")?;
    let info = adapter.get_info();
    let limits = adapter.limits();
    // shader-f16 and subgroups where offered, unless QS_GPU_FEATURES=none (a driver that mishandles them).
    let features = if std::env::var("QS_GPU_FEATURES").is_ok_and(|v| v.trim() == "none") {
        wg::Features::empty()
    } else {
        OPTIONAL
            .iter()
            .fold(wg::Features::empty(), |a, (f, _)| a | *f)
            .intersection(adapter.features())
    };
    let desc = wg::DeviceDescriptor {
        label: Some("quant-studio"),
        required_features: features,
        required_limits: limits.clone(),
        experimental_features: wg::ExperimentalFeatures::disabled(),
        memory_hints: wg::MemoryHints::Performance,
        trace: wg::Trace::Off,
    };
    let (device, queue) = pollster::block_on(adapter.request_device(&desc))
        .map_err(|e| format!("{}: cannot open the device: {e}", info.name))?;
    let lost = std::sync::Arc::new(Mutex::new(None));
    let flag = std::sync::Arc::clone(&lost);
    device.set_device_lost_callback(move |reason, msg| {
        *lock(&flag) = Some(format!("device lost ({reason:?}): {msg}"));
    });
    // An error outside an error scope (wgpu's default handler panics) fails the GPU for this process.
    let flag = std::sync::Arc::clone(&lost);
    device.on_uncaptured_error(std::sync::Arc::new(move |e: wg::Error| {
        let mut slot = lock(&flag);
        if slot.is_none() {
            *slot = Some(format!("GPU error: {e}"));
        }
    }));
    let budget = std::env::var("QS_GPU_WEIGHT_CACHE_MB")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map_or(weights::DEFAULT_BUDGET, |mb| mb << 20);
    Ok(Gpu {
        device,
        queue,
        summary: AdapterSummary::of(&adapter),
        limits,
        pipelines: Mutex::new(HashMap::new()),
        weights: Mutex::new(weights::WeightCache::new(budget)),
        tables: Mutex::new(HashMap::new()),
        lost,
        work: Mutex::new(()),
        features,
        use_features: std::sync::atomic::AtomicBool::new(true),
        pool: Mutex::new(Pool::default()),
        binds: Mutex::new(BindCache::default()),
        binds_cached: std::sync::atomic::AtomicBool::new(false),
        frees: std::sync::atomic::AtomicU64::new(0),
    })
}

impl Gpu {
    /// Whether the matvec adds its partial sums with subgroup operations.
    pub(crate) fn uses_subgroups(&self) -> bool {
        self.features.contains(wg::Features::SUBGROUP)
            && self.use_features.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether F16 weights are read as WGSL `f16`.
    pub(crate) fn uses_f16(&self) -> bool {
        self.features.contains(wg::Features::SHADER_F16)
            && self.use_features.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Use the optional features (where the device has them) or the paths every adapter runs: tests run
    /// the kernels both ways.
    #[cfg(test)]
    pub(crate) fn set_optional_features(&self, on: bool) -> bool {
        self.use_features
            .swap(on, std::sync::atomic::Ordering::Relaxed)
    }

    /// The largest storage binding (bytes) a kernel can see: tensors beyond it are split.
    pub(crate) fn max_binding(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
            & !255
    }

    /// Workgroups a dispatch may have along one dimension.
    pub(crate) fn max_groups(&self) -> u32 {
        self.limits.max_compute_workgroups_per_dimension
    }

    /// Exclusive use of the device's shared state for one call; the uniform buffers handed out meanwhile
    /// return to the pool when it ends.
    pub(crate) fn begin(&self) -> Result<Work<'_>> {
        if let Some(e) = lock(&self.lost).clone() {
            return Err(Error::Gpu(e));
        }
        Ok(Work {
            gpu: self,
            _lock: lock(&self.work),
        })
    }

    /// A buffer of `size` bytes and `usage` from the pool, or a new one.
    pub(crate) fn take(&self, size: u64, usage: wg::BufferUsages) -> wg::Buffer {
        {
            let mut p = lock(&self.pool);
            if let Some(b) = p.free.get_mut(&(size, usage.bits())).and_then(Vec::pop) {
                p.bytes -= size;
                return b;
            }
        }
        #[cfg(test)]
        POOL_MISSES.with(|m| m.set(m.get() + 1));
        self.device.create_buffer(&wg::BufferDescriptor {
            label: Some("pooled"),
            size,
            usage,
            mapped_at_creation: false,
        })
    }

    /// Submit `main` after the parameter blocks handed out since the last submission: their contents
    /// go up in one write and are copied into place by a command buffer submitted with `main` (one
    /// write per submission instead of one per dispatch).
    pub(crate) fn submit(&self, main: wg::CommandBuffer) -> wg::SubmissionIndex {
        count_submission();
        let (data, parts) = {
            let mut p = lock(&self.pool);
            (
                std::mem::take(&mut p.uniform_data),
                std::mem::take(&mut p.uniform_parts),
            )
        };
        if parts.is_empty() {
            return self.queue.submit([main]);
        }
        let size = (data.len() as u64).next_power_of_two().max(256);
        let usage = wg::BufferUsages::COPY_SRC | wg::BufferUsages::COPY_DST;
        let staging = self.take(size, usage);
        self.queue.write_buffer(&staging, 0, &data);
        let mut enc = self.device.create_command_encoder(&Default::default());
        for (b, off, len) in &parts {
            enc.copy_buffer_to_buffer(&staging, *off, b, 0, *len);
        }
        let idx = self.queue.submit([enc.finish(), main]);
        // Later writes to it run after this submission (the queue keeps order).
        self.recycle(staging);
        idx
    }

    /// Keep `b` for reuse (dropped instead when the pool is full). Work already submitted that uses it
    /// runs before anything later written to it: the queue keeps submission order.
    pub(crate) fn recycle(&self, b: wg::Buffer) {
        let mut p = lock(&self.pool);
        let size = b.size();
        if p.bytes + size <= POOL_BYTES {
            p.bytes += size;
            p.free.entry((size, b.usage().bits())).or_default().push(b);
        } else {
            self.freed();
        }
    }

    /// A buffer a cached bind group may hold is being freed: the bind cache empties before its next use.
    pub(crate) fn freed(&self) {
        self.frees
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Run `f` (which records and submits work) and turn validation and out-of-memory errors raised
    /// meanwhile into an engine error.
    pub(crate) fn checked<T>(&self, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let oom = self.device.push_error_scope(wg::ErrorFilter::OutOfMemory);
        let val = self.device.push_error_scope(wg::ErrorFilter::Validation);
        let r = f();
        let v = pollster::block_on(val.pop());
        let o = pollster::block_on(oom.pop());
        if let Some(e) = o {
            return Err(Error::Gpu(format!(
                "{what}: out of GPU memory ({e}); set QS_GPU_WEIGHT_CACHE_MB lower or use --backend cpu"
            )));
        }
        if let Some(e) = v {
            return Err(Error::Gpu(format!("{what}: {e}")));
        }
        if let Some(e) = lock(&self.lost).clone() {
            return Err(Error::Gpu(format!("{what}: {e}")));
        }
        r
    }

    /// Every read-back path: `record` records work and copies `floats` f32 results into the staging buffer it
    /// is given; the work is submitted inside [`Gpu::checked`] and the results come back (waiting at most
    /// [`WAIT`]).
    pub(crate) fn record_and_read(
        &self,
        what: &str,
        floats: usize,
        record: impl FnOnce(&mut wg::CommandEncoder, &wg::Buffer),
    ) -> Result<Vec<f32>> {
        let enc = self.device.create_command_encoder(&Default::default());
        self.read_after(what, floats, enc, record)
    }

    /// [`Gpu::record_and_read`] appending to `enc`, which may already hold work (a recorded forward pass).
    pub(crate) fn read_after(
        &self,
        what: &str,
        floats: usize,
        mut enc: wg::CommandEncoder,
        record: impl FnOnce(&mut wg::CommandEncoder, &wg::Buffer),
    ) -> Result<Vec<f32>> {
        let bytes = (floats.max(1) * 4) as u64;
        let staging = self.device.create_buffer(&wg::BufferDescriptor {
            label: Some("read back"),
            size: bytes,
            usage: wg::BufferUsages::MAP_READ | wg::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let raw = self.checked(what, || {
            record(&mut enc, &staging);
            self.submit(enc.finish());
            self.read_back(&staging, bytes)
        })?;
        let mut v: Vec<f32> = bytemuck::pod_collect_to_vec(&raw);
        v.truncate(floats);
        Ok(v)
    }

    /// Copy `len` bytes of `buf` (a MAP_READ buffer whose copy has been submitted) back, waiting at most
    /// [`WAIT`].
    fn read_back(&self, buf: &wg::Buffer, len: u64) -> Result<Vec<u8>> {
        let slice = buf.slice(0..len);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wg::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wg::PollType::Wait {
                submission_index: None,
                timeout: Some(WAIT),
            })
            .map_err(|e| Error::Gpu(format!("waiting for the GPU: {e}")))?;
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Error::Gpu(format!("reading results back: {e}"))),
            Err(_) => return Err(Error::Gpu("the GPU never finished (timed out)".into())),
        }
        let out = {
            let view = slice
                .get_mapped_range()
                .map_err(|e| Error::Gpu(format!("reading results back: {e}")))?;
            view.to_vec()
        };
        buf.unmap();
        Ok(out)
    }
}
