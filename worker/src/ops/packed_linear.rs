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
//!
//! FP8 weights ([`PackedLinear::round_to_fp8`]) halve the bytes again: each
//! output's weights are divided by a power of two chosen for that output
//! (so its largest magnitude lands in E4M3's top binade, 224–448) and
//! rounded to the nearest E4M3 value. The kernel turns 16 codes into f16
//! bit patterns with two integer operations (E4M3 is f16 with the exponent
//! and mantissa cut short: the same value times 2^-8, exactly) and widens
//! those with F16C; the output is multiplied by its power of two once, at
//! the end. Multiplying by a power of two is exact, so every chain is the
//! chain over the dequantized weight scaled by it: the results are the bits
//! of [`matmul::forward`] on the dequantized weight (tested; values below
//! f32's normal range aside). A power of two instead of an arbitrary scale
//! costs nothing in precision: E4M3's relative step is the same in every
//! binade, so only the unused top of the last binade differs.

use half::bf16;

use crate::fp8::e4m3;
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
/// rows (one 64-byte line of f32 weights per step, half a line of bf16, a
/// quarter of FP8).
const PREFETCH: usize = 16;
/// The element types of panels: a kernel's `E`.
const F32: u8 = 0;
const BF16: u8 = 1;
const FP8: u8 = 2;
/// FP8 panels widened to bf16 ([`widen_fp8_panel`]), still to be scaled.
const FP8_STAGED: u8 = 3;
/// An E4M3 code read as an f16 bit pattern is its value times 2^-8 (see
/// the module comment), so an FP8 output is scaled by this much more.
const FP8_AS_F16: f32 = 256.0;

