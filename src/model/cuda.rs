//! corpusdb's own CUDA kernels (`src/model/kernels/corpusdb.cu`, compiled to PTX by
//! build.rs), launched from the custom ops' `cuda_fwd`. Built only with the `cuda`
//! feature. `CORPUSDB_CUDA_KERNELS=composed` makes the ops fall back to candle's composed
//! tensor ops (the reference the GPU check compares the kernels against).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CudaStorage, Layout, Result};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/corpusdb.ptx"));
const MODULE: &str = "corpusdb";

/// 0: not yet read from the environment, 1: kernels, 2: composed ops.
static KERNELS: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Whether the fused kernels are used (default) or the composed ops.
pub fn kernels_enabled() -> bool {
    use std::sync::atomic::Ordering;
    match KERNELS.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var("CORPUSDB_CUDA_KERNELS").map_or(true, |v| v != "composed");
            KERNELS.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
        state => state == 1,
    }
}

/// Turns the fused kernels on or off for this process (the GPU check compares both).
pub fn set_kernels_enabled(on: bool) {
    KERNELS.store(if on { 1 } else { 2 }, std::sync::atomic::Ordering::Relaxed);
}

/// Launch shape of a grid-stride loop over `n` elements: enough blocks to fill the GPU,
/// not one per 256 elements (the loop covers the rest).
fn grid_stride(n: usize) -> LaunchConfig {
    const THREADS: u32 = 256;
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 65_535) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Inverted dropout of a contiguous f32 or f64 tensor with the mask of
/// `rng::dropout_in_place` for the stream `base` (bit for bit the CPU's mask); a bf16
/// tensor gives its dropout in f32.
pub fn keyed_dropout(
    storage: &CudaStorage,
    layout: &Layout,
    base: u64,
    p: f32,
    keep: f32,
) -> Result<CudaStorage> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("keyed dropout: the input must be contiguous")
    };
    let n = end - start;
    let device = &storage.device;
    let count = n as u64;
    macro_rules! launch {
        ($values:expr, $ty:ty, $name:literal, $variant:ident) => {{
            let func = device.get_or_load_custom_func($name, MODULE, PTX)?;
            let input = $values.slice(start..end);
            // SAFETY: the kernel writes every one of the `n` elements.
            let out = unsafe { device.alloc::<$ty>(n)? };
            let mut builder = func.builder();
            builder.arg(&input);
            builder.arg(&out);
            builder.arg(&count);
            builder.arg(&base);
            builder.arg(&p);
            builder.arg(&keep);
            // SAFETY: the argument list matches the kernel's signature.
            unsafe { builder.launch(grid_stride(n)) }.w()?;
            CudaStorage {
                slice: CudaStorageSlice::$variant(out),
                device: device.clone(),
            }
        }};
    }
    Ok(match &storage.slice {
        CudaStorageSlice::F32(values) => launch!(values, f32, "keyed_dropout_f32", F32),
        CudaStorageSlice::F64(values) => launch!(values, f64, "keyed_dropout_f64", F64),
        // bf16 in, f32 out (lora::keyed_dropout_f32).
        CudaStorageSlice::BF16(values) => launch!(values, f32, "keyed_dropout_bf16_f32", F32),
        _ => candle_core::bail!("keyed dropout: unsupported dtype {:?}", storage.dtype()),
    })
}

/// A contiguous tensor's elements as a view of its CUDA storage.
macro_rules! view {
    ($storage:expr, $layout:expr, $ty:ty) => {{
        let Some((start, end)) = $layout.contiguous_offsets() else {
            candle_core::bail!("a corpusdb kernel needs contiguous inputs")
        };
        $storage.as_cuda_slice::<$ty>()?.slice(start..end)
    }};
}

