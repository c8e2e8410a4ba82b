//! A linear layer whose weight never gets a gradient.
//!
//! candle's matmul backward computes the gradient of both operands, so `x.matmul(&w.t())`
//! on a frozen base weight would allocate a gradient as large as the weight for every
//! projection of the model on every step. [`frozen_linear`] runs the same matmul as a custom
//! op whose backward returns only the input's gradient (`grad · W`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};

struct FrozenLinear {
    /// `[out, in]`, as stored by Hugging Face.
    weight: Tensor,
}

impl FrozenLinear {
    fn dims(&self, layout: &Layout) -> Result<(usize, usize, usize)> {
        let (m, k) = layout.shape().dims2()?;
        let (n, k_weight) = self.weight.dims2()?;
        if k != k_weight {
            candle_core::bail!("frozen linear: input has {k} features, weight expects {k_weight}")
        }
        Ok((m, n, k))
    }
}

impl FrozenLinear {
    /// `x · Wᵀ` on one backend's storage.
    fn forward<S: BackendStorage>(
        &self,
        x: &S,
        layout: &Layout,
        weight: &S,
        weight_layout: &Layout,
    ) -> Result<(S, Shape)> {
        let (m, n, k) = self.dims(layout)?;
        let out = x.matmul(
            weight,
            (1, m, n, k),
            layout,
            &weight_layout.transpose(0, 1)?,
        )?;
        Ok((out, Shape::from((m, n))))
    }
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (weight, weight_layout) = self.weight.storage_and_layout();
        let Storage::Cpu(weight) = &*weight else {
            candle_core::bail!("frozen linear: input on the CPU, weight elsewhere")
        };
        if let Some(out) = super::blas::product(storage, layout, weight, weight_layout, true)? {
            return Ok(out);
        }
        self.forward(storage, layout, weight, weight_layout)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (weight, weight_layout) = self.weight.storage_and_layout();
        let Storage::Cuda(weight) = &*weight else {
            candle_core::bail!("frozen linear: input on CUDA, weight elsewhere")
        };
        self.forward(storage, layout, weight, weight_layout)
    }

    fn bwd(&self, _input: &Tensor, _output: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if grad.device().is_cpu() && grad.dtype() == self.weight.dtype() {
            if let Some(dx) = super::blas::tensor_product(grad, &self.weight)? {
                return Ok(Some(dx));
            }
        }
        Ok(Some(grad.matmul(&self.weight)?))
    }
}

/// `x · Wᵀ` for `x: [m, in]` and a frozen `W: [out, in]`; only `x` receives a gradient.
pub fn frozen_linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let op = FrozenLinear {
        weight: weight.clone(),
    };
    if x.track_op() {
        x.contiguous()?.apply_op1(op)
    } else if super::blas::ENABLED && x.device().is_cpu() && x.dtype() == weight.dtype() {
        // No graph to record, but the same faster product.
        x.contiguous()?.apply_op1_no_bwd(&op)
    } else {
        // Nothing upstream needs a gradient: a plain matmul builds no graph either.
        x.matmul(&weight.t()?)
    }
}
