//! The f32 GEMM behind [`crate::ops::matmul`] on x86-64 CPUs with AVX2:
//! `C += A · B` for strided `A` and `B`, blocked and packed as in BLIS
//! (Van Zee and van de Geijn, 2015) around a 6 × 16 register-tile kernel.
//!
//! Why this shape: the kernel keeps a 6 × 16 tile of `C` in 12 of the 16
//! AVX registers and, per step along `k`, loads 16 values of `B`, broadcasts
//! 6 of `A` and issues 12 independent multiply-adds — enough to keep the
//! multiply and add pipes busy through their latency. Packing copies a
//! `KC`-deep slice of `B` (`KC × NC`) and of `A` (`MC × KC`, for L2) into the
//! order the kernel reads, so every operand layout the three matmul GEMMs
//! need (`x wᵀ`, `dout w`, `doutᵀ x`) runs the same kernel from contiguous
//! memory, and ragged edges are zero-padded instead of special-cased.
//!
//! Exactness: each element of `C` is one running sum, started from zero or
//! continued from its value in `C` ([`Start`]), through the `K` products in
//! ascending order (the `KC` blocks run in order, each resuming from what the
//! previous one stored), one fused multiply-add (one rounding) per product.
//! These are the portable loops' operations (`f32::mul_add`) in their order,
//! so the result is the same to the bit on every CPU, with or without this
//! kernel.

/// Rows of the register tile.
const MR: usize = 6;
/// Columns of the register tile: two 8-wide vectors.
const NR: usize = 16;
/// Depth of one packed block.
const KC: usize = 256;
/// Rows of `A` packed at a time (a multiple of `MR`): 72 × 256 × 4 B = 72 KiB,
/// resident in L2 while the kernel sweeps it once per `B` micro-panel.
const MC: usize = 72;
/// Columns of `B` packed at a time (a multiple of `NR`): up to 4 MiB, in L3;
/// the kernel reads one 16 KiB micro-panel of it at a time, from L1. Wide,
/// so `A` is packed once per `KC` block for every width the MoE layer has.
const NC: usize = 4096;

/// A strided read-only matrix: element `(i, j)` at `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
pub(crate) struct Strided<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

#[cfg(test)]
impl Strided<'_> {
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.row_stride + j * self.col_stride]
    }
}

/// Whether this CPU can run [`gemm`].
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Where each element of `C`'s running sum starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Start {
    /// From zero: `C = A · B`, whatever `C` held (its old values are never read).
    Zero,
    /// From the value in `C`: `C += A · B`.
    FromC,
}

/// `C[m × n] = A[m × k] · B[k × n]` (`Start::Zero`) or `C += A · B` (`Start::FromC`),
/// `C` row-major and dense (`c.len() == m * n`). Call only when [`available`] says so.
///
/// Inside a rayon pool of several threads (`moe-worker train --threads`),
/// a large product is split into blocks of whole rows of `C`, one per
/// thread, each packing its own `A` and `B`. Every element of `C` is still
/// the same running sum whichever thread computes it, so the result is the
/// same to the bit with any number of threads (tested).
pub(crate) fn gemm(
    m: usize,
    n: usize,
    k: usize,
    a: Strided<'_>,
    b: Strided<'_>,
    c: &mut [f32],
    start: Start,
) {
    assert_eq!(c.len(), m * n, "gemm output shape");
    if k == 0 && start == Start::Zero {
        c.fill(0.0);
    }
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    assert!(available(), "packed gemm needs AVX2");
    let parts = parts(m, n, k);
    if parts <= 1 {
        return gemm_here(m, n, k, a, b, c, start);
    }
    use rayon::prelude::*;
    let rows = m.div_ceil(parts).next_multiple_of(MR);
    c.par_chunks_mut(rows * n)
        .enumerate()
        .for_each(|(part, c_part)| {
            let first = part * rows;
            // Row `first + i` of `A` is row `i` of this view, whatever the strides.
            let a_part = Strided {
                data: &a.data[first * a.row_stride..],
                ..a
            };
            gemm_here(c_part.len() / n, n, k, a_part, b, c_part, start);
        });
}

/// Multiply-adds below which a product stays on one thread: about 3 ms of
/// one core at the kernel's rate, far above what handing a block of rows
/// to another thread costs (and each thread packs `B` again).
const MIN_PART: usize = 1 << 24;