/// One block per row of 256 threads.
fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `y = x · w / √(mean(x²) + ε)` over the last dimension (f32 or bf16; `w` of the same
/// dtype), sums in f32.
pub fn rms_norm_forward(
    x: &CudaStorage,
    x_layout: &Layout,
    w: &CudaStorage,
    w_layout: &Layout,
    eps: f32,
) -> Result<CudaStorage> {
    rms_norm(x, x_layout, None, w, w_layout, eps)
}

/// The gradient of [`rms_norm_forward`] with respect to `x` for the upstream gradient `g`
/// (same shape and dtype as `x`).
pub fn rms_norm_backward(
    x: &CudaStorage,
    x_layout: &Layout,
    g: (&CudaStorage, &Layout),
    w: &CudaStorage,
    w_layout: &Layout,
    eps: f32,
) -> Result<CudaStorage> {
    rms_norm(x, x_layout, Some(g), w, w_layout, eps)
}

/// `rms_norm_fwd_*(x, w, y, dim, eps)` or, with an upstream gradient,
/// `rms_norm_bwd_*(x, g, w, dx, dim, eps)`: one block per row.
fn rms_norm(
    x: &CudaStorage,
    x_layout: &Layout,
    g: Option<(&CudaStorage, &Layout)>,
    w: &CudaStorage,
    w_layout: &Layout,
    eps: f32,
) -> Result<CudaStorage> {
    let device = &x.device;
    let dim = *x_layout.dims().last().unwrap_or(&1);
    let n = x_layout.shape().elem_count();
    let rows = n / dim.max(1);
    let dim_arg = dim as i32;
    let direction = if g.is_some() { "bwd" } else { "fwd" };
    macro_rules! launch {
        ($ty:ty, $suffix:literal, $variant:ident) => {{
            let name = format!("rms_norm_{direction}_{}", $suffix);
            let func = device.get_or_load_custom_func(&name, MODULE, PTX)?;
            let xs = view!(x, x_layout, $ty);
            let gs = match g {
                Some((g, g_layout)) => Some(view!(g, g_layout, $ty)),
                None => None,
            };
            let ws = view!(w, w_layout, $ty);
            // SAFETY: the kernel writes every element of every row.
            let out = unsafe { device.alloc::<$ty>(n)? };
            let mut builder = func.builder();
            builder.arg(&xs);
            if let Some(gs) = &gs {
                builder.arg(gs);
            }
            builder.arg(&ws);
            builder.arg(&out);
            builder.arg(&dim_arg);
            builder.arg(&eps);
            // SAFETY: the argument list matches the kernel's signature.
            unsafe { builder.launch(per_row(rows)) }.w()?;
            CudaStorage {
                slice: CudaStorageSlice::$variant(out),
                device: device.clone(),
            }
        }};
    }
    Ok(match x.dtype() {
        candle_core::DType::F32 => launch!(f32, "f32", F32),
        candle_core::DType::BF16 => launch!(half::bf16, "bf16", BF16),
        other => candle_core::bail!("rms norm kernel: unsupported dtype {other:?}"),
    })
}

/// `softmax(scale · scores)` over the keys each query may see, for attention scores
/// `[b, kv_heads, group × t, past + t]` (the rule of `AttentionMask::allows`: causal, and
/// within the query's segment when `segments` holds the packed rows' ids on the device).
/// The probabilities are the op's output and all its backward pass needs.
pub struct MaskedSoftmax {
    pub scale: f32,
    pub t: usize,
    pub past: usize,
    /// `[b × t]` segment ids (u32) on the device, for packed rows.
    pub segments: Option<candle_core::Tensor>,
}

impl candle_core::CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("masked softmax: a CUDA kernel (the CPU has its blockwise attention)")
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> Result<(CudaStorage, candle_core::Shape)> {
        let device = &storage.device;
        let dims = layout.dims();
        let s = *dims.last().unwrap_or(&1);
        let n = layout.shape().elem_count();
        let rows = n / s.max(1);
        let rows_per_batch = (rows / dims.first().copied().unwrap_or(1).max(1)) as i64;
        if s != self.past + self.t || rows_per_batch % self.t as i64 != 0 {
            candle_core::bail!(
                "masked softmax: scores {dims:?} do not fit {} queries after {}",
                self.t,
                self.past
            )
        }
        let (t, past, s_arg, scale) = (self.t as i32, self.past as i32, s as i32, self.scale);
        let segments_storage = self.segments.as_ref().map(|t| t.storage_and_layout());
        let null: u64 = 0;
        macro_rules! launch {
            ($ty:ty, $name:literal, $variant:ident) => {{
                let func = device.get_or_load_custom_func($name, MODULE, PTX)?;
                let scores = view!(storage, layout, $ty);
                // SAFETY: the kernel writes every element of every row.
                let out = unsafe { device.alloc::<$ty>(n)? };
                let segments_view = match &segments_storage {
                    Some((seg, seg_layout)) => {
                        let candle_core::Storage::Cuda(seg) = &**seg else {
                            candle_core::bail!("masked softmax: segment ids must be on the device")
                        };
                        Some(view!(seg, seg_layout, u32))
                    }
                    None => None,
                };
                let mut builder = func.builder();
                builder.arg(&scores);
                builder.arg(&out);
                match &segments_view {
                    Some(view) => builder.arg(view),
                    None => builder.arg(&null),
                };
                builder.arg(&t);
                builder.arg(&past);
                builder.arg(&s_arg);
                builder.arg(&rows_per_batch);
                builder.arg(&scale);
                // SAFETY: the argument list matches the kernel's signature.
                unsafe { builder.launch(per_row(rows)) }.w()?;
                CudaStorage {
                    slice: CudaStorageSlice::$variant(out),
                    device: device.clone(),
                }
            }};
        }
        let out = match storage.dtype() {
            candle_core::DType::F32 => launch!(f32, "masked_softmax_f32", F32),
            candle_core::DType::BF16 => launch!(half::bf16, "masked_softmax_bf16", BF16),
            other => candle_core::bail!("masked softmax: unsupported dtype {other:?}"),
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(
        &self,
        _scores: &candle_core::Tensor,
        probs: &candle_core::Tensor,
        grad: &candle_core::Tensor,
    ) -> Result<Option<candle_core::Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(probs.apply_op2_no_bwd(
            &grad,
            &SoftmaxBackward { scale: self.scale },
        )?))
    }
}

