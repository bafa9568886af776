//! A linear layer whose weight is stored once in the order the GEMM kernel
//! reads it: serving's weights never change, so the packing that
//! [`crate::ops::matmul::forward`] repeats on every call (a third of a
//! prefill) or avoids with a scalar one-row path (three quarters of a
//! decode step) is done at load time instead.
//!
//! Layout: the `out_dim` outputs in panels of [`NR`]; panel `j` holds, for
//! each input `i` in order, the 16 weights `w[16 j .. 16 j + 16, i]`
//! (outputs past `out_dim` are zero). A kernel step broadcasts one input of
//! a row and multiplies it into 16 outputs with two vector fused
//! multiply-adds — the transposed weight is what turns a one-row product
//! into full-width vector work without shuffles.
//!
//! Exactness: every output is one fused multiply-add chain from zero over
//! the inputs in ascending order, which is what [`crate::ops::matmul::forward`]
//! computes on every path (portable loops, one-row path, packed kernel), so
//! the results are the same bits (tested). Same memory as the plain weight
//! (plus padding to 16 outputs); on CPUs without AVX2 and FMA the weight
//! stays plain and `matmul::forward` runs.
//!
//! BF16 weights ([`PackedLinear::round_to_bf16`]) halve the bytes a product
//! streams from memory, which is what bounds a decode step and a short
//! prefill on a CPU. Each weight is rounded to the nearest bfloat16 once;
//! the kernel widens 8 of them to f32 in a register (a zero-extension and
//! a shift: exact) and runs the same chains, so the results are the bits
//! of [`matmul::forward`] on the rounded weight (tested). Activations and
//! sums stay f32.

use half::bf16;

use crate::ops::matmul;

/// Outputs per panel: two 8-wide vectors.
const NR: usize = 16;
/// Where a bf16 panel step keeps its 16 outputs: interleaving the 256-bit
/// step with zeros (`vpunpcklwd` / `vpunpckhwd`, which work within each
/// 128-bit half) then yields outputs 0–7 and 8–15 as f32 — one shuffle per
/// 8 weights, where zero-extending and shifting took two.
const BF16_ORDER: [usize; NR] = [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15];
/// Rows of `x` per register tile when there are many (6 × 16 outputs in 12
/// of the 16 AVX registers, as the packed GEMM's kernel).
const MR: usize = 6;
/// Kernel steps between a prefetch and its use in a tile of two or more
/// rows (one 64-byte line of f32 weights per step, half a line of bf16).
const PREFETCH: usize = 16;

/// How a linear layer's weights are stored (activations are f32 either way).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightPrecision {
    #[default]
    F32,
    /// Each weight rounded to the nearest bfloat16 (ties to even).
    Bf16,
}

/// A `[out_dim, in_dim]` weight ready for `out = x · wᵀ`.
#[derive(Clone, Debug)]
pub struct PackedLinear {
    in_dim: usize,
    out_dim: usize,
    data: Storage,
}

#[derive(Clone, Debug)]
enum Storage {
    /// The plain `[out_dim, in_dim]` weight, for CPUs without the kernels;
    /// rounded to bfloat16 values when that precision was asked for.
    Plain(Vec<f32>, WeightPrecision),
    /// Panels (see the module comment).
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

impl PackedLinear {
    /// Takes `w: [out_dim, in_dim]` row-major (the layout of
    /// [`crate::ops::matmul`] and PyTorch).
    pub fn new(w: Vec<f32>, in_dim: usize, out_dim: usize) -> Self {
        assert!(
            in_dim > 0 && out_dim > 0,
            "linear dimensions must be positive"
        );
        assert_eq!(w.len(), in_dim * out_dim, "linear weight shape");
        if !available() {
            return Self {
                in_dim,
                out_dim,
                data: Storage::Plain(w, WeightPrecision::F32),
            };
        }
        let panels = out_dim.div_ceil(NR);
        let mut data = vec![0.0f32; panels * in_dim * NR];
        for (o, row) in w.chunks_exact(in_dim).enumerate() {
            let panel = &mut data[o / NR * in_dim * NR..][..in_dim * NR];
            for (i, &value) in row.iter().enumerate() {
                panel[i * NR + o % NR] = value;
            }
        }
        Self {
            in_dim,
            out_dim,
            data: Storage::F32(data),
        }
    }