/// How a linear layer's weights are stored (activations are f32 either way).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WeightPrecision {
    #[default]
    F32,
    /// Each weight rounded to the nearest bfloat16 (ties to even).
    Bf16,
    /// Each output's weights scaled by a power of two and rounded to the
    /// nearest E4M3 value (ties to even).
    Fp8,
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
    /// E4M3 codes in the f32 panels' order, and for every output of the
    /// panels (padding included) the power of two its sums are multiplied
    /// by: its weights' scale times [`FP8_AS_F16`].
    Fp8 {
        codes: Vec<u8>,
        scales: Vec<f32>,
    },
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

    /// Stores the weights at `precision`: [`Self::round_to_bf16`],
    /// [`Self::round_to_fp8`], or as they are for f32.
    pub fn round_to(&mut self, precision: WeightPrecision) {
        match precision {
            WeightPrecision::F32 => {}
            WeightPrecision::Bf16 => self.round_to_bf16(),
            WeightPrecision::Fp8 => self.round_to_fp8(),
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
            bf16 @ Storage::Bf16(_) => bf16,
            panels => Storage::Bf16(
                f32_panels(panels)
                    .chunks_exact(NR)
                    .flat_map(|step| BF16_ORDER.map(|o| bf16::from_f32(step[o])))
                    .collect(),
            ),
        };
    }

    /// Rounds every output's weights to E4M3 with a power-of-two scale of
    /// its own (a quarter of f32's bytes; see the module comment).
    pub fn round_to_fp8(&mut self) {
        let (in_dim, out_dim) = (self.in_dim, self.out_dim);
        let data = std::mem::replace(&mut self.data, Storage::F32(Vec::new()));
        self.data = match data {
            Storage::Plain(mut w, _) => {
                for row in w.chunks_exact_mut(in_dim) {
                    let scale = fp8_scale(row.iter().copied());
                    for v in row {
                        *v = e4m3::decode(e4m3::encode(*v / scale)) * scale;
                    }
                }
                Storage::Plain(w, WeightPrecision::Fp8)
            }
            fp8 @ Storage::Fp8 { .. } => fp8,
            panels => {
                let panels = f32_panels(panels);
                let mut scales = vec![1.0; panels.len() / in_dim];
                let mut codes = vec![0u8; panels.len()];
                for (p, (panel, codes)) in panels
                    .chunks_exact(in_dim * NR)
                    .zip(codes.chunks_exact_mut(in_dim * NR))
                    .enumerate()
                {
                    for c in 0..NR.min(out_dim - p * NR) {
                        let scale = fp8_scale(panel.iter().skip(c).step_by(NR).copied());
                        for i in 0..in_dim {
                            codes[i * NR + c] = e4m3::encode(panel[i * NR + c] / scale);
                        }
                        scales[p * NR + c] = scale * FP8_AS_F16;
                    }
                }
                Storage::Fp8 { codes, scales }
            }
        };
    }

    pub fn precision(&self) -> WeightPrecision {
        match self.data {
            Storage::Plain(_, precision) => precision,
            Storage::F32(_) => WeightPrecision::F32,
            Storage::Bf16(_) => WeightPrecision::Bf16,
            Storage::Fp8 { .. } => WeightPrecision::Fp8,
        }
    }

    /// Bytes the weights take (panels include their padding; FP8 its scales).
    pub fn bytes(&self) -> usize {
        match &self.data {
            Storage::Plain(w, _) | Storage::F32(w) => w.len() * 4,
            Storage::Bf16(w) => w.len() * 2,
            Storage::Fp8 { codes, scales } => codes.len() + scales.len() * 4,
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

    /// The whole weight `[out_dim, in_dim]` as the kernel multiplies it (the
    /// rounded values, at BF16 or FP8): packing it again at the same
    /// precision gives the same products, on any CPU.
    pub fn weights(&self) -> Vec<f32> {
        let mut w = vec![0.0; self.out_dim * self.in_dim];
        for (o, row) in w.chunks_exact_mut(self.in_dim).enumerate() {
            self.row(o, row);
        }
        w
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
            Storage::Fp8 { codes, scales } => {
                let scale = scales[o] / FP8_AS_F16;
                for (value, step) in out.iter_mut().zip(codes[panel].chunks_exact(NR)) {
                    *value = e4m3::decode(step[o % NR]) * scale;
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
            Storage::F32(w) => self.forward_packed::<F32>(out, x, rows, weights(w, &[])),
            #[cfg(target_arch = "x86_64")]
            Storage::Bf16(w) => self.forward_packed::<BF16>(out, x, rows, weights(w, &[])),
            #[cfg(target_arch = "x86_64")]
            Storage::Fp8 { codes, scales } => {
                self.forward_packed::<FP8>(out, x, rows, weights(codes, scales))
            }
            // Panels are only built where `available()` (x86-64).
            #[cfg(not(target_arch = "x86_64"))]
            Storage::F32(_) | Storage::Bf16(_) | Storage::Fp8 { .. } => {
                unreachable!("packed weights off x86-64")
            }
        }
    }

    /// [`Self::forward`] on the panels, split across the current rayon
    /// pool's threads when the product is large enough.
    /// `weights` holds the panels in the element type `E` names.
    #[cfg(target_arch = "x86_64")]
    fn forward_packed<const E: u8>(
        &self,
        out: &mut [f32],
        x: &[f32],
        rows: usize,
        weights: Weights,
    ) {
        let panels = self.out_dim.div_ceil(NR);
        let parts = parts(rows * self.in_dim * self.out_dim, panels);
        let out = SharedOut(out.as_mut_ptr());
        // SAFETY (both calls): panels are only built when `available()` said
        // AVX2, FMA and F16C run here, and `weights` holds them in the
        // element type `E` names; `forward` checked the shapes; the parts'
        // panel ranges are disjoint, so no output is written twice.
        if parts <= 1 {
            unsafe { forward_avx2::<E>(self, weights, out, x, rows, 0..panels) }
        } else {
            use rayon::prelude::*;
            // Whole groups of 4 panels per part, as the one-row tile takes them.
            let per_part = panels.div_ceil(parts).next_multiple_of(4);
            (0..parts).into_par_iter().for_each(|part| {
                let range = (part * per_part).min(panels)..((part + 1) * per_part).min(panels);
                unsafe { forward_avx2::<E>(self, weights, out, x, rows, range) }
            });
        }
    }
}

/// Multiply-adds below which a product is not worth splitting: about 10 µs
/// of one core, several times what handing a part to another thread costs.
#[cfg(target_arch = "x86_64")]
const MIN_PART: usize = 1 << 18;

/// How many threads share a product: as many as the pool has
/// ([`super::pool_threads`]), the work allows and there are groups of 4
/// panels for.
#[cfg(target_arch = "x86_64")]
fn parts(multiply_adds: usize, panels: usize) -> usize {
    super::pool_threads()
        .min(multiply_adds / MIN_PART)
        .min(panels.div_ceil(4))
        .max(1)
}

/// The panels' f32 values, whatever they are stored as (the layout of
/// [`Storage::F32`]).
fn f32_panels(data: Storage) -> Vec<f32> {
    match data {
        Storage::Plain(..) => unreachable!("plain weights have no panels"),
        Storage::F32(panels) => panels,
        Storage::Bf16(w) => w
            .chunks_exact(NR)
            .flat_map(|step| std::array::from_fn::<f32, NR, _>(|o| step[BF16_ORDER[o]].to_f32()))
            .collect(),
        Storage::Fp8 { codes, scales } => {
            let per_panel = codes.len() / scales.len() * NR;
            codes
                .chunks_exact(per_panel)
                .zip(scales.chunks_exact(NR))
                .flat_map(|(panel, scales)| {
                    panel.chunks_exact(NR).flat_map(|step| {
                        std::array::from_fn::<f32, NR, _>(|o| {
                            e4m3::decode(step[o]) * (scales[o] / FP8_AS_F16)
                        })
                    })
                })
                .collect()
        }
    }
}

/// The power of two an output's weights are divided by before rounding to
/// E4M3: the smallest that brings the largest magnitude to at most 448
/// (1 for all zeros; non-finite weights saturate).
fn fp8_scale(weights: impl Iterator<Item = f32>) -> f32 {
    let largest = weights.fold(0.0f32, |m, w| m.max(w.abs()));
    if !(largest > 0.0 && largest.is_finite()) {
        return 1.0;
    }
    // Kept where the scale times FP8_AS_F16 and its inverse stay normal.
    let mut exponent = (largest / e4m3::MAX).log2().ceil().clamp(-110.0, 110.0) as i32;
    // `log2` may be off by one next to a power of two; settle it exactly.
    while exponent < 110 && largest / 2f32.powi(exponent) > e4m3::MAX {
        exponent += 1;
    }
    while exponent > -110 && largest / 2f32.powi(exponent - 1) <= e4m3::MAX {
        exponent -= 1;
    }
    2f32.powi(exponent)
}

/// The panels (and for FP8 every output's scale), read by several threads.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Weights {
    panels: *const u8,
    scales: *const f32,
}

#[cfg(target_arch = "x86_64")]
fn weights<T>(panels: &[T], scales: &[f32]) -> Weights {
    Weights {
        panels: panels.as_ptr().cast(),
        scales: scales.as_ptr(),
    }
}
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

/// Whether this CPU runs the packed kernels (every CPU with AVX2 has F16C).
fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
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
    /// The tile's first panel's first weight (of the kernel's element type
    /// `E`), panels `k * NR` weights apart.
    panels: *const u8,
    /// FP8: the tile's first panel's first output's scale, `NR` per panel.
    scales: *const f32,
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
/// FP8 panels that several row tiles read are first widened to bf16 in a
/// scratch buffer (exact: an E4M3 value times 2^-8 is a bfloat16), so the
/// eight-instruction widening runs once per weight, not once per tile: a
/// 39-token prefill's attention projections have 7 tiles per panel.
///
/// # Safety
/// AVX2, FMA and F16C; `x: [rows, in_dim]`, `out: [rows, out_dim]`; only
/// the columns of `panels` are written.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn forward_avx2<const E: u8>(
    w: &PackedLinear,
    weights: Weights,
    out: SharedOut,
    x: &[f32],
    rows: usize,
    panels: std::ops::Range<usize>,
) {
    let (k, n) = (w.in_dim, w.out_dim);
    // Row 0's tile of the group of panels from `panel`, whose weights are
    // at `panels_at` (in place, or widened into `staged`).
    let at = |panel: usize, panels_at: *const u8| Tile {
        k,
        x: x.as_ptr(),
        panels: panels_at,
        scales: weights.scales.wrapping_add(panel * NR),
        out: out.0.wrapping_add(panel * NR),
        ldo: n,
        cols: n - panel * NR,
    };
    let full = rows / MR * MR;
    let left = rows - full;
    let group = match left {
        1 => 4,
        2 | 3 => 2,
        _ => 1,
    };
    let tiles_per_panel = full / MR + usize::from(left > 0);
    let stage = E == FP8 && tiles_per_panel > 1;
    let mut staged: Vec<bf16> = if stage {
        vec![bf16::ZERO; group * k * NR]
    } else {
        Vec::new()
    };
    let (mut panel, panels) = (panels.start, panels.end);
    while panel < panels {
        let width = if panels - panel >= group { group } else { 1 };
        // SAFETY (every call): the panels panel..panel + width exist, and
        // `staged` holds `width` of them.
        unsafe {
            if stage {
                for p in 0..width {
                    widen_fp8_panel(
                        weights.panels.add((panel + p) * k * NR),
                        staged.as_mut_ptr().add(p * k * NR),
                        k,
                    );
                }
                panel_tiles::<FP8_STAGED>(at(panel, staged.as_ptr().cast()), full, left, width);
            } else {
                let first = weights.panels.add(panel * k * NR * element_bytes::<E>());
                panel_tiles::<E>(at(panel, first), full, left, width);
            }
        }
        panel += width;
    }
}