/// `(probs, d probs) -> d scores = scale · p · (dp − Σ p·dp)` per row.
struct SoftmaxBackward {
    scale: f32,
}

impl candle_core::CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "softmax-backward"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("softmax backward: a CUDA kernel")
    }

    fn cuda_fwd(
        &self,
        probs: &CudaStorage,
        probs_layout: &Layout,
        dprobs: &CudaStorage,
        dprobs_layout: &Layout,
    ) -> Result<(CudaStorage, candle_core::Shape)> {
        let device = &probs.device;
        let s = *probs_layout.dims().last().unwrap_or(&1);
        let n = probs_layout.shape().elem_count();
        let rows = n / s.max(1);
        let (s_arg, scale) = (s as i32, self.scale);
        if dprobs_layout.shape() != probs_layout.shape() {
            candle_core::bail!("softmax backward: gradient of another shape")
        }
        macro_rules! launch {
            ($ty:ty, $name:literal, $variant:ident) => {{
                let func = device.get_or_load_custom_func($name, MODULE, PTX)?;
                let (p, dp) = (
                    view!(probs, probs_layout, $ty),
                    view!(dprobs, dprobs_layout, $ty),
                );
                // SAFETY: the kernel writes every element of every row.
                let out = unsafe { device.alloc::<$ty>(n)? };
                let mut builder = func.builder();
                builder.arg(&p);
                builder.arg(&dp);
                builder.arg(&out);
                builder.arg(&s_arg);
                builder.arg(&scale);
                // SAFETY: the argument list matches the kernel's signature.
                unsafe { builder.launch(per_row(rows)) }.w()?;
                CudaStorage {
                    slice: CudaStorageSlice::$variant(out),
                    device: device.clone(),
                }
            }};
        }
        let out = match probs.dtype() {
            candle_core::DType::F32 => launch!(f32, "softmax_backward_f32", F32),
            candle_core::DType::BF16 => launch!(half::bf16, "softmax_backward_bf16", BF16),
            other => candle_core::bail!("softmax backward: unsupported dtype {other:?}"),
        };
        Ok((out, probs_layout.shape().clone()))
    }
}

/// Allocator settings for one-stream training (`CORPUSDB_CUDA_TUNING=0` turns them off; on
/// an H200 they made a 2-layer 1B step 12% faster, 0.249 → 0.219 s):
/// - the device's default memory pool keeps freed memory instead of returning it to the
///   driver at every synchronisation (release threshold: unlimited), as PyTorch's caching
///   allocator does;
/// - no per-tensor CUDA events: candle uses one stream per device, so the events that
///   order tensors across streams are pure overhead (two per allocation).
///
/// Applies to tensors created afterwards; errors are reported, not fatal.
pub fn tune_for_training(device: &candle_core::CudaDevice) -> Result<()> {
    if std::env::var("CORPUSDB_CUDA_TUNING").is_ok_and(|v| v == "0") {
        return Ok(());
    }
    use candle_core::cuda_backend::cudarc::driver::sys;
    let stream = device.cuda_stream();
    let cu_device = stream.context().cu_device();
    let mut pool = std::mem::MaybeUninit::<sys::CUmemoryPool>::uninit();
    // SAFETY: plain driver calls on a device the context holds; `pool` is written by the
    // first call before it is read.
    unsafe {
        stream.context().bind_to_thread().w()?;
        sys::cuDeviceGetDefaultMemPool(pool.as_mut_ptr(), cu_device)
            .result()
            .w()?;
        let mut threshold: u64 = u64::MAX;
        sys::cuMemPoolSetAttribute(
            pool.assume_init(),
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut threshold as *mut u64 as *mut std::ffi::c_void,
        )
        .result()
        .w()?;
        device.disable_event_tracking();
    }
    Ok(())
}

/// `scale · p · (dp − Σ p·dp)` per row: the gradient of the scores of [`MaskedSoftmax`]
/// from its output `probs` and the output's gradient `d_probs`.
pub fn masked_softmax_backward(
    probs: &candle_core::Tensor,
    d_probs: &candle_core::Tensor,
    scale: f32,
) -> Result<candle_core::Tensor> {
    probs
        .contiguous()?
        .apply_op2_no_bwd(&d_probs.contiguous()?, &SoftmaxBackward { scale })
}

