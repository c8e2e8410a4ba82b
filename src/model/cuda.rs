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
    let device = &x.device;
    let dim = *x_layout.dims().last().unwrap_or(&1);
    let n = x_layout.shape().elem_count();
    let rows = n / dim.max(1);
    let dim_arg = dim as i32;
    macro_rules! launch {
        ($ty:ty, $name:literal, $variant:ident) => {{
            let func = device.get_or_load_custom_func($name, MODULE, PTX)?;
            let (xs, ws) = (view!(x, x_layout, $ty), view!(w, w_layout, $ty));
            // SAFETY: the kernel writes every element of every row.
            let out = unsafe { device.alloc::<$ty>(n)? };
            let mut builder = func.builder();
            builder.arg(&xs);
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
        candle_core::DType::F32 => launch!(f32, "rms_norm_fwd_f32", F32),
        candle_core::DType::BF16 => launch!(half::bf16, "rms_norm_fwd_bf16", BF16),
        other => candle_core::bail!("rms norm kernel: unsupported dtype {other:?}"),
    })
}

/// The gradient of [`rms_norm_forward`] with respect to `x` for the upstream gradient `g`
/// (same shape and dtype as `x`).
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_backward(
    x: &CudaStorage,
    x_layout: &Layout,
    g: &CudaStorage,
    g_layout: &Layout,
    w: &CudaStorage,
    w_layout: &Layout,
    eps: f32,
) -> Result<CudaStorage> {
    let device = &x.device;
    let dim = *x_layout.dims().last().unwrap_or(&1);
    let n = x_layout.shape().elem_count();
    let rows = n / dim.max(1);
    let dim_arg = dim as i32;
    macro_rules! launch {
        ($ty:ty, $name:literal, $variant:ident) => {{
            let func = device.get_or_load_custom_func($name, MODULE, PTX)?;
            let (xs, gs, ws) = (
                view!(x, x_layout, $ty),
                view!(g, g_layout, $ty),
                view!(w, w_layout, $ty),
            );
            // SAFETY: the kernel writes every element of every row.
            let out = unsafe { device.alloc::<$ty>(n)? };
            let mut builder = func.builder();
            builder.arg(&xs);
            builder.arg(&gs);
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
        candle_core::DType::F32 => launch!(f32, "rms_norm_bwd_f32", F32),
        candle_core::DType::BF16 => launch!(half::bf16, "rms_norm_bwd_bf16", BF16),
        other => candle_core::bail!("rms norm kernel: unsupported dtype {other:?}"),
    })
}
