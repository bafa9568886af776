//! E4M3 quantisation on the device; CPU reference: [`crate::fp8::quantize::Fp8Matrix`],
//! which the kernels match bit for bit (codes and scales).

use super::{Gpu, Result, int};
use crate::fp8::quantize::{TILE, TileShape};
use moe_kernels::cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use moe_kernels::registry::FP8;

/// How a [`DeviceFp8`]'s scales are laid out in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleLayout {
    /// Row-major over the tile grid, `[tile_rows, tile_cols]`: the CPU's
    /// [`crate::fp8::quantize::Fp8Matrix`] layout, read by [`gemm_abt`].
    RowMajor,
    /// What cuBLASLt's block-scaled FP8 GEMM reads ([`super::fp8_gemm`]):
    /// 1×128 tiles outer-major, `[tile_cols, rows]` (one row of scales per
    /// K slice); 128×128 blocks row-major with each row of K blocks padded
    /// to a multiple of 4, `[tile_rows, round_up(tile_cols, 4)]` (padding
    /// zero). Measured on an H200: unpadded rows give garbage whenever
    /// `ceil(K / 128)` is not a multiple of 4.
    Cublaslt,
    /// One scale for the whole operand (the tensorwise recipe's delayed
    /// scale, [`super::fp8_delayed`]); cuBLASLt's scalar scale mode, codes
    /// laid out as [`ScaleLayout::Cublaslt`]'s 1×128 operands'.
    Tensor,
}

/// An [`crate::fp8::quantize::Fp8Matrix`] on the device.
pub struct DeviceFp8 {
    pub rows: usize,
    pub cols: usize,
    pub tile: TileShape,
    /// Codes per stored row, `cols` or more: an operand of cuBLASLt's FP8
    /// GEMM is padded with zero codes to whole 128-wide K slices.
    pub stride: usize,
    /// Rows in memory, `rows` or more (an operand of cuBLASLt's FP8 GEMM
    /// is padded to a multiple of 16, see `matmul::FP8_ROWS`; its 1×128
    /// scales are one row of `padded_rows` per K slice); the rows past
    /// `rows` are zero codes with zero scales.
    pub padded_rows: usize,
    /// `[padded_rows, stride]` E4M3 codes.
    pub codes: CudaSlice<u8>,
    /// One f32 per tile, laid out as `layout` says.
    pub scales: CudaSlice<f32>,
    pub layout: ScaleLayout,
}

impl DeviceFp8 {
    /// The scales in the CPU's row-major tile-grid order, whatever the
    /// device layout (for checks against [`crate::fp8::quantize::Fp8Matrix`]).
    pub fn row_major_scales(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        let stored = gpu.download(&self.scales)?;
        let tile_cols = self.cols.div_ceil(TILE);
        Ok(match (self.layout, self.tile) {
            (ScaleLayout::RowMajor, _) => stored,
            (ScaleLayout::Tensor, _) => vec![stored[0]; self.rows * tile_cols],
            (ScaleLayout::Cublaslt, TileShape::ROW) => (0..self.rows * tile_cols)
                .map(|i| stored[(i % tile_cols) * self.padded_rows + i / tile_cols])
                .collect(),
            (ScaleLayout::Cublaslt, _) => {
                let stride = tile_cols.next_multiple_of(4);
                stored
                    .chunks(stride)
                    .flat_map(|row| &row[..tile_cols])
                    .copied()
                    .collect()
            }
        })
    }
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
    quantize_with_layout(gpu, m, rows, cols, tile, ScaleLayout::RowMajor)
}