/// The gradients of `silu(gate) · up` with respect to `gate` and `up` for the upstream
/// gradient `d` (all of one shape and dtype, f32 or bf16), by one kernel computing in f32.
pub fn swiglu_backward(
    gate: &candle_core::Tensor,
    up: &candle_core::Tensor,
    d: &candle_core::Tensor,
) -> Result<(candle_core::Tensor, candle_core::Tensor)> {
    let both = gate.contiguous()?.apply_op3_no_bwd(
        &up.contiguous()?,
        &d.contiguous()?,
        &SwigluBackward,
    )?;
    Ok((both.get(0)?, both.get(1)?))
}

/// `(gate, up, d) -> [d gate, d up]` stacked on a new first dimension.
struct SwigluBackward;

impl candle_core::CustomOp3 for SwigluBackward {
    fn name(&self) -> &'static str {
        "swiglu-backward"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("swiglu backward: a CUDA kernel (the CPU composes it)")
    }

    fn cuda_fwd(
        &self,
        gate: &CudaStorage,
        gate_layout: &Layout,
        up: &CudaStorage,
        up_layout: &Layout,
        d: &CudaStorage,
        d_layout: &Layout,
    ) -> Result<(CudaStorage, candle_core::Shape)> {
        if gate_layout.shape() != up_layout.shape() || gate_layout.shape() != d_layout.shape() {
            candle_core::bail!("swiglu backward: inputs of different shapes")
        }
        let device = &gate.device;
        let n = gate_layout.shape().elem_count();
        let count = n as u64;
        macro_rules! launch {
            ($ty:ty, $name:literal, $variant:ident) => {{
                let func = device.get_or_load_custom_func($name, MODULE, PTX)?;
                let (g, u, dy) = (
                    view!(gate, gate_layout, $ty),
                    view!(up, up_layout, $ty),
                    view!(d, d_layout, $ty),
                );
                // SAFETY: the kernel writes both halves, every element.
                let mut out = unsafe { device.alloc::<$ty>(2 * n)? };
                let mut builder = func.builder();
                builder.arg(&g);
                builder.arg(&u);
                builder.arg(&dy);
                builder.arg(&mut out);
                builder.arg(&count);
                // SAFETY: the argument list matches the kernel's signature.
                unsafe { builder.launch(grid_stride(n)) }.w()?;
                CudaStorage {
                    slice: CudaStorageSlice::$variant(out),
                    device: device.clone(),
                }
            }};
        }
        let out = match gate.dtype() {
            candle_core::DType::F32 => launch!(f32, "swiglu_bwd_f32", F32),
            candle_core::DType::BF16 => launch!(half::bf16, "swiglu_bwd_bf16", BF16),
            other => candle_core::bail!("swiglu backward: unsupported dtype {other:?}"),
        };
        let mut dims = vec![2];
        dims.extend_from_slice(gate_layout.dims());
        Ok((out, candle_core::Shape::from(dims)))
    }
}