    /// Rounds every weight to the nearest bfloat16 (half the bytes; the
    /// layout is unchanged).
    pub fn round_to_bf16(&mut self) {
        let data = std::mem::replace(&mut self.data, Storage::F32(Vec::new()));
        self.data = match data {
            Storage::Plain(w, _) => Storage::Plain(
                w.into_iter().map(|v| bf16::from_f32(v).to_f32()).collect(),
                WeightPrecision::Bf16,
            ),
            Storage::F32(panels) => Storage::Bf16(
                panels
                    .chunks_exact(NR)
                    .flat_map(|step| BF16_ORDER.map(|o| bf16::from_f32(step[o])))
                    .collect(),
            ),
            bf16 @ Storage::Bf16(_) => bf16,
        };
    }

    pub fn precision(&self) -> WeightPrecision {
        match self.data {
            Storage::Plain(_, precision) => precision,
            Storage::F32(_) => WeightPrecision::F32,
            Storage::Bf16(_) => WeightPrecision::Bf16,
        }
    }

    /// Bytes the weights take (panels include their padding).
    pub fn bytes(&self) -> usize {
        match &self.data {
            Storage::Plain(w, _) | Storage::F32(w) => w.len() * 4,
            Storage::Bf16(w) => w.len() * 2,
        }
    }

    /// Several weights with the same input, stacked along the outputs
    /// (`q, k, v`; `w1, w3`): one pass over the input computes them all,
    /// output row `[first | second | …]`, each output's bits unchanged.
    pub fn stacked(parts: &[&[f32]], in_dim: usize) -> Self {
        let w: Vec<f32> = parts.concat();
        let out_dim = w.len() / in_dim;
        Self::new(w, in_dim, out_dim)
    }

    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// Weight row `o` (`w[o, ..]`), e.g. an embedding looked up from a tied
    /// LM head.
    pub fn row(&self, o: usize, out: &mut [f32]) {
        assert!(o < self.out_dim && out.len() == self.in_dim, "linear row");
        let panel = o / NR * self.in_dim * NR..(o / NR + 1) * self.in_dim * NR;
        match &self.data {
            Storage::Plain(w, _) => {
                out.copy_from_slice(&w[o * self.in_dim..(o + 1) * self.in_dim]);
            }
            Storage::F32(w) => {
                for (value, step) in out.iter_mut().zip(w[panel].chunks_exact(NR)) {
                    *value = step[o % NR];
                }
            }
            Storage::Bf16(w) => {
                let at = BF16_ORDER.iter().position(|&p| p == o % NR).unwrap_or(0);
                for (value, step) in out.iter_mut().zip(w[panel].chunks_exact(NR)) {
                    *value = step[at].to_f32();
                }
            }
        }
    }

    /// `out[r, o] = Σ_i x[r, i] · w[o, i]` for `x: [rows, in_dim]`,
    /// `out: [rows, out_dim]`: [`matmul::forward`]'s bits.
    pub fn forward(&self, out: &mut [f32], x: &[f32]) {
        let rows = x.len() / self.in_dim;
        assert_eq!(x.len(), rows * self.in_dim, "linear input shape");
        assert_eq!(out.len(), rows * self.out_dim, "linear output shape");
        match &self.data {
            Storage::Plain(w, _) => matmul::forward(out, x, w, self.in_dim, self.out_dim),
            #[cfg(target_arch = "x86_64")]
            Storage::F32(w) => self.forward_packed::<false>(out, x, rows, w.as_ptr().cast()),
            #[cfg(target_arch = "x86_64")]
            Storage::Bf16(w) => self.forward_packed::<true>(out, x, rows, w.as_ptr().cast()),
            // Panels are only built where `available()` (x86-64).
            #[cfg(not(target_arch = "x86_64"))]
            Storage::F32(_) | Storage::Bf16(_) => unreachable!("packed weights off x86-64"),
        }
    }