/// [`quantize`], with the scales laid out as `layout` says
/// ([`ScaleLayout::Cublaslt`] for [`super::fp8_gemm`]).
pub fn quantize_with_layout(
    gpu: &Gpu,
    m: &CudaSlice<f32>,
    rows: usize,
    cols: usize,
    tile: TileShape,
    layout: ScaleLayout,
) -> Result<DeviceFp8> {
    assert!(
        layout == ScaleLayout::RowMajor || tile != TileShape::COLUMN,
        "128x1 scales have only the row-major layout"
    );
    assert_eq!(m.len(), rows * cols, "fp8 input shape");
    if tile == TileShape::COLUMN {
        // One thread per (128-row tile, column).
        let tile_rows = rows.div_ceil(TILE);
        let config = LaunchConfig {
            grid_dim: (cols.div_ceil(128).max(1) as u32, tile_rows.max(1) as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        return quantize_columns(gpu, m, rows, cols, tile_rows, config);
    }
    let operand = Operand {
        rows,
        cols,
        transposed: false,
        stride: cols,
        padded_rows: rows,
    };
    quantize_operand(gpu, &m.slice(..), operand, tile, layout)
}

/// A GEMM operand `[rows, cols]` to quantise along its rows (K = `cols`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Operand {
    pub rows: usize,
    pub cols: usize,
    /// Stored as its transpose, `[cols, rows]`: the input gradient's weight
    /// (`dy @ w`) and both operands of the weight gradient (`dyᵀ @ x`).
    pub transposed: bool,
    /// Codes per row of the result, at least `cols`, the rest zero.
    pub stride: usize,
    /// Rows of the result, at least `rows`, the rest zero (see
    /// [`DeviceFp8::padded_rows`]).
    pub padded_rows: usize,
}

/// Quantises `operand` (read from `m`) in 1×128 tiles ([`TileShape::ROW`])
/// or 128×128 blocks ([`TileShape::BLOCK`]), its codes written row-major
/// whatever the stored orientation: K-major, as cuBLASLt's FP8 GEMM reads
/// both operands. A transposed operand's 1×128 tiles are the stored
/// matrix's 128×1 tiles, and its blocks the stored matrix's blocks, so the
/// codes and scales are the CPU's [`crate::fp8::quantize::Fp8Matrix`] of
/// the stored matrix in that tiling, transposed.
pub fn quantize_operand(
    gpu: &Gpu,
    m: &CudaView<'_, f32>,
    operand: Operand,
    tile: TileShape,
    layout: ScaleLayout,
) -> Result<DeviceFp8> {
    let Operand {
        rows,
        cols,
        transposed,
        stride,
        padded_rows,
    } = operand;
    assert_eq!(m.len(), rows * cols, "fp8 input shape");
    let tile_cols = cols.div_ceil(TILE);
    assert!(
        stride >= cols && stride <= tile_cols * TILE,
        "fp8 code stride {stride} for {cols} columns"
    );
    assert!(
        padded_rows >= rows && (padded_rows == rows || layout == ScaleLayout::Cublaslt),
        "fp8 rows padded to {padded_rows} for {rows} rows, scales {layout:?}"
    );
    // Padding rows to a multiple of 16 never adds a 128-row block.
    let tile_rows = if tile == TileShape::ROW {
        padded_rows
    } else if tile == TileShape::BLOCK {
        padded_rows.div_ceil(TILE)
    } else {
        panic!("GEMM operands are quantised in 1x128 tiles or 128x128 blocks, not {tile:?}");
    };
    // 128×128 scale rows padded for cuBLASLt; the padding is zeroed, every
    // other code and scale is written by the quantiser.
    let scale_stride = if layout == ScaleLayout::Cublaslt && tile == TileShape::BLOCK {
        tile_cols.next_multiple_of(4)
    } else {
        tile_cols
    };
    let scale_count = tile_rows * scale_stride;
    // Padding (rows, or 128×128 scale rows) is zeroed; every other code and
    // scale is written by the quantiser.
    let padded = padded_rows > rows;
    let mut quantized = DeviceFp8 {
        rows,
        cols,
        tile,
        stride,
        padded_rows,
        codes: if padded {
            gpu.zeros(padded_rows * stride)?
        } else {
            gpu.output(padded_rows * stride)?
        },
        scales: if scale_stride == tile_cols && !padded {
            gpu.output(scale_count)?
        } else {
            gpu.zeros(scale_count)?
        },
        layout,
    };
    if rows == 0 || cols == 0 {
        return Ok(quantized);
    }
    let (entry, config) = match (tile == TileShape::ROW, transposed) {
        (true, _) => row_tiles(rows, tile_cols, transposed),
        // A block per 128×128 tile.
        (false, false) => ("fp8_quantize_128x128_f32", block_grid(tile_cols, tile_rows)),
        (false, true) => (
            "fp8_quantize_128x128_t_f32",
            block_grid(tile_cols, tile_rows),
        ),
    };
    let f = gpu.function(&FP8, entry)?;
    // The transposing kernels take the stored matrix's shape, [cols, rows].
    let (first, second) = if transposed {
        (int(cols), int(rows))
    } else {
        (int(rows), int(cols))
    };
    let stride_i = int(stride);
    let outer_major_i = i32::from(layout == ScaleLayout::Cublaslt);
    let scale_stride_i = int(scale_stride);
    let scale_rows_i = int(padded_rows);
    let mut launch = gpu.stream().launch_builder(&f);
    launch
        .arg(&mut quantized.codes)
        .arg(&mut quantized.scales)
        .arg(m)
        .arg(&first)
        .arg(&second)
        .arg(&stride_i);
    // No tensor scale: each tile's own.
    let tensor_scale: u64 = 0;
    if tile == TileShape::ROW {
        launch
            .arg(&outer_major_i)
            .arg(&scale_rows_i)
            .arg(&tensor_scale);
    } else {
        launch.arg(&scale_stride_i);
    }
    unsafe { launch.launch(config) }?;
    Ok(quantized)
}

/// Quantises `operand` (read from `m`) with the one scale in `scale` (a
/// delayed scale, [`super::fp8_delayed::DelayedScales::scale`]), codes laid
/// out as [`quantize_operand`]'s 1×128 operands (K-major, K padded to
/// `stride`, rows to `padded_rows` with zero codes): the CPU's
/// [`crate::fp8::quantize::Fp8Matrix::quantize_with_scale`] of the stored
/// matrix, transposed when it is stored transposed.
pub fn quantize_operand_tensorwise(
    gpu: &Gpu,
    m: &CudaView<'_, f32>,
    operand: Operand,
    scale: CudaSlice<f32>,
) -> Result<DeviceFp8> {
    let Operand {
        rows,
        cols,
        transposed,
        stride,
        padded_rows,
    } = operand;
    assert_eq!(m.len(), rows * cols, "fp8 input shape");
    assert_eq!(scale.len(), 1, "one tensor scale");
    let tile_cols = cols.div_ceil(TILE);
    assert!(
        stride >= cols && stride <= tile_cols * TILE && padded_rows >= rows,
        "fp8 operand {rows}x{cols} padded to {padded_rows}x{stride}"
    );
    let mut quantized = DeviceFp8 {
        rows,
        cols,
        tile: TileShape::ROW,
        stride,
        padded_rows,
        codes: if padded_rows > rows {
            gpu.zeros(padded_rows * stride)?
        } else {
            gpu.output(padded_rows * stride)?
        },
        scales: scale,
        layout: ScaleLayout::Tensor,
    };
    if rows == 0 || cols == 0 {
        return Ok(quantized);
    }
    let (entry, config) = row_tiles(rows, tile_cols, transposed);
    let f = gpu.function(&FP8, entry)?;
    let (first, second) = if transposed {
        (int(cols), int(rows))
    } else {
        (int(rows), int(cols))
    };
    let (stride_i, outer_major_i, scale_rows_i) = (int(stride), 1i32, int(padded_rows));
    // The kernel reads the scale and writes no tile scales: `scales` is
    // passed only to fill the parameter.
    let DeviceFp8 { codes, scales, .. } = &mut quantized;
    let mut launch = gpu.stream().launch_builder(&f);
    launch
        .arg(codes)
        .arg(&*scales)
        .arg(m)
        .arg(&first)
        .arg(&second)
        .arg(&stride_i)
        .arg(&outer_major_i)
        .arg(&scale_rows_i)
        .arg(&*scales);
    unsafe { launch.launch(config) }?;
    Ok(quantized)
}

/// The 1×128 quantiser of an operand of `rows` rows and `tile_cols` K
/// slices, and its launch: one warp per tile, 8 warps a block, or stored
/// transposed a block per 128 (K) × 32 (rows) tile.
fn row_tiles(rows: usize, tile_cols: usize, transposed: bool) -> (&'static str, LaunchConfig) {
    if transposed {
        (
            "fp8_quantize_1x128_t_f32",
            LaunchConfig {
                grid_dim: (rows.div_ceil(32) as u32, tile_cols as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            },
        )
    } else {
        (
            "fp8_quantize_1x128_f32",
            super::grid((rows * tile_cols).div_ceil(8), 256, 0),
        )
    }
}

/// One block of 256 threads per 128×128 tile: `(tile columns, tile rows)`.
fn block_grid(tile_cols: usize, tile_rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (tile_cols as u32, tile_rows as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// 128×1 tiles: scales `[ceil(rows / 128), cols]`.
fn quantize_columns(
    gpu: &Gpu,
    m: &CudaSlice<f32>,
    rows: usize,
    cols: usize,
    tile_rows: usize,
    config: LaunchConfig,
) -> Result<DeviceFp8> {
    let mut quantized = DeviceFp8 {
        rows,
        cols,
        tile: TileShape::COLUMN,
        stride: cols,
        padded_rows: rows,
        // Every code and scale is written by the quantiser.
        codes: gpu.output(rows * cols)?,
        scales: gpu.output(tile_rows * cols)?,
        layout: ScaleLayout::RowMajor,
    };
    if rows == 0 || cols == 0 {
        return Ok(quantized);
    }
    let f = gpu.function(&FP8, "fp8_quantize_128x1_f32")?;
    let (rows_i, cols_i) = (int(rows), int(cols));
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

/// `out[m, n] = Σ_k a[m, k] b[n, k]` from FP8 operands: `a` in 1×128 tiles
/// (activations, or output gradients), `b` in 128×128 blocks (weights) — the
/// forward `x @ wᵀ` of [`crate::fp8::gemm::forward`] on CUDA cores, its
/// numerics reference on the device.
pub fn gemm_abt(gpu: &Gpu, out: &mut CudaSlice<f32>, a: &DeviceFp8, b: &DeviceFp8) -> Result<()> {
    assert!(
        a.tile == TileShape::ROW && b.tile == TileShape::BLOCK,
        "fp8 GEMM operand tiles"
    );
    assert!(
        a.layout == ScaleLayout::RowMajor
            && b.layout == ScaleLayout::RowMajor
            && a.stride == a.cols
            && b.stride == b.cols,
        "the CUDA-core FP8 GEMM reads unpadded codes and row-major scales"
    );
    assert!(
        a.cols == b.cols && out.len() == a.rows * b.rows,
        "fp8 GEMM shapes"
    );
    if a.rows == 0 || b.rows == 0 {
        return Ok(());
    }
    let f = gpu.function(&FP8, "fp8_gemm_abt_f32")?;
    let (m_i, n_i, k_i) = (int(a.rows), int(b.rows), int(a.cols));
    let config = LaunchConfig {
        grid_dim: (b.rows.div_ceil(32) as u32, a.rows.div_ceil(32) as u32, 1),
        block_dim: (32, 32, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = gpu.stream().launch_builder(&f);
    launch
        .arg(out)
        .arg(&a.codes)
        .arg(&a.scales)
        .arg(&b.codes)
        .arg(&b.scales)
        .arg(&m_i)
        .arg(&n_i)
        .arg(&k_i);
    unsafe { launch.launch(config) }?;
    Ok(())
}

/// `out[r, c] (+)= src[r * ld + c]` for `out: [rows, width]`: an FP8 GEMM's
/// result from its aligned scratch (rows padded to `ld`) into its
/// destination, added when `accumulate`.
pub fn unpad_rows(
    gpu: &Gpu,
    out: &mut CudaViewMut<'_, f32>,
    src: &CudaSlice<f32>,
    (rows, width, ld): (usize, usize, usize),
    accumulate: bool,
) -> Result<()> {
    assert!(
        out.len() == rows * width && ld >= width && src.len() >= rows * ld,
        "fp8 unpad shapes"
    );
    if out.is_empty() {
        return Ok(());
    }
    let f = gpu.function(&FP8, "fp8_unpad_rows_f32")?;
    let (rows_i, width_i, ld_i) = (int(rows), int(width), int(ld));
    let accumulate = i32::from(accumulate);
    let mut launch = gpu.stream().launch_builder(&f);
    launch
        .arg(out)
        .arg(src)
        .arg(&rows_i)
        .arg(&width_i)
        .arg(&ld_i)
        .arg(&accumulate);
    unsafe { launch.launch(super::elementwise(rows * width)) }?;
    Ok(())
}