/// The cross-entropy of every row of `logits: [n, vocab]` (f32 or bf16, on the device)
/// against `targets: [n]` (u32, on the device): the per-row negative log-likelihoods (f32)
/// and the gradient of their sum with respect to the logits, `softmax − onehot` (the
/// logits' dtype), by one kernel that reads each row twice and computes in f32.
pub fn cross_entropy(
    logits: &candle_core::Tensor,
    targets: &candle_core::Tensor,
) -> Result<(candle_core::Tensor, candle_core::Tensor)> {
    use candle_core::{op::BackpropOp, Storage, Tensor};
    let (n, vocab) = logits.dims2()?;
    if targets.dims1()? != n || targets.dtype() != candle_core::DType::U32 {
        candle_core::bail!("cross-entropy: {n} rows of logits need {n} u32 targets")
    }
    let logits = logits.contiguous()?;
    let targets = targets.contiguous()?;
    let (storage, layout) = logits.storage_and_layout();
    let (target_storage, target_layout) = targets.storage_and_layout();
    let (Storage::Cuda(storage), Storage::Cuda(target_storage)) = (&*storage, &*target_storage)
    else {
        candle_core::bail!("cross-entropy: logits and targets must be on the device")
    };
    let device = &storage.device;
    let vocab_arg = vocab as i32;
    // SAFETY: the kernel writes one value per row.
    let mut nll = unsafe { device.alloc::<f32>(n)? };
    macro_rules! launch {
        ($ty:ty, $name:literal, $variant:ident) => {{
            let func = device.get_or_load_custom_func($name, MODULE, PTX)?;
            let (x, t) = (
                view!(storage, layout, $ty),
                view!(target_storage, target_layout, u32),
            );
            // SAFETY: the kernel writes every element of every row.
            let mut grad = unsafe { device.alloc::<$ty>(n * vocab)? };
            let mut builder = func.builder();
            builder.arg(&x);
            builder.arg(&t);
            builder.arg(&mut grad);
            builder.arg(&mut nll);
            builder.arg(&vocab_arg);
            let config = LaunchConfig {
                grid_dim: (n as u32, 1, 1),
                block_dim: (1024, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: the argument list matches the kernel's signature.
            unsafe { builder.launch(config) }.w()?;
            CudaStorageSlice::$variant(grad)
        }};
    }
    let grad = match storage.dtype() {
        candle_core::DType::F32 => launch!(f32, "cross_entropy_f32", F32),
        candle_core::DType::BF16 => launch!(half::bf16, "cross_entropy_bf16", BF16),
        other => candle_core::bail!("cross-entropy: unsupported dtype {other:?}"),
    };
    let wrap = |slice| {
        Storage::Cuda(CudaStorage {
            slice,
            device: device.clone(),
        })
    };
    let grad = Tensor::from_storage(wrap(grad), (n, vocab), BackpropOp::none(), false);
    let nll = Tensor::from_storage(
        wrap(CudaStorageSlice::F32(nll)),
        n,
        BackpropOp::none(),
        false,
    );
    Ok((nll, grad))
}

/// 0: not yet read from the environment, 1: on, 2: off.
static FLASH: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Whether attention in training runs as corpusdb's flash kernels (default; with
/// `CORPUSDB_CUDA_FLASH=0` or without the fused kernels, it keeps the probabilities).
pub fn flash_enabled() -> bool {
    use std::sync::atomic::Ordering;
    let on = match FLASH.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var("CORPUSDB_CUDA_FLASH").map_or(true, |v| v != "0");
            FLASH.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
        state => state == 1,
    };
    on && kernels_enabled()
}

/// Turns the flash kernels on or off for this process (the GPU check compares both).
pub fn set_flash_enabled(on: bool) {
    FLASH.store(if on { 1 } else { 2 }, std::sync::atomic::Ordering::Relaxed);
}

/// Head widths the flash kernels are built for.
pub const FLASH_HEAD_DIMS: [usize; 2] = [64, 128];

/// Rows of a flash kernel's tile (FLASH_ROWS in corpusdb.cu).
pub const FLASH_TILE: usize = 64;
const FLASH_ROWS: usize = FLASH_TILE;

/// The packed rows' masking data for the flash kernels, on the device: segment ids and,
/// per position, the first and last position of its segment (`[b × t]` u32 each), and per
/// 64-position tile of a row its one segment id or `u32::MAX` when it holds several (tile
/// pairs inside one segment need no mask).
pub struct FlashSegments {
    pub ids: candle_core::Tensor,
    pub first: candle_core::Tensor,
    pub last: candle_core::Tensor,
    pub tiles: candle_core::Tensor,
}

/// Per row of `t` ids, per tile of [`FLASH_TILE`] positions (the last one short), the tile's
/// one segment id, or `u32::MAX` when it holds several.
pub fn segment_tiles(ids: &[u32], b: usize, t: usize) -> Vec<u32> {
    let per_row = t.div_ceil(FLASH_TILE);
    let mut tiles = Vec::with_capacity(b * per_row);
    for row in 0..b {
        for chunk in ids[row * t..(row + 1) * t].chunks(FLASH_TILE) {
            let first = chunk[0];
            tiles.push(if chunk.iter().all(|&id| id == first) {
                first
            } else {
                u32::MAX
            });
        }
    }
    tiles
}

/// Checks a flash kernel's input: on the device, contiguous and 16-byte aligned (the
/// kernels read rows in 16-byte chunks).
fn check_input(storage: &candle_core::Storage, layout: &Layout, what: &str) -> Result<()> {
    if !matches!(storage, candle_core::Storage::Cuda(_)) {
        candle_core::bail!("flash attention: {what} must be on the device")
    }
    if !layout.is_contiguous() || !layout.start_offset().is_multiple_of(8) {
        candle_core::bail!("flash attention: {what} must be contiguous and aligned")
    }
    Ok(())
}

/// A checked flash input's storage guard and layout.
macro_rules! flash_input {
    ($tensor:expr, $what:expr) => {{
        let (guard, layout) = $tensor.storage_and_layout();
        check_input(&guard, layout, $what)?;
        (guard, layout.clone())
    }};
    ($tensor:expr, $what:expr, u32) => {{
        if $tensor.dtype() != candle_core::DType::U32 {
            candle_core::bail!("flash attention: {} must be u32", $what)
        }
        flash_input!($tensor, $what)
    }};
}

macro_rules! cuda_view {
    ($guard:expr, $layout:expr, $ty:ty) => {{
        let storage: &candle_core::Storage = &$guard;
        let candle_core::Storage::Cuda(storage) = storage else {
            unreachable!("checked by check_input")
        };
        view!(storage, $layout, $ty)
    }};
}

/// Lets a kernel use `shared` bytes of dynamic shared memory (past the default 48 KiB).
fn allow_shared(
    func: &candle_core::cuda_backend::cudarc::driver::CudaFunction,
    shared: usize,
) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
    func.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        shared as i32,
    )
    .w()
}

