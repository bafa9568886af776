//! Dropless dispatch on the device; CPU reference: [`crate::moe::dispatch::Dispatch`].
//! A stable counting sort of the (token, k) slots by expert, then token rows
//! permuted into that expert-major layout and expert outputs gathered back
//! with their gates. See kernels/cuda/permute.cu.

use super::{Gpu, Result, grid, int};
use half::bf16;
use moe_kernels::cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg};
use moe_kernels::registry::PERMUTE;

/// Slots per chunk of the counting sort: one warp walks a chunk in order.
const CHUNK: usize = 256;

/// [`crate::moe::dispatch::Dispatch`] on the device.
pub struct DeviceDispatch {
    pub top_k: usize,
    pub n_experts: usize,
    /// `[n_experts + 1]`: expert `e` owns rows `offsets[e]..offsets[e + 1]`.
    pub offsets: CudaSlice<i32>,
    /// `[tokens * top_k]`: the expert-major row of each slot.
    pub row_of_slot: CudaSlice<i32>,
    /// `[tokens * top_k]`: the slot of each row (the CPU's `slots`, concatenated).
    pub slot_of_row: CudaSlice<i32>,
}

impl DeviceDispatch {
    pub fn rows(&self) -> usize {
        self.row_of_slot.len()
    }

    pub fn tokens(&self) -> usize {
        self.rows() / self.top_k
    }
}

/// Groups `experts: [tokens, top_k]` by expert, stably (token order within an expert).
pub fn dispatch(
    gpu: &Gpu,
    experts: &CudaSlice<i32>,
    top_k: usize,
    n_experts: usize,
) -> Result<DeviceDispatch> {
    assert!(
        n_experts <= 1024,
        "the offset scan runs in one block of at most 1024 experts"
    );
    let slots = experts.len();
    let mut dispatch = DeviceDispatch {
        top_k,
        n_experts,
        // With no slots no kernel runs: every expert's range is empty (zeros).
        offsets: if slots == 0 {
            gpu.zeros(n_experts + 1)?
        } else {
            gpu.output(n_experts + 1)?
        },
        // The scatter writes every slot's row and every row's slot.
        row_of_slot: gpu.output(slots)?,
        slot_of_row: gpu.output(slots)?,
    };
    if slots == 0 {
        return Ok(dispatch);
    }
    let chunks = slots.div_ceil(CHUNK);
    // Written in full by the count and scan kernels respectively.
    let mut chunk_counts = gpu.output::<i32>(chunks * n_experts)?;
    let mut chunk_base = gpu.output::<i32>(chunks * n_experts)?;
    let (slots_i, experts_i, chunk_i, chunks_i) =
        (int(slots), int(n_experts), int(CHUNK), int(chunks));
    let expert_ints = (n_experts * 4) as u32;

    let counts = gpu.function(&PERMUTE, "moe_chunk_counts")?;
    let mut launch = gpu.stream().launch_builder(&counts);
    launch
        .arg(&mut chunk_counts)
        .arg(experts)
        .arg(&slots_i)
        .arg(&experts_i)
        .arg(&chunk_i);
    unsafe { launch.launch(grid(chunks, 256, expert_ints)) }?;

    let scan_threads = n_experts.next_multiple_of(32) as u32;
    let scan = gpu.function(&PERMUTE, "moe_scan_offsets")?;
    let mut launch = gpu.stream().launch_builder(&scan);
    launch
        .arg(&mut dispatch.offsets)
        .arg(&mut chunk_base)
        .arg(&chunk_counts)
        .arg(&chunks_i)
        .arg(&experts_i);
    unsafe { launch.launch(grid(1, scan_threads, scan_threads * 4)) }?;

    let scatter = gpu.function(&PERMUTE, "moe_scatter_slots")?;
    let mut launch = gpu.stream().launch_builder(&scatter);
    launch
        .arg(&mut dispatch.row_of_slot)
        .arg(&mut dispatch.slot_of_row)
        .arg(experts)
        .arg(&chunk_base)
        .arg(&slots_i)
        .arg(&experts_i)
        .arg(&chunk_i);
    unsafe { launch.launch(grid(chunks, 32, expert_ints)) }?;
    Ok(dispatch)
}

/// `xp[row] = x[token of row]`: token rows `[tokens, hidden]` into the
/// expert-major layout `[tokens * top_k, hidden]`. Any element type whose
/// rows are whole 16-byte vectors (the kernel moves `uint4`s).
pub fn permute<T: DeviceRepr>(
    gpu: &Gpu,
    xp: &mut CudaSlice<T>,
    x: &CudaSlice<T>,
    dispatch: &DeviceDispatch,
    hidden: usize,
) -> Result<()> {
    let row_bytes = hidden * std::mem::size_of::<T>();
    assert!(
        row_bytes.is_multiple_of(16),
        "permuted rows must be whole 16-byte vectors"
    );
    assert!(
        x.len() == dispatch.tokens() * hidden && xp.len() == dispatch.rows() * hidden,
        "permute shapes"
    );
    if dispatch.rows() == 0 {
        return Ok(());
    }
    let f = gpu.function(&PERMUTE, "moe_permute_rows")?;
    let (rows_i, vectors_i, k_i) = (
        int(dispatch.rows()),
        int(row_bytes / 16),
        int(dispatch.top_k),
    );
    let mut launch = gpu.stream().launch_builder(&f);
    launch
        .arg(xp)
        .arg(x)
        .arg(&dispatch.slot_of_row)
        .arg(&rows_i)
        .arg(&vectors_i)
        .arg(&k_i);
    unsafe { launch.launch(grid(dispatch.rows(), 128, 0)) }?;
    Ok(())
}

