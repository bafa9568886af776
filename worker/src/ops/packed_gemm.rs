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
//! Exactness: each element of `C` is one running sum, continued from its
//! value in `C` through the `K` products in ascending order (the `KC` blocks
//! run in order, each resuming from what the previous one stored), with the
//! product and the sum each rounded — no fused multiply-add. These are the
//! portable loops' operations in their order, so the result is the same to
//! the bit on every CPU, with or without this kernel. (On CPUs with separate
//! multiply and add pipes, as AMD Zen has, this costs no throughput against
//! FMA: the only dependency chain is the add.)

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

/// `C[m × n] += A[m × k] · B[k × n]`, `C` row-major and dense (`c.len() == m * n`).
/// Call only when [`available`] says so.
pub(crate) fn gemm(m: usize, n: usize, k: usize, a: Strided<'_>, b: Strided<'_>, c: &mut [f32]) {
    assert_eq!(c.len(), m * n, "gemm output shape");
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    assert!(available(), "packed gemm needs AVX2");
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
        blocked(m, n, k, a, b, c, packed_a, packed_b);
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
#[allow(clippy::too_many_arguments)] // gemm's arguments and the two buffers
fn blocked(
    m: usize,
    n: usize,
    k: usize,
    a: Strided<'_>,
    b: Strided<'_>,
    c: &mut [f32],
    packed_a: &mut [f32],
    packed_b: &mut [f32],
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
        for (p, row) in out.chunks_exact_mut(W).enumerate() {
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

/// Where a register tile lands in `C`, and how much of it is real.
#[derive(Clone, Copy)]
struct Tile {
    row: usize,
    col: usize,
    rows: usize,
    cols: usize,
    ldc: usize,
}

/// `C[tile] += a_panel · b_panel` over `kc` steps, continuing each element's
/// running sum from its value in `C`: per step `c = fma(a, b, c)`, one
/// rounding, exactly as the portable loops compute it in f32.
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
    // The tile's current values; rows and columns past the edge start at 0
    // and are never written back.
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    let mut values = [0.0f32; NR];
    for (i, row) in acc.iter_mut().enumerate().take(tile.rows) {
        let start = (tile.row + i) * tile.ldc + tile.col;
        values[..tile.cols].copy_from_slice(&c[start..start + tile.cols]);
        // SAFETY: `values` holds 16 f32s.
        unsafe {
            row[0] = _mm256_loadu_ps(values.as_ptr());
            row[1] = _mm256_loadu_ps(values.as_ptr().add(8));
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
    for (i, row) in acc.iter().enumerate().take(tile.rows) {
        // SAFETY: `values` holds 16 f32s.
        unsafe {
            _mm256_storeu_ps(values.as_mut_ptr(), row[0]);
            _mm256_storeu_ps(values.as_mut_ptr().add(8), row[1]);
        }
        let start = (tile.row + i) * tile.ldc + tile.col;
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
            let layouts = [(k, 1, n, 1), (1, m, 1, k), (k, 1, 1, k)];
            for (rs_a, cs_a, rs_b, cs_b) in layouts {
                let a = Strided {
                    data: &a_data,
                    row_stride: rs_a,
                    col_stride: cs_a,
                };
                let b = Strided {
                    data: &b_data,
                    row_stride: rs_b,
                    col_stride: cs_b,
                };
                let start: Vec<f32> = rng.normal_vec(m * n, 1.0);
                let mut c = start.clone();
                gemm(m, n, k, a, b, &mut c);
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
}