/// Every row tile of the `width` panels at `tile` (rows from 0, outputs
/// from the first panel's): the full tiles panel by panel, then the rows
/// left over across all of them. Each panel's tiles run while the panel
/// is in L1/L2, so the weights stream from memory once per call (a
/// prefill's experts get ~10 rows: a second pass for the last 4 had read
/// each expert's weights twice).
///
/// # Safety
/// As [`forward_avx2`], for `full + left` rows and `width` panels.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn panel_tiles<const E: u8>(tile: Tile, full: usize, left: usize, width: usize) {
    let k = tile.k;
    let at = |row: usize, p: usize| Tile {
        x: tile.x.wrapping_add(row * k),
        panels: tile.panels.wrapping_add(p * k * NR * element_bytes::<E>()),
        scales: tile.scales.wrapping_add(p * NR),
        out: tile.out.wrapping_add(row * tile.ldo + p * NR),
        cols: tile.cols - p * NR,
        ..tile
    };
    for p in 0..width {
        for row in (0..full).step_by(MR) {
            // SAFETY: rows row..row + MR and panel p exist; `cols` clips the
            // outputs to `out_dim`.
            unsafe { kernel::<E, MR, 1>(at(row, p)) };
        }
    }
    let t = at(full, 0);
    // SAFETY (every arm): rows full..full + left exist, and `width` panels.
    unsafe {
        match (left, width) {
            (0, _) => {}
            (1, 4) => kernel::<E, 1, 4>(t),
            (2, 2) => kernel::<E, 2, 2>(t),
            (3, 2) => kernel::<E, 3, 2>(t),
            (1, _) => kernel::<E, 1, 1>(t),
            (2, _) => kernel::<E, 2, 1>(t),
            (3, _) => kernel::<E, 3, 1>(t),
            (4, _) => kernel::<E, 4, 1>(t),
            _ => kernel::<E, 5, 1>(t),
        }
    }
}