    /// [`Self::forward`] on the panels, split across the current rayon
    /// pool's threads when the product is large enough.
    /// `panels` points at the panels' first weight, f32 or (`BF16`) bf16.
    #[cfg(target_arch = "x86_64")]
    fn forward_packed<const BF16: bool>(
        &self,
        out: &mut [f32],
        x: &[f32],
        rows: usize,
        panels_at: *const u8,
    ) {
        let panels = self.out_dim.div_ceil(NR);
        let parts = parts(rows * self.in_dim * self.out_dim, panels);
        let out = SharedOut(out.as_mut_ptr());
        let weights = Weights(panels_at);
        // SAFETY (both calls): panels are only built when `available()` said
        // AVX2 and FMA run here, and `panels_at` holds them in the element
        // type `BF16` names; `forward` checked the shapes; the parts' panel
        // ranges are disjoint, so no output is written twice.
        if parts <= 1 {
            unsafe { forward_avx2::<BF16>(self, weights, out, x, rows, 0..panels) }
        } else {
            use rayon::prelude::*;
            // Whole groups of 4 panels per part, as the one-row tile takes them.
            let per_part = panels.div_ceil(parts).next_multiple_of(4);
            (0..parts).into_par_iter().for_each(|part| {
                let range = (part * per_part).min(panels)..((part + 1) * per_part).min(panels);
                unsafe { forward_avx2::<BF16>(self, weights, out, x, rows, range) }
            });
        }
    }
}

/// Multiply-adds below which a product is not worth splitting: about 10 µs
/// of one core, several times what handing a part to another thread costs.
#[cfg(target_arch = "x86_64")]
const MIN_PART: usize = 1 << 18;

/// How many threads share a product: one outside a rayon pool (the
/// engine's pool exists only with `--threads` above 1), else as many as
/// the pool has, the work allows and there are groups of 4 panels for.
#[cfg(target_arch = "x86_64")]
fn parts(multiply_adds: usize, panels: usize) -> usize {
    if rayon::current_thread_index().is_none() {
        return 1;
    }
    rayon::current_num_threads()
        .min(multiply_adds / MIN_PART)
        .min(panels.div_ceil(4))
        .max(1)
}

/// The panels, read by several threads.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Weights(*const u8);
// SAFETY: read only, and alive for the call (borrowed from the layer).
#[cfg(target_arch = "x86_64")]
unsafe impl Send for Weights {}
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for Weights {}

/// The output, written by several threads at disjoint columns.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: each thread writes only its own panels' columns (see `forward_packed`).
#[cfg(target_arch = "x86_64")]
unsafe impl Send for SharedOut {}
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for SharedOut {}

/// Whether this CPU runs the packed kernels.
fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Where a register tile reads and writes.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Tile {
    /// Inputs per row (`k`).
    k: usize,
    /// The tile's first row of `x`, rows `k` apart.
    x: *const f32,
    /// The tile's first panel's first weight (f32 or bf16: see the
    /// kernel's `BF16`), panels `k * NR` weights apart.
    panels: *const u8,
    /// The tile's first output, rows `ldo` apart.
    out: *mut f32,
    ldo: usize,
    /// Outputs of the tile that exist (the rest are padding, not written).
    cols: usize,
}

/// Loops the register tiles over `rows × out_dim`, panels outermost so a
/// panel stays in L1/L2 while every row tile reads it: tiles of [`MR`]
/// rows, then the rows left over (all of them in a decode step) in one tile
/// spanning several panels, so it still has at least 8 independent
/// accumulators (a fused multiply-add has 4 cycles' latency and two issue
/// per cycle) and streams several panels at once.
///
/// # Safety
/// AVX2 and FMA; `x: [rows, in_dim]`, `out: [rows, out_dim]`; only the
/// columns of `panels` are written.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_avx2<const BF16: bool>(
    w: &PackedLinear,
    weights: Weights,
    out: SharedOut,
    x: &[f32],
    rows: usize,
    panels: std::ops::Range<usize>,
) {
    let (k, n) = (w.in_dim, w.out_dim);
    let out = out.0;
    let tile = |row: usize, panel: usize| Tile {
        k,
        x: x.as_ptr().wrapping_add(row * k),
        panels: weights
            .0
            .wrapping_add(panel * k * NR * element_bytes::<BF16>()),
        out: out.wrapping_add(row * n + panel * NR),
        ldo: n,
        cols: n - panel * NR,
    };
    let full = rows / MR * MR;
    let (row, left) = (full, rows - full);
    let group = match left {
        1 => 4,
        2 | 3 => 2,
        _ => 1,
    };
    let (mut panel, panels) = (panels.start, panels.end);
    while panel < panels {
        let width = if panels - panel >= group { group } else { 1 };
        // Every row tile of a panel runs while the panel is in L1/L2: the
        // full tiles first, then the rows left over, so the weights stream
        // from memory once per call (a prefill's experts get ~10 rows: a
        // second pass for the last 4 had read each expert's weights twice).
        for p in panel..panel + width {
            for full_row in (0..full).step_by(MR) {
                // SAFETY: rows full_row..full_row + MR and panel p exist;
                // `tile` clips the columns to `out_dim`.
                unsafe { kernel::<BF16, MR, 1>(tile(full_row, p)) };
            }
        }
        let t = tile(row, panel);
        // SAFETY (every arm): rows row..rows exist, and the panels
        // panel..panel + width.
        unsafe {
            match (left, width) {
                (0, _) => {}
                (1, 4) => kernel::<BF16, 1, 4>(t),
                (2, 2) => kernel::<BF16, 2, 2>(t),
                (3, 2) => kernel::<BF16, 3, 2>(t),
                (1, _) => kernel::<BF16, 1, 1>(t),
                (2, _) => kernel::<BF16, 2, 1>(t),
                (3, _) => kernel::<BF16, 3, 1>(t),
                (4, _) => kernel::<BF16, 4, 1>(t),
                _ => kernel::<BF16, 5, 1>(t),
            }
        }
        panel += width;
    }
}

