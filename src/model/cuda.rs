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
/// `rng::dropout_in_place` for the stream `base` (bit for bit the CPU's mask).
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
