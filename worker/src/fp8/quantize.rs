//! Scaled E4M3 matrices: every tile of a row-major matrix shares one f32
//! scale, `value ≈ decode(code) × scale`.
//!
//! The scale of a tile is `amax / 448` (see [`scale_for_amax`]), so the
//! tile's largest magnitude lands on E4M3's largest value and the tile uses
//! the whole format. It is deliberately *not* rounded to a power of two:
//! DeepSeek-V3 computes activation scales on-line as plain `amax / 448`
//! (its `act_quant` kernel divides by `s = amax / 448`), which keeps a tile's
//! amax exactly representable; a power-of-two scale would waste up to one
//! binade of range in exchange for an exact dequantisation multiply, which
//! the f32 dequantisation here does not need (it rounds at 2^-24, far below
//! E4M3's 2^-4). Values are quantised as `encode(x / scale)` with a true
//! division, which the CUDA quantisation kernel must use too for its codes
//! to match these bit for bit.

use crate::fp8::e4m3;
use crate::scalar::Scalar;

/// Side of the square weight blocks and length of the activation tiles.
pub const TILE: usize = 128;

/// The shape of the tiles that share a scale. Tiles start at row and column
/// 0; the last tile of a row or column is cut short when the matrix's size
/// is not a multiple of the tile's (a "tail" tile).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileShape {
    pub rows: usize,
    pub cols: usize,
}

impl TileShape {
    /// 1 × 128: activations and output gradients whose GEMM inner dimension
    /// is their row (the forward pass and the input-gradient GEMM).
    pub const ROW: Self = Self {
        rows: 1,
        cols: TILE,
    };
    /// 128 × 1: activations and output gradients whose GEMM inner dimension
    /// runs down their columns (the weight-gradient GEMM, over tokens).
    pub const COLUMN: Self = Self {
        rows: TILE,
        cols: 1,
    };
    /// 128 × 128: weights, whose blocks are the same whichever way the GEMM
    /// reads them (forward `x @ wᵀ` or input gradient `dout @ w`).
    pub const BLOCK: Self = Self {
        rows: TILE,
        cols: TILE,
    };
}

/// A `rows × cols` matrix of E4M3 codes with one scale per tile.
#[derive(Clone, Debug, PartialEq)]
pub struct Fp8Matrix {
    rows: usize,
    cols: usize,
    tile: TileShape,
    /// Row-major, `rows × cols`.
    codes: Vec<u8>,
    /// Row-major over the tile grid, `tile_rows × tile_cols`.
    scales: Vec<f32>,
}

/// The largest magnitude in `values`, ignoring NaN (0 for none).
pub fn amax<T: Scalar>(values: &[T]) -> f32 {
    values
        .iter()
        .fold(0.0f32, |m, &v| m.max((v.to_f64() as f32).abs()))
}

/// The scale that maps a tile of largest magnitude `amax` onto E4M3's full
/// range: `amax / 448`.
///
/// An all-zero tile gets scale 1 (any scale encodes zeros exactly; 1 keeps
/// the division harmless). So does a non-finite amax (the tile already holds
/// an infinity, which saturates). The scale never goes below the smallest
/// normal f32, so `x / scale` never divides by zero or by a subnormal.
pub fn scale_for_amax(amax: f32) -> f32 {
    if amax > 0.0 && amax.is_finite() {
        (amax / e4m3::MAX).max(f32::MIN_POSITIVE)
    } else {
        1.0
    }
}

/// `x` in units of `scale`, rounded to E4M3.
pub fn encode_scaled(x: f32, scale: f32) -> u8 {
    e4m3::encode(x / scale)
}

impl Fp8Matrix {
    /// Quantises `m: [rows, cols]` with each tile scaled by its own amax
    /// (just-in-time scaling, DeepSeek-V3's fine-grained recipe).
    pub fn quantize<T: Scalar>(m: &[T], rows: usize, cols: usize, tile: TileShape) -> Self {
        let tile = clamp_tile(tile);
        let (_, tile_cols) = grid(rows, cols, tile);
        let mut amaxes = vec![0.0f32; grid_len(rows, cols, tile)];
        check_len(m, rows, cols);
        for (r, row) in m.chunks_exact(cols.max(1)).take(rows).enumerate() {
            let grid_row = &mut amaxes[(r / tile.rows) * tile_cols..][..tile_cols];
            for (tile_amax, chunk) in grid_row.iter_mut().zip(row.chunks(tile.cols)) {
                *tile_amax = tile_amax.max(amax(chunk));
            }
        }
        let scales = amaxes.into_iter().map(scale_for_amax).collect();
        Self::with_scales(m, rows, cols, tile, scales)
    }