/// `out[r, c] = Σ_i x[r, i] · panel[i, c]` for `R` rows and `P` panels
/// (`16 P` outputs): per input, one broadcast per row and two vector
/// fused multiply-adds per row and panel, each accumulator one output's
/// chain from zero in ascending `i`.
///
/// # Safety
/// AVX2 and FMA; `R` rows of `k` inputs at `tile.x`, `P` panels of `k * NR`
/// values at `tile.panels`, `R` output rows of `tile.cols.min(16 P)` at `tile.out`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel<const BF16: bool, const R: usize, const P: usize>(tile: Tile) {
    use std::arch::x86_64::*;
    let k = tile.k;
    let bytes = element_bytes::<BF16>();
    let mut acc = [[[_mm256_setzero_ps(); 2]; P]; R];
    for i in 0..k {
        let mut b = [[_mm256_setzero_ps(); 2]; P];
        for (j, b) in b.iter_mut().enumerate() {
            // SAFETY: panel j holds k * NR weights (caller), i < k.
            unsafe {
                let step = tile.panels.add((j * k * NR + i * NR) * bytes);
                if BF16 {
                    // A bfloat16 is the top half of the f32 it stands for:
                    // interleaved below zeros, the steps' weights (stored in
                    // `BF16_ORDER`) become outputs 0–7 and 8–15.
                    let w = _mm256_loadu_si256(step.cast());
                    let zero = _mm256_setzero_si256();
                    b[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, w));
                    b[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, w));
                } else {
                    b[0] = _mm256_loadu_ps(step.cast());
                    b[1] = _mm256_loadu_ps(step.add(32).cast());
                }
            }
            // Tiles of several rows take long enough per step for a software
            // prefetch of the weights to help: ~5% for a prefill's 6-row
            // tiles, 7–9% for the 2–5 rows an expert often gets (bf16 weights
            // streaming from memory). A decode's one-row tile is already
            // memory-bound, and the extra instructions slowed it by a fifth.
            // Prefetches never fault.
            if R >= 2 {
                let ahead = tile
                    .panels
                    .wrapping_add((j * k * NR + (i + PREFETCH) * NR) * bytes);
                _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
            }
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: row r holds k inputs (caller), i < k.
            let a = _mm256_set1_ps(unsafe { *tile.x.add(r * k + i) });
            for (acc, b) in acc.iter_mut().zip(&b) {
                acc[0] = _mm256_fmadd_ps(a, b[0], acc[0]);
                acc[1] = _mm256_fmadd_ps(a, b[1], acc[1]);
            }
        }
    }
    let cols = tile.cols.min(P * NR);
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: output row r has `cols` values from tile.out (caller).
        let row = unsafe { tile.out.add(r * tile.ldo) };
        if cols == P * NR {
            for (j, acc) in acc.iter().enumerate() {
                // SAFETY: as above, 16 values per panel.
                unsafe {
                    _mm256_storeu_ps(row.add(j * NR), acc[0]);
                    _mm256_storeu_ps(row.add(j * NR + 8), acc[1]);
                }
            }
        } else {
            let mut values = [[0.0f32; NR]; P];
            for (v, acc) in values.iter_mut().zip(acc) {
                // SAFETY: `v` holds 16 f32s.
                unsafe {
                    _mm256_storeu_ps(v.as_mut_ptr(), acc[0]);
                    _mm256_storeu_ps(v.as_mut_ptr().add(8), acc[1]);
                }
            }
            let flat = values.as_flattened();
            // SAFETY: as above, `cols` values.
            unsafe { std::ptr::copy_nonoverlapping(flat.as_ptr(), row, cols) };
        }
    }
}