/// The permute's backward: adds each row's gradient back into its token's.
pub fn permute_backward(
    gpu: &Gpu,
    dx: &mut CudaSlice<f32>,
    dxp: &CudaSlice<f32>,
    dispatch: &DeviceDispatch,
    hidden: usize,
) -> Result<()> {
    let tokens = dispatch.tokens();
    assert!(
        dx.len() == tokens * hidden && dxp.len() == dispatch.rows() * hidden,
        "permute gradient shapes"
    );
    if tokens == 0 {
        return Ok(());
    }
    let f = gpu.function(&PERMUTE, "moe_permute_backward_f32")?;
    let (tokens_i, hidden_i, k_i) = (int(tokens), int(hidden), int(dispatch.top_k));
    let mut launch = gpu.stream().launch_builder(&f);
    launch
        .arg(dx)
        .arg(dxp)
        .arg(&dispatch.row_of_slot)
        .arg(&tokens_i)
        .arg(&hidden_i)
        .arg(&k_i);
    unsafe { launch.launch(grid(tokens, 256, 0)) }?;
    Ok(())
}

/// `out[t] = sum_j gates[t, j] y[row of (t, j)]`: expert outputs back to tokens.
pub fn unpermute(
    gpu: &Gpu,
    out: &mut CudaSlice<f32>,
    y: &CudaSlice<f32>,
    gates: &CudaSlice<f32>,
    dispatch: &DeviceDispatch,
    hidden: usize,
) -> Result<()> {
    let tokens = dispatch.tokens();
    assert!(
        out.len() == tokens * hidden
            && y.len() == dispatch.rows() * hidden
            && gates.len() == dispatch.rows(),
        "unpermute shapes"
    );
    if tokens == 0 {
        return Ok(());
    }
    let f = gpu.function(&PERMUTE, "moe_unpermute_f32")?;
    let (tokens_i, hidden_i, k_i) = (int(tokens), int(hidden), int(dispatch.top_k));
    let mut launch = gpu.stream().launch_builder(&f);
    launch
        .arg(out)
        .arg(y)
        .arg(gates)
        .arg(&dispatch.row_of_slot)
        .arg(&tokens_i)
        .arg(&hidden_i)
        .arg(&k_i);
    unsafe { launch.launch(grid(tokens, 256, 0)) }?;
    Ok(())
}

/// [`unpermute`] on bf16 rows with f32 accumulation (`hidden` a multiple of 8).
pub fn unpermute_bf16(
    gpu: &Gpu,
    out: &mut CudaSlice<bf16>,
    y: &CudaSlice<bf16>,
    gates: &CudaSlice<f32>,
    dispatch: &DeviceDispatch,
    hidden: usize,
) -> Result<()> {
    let tokens = dispatch.tokens();
    assert!(
        hidden.is_multiple_of(8),
        "bf16 rows are moved 8 values at a time"
    );
    assert!(
        out.len() == tokens * hidden
            && y.len() == dispatch.rows() * hidden
            && gates.len() == dispatch.rows(),
        "unpermute shapes"
    );
    if tokens == 0 {
        return Ok(());
    }
    let f = gpu.function(&PERMUTE, "moe_unpermute_bf16")?;
    let (tokens_i, vectors_i, k_i) = (int(tokens), int(hidden / 8), int(dispatch.top_k));
    let mut launch = gpu.stream().launch_builder(&f);
    launch
        .arg(out)
        .arg(y)
        .arg(gates)
        .arg(&dispatch.row_of_slot)
        .arg(&tokens_i)
        .arg(&vectors_i)
        .arg(&k_i);
    unsafe { launch.launch(grid(tokens, 128, 0)) }?;
    Ok(())
}

/// The unpermute's backward: adds `gate * dout[t]` into each row's `dy` and
/// `dot(dout[t], y[row])` into each slot's `dgates`; with `accumulate`
/// false it writes them instead (each row and slot is one slot's, so the
/// outputs need no zeroing first).
#[allow(clippy::too_many_arguments)]
pub fn unpermute_backward(
    gpu: &Gpu,
    dy: &mut CudaSlice<f32>,
    dgates: &mut CudaSlice<f32>,
    dout: &CudaSlice<f32>,
    y: &CudaSlice<f32>,
    gates: &CudaSlice<f32>,
    dispatch: &DeviceDispatch,
    hidden: usize,
    accumulate: bool,
) -> Result<()> {
    let tokens = dispatch.tokens();
    assert!(
        dout.len() == tokens * hidden
            && y.len() == dispatch.rows() * hidden
            && dy.len() == y.len()
            && gates.len() == dispatch.rows()
            && dgates.len() == gates.len(),
        "unpermute gradient shapes"
    );
    if tokens == 0 {
        return Ok(());
    }
    let f = gpu.function(&PERMUTE, "moe_unpermute_backward_f32")?;
    let (tokens_i, hidden_i, k_i) = (int(tokens), int(hidden), int(dispatch.top_k));
    let accumulate = i32::from(accumulate);
    let mut launch = gpu.stream().launch_builder(&f);
    launch
        .arg(dy)
        .arg(dgates)
        .arg(dout)
        .arg(y)
        .arg(gates)
        .arg(&dispatch.row_of_slot)
        .arg(&tokens_i)
        .arg(&hidden_i)
        .arg(&k_i)
        .arg(&accumulate);
    unsafe { launch.launch(grid(tokens, 256, 0)) }?;
    Ok(())
}