/// How many threads share a product: as many as the pool has
/// ([`super::pool_threads`]), the work allows, and there are blocks of `MR`
/// rows for.
fn parts(m: usize, n: usize, k: usize) -> usize {
    super::pool_threads()
        .min(m * n * k / MIN_PART)
        .min(m.div_ceil(MR))
        .max(1)
}

/// [`gemm`] on this thread, with its packing buffers.
fn gemm_here(
    m: usize,
    n: usize,
    k: usize,
    a: Strided<'_>,
    b: Strided<'_>,
    c: &mut [f32],
    start: Start,
) {
    PACKING.with_borrow_mut(|(packed_a, packed_b)| {
        // Sized for this product, so small ones do not pay for the full blocks.
        let b_len = KC.min(k) * NC.min(n.next_multiple_of(NR));
        let a_len = MC.min(m.next_multiple_of(MR)) * KC.min(k);
        if packed_b.len() < b_len {
            packed_b.resize(b_len, 0.0);
        }
        if packed_a.len() < a_len {
            packed_a.resize(a_len, 0.0);
        }
        blocked(m, n, k, [a, b], c, start, [packed_a, packed_b]);
    });
}

/// `out[o] = Σ_i x[i] · w[o, i]` for one row `x: [in_dim]` and
/// `w: [out.len(), in_dim]` row-major: the decode step of serving, where
/// packing the whole weight matrix for the blocked kernel cost more than
/// the product. Each output is one fused multiply-add chain from zero in
/// ascending `i` — the blocked kernel's operations, so the same bits — and
/// eight outputs' chains run interleaved (FMA latency is 4 cycles, two
/// issue per cycle), streaming each weight row once. Call only when
/// [`available`] says so.
pub(crate) fn gemv(out: &mut [f32], x: &[f32], w: &[f32]) {
    let in_dim = x.len();
    assert_eq!(w.len(), out.len() * in_dim, "gemv weight shape");
    assert!(available(), "gemv needs AVX2 and FMA");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `available()` checked the CPU's features; shapes checked above.
    unsafe {
        gemv_fma(out, x, w)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gemv_fma(out: &mut [f32], x: &[f32], w: &[f32]) {
    const LANES: usize = 8;
    let in_dim = x.len();
    let full = out.len() / LANES * LANES;
    let (head, tail) = out.split_at_mut(full);
    for (block, out_block) in head.chunks_exact_mut(LANES).enumerate() {
        let base = block * LANES * in_dim;
        let rows = w[base..base + LANES * in_dim].as_ptr();
        let mut acc = [0.0f32; LANES];
        for (i, &xi) in x.iter().enumerate() {
            // Eight independent chains in registers, one weight row each.
            for (j, a) in acc.iter_mut().enumerate() {
                // SAFETY: j < LANES and i < in_dim index inside the slice
                // of LANES rows taken above.
                *a = xi.mul_add(unsafe { *rows.add(j * in_dim + i) }, *a);
            }
        }
        out_block.copy_from_slice(&acc);
    }
    for (j, o) in tail.iter_mut().enumerate() {
        let row = &w[(full + j) * in_dim..(full + j + 1) * in_dim];
        *o = x
            .iter()
            .zip(row)
            .fold(0.0f32, |a, (&xi, &wi)| xi.mul_add(wi, a));
    }
}

thread_local! {
    /// Each thread's packing buffers (`A` block, `B` block), kept between
    /// calls: at a megabyte each call, allocating them afresh cost more in
    /// page faults than packing into them.
    static PACKING: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// The loops around the kernel, with the packing buffers lent.
fn blocked(
    m: usize,
    n: usize,
    k: usize,
    [a, b]: [Strided<'_>; 2],
    c: &mut [f32],
    start: Start,
    [packed_a, packed_b]: [&mut [f32]; 2],
) {
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            pack_b(packed_b, b, pc, kc, jc, nc);
            for ic in (0..m).step_by(MC) {
                let mc = MC.min(m - ic);
                pack_a(packed_a, a, ic, mc, pc, kc);
                for jr in (0..nc).step_by(NR) {
                    let b_panel = &packed_b[jr * kc..(jr + NR) * kc];
                    for ir in (0..mc).step_by(MR) {
                        let a_panel = &packed_a[ir * kc..(ir + MR) * kc];
                        let tile = Tile {
                            row: ic + ir,
                            col: jc + jr,
                            rows: MR.min(mc - ir),
                            cols: NR.min(nc - jr),
                            ldc: n,
                            // The first `KC` block starts each sum as `start`
                            // says; later ones continue from what it stored.
                            from_c: pc > 0 || start == Start::FromC,
                        };
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: `gemm` checked `available()`; the panels
                        // hold `kc` steps of MR and NR values.
                        unsafe {
                            kernel_avx2(kc, a_panel, b_panel, c, tile)
                        };
                    }
                }
            }
        }
    }
}

/// Packs `B[pc.., jc..]` (`kc × nc`) as `NR`-wide column panels, each `kc`
/// rows of `NR` values, zero-padded past `nc`.
fn pack_b(dst: &mut [f32], b: Strided<'_>, pc: usize, kc: usize, jc: usize, nc: usize) {
    if b.col_stride == 1 && nc.is_multiple_of(NR) {
        // Row-major `B`: walk each row once, front to back (rows lie a
        // whole row apart, so panel by panel would jump that far per read),
        // dealing its NR-wide pieces out to the panels.
        let dst = &mut dst[..kc * nc];
        for p in 0..kc {
            let row = &b.data[(pc + p) * b.row_stride + jc..][..nc];
            for (panel, piece) in row.chunks_exact(NR).enumerate() {
                let start = panel * NR * kc + p * NR;
                dst[start..start + NR].copy_from_slice(piece);
            }
        }
        return;
    }
    for (panel, j0) in (0..nc).step_by(NR).enumerate() {
        let out = &mut dst[panel * NR * kc..(panel + 1) * NR * kc];
        pack_panel::<NR>(out, b, pc, kc, jc + j0, NR.min(nc - j0));
    }
}

/// Packs `A[ic.., pc..]` (`mc × kc`) as `MR`-tall row panels, each `kc`
/// columns of `MR` values, zero-padded past `mc`. `A`'s transpose is
/// packed exactly like a `B` panel.
fn pack_a(dst: &mut [f32], a: Strided<'_>, ic: usize, mc: usize, pc: usize, kc: usize) {
    let a_t = Strided {
        data: a.data,
        row_stride: a.col_stride,
        col_stride: a.row_stride,
    };
    for (panel, i0) in (0..mc).step_by(MR).enumerate() {
        let out = &mut dst[panel * MR * kc..(panel + 1) * MR * kc];
        pack_panel::<MR>(out, a_t, pc, kc, ic + i0, MR.min(mc - i0));
    }
}

/// Writes `out[p * W + j] = m(p0 + p, j0 + j)` for `p < kc`, `j < width`,
/// and zero for `width <= j < W`. Two loop orders, so the reads run along
/// whichever dimension of `m` is contiguous.
fn pack_panel<const W: usize>(
    out: &mut [f32],
    m: Strided<'_>,
    p0: usize,
    kc: usize,
    j0: usize,
    width: usize,
) {
    let out = &mut out[..kc * W];
    if width < W {
        out.fill(0.0);
    }
    if m.col_stride == 1 {
        // Each of the kc rows is `width` contiguous values: a copy per row
        // (of a constant W values when full, which compiles to vector moves).
        for (p, row) in out.chunks_exact_mut(W).enumerate() {
            let start = (p0 + p) * m.row_stride + j0;
            if width == W {
                row.copy_from_slice(&m.data[start..start + W]);
            } else {
                row[..width].copy_from_slice(&m.data[start..start + width]);
            }
        }
    } else if m.row_stride == 1 {
        // Each of the `width` columns is contiguous: read them side by side,
        // front to back, writing the panel in order (a transpose).
        let mut columns: [&[f32]; W] = [&[]; W];
        for (j, column) in columns.iter_mut().enumerate().take(width) {
            *column = &m.data[(j0 + j) * m.col_stride + p0..][..kc];
        }
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if width == W {
            // SAFETY: packing runs only inside `gemm`, which checked `available()`.
            done = unsafe { transpose_columns_avx2::<W>(out, &columns) };
        }
        for (p, row) in out.chunks_exact_mut(W).enumerate().skip(done) {
            for (value, column) in row.iter_mut().zip(&columns[..width]) {
                *value = column[p];
            }
        }
    } else {
        // Each of the `width` columns is read along its own stride.
        for j in 0..width {
            let column = &m.data[(j0 + j) * m.col_stride..];
            for (p, row) in out.chunks_exact_mut(W).enumerate() {
                row[j] = column[(p0 + p) * m.row_stride];
            }
        }
    }
}

/// The transpose of [`pack_panel`] for a full panel, 8 × 8 values at a
/// time in registers (one at a time, bounds-checked, this loop was half the
/// packing time): `out[p * W + j] = columns[j][p]`. Returns how many rows
/// `p` it wrote; the caller writes the rest. A 6-wide panel is transposed
/// as 8 wide with two empty columns, each row's two extra values landing on
/// the next row's first two, which that row's store then overwrites — so
/// the last row is always left to the caller.
///
/// # Safety
/// The CPU must support AVX2; every column must hold `out.len() / W` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transpose_columns_avx2<const W: usize>(out: &mut [f32], columns: &[&[f32]; W]) -> usize {
    use std::arch::x86_64::*;
    let kc = out.len() / W;
    assert!(columns.iter().all(|c| c.len() == kc));
    let rows = match W {
        16 => kc / 8 * 8,
        // Overlapping stores: row p writes out[p * 6 .. p * 6 + 8], so a
        // vector block must be followed by at least one more row.
        6 => kc.saturating_sub(1) / 8 * 8,
        _ => return 0,
    };
    let dst = out.as_mut_ptr();
    for p in (0..rows).step_by(8) {
        for g in (0..W).step_by(8) {
            let mut r = [_mm256_setzero_ps(); 8];
            for (j, v) in r.iter_mut().enumerate().take((W - g).min(8)) {
                // SAFETY: p + 8 <= rows <= kc values in each column (asserted).
                *v = unsafe { _mm256_loadu_ps(columns[g + j].as_ptr().add(p)) };
            }
            for (q, v) in transpose8x8(r).into_iter().enumerate() {
                // SAFETY: row p + q < rows; for W = 16 the 8 values end inside
                // the row, for W = 6 inside the next row (p + q + 1 < kc).
                unsafe { _mm256_storeu_ps(dst.add((p + q) * W + g), v) };
            }
        }
    }
    rows
}

/// `r[j][q]` → `out[q][j]` for eight 8-wide vectors.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn transpose8x8(r: [std::arch::x86_64::__m256; 8]) -> [std::arch::x86_64::__m256; 8] {
    use std::arch::x86_64::*;
    // Pairs of rows interleaved: t0 = r0[0] r1[0] r0[1] r1[1] | r0[4] r1[4] r0[5] r1[5].
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    // Four rows' element q side by side: s0 = r0..r3[0] | r0..r3[4].
    let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    // Low halves give elements 0-3, high halves 4-7.
    [
        _mm256_permute2f128_ps::<0x20>(s0, s4),
        _mm256_permute2f128_ps::<0x20>(s1, s5),
        _mm256_permute2f128_ps::<0x20>(s2, s6),
        _mm256_permute2f128_ps::<0x20>(s3, s7),
        _mm256_permute2f128_ps::<0x31>(s0, s4),
        _mm256_permute2f128_ps::<0x31>(s1, s5),
        _mm256_permute2f128_ps::<0x31>(s2, s6),
        _mm256_permute2f128_ps::<0x31>(s3, s7),
    ]
}