/// Bytes per packed weight.
#[cfg(target_arch = "x86_64")]
const fn element_bytes<const BF16: bool>() -> usize {
    if BF16 { 2 } else { 4 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Every row count a tile shape is chosen for, ragged output widths and
    /// depths: the bits of `matmul::forward` on the plain weight.
    #[test]
    fn gives_the_bits_of_matmul_forward() {
        check_against_matmul(WeightPrecision::F32);
    }

    /// BF16 panels: the bits of `matmul::forward` on the weight rounded to
    /// bfloat16 (rounded here independently: by clearing or carrying into
    /// the low 16 bits, ties to even).
    #[test]
    fn bf16_weights_give_the_bits_of_matmul_forward_on_the_rounded_weight() {
        check_against_matmul(WeightPrecision::Bf16);
    }

    /// Round to nearest bfloat16, ties to even, for finite values.
    fn rounded(v: f32) -> f32 {
        let bits = v.to_bits();
        let round = 0x7fff + ((bits >> 16) & 1);
        f32::from_bits(bits.wrapping_add(round) & 0xffff_0000)
    }

    #[test]
    fn bf16_rounding_is_to_nearest_even() {
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even 1.
        assert_eq!(rounded(1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(rounded(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
        let linear = PackedLinear::new(vec![1.0 + 2f32.powi(-8), 1.0 + 2f32.powi(-7)], 2, 1);
        let mut row = [0.0; 2];
        let mut linear = linear;
        linear.round_to_bf16();
        linear.row(0, &mut row);
        assert_eq!(row, [1.0, 1.0 + 2f32.powi(-7)]);
    }

    fn check_against_matmul(precision: WeightPrecision) {
        let mut rng = SplitMix64::new(17);
        for (in_dim, out_dim) in [(1, 1), (5, 8), (64, 400), (33, 100), (512, 48)] {
            let mut w = rng.normal_vec(out_dim * in_dim, 1.0);
            let mut linear = PackedLinear::new(w.clone(), in_dim, out_dim);
            if precision == WeightPrecision::Bf16 {
                linear.round_to_bf16();
                for v in &mut w {
                    *v = rounded(*v);
                }
                assert_eq!(linear.bytes() % 2, 0);
            }
            assert_eq!(linear.precision(), precision);
            for rows in [1, 2, 3, 4, 5, 6, 7, 13, 39] {
                let x = rng.normal_vec(rows * in_dim, 1.0);
                let mut expected = vec![0.0f32; rows * out_dim];
                matmul::forward(&mut expected, &x, &w, in_dim, out_dim);
                let mut got = vec![f32::NAN; rows * out_dim];
                linear.forward(&mut got, &x);
                assert_eq!(bits(&got), bits(&expected), "{rows}x{in_dim} · {out_dim}");
            }
            for o in (0..out_dim).step_by(7) {
                let mut row = vec![0.0; in_dim];
                linear.row(o, &mut row);
                assert_eq!(row, w[o * in_dim..(o + 1) * in_dim], "row {o}");
            }
        }
    }

    /// Split across a pool's threads (columns in groups of panels), the
    /// same bits as on one.
    #[test]
    fn threads_give_the_bits_of_one() {
        let mut rng = SplitMix64::new(5);
        let (in_dim, out_dim) = (512, 2000);
        let w = rng.normal_vec(out_dim * in_dim, 1.0);
        let f32_weights = PackedLinear::new(w, in_dim, out_dim);
        let mut bf16_weights = f32_weights.clone();
        bf16_weights.round_to_bf16();
        threads_match_one(&bf16_weights, &mut rng);
        threads_match_one(&f32_weights, &mut rng);
    }

    fn threads_match_one(linear: &PackedLinear, rng: &mut SplitMix64) {
        let (in_dim, out_dim) = (linear.in_dim, linear.out_dim);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for rows in [1, 2, 7] {
            let x = rng.normal_vec(rows * in_dim, 1.0);
            let mut alone = vec![0.0; rows * out_dim];
            linear.forward(&mut alone, &x);
            let mut shared = vec![f32::NAN; rows * out_dim];
            pool.install(|| {
                #[cfg(target_arch = "x86_64")]
                if !matches!(linear.data, Storage::Plain(..)) {
                    assert!(parts(rows * in_dim * out_dim, out_dim.div_ceil(NR)) > 1);
                }
                linear.forward(&mut shared, &x)
            });
            assert_eq!(bits(&shared), bits(&alone), "{rows} rows");
        }
    }

    #[test]
    fn stacked_weights_give_each_part_side_by_side() {
        let mut rng = SplitMix64::new(3);
        let (a, b) = (rng.normal_vec(20 * 24, 1.0), rng.normal_vec(12 * 24, 1.0));
        let x = rng.normal_vec(3 * 24, 1.0);
        let stacked = PackedLinear::stacked(&[&a, &b], 24);
        let mut both = vec![0.0; 3 * 32];
        stacked.forward(&mut both, &x);
        let (mut ya, mut yb) = (vec![0.0; 3 * 20], vec![0.0; 3 * 12]);
        matmul::forward(&mut ya, &x, &a, 24, 20);
        matmul::forward(&mut yb, &x, &b, 24, 12);
        for r in 0..3 {
            assert_eq!(both[r * 32..r * 32 + 20], ya[r * 20..(r + 1) * 20]);
            assert_eq!(both[r * 32 + 20..(r + 1) * 32], yb[r * 12..(r + 1) * 12]);
        }
    }
}
