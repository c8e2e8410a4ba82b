//! The frozen projections' matrix products through OpenBLAS (feature `openblas`, on by
//! default; Debian's `libopenblas-dev`, linked statically so the binary carries it).
//!
//! Frozen base projections are most of a LoRA step's arithmetic: each one's forward
//! product and its input gradient (the weight gets none). On the 2-core Xeon of
//! BENCHMARKS.md OpenBLAS multiplies those shapes about twice as fast as the `gemm` crate
//! candle uses, so [`super::frozen_linear`] hands them here; everything else stays candle's.

use candle_core::{CpuStorage, Layout, Result, Shape, Storage, Tensor};

#[cfg(feature = "openblas")]
mod ffi {
    pub const ROW_MAJOR: i32 = 101;
    pub const NO_TRANS: i32 = 111;
    pub const TRANS: i32 = 112;

    // Linked by build.rs.
    extern "C" {
        #[allow(clippy::too_many_arguments)]
        pub fn cblas_sgemm(
            layout: i32,
            trans_a: i32,
            trans_b: i32,
            m: i32,
            n: i32,
            k: i32,
            alpha: f32,
            a: *const f32,
            lda: i32,
            b: *const f32,
            ldb: i32,
            beta: f32,
            c: *mut f32,
            ldc: i32,
        );
        #[allow(clippy::too_many_arguments)]
        pub fn cblas_dgemm(
            layout: i32,
            trans_a: i32,
            trans_b: i32,
            m: i32,
            n: i32,
            k: i32,
            alpha: f64,
            a: *const f64,
            lda: i32,
            b: *const f64,
            ldb: i32,
            beta: f64,
            c: *mut f64,
            ldc: i32,
        );
    }
}

/// Whether products go through BLAS in this build.
pub const ENABLED: bool = cfg!(feature = "openblas");

/// `x[m, k] · W[n, k]ᵀ` (`transpose_w`) or `x[m, k] · W[k, n]` on contiguous CPU storage;
/// `None` when this build has no BLAS or the dtype is not f32/f64.
pub fn product(
    x: &CpuStorage,
    x_layout: &Layout,
    w: &CpuStorage,
    w_layout: &Layout,
    transpose_w: bool,
) -> Result<Option<(CpuStorage, Shape)>> {
    let (Some((xs, xe)), Some((ws, we))) =
        (x_layout.contiguous_offsets(), w_layout.contiguous_offsets())
    else {
        return Ok(None);
    };
    let (m, k) = x_layout.shape().dims2()?;
    let (w0, w1) = w_layout.shape().dims2()?;
    let n = if transpose_w { w0 } else { w1 };
    if (if transpose_w { w1 } else { w0 }) != k {
        candle_core::bail!(
            "blas: x is [{m}, {k}], the weight {:?}{}",
            w_layout.dims(),
            if transpose_w { " (transposed)" } else { "" }
        )
    }
    if !ENABLED || [m, n, k].iter().any(|&d| d > i32::MAX as usize) {
        return Ok(None);
    }
    let out = match (x, w) {
        (CpuStorage::F32(x), CpuStorage::F32(w)) => {
            CpuStorage::F32(multiply(&x[xs..xe], &w[ws..we], m, n, k, transpose_w))
        }
        (CpuStorage::F64(x), CpuStorage::F64(w)) => {
            CpuStorage::F64(multiply(&x[xs..xe], &w[ws..we], m, n, k, transpose_w))
        }
        _ => return Ok(None),
    };
    Ok(Some((out, Shape::from((m, n)))))
}

/// `product` on tensors: the input gradient of a frozen projection, `grad[m, n] · W[n, k]`.
pub fn tensor_product(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let x = x.contiguous()?;
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (Storage::Cpu(xs), Storage::Cpu(ws)) = (&*xs, &*ws) else {
        return Ok(None);
    };
    Ok(product(xs, xl, ws, wl, false)?.map(|(storage, shape)| {
        Tensor::from_storage(
            Storage::Cpu(storage),
            shape,
            candle_core::op::BackpropOp::none(),
            false,
        )
    }))
}

trait Gemm: Copy + Default {
    #[allow(clippy::too_many_arguments)]
    fn gemm(a: &[Self], b: &[Self], c: &mut [Self], m: usize, n: usize, k: usize, trans_b: bool);
}

#[cfg(feature = "openblas")]
macro_rules! gemm_impl {
    ($t:ty, $f:ident) => {
        impl Gemm for $t {
            fn gemm(a: &[$t], b: &[$t], c: &mut [$t], m: usize, n: usize, k: usize, trans_b: bool) {
                let ldb = if trans_b { k } else { n };
                // Safety: the slices hold m×k, (n×k or k×n) and m×n values (checked by the
                // caller's shapes); OpenBLAS only reads a and b and writes c.
                unsafe {
                    ffi::$f(
                        ffi::ROW_MAJOR,
                        ffi::NO_TRANS,
                        if trans_b { ffi::TRANS } else { ffi::NO_TRANS },
                        m as i32,
                        n as i32,
                        k as i32,
                        1.0,
                        a.as_ptr(),
                        k.max(1) as i32,
                        b.as_ptr(),
                        ldb.max(1) as i32,
                        0.0,
                        c.as_mut_ptr(),
                        n.max(1) as i32,
                    )
                }
            }
        }
    };
}

#[cfg(feature = "openblas")]
gemm_impl!(f32, cblas_sgemm);
#[cfg(feature = "openblas")]
gemm_impl!(f64, cblas_dgemm);

#[cfg(not(feature = "openblas"))]
impl<T: Copy + Default> Gemm for T {
    fn gemm(_: &[T], _: &[T], _: &mut [T], _: usize, _: usize, _: usize, _: bool) {
        unreachable!("no BLAS in this build")
    }
}

fn multiply<T: Gemm>(x: &[T], w: &[T], m: usize, n: usize, k: usize, transpose_w: bool) -> Vec<T> {
    let mut out = vec![T::default(); m * n];
    if m > 0 && n > 0 {
        T::gemm(x, w, &mut out, m, n, k, transpose_w);
    }
    out
}
