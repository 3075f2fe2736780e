//! TMA tensor maps (`CUtensorMap`), encoded on the host for the kernels that load tiles with
//! `cp.async.bulk.tensor` (kernels/tma.cuh): the KV pools of the wgmma prefill attention and the
//! operands of the FP8 streaming product.

use anyhow::{ensure, Result};
use cudarc::driver::sys;

/// An encoded `CUtensorMap` (128 opaque bytes).
pub type TensorMap = [u64; 16];

/// Element types the maps are made for.
#[derive(Debug, Clone, Copy)]
pub enum Element {
    U8,
    Bf16,
}

/// A 2-D map of `rows` rows of `cols` elements each (packed: rows are `cols` elements apart) at
/// `ptr`, read in boxes of `box_rows` x `box_cols` elements written with the 128-byte swizzle;
/// elements past the edges read as zeros. Encoding only: the memory is not read.
pub fn swizzled_2d(
    ptr: u64,
    element: Element,
    rows: usize,
    cols: usize,
    box_rows: usize,
    box_cols: usize,
) -> Result<TensorMap> {
    use sys::{
        CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE as ZERO_FILL,
        CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE as NO_INTERLEAVE,
        CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B as L2_256B,
        CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B as SWIZZLE_128B,
    };
    let (dtype, size) = match element {
        Element::U8 => (sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8, 1),
        Element::Bf16 => (
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            2,
        ),
    };
    // The kernels address rows and columns with 32-bit coordinates.
    ensure!(
        rows <= i32::MAX as usize && cols <= i32::MAX as usize,
        "a tensor of {rows} x {cols} is too large for TMA"
    );
    let dims = [cols as u64, rows as u64];
    let strides = [(cols * size) as u64];
    let boxes = [box_cols as u32, box_rows as u32];
    let steps = [1u32, 1];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: the arrays outlive the call and have the lengths rank 2 needs; the driver only
    // encodes the map (the memory at `ptr` is not dereferenced here).
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            dtype,
            2,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            steps.as_ptr(),
            NO_INTERLEAVE,
            SWIZZLE_128B,
            L2_256B,
            ZERO_FILL,
        )
    };
    ensure!(
        r == sys::CUresult::CUDA_SUCCESS,
        "encoding a tensor map of {rows} x {cols} {element:?} in boxes of {box_rows} x {box_cols}: {r:?}"
    );
    // SAFETY: the driver filled the map; it is plain bytes.
    Ok(unsafe { map.assume_init() }.opaque)
}
