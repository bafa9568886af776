//! E4M3 quantisation on the device; CPU reference: [`crate::fp8::quantize::Fp8Matrix`],
//! which the kernels match bit for bit (codes and scales).

use super::{Gpu, Result, int};
use crate::fp8::quantize::{TILE, TileShape};
use moe_kernels::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use moe_kernels::registry::FP8;

/// An [`crate::fp8::quantize::Fp8Matrix`] on the device.
pub struct DeviceFp8 {
    pub rows: usize,
    pub cols: usize,
    pub tile: TileShape,
    /// `[rows, cols]` E4M3 codes.
    pub codes: CudaSlice<u8>,
    /// Row-major over the tile grid.
    pub scales: CudaSlice<f32>,
}

/// Quantises `m: [rows, cols]` with 1×128 tiles ([`TileShape::ROW`],
/// activations) or 128×128 blocks ([`TileShape::BLOCK`], weights).
pub fn quantize(
    gpu: &Gpu,
    m: &CudaSlice<f32>,
    rows: usize,
    cols: usize,
    tile: TileShape,
) -> Result<DeviceFp8> {
    assert_eq!(m.len(), rows * cols, "fp8 input shape");
    let tile_cols = cols.div_ceil(TILE);
    let (rows_i, cols_i) = (int(rows), int(cols));
    let (entry, tile_rows, config) = if tile == TileShape::ROW {
        // One warp per tile, 8 warps per block.
        let tiles = rows * tile_cols;
        let config = super::grid(tiles.div_ceil(8).max(1), 256, 0);
        ("fp8_quantize_1x128_f32", rows, config)
    } else if tile == TileShape::BLOCK {
        let tile_rows = rows.div_ceil(TILE);
        let config = LaunchConfig {
            grid_dim: (tile_cols.max(1) as u32, tile_rows.max(1) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        ("fp8_quantize_128x128_f32", tile_rows, config)
    } else {
        panic!("the CUDA quantiser supports 1x128 and 128x128 tiles, not {tile:?}");
    };
    let mut quantized = DeviceFp8 {
        rows,
        cols,
        tile,
        codes: gpu.zeros(rows * cols)?,
        scales: gpu.zeros(tile_rows * tile_cols)?,
    };
    if rows == 0 || cols == 0 {
        return Ok(quantized);
    }
    let f = gpu.function(&FP8, entry)?;
    let mut launch = gpu.stream().launch_builder(&f);
    launch
        .arg(&mut quantized.codes)
        .arg(&mut quantized.scales)
        .arg(m)
        .arg(&rows_i)
        .arg(&cols_i);
    unsafe { launch.launch(config) }?;
    Ok(quantized)
}