/// Widens one FP8 panel (`k` steps of [`NR`] codes) to bf16 steps in
/// [`BF16_ORDER`], each the code's value times 2^-8 (exact), as the
/// kernel's FP8 path does in registers.
///
/// # Safety
/// AVX2 and F16C; `k * NR` codes at `codes`, room for `k * NR` at `out`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn widen_fp8_panel(codes: *const u8, out: *mut bf16, k: usize) {
    use std::arch::x86_64::*;
    for i in 0..k {
        // SAFETY: step i < k of both (caller).
        unsafe {
            let [low, high] = fp8_step(codes.add(i * NR));
            // The f32s' top halves are their bfloat16s (the values have at
            // most 4 significant bits); packing the two vectors interleaves
            // their 128-bit halves into `BF16_ORDER`.
            let packed = _mm256_packus_epi32(
                _mm256_srli_epi32::<16>(_mm256_castps_si256(low)),
                _mm256_srli_epi32::<16>(_mm256_castps_si256(high)),
            );
            _mm256_storeu_si256(out.add(i * NR).cast(), packed);
        }
    }
}

/// One FP8 step's 16 codes as f32, outputs 0–7 and 8–15, each the code's
/// value times 2^-8: E4M3 `s eeee mmm` sign-extended to 16 bits and shifted
/// left by 7 is `s s eeee mmm 0000000`; clearing bit 14 leaves the f16
/// `s 0eeee mmm0000000` (subnormals included), which F16C widens.
///
/// # Safety
/// AVX2 and F16C; 16 codes at `step`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fp8_step(step: *const u8) -> [std::arch::x86_64::__m256; 2] {
    use std::arch::x86_64::*;
    // SAFETY: 16 codes at `step` (caller).
    let codes = _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(step.cast()) });
    let half = _mm256_and_si256(_mm256_slli_epi16::<7>(codes), _mm256_set1_epi16(!0x4000));
    [
        _mm256_cvtph_ps(_mm256_castsi256_si128(half)),
        _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(half)),
    ]
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
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn kernel<const E: u8, const R: usize, const P: usize>(tile: Tile) {
    use std::arch::x86_64::*;
    let k = tile.k;
    let bytes = element_bytes::<E>();
    let mut acc = [[[_mm256_setzero_ps(); 2]; P]; R];
    for i in 0..k {
        let mut b = [[_mm256_setzero_ps(); 2]; P];
        for (j, b) in b.iter_mut().enumerate() {
            // SAFETY: panel j holds k * NR weights (caller), i < k.
            unsafe {
                let step = tile.panels.add((j * k * NR + i * NR) * bytes);
                if E == BF16 || E == FP8_STAGED {
                    // A bfloat16 is the top half of the f32 it stands for:
                    // interleaved below zeros, the steps' weights (stored in
                    // `BF16_ORDER`) become outputs 0–7 and 8–15.
                    let w = _mm256_loadu_si256(step.cast());
                    let zero = _mm256_setzero_si256();
                    b[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, w));
                    b[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, w));
                } else if E == FP8 {
                    *b = fp8_step(step);
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
    if E == FP8 || E == FP8_STAGED {
        for j in 0..P {
            // SAFETY: every panel has NR scales (padding included).
            let scale = unsafe {
                [
                    _mm256_loadu_ps(tile.scales.add(j * NR)),
                    _mm256_loadu_ps(tile.scales.add(j * NR + 8)),
                ]
            };
            for acc in &mut acc {
                acc[j][0] = _mm256_mul_ps(acc[j][0], scale[0]);
                acc[j][1] = _mm256_mul_ps(acc[j][1], scale[1]);
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
const fn element_bytes<const E: u8>() -> usize {
    match E {
        F32 => 4,
        BF16 | FP8_STAGED => 2,
        _ => 1,
    }
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

    /// FP8 panels: the bits of `matmul::forward` on the dequantized weight,
    /// each output's scale found here independently (halving or doubling in
    /// f64 until the largest magnitude is in (224, 448]).
    #[test]
    fn fp8_weights_give_the_bits_of_matmul_forward_on_the_dequantized_weight() {
        check_against_matmul(WeightPrecision::Fp8);
    }

    fn fp8_rounded(w: &mut [f32], in_dim: usize) {
        for row in w.chunks_exact_mut(in_dim) {
            let largest = row.iter().fold(0.0f64, |m, &v| m.max(f64::from(v).abs()));
            let mut scale = 1.0f64;
            while largest / scale > 448.0 {
                scale *= 2.0;
            }
            while largest > 0.0 && largest / (scale / 2.0) <= 448.0 {
                scale /= 2.0;
            }
            for v in row {
                let code = e4m3::encode((f64::from(*v) / scale) as f32);
                *v = (f64::from(e4m3::decode(code)) * scale) as f32;
            }
        }
    }

    /// Every finite E4M3 code, as one output's weights (largest 448, so its
    /// scale is 1), read back one input at a time: the kernel's f16 widening
    /// gives each code's value, subnormals and negative zero included.
    #[test]
    fn every_fp8_code_widens_to_its_value() {
        let codes: Vec<u8> = (0..=255u8).filter(|c| c & 0x7F != e4m3::NAN).collect();
        let values: Vec<f32> = codes.iter().map(|&c| e4m3::decode(c)).collect();
        let in_dim = values.len();
        let mut linear = PackedLinear::new(values.clone(), in_dim, 1);
        linear.round_to_fp8();
        let mut one_hot = vec![0.0f32; in_dim * in_dim];
        for i in 0..in_dim {
            one_hot[i * in_dim + i] = 1.0;
        }
        let mut got = vec![f32::NAN; in_dim];
        linear.forward(&mut got, &one_hot);
        for ((&code, &value), &got) in codes.iter().zip(&values).zip(&got) {
            // 1 · (-0) + 0 sums to +0: compare values, then the sign of non-zeros.
            assert_eq!(got, value, "code {code:#04x}");
        }
        let mut row = vec![0.0; in_dim];
        linear.row(0, &mut row);
        assert_eq!(bits(&row), bits(&values));
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
            // Outputs of very different sizes, for FP8's scales.
            for (o, row) in w.chunks_exact_mut(in_dim).enumerate() {
                row.iter_mut()
                    .for_each(|v| *v *= 2f32.powi(o as i32 % 13 - 6));
            }
            let mut linear = PackedLinear::new(w.clone(), in_dim, out_dim);
            linear.round_to(precision);
            match precision {
                WeightPrecision::F32 => {}
                WeightPrecision::Bf16 => w.iter_mut().for_each(|v| *v = rounded(*v)),
                WeightPrecision::Fp8 => fp8_rounded(&mut w, in_dim),
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
        for precision in [WeightPrecision::Bf16, WeightPrecision::Fp8] {
            let mut reduced = f32_weights.clone();
            reduced.round_to(precision);
            threads_match_one(&reduced, &mut rng);
        }
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