/// Where a register tile lands in `C`, how much of it is real, and whether
/// its sums continue from `C` or start from zero.
#[derive(Clone, Copy)]
struct Tile {
    row: usize,
    col: usize,
    rows: usize,
    cols: usize,
    ldc: usize,
    from_c: bool,
}

/// `C[tile] += a_panel · b_panel` over `kc` steps, continuing each element's
/// running sum from its value in `C` (or from zero when `tile.from_c` is
/// false): per step `c = fma(a, b, c)`, one rounding, exactly as the portable
/// loops compute it in f32.
///
/// # Safety
/// The CPU must support AVX2; `a_panel` must hold `kc * MR` and `b_panel`
/// `kc * NR` values; the tile must lie inside `c`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_avx2(kc: usize, a_panel: &[f32], b_panel: &[f32], c: &mut [f32], tile: Tile) {
    use std::arch::x86_64::*;
    assert!(a_panel.len() >= kc * MR && b_panel.len() >= kc * NR);
    assert!(tile.rows <= MR && tile.cols <= NR);
    assert!((tile.row + tile.rows - 1) * tile.ldc + tile.col + tile.cols <= c.len());
    let ldc = tile.ldc;
    let full = tile.rows == MR && tile.cols == NR;
    let origin = c.as_mut_ptr().wrapping_add(tile.row * ldc + tile.col);
    // The tile below this one is the kernel's next call (same columns, the
    // next MR rows): start fetching its rows of `C` now, so their misses
    // overlap this tile's arithmetic. Prefetches never fault, so rows past
    // the end are harmless; the addresses are only computed, not read.
    for i in MR..2 * MR {
        let row = origin.wrapping_add(i * ldc);
        _mm_prefetch::<_MM_HINT_T0>(row.cast());
        _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(NR - 1).cast());
    }
    // The tile's current values; rows and columns past the edge start at 0
    // and are never written back.
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    let mut values = [0.0f32; NR];
    if tile.from_c && full {
        for (i, row) in acc.iter_mut().enumerate() {
            // SAFETY: a full tile's MR rows of NR values lie inside `c` (asserted).
            unsafe {
                row[0] = _mm256_loadu_ps(origin.add(i * ldc));
                row[1] = _mm256_loadu_ps(origin.add(i * ldc + 8));
            }
        }
    } else if tile.from_c {
        for (i, row) in acc.iter_mut().enumerate().take(tile.rows) {
            let start = (tile.row + i) * ldc + tile.col;
            values[..tile.cols].copy_from_slice(&c[start..start + tile.cols]);
            // SAFETY: `values` holds 16 f32s.
            unsafe {
                row[0] = _mm256_loadu_ps(values.as_ptr());
                row[1] = _mm256_loadu_ps(values.as_ptr().add(8));
            }
        }
    }
    let (a, b) = (a_panel.as_ptr(), b_panel.as_ptr());
    for p in 0..kc {
        // SAFETY: p < kc, and the panels hold kc * NR and kc * MR values (asserted).
        let (b0, b1) = unsafe {
            (
                _mm256_loadu_ps(b.add(p * NR)),
                _mm256_loadu_ps(b.add(p * NR + 8)),
            )
        };
        for (i, row) in acc.iter_mut().enumerate() {
            // SAFETY: as above.
            let ai = _mm256_set1_ps(unsafe { *a.add(p * MR + i) });
            // Fused: one instruction and one rounding per product; the
            // 2 × MR accumulators are independent chains that keep both
            // FMA pipes busy.
            row[0] = _mm256_fmadd_ps(ai, b0, row[0]);
            row[1] = _mm256_fmadd_ps(ai, b1, row[1]);
        }
    }
    if full {
        for (i, row) in acc.iter().enumerate() {
            // SAFETY: as for the loads above.
            unsafe {
                _mm256_storeu_ps(origin.add(i * ldc), row[0]);
                _mm256_storeu_ps(origin.add(i * ldc + 8), row[1]);
            }
        }
        return;
    }
    for (i, row) in acc.iter().enumerate().take(tile.rows) {
        // SAFETY: `values` holds 16 f32s.
        unsafe {
            _mm256_storeu_ps(values.as_mut_ptr(), row[0]);
            _mm256_storeu_ps(values.as_mut_ptr().add(8), row[1]);
        }
        let start = (tile.row + i) * ldc + tile.col;
        c[start..start + tile.cols].copy_from_slice(&values[..tile.cols]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// `C += A·B` in f64 from the same strided operands: the reference.
    fn naive(m: usize, n: usize, k: usize, a: Strided<'_>, b: Strided<'_>, c: &mut [f64]) {
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] += (0..k)
                    .map(|p| f64::from(a.at(i, p)) * f64::from(b.at(p, j)))
                    .sum::<f64>();
            }
        }
    }

    /// The three operand layouts matmul uses, as (row, column) strides of
    /// `A` (`m × k`) then `B` (`k × n`): `x wᵀ`, `doutᵀ x`, `dout w`.
    fn layouts(m: usize, n: usize, k: usize) -> [(usize, usize, usize, usize); 3] {
        [(k, 1, n, 1), (1, m, 1, k), (k, 1, 1, k)]
    }

    /// `A` and `B` over their data in one of [`layouts`].
    fn operands<'a>(
        a_data: &'a [f32],
        b_data: &'a [f32],
        (rs_a, cs_a, rs_b, cs_b): (usize, usize, usize, usize),
    ) -> (Strided<'a>, Strided<'a>) {
        let strided = |data, row_stride, col_stride| Strided {
            data,
            row_stride,
            col_stride,
        };
        (strided(a_data, rs_a, cs_a), strided(b_data, rs_b, cs_b))
    }

    /// Ragged shapes straddling every blocking size, in all three operand layouts matmul uses.
    #[test]
    fn matches_a_naive_product_across_block_edges_and_layouts() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX2, and matmul never calls the packed GEMM");
            return;
        }
        let mut rng = SplitMix64::new(9);
        for (m, n, k) in [(1, 1, 1), (7, 17, 5), (97, 520, 300), (13, 33, 513)] {
            let a_data: Vec<f32> = rng.normal_vec(m * k, 1.0);
            let b_data: Vec<f32> = rng.normal_vec(k * n, 1.0);
            for layout in layouts(m, n, k) {
                let (rs_a, cs_a, rs_b, cs_b) = layout;
                let (a, b) = operands(&a_data, &b_data, layout);
                let start: Vec<f32> = rng.normal_vec(m * n, 1.0);
                let mut c = start.clone();
                gemm(m, n, k, a, b, &mut c, Start::FromC);
                let mut expected: Vec<f64> = start.iter().map(|&v| f64::from(v)).collect();
                naive(m, n, k, a, b, &mut expected);
                for (idx, (&got, &want)) in c.iter().zip(&expected).enumerate() {
                    // f32 accumulation over k terms of unit size.
                    let tolerance = 1e-6 * (k as f64).sqrt() * 4.0 + 1e-6 * want.abs();
                    assert!(
                        (f64::from(got) - want).abs() <= tolerance,
                        "{m}x{n}x{k} layout {rs_a},{cs_a},{rs_b},{cs_b} [{idx}]: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// Split across a pool's threads (`--threads`), every layout and both
    /// starts give the bits of one thread: each element of `C` is the same
    /// running sum whichever thread computes it. Ragged last blocks too.
    #[test]
    fn threads_give_the_bits_of_one_thread() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX2, and matmul never calls the packed GEMM");
            return;
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .expect("a pool of three");
        let mut rng = SplitMix64::new(11);
        // 701 × 257 × 300: 54M multiply-adds, three parts of 234, 234 and 233 rows.
        let (m, n, k) = (701, 257, 300);
        assert_eq!(pool.install(|| parts(m, n, k)), 3, "the product is split");
        assert_eq!(parts(m, n, k), 1, "outside a pool it is not");
        let a_data: Vec<f32> = rng.normal_vec(m * k, 1.0);
        let b_data: Vec<f32> = rng.normal_vec(k * n, 1.0);
        for layout in layouts(m, n, k) {
            let (a, b) = operands(&a_data, &b_data, layout);
            let c0: Vec<f32> = rng.normal_vec(m * n, 1.0);
            for start in [Start::Zero, Start::FromC] {
                let mut one = c0.clone();
                gemm(m, n, k, a, b, &mut one, start);
                let mut three = c0.clone();
                pool.install(|| gemm(m, n, k, a, b, &mut three, start));
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert!(
                    bits(&one) == bits(&three),
                    "layout {layout:?} {start:?}: threads changed the bits"
                );
            }
        }
    }

    /// `Start::Zero` never reads `C` (NaN there must not leak in) and gives the
    /// bits of accumulating into zeros, on full and ragged tiles and for `k = 0`.
    #[test]
    fn starting_from_zero_ignores_c_and_equals_accumulating_into_zeros() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX2, and matmul never calls the packed GEMM");
            return;
        }
        let mut rng = SplitMix64::new(4);
        for (m, n, k) in [(12, 32, 300), (13, 33, 513), (5, 7, 0)] {
            let a_data: Vec<f32> = rng.normal_vec(m * k, 1.0);
            let b_data: Vec<f32> = rng.normal_vec(k * n, 1.0);
            let a = Strided {
                data: &a_data,
                row_stride: k,
                col_stride: 1,
            };
            let b = Strided {
                data: &b_data,
                row_stride: n,
                col_stride: 1,
            };
            let mut into_zeros = vec![0.0f32; m * n];
            gemm(m, n, k, a, b, &mut into_zeros, Start::FromC);
            let mut over_nan = vec![f32::NAN; m * n];
            gemm(m, n, k, a, b, &mut over_nan, Start::Zero);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&over_nan), bits(&into_zeros), "{m}x{n}x{k}");
        }
    }
}