    /// Quantises `m: [rows, cols]` as one tile with the given `scale`
    /// (tensorwise scaling; values beyond `448 × scale` saturate).
    pub fn quantize_with_scale<T: Scalar>(m: &[T], rows: usize, cols: usize, scale: f32) -> Self {
        check_len(m, rows, cols);
        let tile = clamp_tile(TileShape { rows, cols });
        Self::with_scales(m, rows, cols, tile, vec![scale])
    }

    fn with_scales<T: Scalar>(
        m: &[T],
        rows: usize,
        cols: usize,
        tile: TileShape,
        scales: Vec<f32>,
    ) -> Self {
        let (_, tile_cols) = grid(rows, cols, tile);
        let mut codes = Vec::with_capacity(m.len());
        for (r, row) in m.chunks_exact(cols.max(1)).take(rows).enumerate() {
            let grid_row = &scales[(r / tile.rows) * tile_cols..][..tile_cols];
            for (&scale, chunk) in grid_row.iter().zip(row.chunks(tile.cols)) {
                codes.extend(
                    chunk
                        .iter()
                        .map(|&v| encode_scaled(v.to_f64() as f32, scale)),
                );
            }
        }
        Self {
            rows,
            cols,
            tile,
            codes,
            scales,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn tile(&self) -> TileShape {
        self.tile
    }

    /// The E4M3 codes, row-major `rows × cols`.
    pub fn codes(&self) -> &[u8] {
        &self.codes
    }

    /// One scale per tile, row-major over the tile grid ([`Self::tile_grid`]).
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }

    /// Tiles down and across: `ceil(rows / tile.rows) × ceil(cols / tile.cols)`.
    pub fn tile_grid(&self) -> (usize, usize) {
        grid(self.rows, self.cols, self.tile)
    }

    /// The scale element `(r, c)` was quantised with.
    pub fn scale_at(&self, r: usize, c: usize) -> f32 {
        let (_, tile_cols) = self.tile_grid();
        self.scales[(r / self.tile.rows) * tile_cols + c / self.tile.cols]
    }

    /// `decode(code) × scale` for every element, row-major: the values an
    /// FP8 GEMM multiplies (each rounded once, at f32's 2^-24).
    pub fn dequantize<T: Scalar>(&self) -> Vec<T> {
        let (_, tile_cols) = self.tile_grid();
        let mut values = Vec::with_capacity(self.codes.len());
        for (r, row) in self.codes.chunks_exact(self.cols.max(1)).enumerate() {
            let grid_row = &self.scales[(r / self.tile.rows) * tile_cols..][..tile_cols];
            for (&scale, chunk) in grid_row.iter().zip(row.chunks(self.tile.cols)) {
                values.extend(
                    chunk
                        .iter()
                        .map(|&code| T::from_f64(f64::from(e4m3::decode(code) * scale))),
                );
            }
        }
        values
    }
}

/// A tile of at least 1 × 1, so an empty matrix has a (1-tile) grid too.
fn clamp_tile(tile: TileShape) -> TileShape {
    TileShape {
        rows: tile.rows.max(1),
        cols: tile.cols.max(1),
    }
}

fn grid(rows: usize, cols: usize, tile: TileShape) -> (usize, usize) {
    (
        rows.div_ceil(tile.rows).max(1),
        cols.div_ceil(tile.cols).max(1),
    )
}

fn grid_len(rows: usize, cols: usize, tile: TileShape) -> usize {
    let (down, across) = grid(rows, cols, tile);
    down * across
}

fn check_len<T>(m: &[T], rows: usize, cols: usize) {
    assert_eq!(m.len(), rows * cols, "FP8 matrix shape");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|i| ((i % 17) as f32 - 8.0) * scale).collect()
    }

    #[test]
    fn a_huge_value_sets_only_its_own_tiles_scale() {
        let (rows, cols) = (2, 2 * TILE);
        let mut m = ramp(rows * cols, 0.01);
        m[5] = 1e4; // row 0, tile 0
        let q = Fp8Matrix::quantize(&m, rows, cols, TileShape::ROW);
        assert_eq!(q.tile_grid(), (2, 2));
        assert_eq!(q.scales()[0], 1e4 / 448.0);
        for (t, r, c0) in [(1, 0, TILE), (2, 1, 0), (3, 1, TILE)] {
            let own = amax(&m[r * cols + c0..r * cols + c0 + TILE]);
            assert_eq!(q.scales()[t], own / 448.0, "tile {t}");
        }
        // The neighbours keep E4M3's relative precision.
        let d = q.dequantize::<f32>();
        for i in TILE..cols {
            assert!((d[i] - m[i]).abs() <= m[i].abs() / 16.0, "element {i}");
        }
    }

    #[test]
    fn a_tail_tile_of_two_columns_has_its_own_scale() {
        let (rows, cols) = (3, TILE + 2);
        let mut m = ramp(rows * cols, 0.5);
        m[TILE] = 0.001; // row 0's tail: [0.001, -0.002]
        m[TILE + 1] = -0.002;
        let q = Fp8Matrix::quantize(&m, rows, cols, TileShape::ROW);
        assert_eq!(q.tile_grid(), (3, 2));
        assert_eq!(q.scale_at(0, TILE), 0.002 / 448.0);
        assert_eq!(q.scale_at(0, TILE + 1), q.scales()[1]);
        let d = q.dequantize::<f32>();
        // The tile's amax is exactly representable; the other value to E4M3 precision.
        assert!((d[TILE + 1] - m[TILE + 1]).abs() <= 1e-9);
        assert!((d[TILE] - m[TILE]).abs() <= 0.001 / 16.0);
        assert_eq!(d.len(), rows * cols);
    }

    #[test]
    fn blocks_and_column_tiles_cover_tails_in_both_directions() {
        let (rows, cols) = (TILE + 2, TILE + 3);
        let m = ramp(rows * cols, 0.25);
        let blocks = Fp8Matrix::quantize(&m, rows, cols, TileShape::BLOCK);
        assert_eq!(blocks.tile_grid(), (2, 2));
        let columns = Fp8Matrix::quantize(&m, rows, cols, TileShape::COLUMN);
        assert_eq!(columns.tile_grid(), (2, cols));
        // Block (1, 1) is the 2 × 3 corner.
        let corner = (TILE..rows).flat_map(|r| m[r * cols + TILE..(r + 1) * cols].to_vec());
        let corner_amax = corner.fold(0.0f32, |a, v| a.max(v.abs()));
        assert_eq!(blocks.scale_at(rows - 1, cols - 1), corner_amax / 448.0);
        // Column tile (1, c) is rows 128..130 of column c.
        for c in 0..cols {
            let tail = (m[TILE * cols + c].abs()).max(m[(TILE + 1) * cols + c].abs());
            assert_eq!(
                columns.scale_at(TILE, c),
                scale_for_amax(tail),
                "column {c}"
            );
        }
    }

    #[test]
    fn zero_tiles_get_scale_one_and_decode_to_zero() {
        let m = vec![0.0f32; 2 * TILE];
        let q = Fp8Matrix::quantize(&m, 1, 2 * TILE, TileShape::ROW);
        assert_eq!(q.scales(), &[1.0, 1.0]);
        assert!(q.dequantize::<f32>().iter().all(|&v| v == 0.0));
    }

    #[test]
    fn the_amax_of_each_tile_round_trips_exactly() {
        // amax / (amax / 448) rounds to 448 or saturates there, and
        // 448 × (amax / 448) is amax up to one f32 rounding.
        for amax_value in [1e-30f32, 3e-7, 0.1, 1.0, 7.3, 1e20] {
            let s = scale_for_amax(amax_value);
            assert_eq!(encode_scaled(amax_value, s), 0x7E, "{amax_value}");
            let back = e4m3::decode(0x7E) * s;
            assert!((back - amax_value).abs() <= amax_value * f32::EPSILON);
        }
        assert_eq!(scale_for_amax(0.0), 1.0);
        assert_eq!(scale_for_amax(f32::INFINITY), 1.0);
        assert_eq!(scale_for_amax(1e-44), f32::MIN_POSITIVE);
    }

    #[test]
    fn a_single_scale_saturates_values_beyond_its_range() {
        let m = [1.0f32, -2.0, 1000.0];
        let q = Fp8Matrix::quantize_with_scale(&m, 1, 3, 2.0 / 448.0);
        assert_eq!(q.tile_grid(), (1, 1));
        let d = q.dequantize::<f32>();
        assert_eq!(d[1], -2.0);
        assert_eq!(d[2], 2.0, "saturated at 448 × scale");
    }

    #[test]
    fn an_empty_matrix_quantises_to_nothing() {
        let q = Fp8Matrix::quantize::<f32>(&[], 0, 64, TileShape::COLUMN);
        assert!(q.codes().is_empty());
        assert!(q.dequantize::<f32>().is_empty());
    }
}