fn flash_config(blocks: (usize, usize, usize), shared: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.0 as u32, blocks.1 as u32, blocks.2 as u32),
        block_dim: (128, 1, 1),
        shared_mem_bytes: shared as u32,
    }
}

/// Shared bytes of `tiles` padded `[64, d + 8]` bf16 tiles and `rows` f32/u32 row vectors.
fn flash_shared(d: usize, tiles: usize, rows: usize) -> usize {
    tiles * FLASH_ROWS * (d + 8) * 2 + rows * FLASH_ROWS * 4
}

fn wrap_bf16(
    slice: candle_core::cuda_backend::cudarc::driver::CudaSlice<half::bf16>,
    device: &candle_core::CudaDevice,
    shape: &[usize],
) -> candle_core::Tensor {
    use candle_core::op::BackpropOp;
    let storage = candle_core::Storage::Cuda(CudaStorage {
        slice: CudaStorageSlice::BF16(slice),
        device: device.clone(),
    });
    candle_core::Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

/// The shapes of a flash call: `q: [b, kv_heads, group × t, d]`, `k`, `v: [b, kv_heads, t, d]`.
fn flash_shapes(
    q: &candle_core::Tensor,
    k: &candle_core::Tensor,
    v: &candle_core::Tensor,
    t: usize,
) -> Result<(usize, usize, usize, usize)> {
    let (b, kv_heads, rows, d) = q.dims4()?;
    if t == 0
        || rows % t != 0
        || k.dims4()? != (b, kv_heads, t, d)
        || v.dims4()? != (b, kv_heads, t, d)
        || !FLASH_HEAD_DIMS.contains(&d)
        || [q, k, v]
            .iter()
            .any(|x| x.dtype() != candle_core::DType::BF16)
    {
        candle_core::bail!(
            "flash attention: q {:?}, k {:?}, v {:?} ({:?}) do not fit {t} tokens of width 64 or 128 in bf16",
            q.dims(),
            k.dims(),
            v.dims(),
            q.dtype()
        )
    }
    Ok((b, kv_heads, rows / t, d))
}

/// Attention's output and per-query log-sum-exp (f32, log2 units of the scaled scores) by
/// the flash forward kernel, for `t` tokens per row with no cached positions: causal, and
/// within packed segments when `segments` is given.
pub fn flash_forward(
    q: &candle_core::Tensor,
    k: &candle_core::Tensor,
    v: &candle_core::Tensor,
    scale: f64,
    t: usize,
    segments: Option<&FlashSegments>,
) -> Result<(candle_core::Tensor, candle_core::Tensor)> {
    let (b, kv_heads, group, d) = flash_shapes(q, k, v, t)?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (qs, ql) = flash_input!(q, "q");
    let (ks, kl) = flash_input!(k, "k");
    let (vs, vl) = flash_input!(v, "v");
    let candle_core::Storage::Cuda(cuda) = &*qs else {
        unreachable!("checked by check_input")
    };
    let device = cuda.device.clone();
    let rows = b * kv_heads * group * t;
    let shared = flash_shared(d, 3, 1);
    let func = device.get_or_load_custom_func(&format!("flash_forward_d{d}"), MODULE, PTX)?;
    allow_shared(&func, shared)?;
    // SAFETY: the kernel writes every row of the output and the log-sum-exp.
    let out = unsafe { device.alloc::<half::bf16>(rows * d)? };
    let lse = unsafe { device.alloc::<f32>(rows)? };
    let segment_guards = match segments {
        Some(s) => Some((
            flash_input!(s.ids, "segment ids", u32),
            flash_input!(s.first, "segment starts", u32),
            flash_input!(s.tiles, "segment tiles", u32),
        )),
        None => None,
    };
    let null: u64 = 0;
    let (t_arg, group_arg, kv_arg) = (t as i32, group as i32, kv_heads as i32);
    let scale_log2 = (scale * std::f64::consts::LOG2_E) as f32;
    let (qv, kv, vv) = (
        cuda_view!(qs, &ql, half::bf16),
        cuda_view!(ks, &kl, half::bf16),
        cuda_view!(vs, &vl, half::bf16),
    );
    let segment_views = match &segment_guards {
        Some(((ids, ids_layout), (first, first_layout), (tiles, tiles_layout))) => Some((
            cuda_view!(ids, ids_layout, u32),
            cuda_view!(first, first_layout, u32),
            cuda_view!(tiles, tiles_layout, u32),
        )),
        None => None,
    };
    let mut builder = func.builder();
    builder.arg(&qv);
    builder.arg(&kv);
    builder.arg(&vv);
    builder.arg(&out);
    builder.arg(&lse);
    match &segment_views {
        Some((ids, first, tiles)) => {
            builder.arg(ids);
            builder.arg(first);
            builder.arg(tiles);
        }
        None => {
            builder.arg(&null);
            builder.arg(&null);
            builder.arg(&null);
        }
    }
    builder.arg(&t_arg);
    builder.arg(&group_arg);
    builder.arg(&kv_arg);
    builder.arg(&scale_log2);
    let blocks = (t.div_ceil(FLASH_ROWS), group, b * kv_heads);
    // SAFETY: the argument list matches the kernel's signature.
    unsafe { builder.launch(flash_config(blocks, shared)) }.w()?;
    let out = wrap_bf16(out, &device, &[b, kv_heads, group * t, d]);
    let lse = candle_core::Tensor::from_storage(
        candle_core::Storage::Cuda(CudaStorage {
            slice: CudaStorageSlice::F32(lse),
            device: device.clone(),
        }),
        rows,
        candle_core::op::BackpropOp::none(),
        false,
    );
    Ok((out, lse))
}

/// The gradients of `q`, `k` and `v` for the gradient `d_out` of [`flash_forward`]'s output
/// `out` (with its log-sum-exp `lse`): the rows' `Σ dO·O`, then one kernel for `dq` over the
/// query tiles and one for `dk`, `dv` over the key tiles (summed over the group's heads).
#[allow(clippy::too_many_arguments)]
pub fn flash_backward(
    q: &candle_core::Tensor,
    k: &candle_core::Tensor,
    v: &candle_core::Tensor,
    out: &candle_core::Tensor,
    lse: &candle_core::Tensor,
    d_out: &candle_core::Tensor,
    scale: f64,
    t: usize,
    segments: Option<&FlashSegments>,
) -> Result<(
    candle_core::Tensor,
    candle_core::Tensor,
    candle_core::Tensor,
)> {
    let (b, kv_heads, group, d) = flash_shapes(q, k, v, t)?;
    let d_out = d_out.to_dtype(candle_core::DType::BF16)?.contiguous()?;
    if d_out.dims() != q.dims() || out.dims() != q.dims() {
        candle_core::bail!("flash attention: the output's gradient has another shape")
    }
    let (q, k, v, out) = (
        q.contiguous()?,
        k.contiguous()?,
        v.contiguous()?,
        out.contiguous()?,
    );
    let lse = lse.contiguous()?;
    let (qs, ql) = flash_input!(q, "q");
    let (ks, kl) = flash_input!(k, "k");
    let (vs, vl) = flash_input!(v, "v");
    let (os, ol) = flash_input!(out, "the output");
    let (ds, dl) = flash_input!(d_out, "the output's gradient");
    let (ls, ll) = flash_input!(lse, "the log-sum-exp");
    let candle_core::Storage::Cuda(cuda) = &*qs else {
        unreachable!("checked by check_input")
    };
    let device = cuda.device.clone();
    let rows = b * kv_heads * group * t;
    let (qv, kv, vv, ov, dv_out, lv) = (
        cuda_view!(qs, &ql, half::bf16),
        cuda_view!(ks, &kl, half::bf16),
        cuda_view!(vs, &vl, half::bf16),
        cuda_view!(os, &ol, half::bf16),
        cuda_view!(ds, &dl, half::bf16),
        cuda_view!(ls, &ll, f32),
    );

    // Σ_d dO·O per query row: one warp a row.
    // SAFETY: the kernel writes every row's value.
    let delta = unsafe { device.alloc::<f32>(rows)? };
    {
        let func = device.get_or_load_custom_func("flash_delta_bf16", MODULE, PTX)?;
        let (rows_arg, dim_arg) = (rows as i64, d as i32);
        let mut builder = func.builder();
        builder.arg(&ov);
        builder.arg(&dv_out);
        builder.arg(&delta);
        builder.arg(&rows_arg);
        builder.arg(&dim_arg);
        let config = LaunchConfig {
            grid_dim: (rows.div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the argument list matches the kernel's signature.
        unsafe { builder.launch(config) }.w()?;
    }

    let segment_guards = match segments {
        Some(s) => Some((
            flash_input!(s.ids, "segment ids", u32),
            flash_input!(s.first, "segment starts", u32),
            flash_input!(s.last, "segment ends", u32),
            flash_input!(s.tiles, "segment tiles", u32),
        )),
        None => None,
    };
    let segment_views = match &segment_guards {
        Some(((ids, il), (first, fl), (last, ll), (tiles, tl))) => Some((
            cuda_view!(ids, il, u32),
            cuda_view!(first, fl, u32),
            cuda_view!(last, ll, u32),
            cuda_view!(tiles, tl, u32),
        )),
        None => None,
    };
    let null: u64 = 0;
    let (t_arg, group_arg, kv_arg) = (t as i32, group as i32, kv_heads as i32);
    let scale_log2 = (scale * std::f64::consts::LOG2_E) as f32;
    let scale_arg = scale as f32;

    // SAFETY: each kernel writes every row of its outputs.
    let dq = unsafe { device.alloc::<half::bf16>(rows * d)? };
    let shared = flash_shared(d, 4, 1);
    let func = device.get_or_load_custom_func(&format!("flash_dq_d{d}"), MODULE, PTX)?;
    allow_shared(&func, shared)?;
    let mut builder = func.builder();
    builder.arg(&qv);
    builder.arg(&kv);
    builder.arg(&vv);
    builder.arg(&dv_out);
    builder.arg(&lv);
    builder.arg(&delta);
    builder.arg(&dq);
    match &segment_views {
        Some((ids, first, _, tiles)) => {
            builder.arg(ids);
            builder.arg(first);
            builder.arg(tiles);
        }
        None => {
            builder.arg(&null);
            builder.arg(&null);
            builder.arg(&null);
        }
    }
    builder.arg(&t_arg);
    builder.arg(&group_arg);
    builder.arg(&kv_arg);
    builder.arg(&scale_log2);
    builder.arg(&scale_arg);
    let blocks = (t.div_ceil(FLASH_ROWS), group, b * kv_heads);
    // SAFETY: the argument list matches the kernel's signature.
    unsafe { builder.launch(flash_config(blocks, shared)) }.w()?;

    let key_values = b * kv_heads * t * d;
    // SAFETY: as above.
    let dk = unsafe { device.alloc::<half::bf16>(key_values)? };
    let dv = unsafe { device.alloc::<half::bf16>(key_values)? };
    let shared = flash_shared(d, 4, 3);
    let func = device.get_or_load_custom_func(&format!("flash_dkdv_d{d}"), MODULE, PTX)?;
    allow_shared(&func, shared)?;
    let mut builder = func.builder();
    builder.arg(&qv);
    builder.arg(&kv);
    builder.arg(&vv);
    builder.arg(&dv_out);
    builder.arg(&lv);
    builder.arg(&delta);
    builder.arg(&dk);
    builder.arg(&dv);
    match &segment_views {
        Some((ids, _, last, tiles)) => {
            builder.arg(ids);
            builder.arg(last);
            builder.arg(tiles);
        }
        None => {
            builder.arg(&null);
            builder.arg(&null);
            builder.arg(&null);
        }
    }
    builder.arg(&t_arg);
    builder.arg(&group_arg);
    builder.arg(&kv_arg);
    builder.arg(&scale_log2);
    builder.arg(&scale_arg);
    let blocks = (t.div_ceil(FLASH_ROWS), 1, b * kv_heads);
    // SAFETY: the argument list matches the kernel's signature.
    unsafe { builder.launch(flash_config(blocks, shared)) }.w()?;

    let dq = wrap_bf16(dq, &device, &[b, kv_heads, group * t, d]);
    let dk = wrap_bf16(dk, &device, &[b, kv_heads, t, d]);
    let dv = wrap_bf16(dv, &device, &[b, kv_heads, t, d]);
    Ok((dq, dk, dv))
}

/// `bf16(base + delta)` for a bf16 `base` and an f32 `delta` of one shape, rounded once (the
/// adapter's term added to a frozen projection, as PyTorch adds an f32 LoRA delta).
pub fn add_f32_to_bf16(
    base: &candle_core::Tensor,
    delta: &candle_core::Tensor,
) -> Result<candle_core::Tensor> {
    if base.dims() != delta.dims()
        || base.dtype() != candle_core::DType::BF16
        || delta.dtype() != candle_core::DType::F32
    {
        candle_core::bail!(
            "add f32 to bf16: {:?} {:?} and {:?} {:?}",
            base.dims(),
            base.dtype(),
            delta.dims(),
            delta.dtype()
        )
    }
    let (base, delta) = (base.contiguous()?, delta.contiguous()?);
    let (bs, bl) = base.storage_and_layout();
    let (ds, dl) = delta.storage_and_layout();
    let (candle_core::Storage::Cuda(bs), candle_core::Storage::Cuda(ds)) = (&*bs, &*ds) else {
        candle_core::bail!("add f32 to bf16: both tensors must be on the device")
    };
    let device = bs.device.clone();
    let n = bl.shape().elem_count();
    let count = n as u64;
    let (bv, dv) = (view!(bs, bl, half::bf16), view!(ds, dl, f32));
    let func = device.get_or_load_custom_func("add_f32_to_bf16", MODULE, PTX)?;
    // SAFETY: the kernel writes every element.
    let out = unsafe { device.alloc::<half::bf16>(n)? };
    let mut builder = func.builder();
    builder.arg(&bv);
    builder.arg(&dv);
    builder.arg(&out);
    builder.arg(&count);
    // SAFETY: the argument list matches the kernel's signature.
    unsafe { builder.launch(grid_stride(n)) }.w()?;
    Ok(wrap_bf16(out, &device, base.dims()))
}
