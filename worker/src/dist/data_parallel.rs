//! What data-parallel replicas must agree on after every step, or they
//! drift apart: the mean gradient (bucketed), the summed expert loads (the
//! selection-bias update reads them), the mean loss for reporting, and
//! (tensorwise FP8) the amax of each tensor ([`Collective::all_reduce_max`]).
//! Each result is bit-identical on every replica, so identical updates keep
//! identical weights.
//!
//! With expert parallelism, dense and expert parameters are reduced over
//! different groups: call these once per group with that group's tensors.

use super::collective::Collective;
use super::error::DistError;

/// Gradients are packed into buckets of this many floats (16 MiB): one
/// collective per bucket instead of one per tensor (a model has hundreds of
/// small norm and bias tensors; each collective costs a few network round
/// trips), while big tensors are reduced in place without a copy.
pub const BUCKET_FLOATS: usize = 4 << 20;

/// Replaces each tensor by its mean over the ranks of `group`. Every rank
/// must pass tensors of the same lengths in the same order.
pub fn all_reduce_mean(
    group: &mut dyn Collective,
    tensors: &mut [&mut Vec<f32>],
    bucket_floats: usize,
) -> Result<(), DistError> {
    let size = group.size();
    if size == 1 {
        return Ok(());
    }
    all_reduce_scaled(group, tensors, bucket_floats, size)
}

/// Replaces each tensor by its sum over the ranks of `group` divided by
/// `divisor` (expert parallelism divides expert gradients by the world
/// size, not by their group's). Bucketed as [`all_reduce_mean`].
pub fn all_reduce_scaled<V: AsMut<[f32]>>(
    group: &mut dyn Collective,
    tensors: &mut [V],
    bucket_floats: usize,
    divisor: usize,
) -> Result<(), DistError> {
    let mut bucket: Vec<f32> = Vec::new();
    // Indices of the tensors packed into `bucket`, in order.
    let mut packed: Vec<usize> = Vec::new();
    for i in 0..tensors.len() {
        let n = tensors[i].as_mut().len();
        if n >= bucket_floats {
            group.all_reduce_sum(tensors[i].as_mut())?;
            divide(tensors[i].as_mut(), divisor);
            continue;
        }
        if bucket.len() + n > bucket_floats {
            flush(group, tensors, &mut bucket, &mut packed, divisor)?;
        }
        bucket.extend_from_slice(tensors[i].as_mut());
        packed.push(i);
    }
    flush(group, tensors, &mut bucket, &mut packed, divisor)
}

fn divide(values: &mut [f32], size: usize) {
    if size == 1 {
        return;
    }
    for v in values {
        *v /= size as f32;
    }
}

/// Reduces the packed tensors in one collective and unpacks their scaled sums.
fn flush<V: AsMut<[f32]>>(
    group: &mut dyn Collective,
    tensors: &mut [V],
    bucket: &mut Vec<f32>,
    packed: &mut Vec<usize>,
    divisor: usize,
) -> Result<(), DistError> {
    if packed.is_empty() {
        return Ok(());
    }
    group.all_reduce_sum(bucket)?;
    divide(bucket, divisor);
    let mut at = 0;
    for &i in packed.iter() {
        let tensor = tensors[i].as_mut();
        let n = tensor.len();
        tensor.copy_from_slice(&bucket[at..at + n]);
        at += n;
    }
    bucket.clear();
    packed.clear();
    Ok(())
}

/// Sums per-expert token counts (one list per MoE layer) over `group`,
/// exactly: counts travel as integers and are added in rank order.
pub fn sum_counts(group: &mut dyn Collective, counts: &mut [Vec<usize>]) -> Result<(), DistError> {
    let size = group.size();
    if size == 1 {
        return Ok(());
    }
    let mine: Vec<u8> = counts
        .iter()
        .flatten()
        .flat_map(|&c| (c as u64).to_le_bytes())
        .collect();
    let mut all = vec![0u8; mine.len() * size];
    group.all_gather_bytes(&mine, &vec![mine.len(); size], &mut all)?;
    for slot in counts.iter_mut().flatten() {
        *slot = 0;
    }
    for rank_bytes in all.chunks_exact(mine.len().max(1)) {
        let values = rank_bytes.chunks_exact(8).map(|b| {
            let mut word = [0u8; 8];
            word.copy_from_slice(b);
            u64::from_le_bytes(word) as usize
        });
        for (slot, v) in counts.iter_mut().flatten().zip(values) {
            *slot += v;
        }
    }
    Ok(())
}

/// The mean of one `f64` per rank (the step's loss), summed in rank order.
pub fn mean(group: &mut dyn Collective, value: f64) -> Result<f64, DistError> {
    Ok(sum(group, value)? / group.size() as f64)
}

/// The sum of one `f64` per rank, in rank order: bit-identical on every rank.
pub fn sum(group: &mut dyn Collective, value: f64) -> Result<f64, DistError> {
    let size = group.size();
    let mut all = vec![0u8; 8 * size];
    group.all_gather_bytes(&value.to_le_bytes(), &vec![8; size], &mut all)?;
    Ok(all
        .chunks_exact(8)
        .map(|b| {
            let mut word = [0u8; 8];
            word.copy_from_slice(b);
            f64::from_le_bytes(word)
        })
        .sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A two-rank group whose other rank holds the same values: records
    /// the length of every all-reduce and doubles the values.
    struct Recorder(Vec<usize>);

    fn unused<T>() -> Result<T, DistError> {
        Err(DistError::invalid("recorder", "not used by these tests"))
    }

    impl Collective for Recorder {
        fn rank(&self) -> usize {
            0
        }
        fn size(&self) -> usize {
            2
        }
        fn all_reduce_sum(&mut self, data: &mut [f32]) -> Result<(), DistError> {
            self.0.push(data.len());
            data.iter_mut().for_each(|v| *v *= 2.0);
            Ok(())
        }
        fn all_reduce_max(&mut self, _: &mut [f32]) -> Result<(), DistError> {
            unused()
        }
        fn reduce_scatter_sum(
            &mut self,
            _: &[f32],
            _: &[usize],
            _: &mut [f32],
        ) -> Result<(), DistError> {
            unused()
        }
        fn all_gather_bytes(
            &mut self,
            _: &[u8],
            _: &[usize],
            _: &mut [u8],
        ) -> Result<(), DistError> {
            unused()
        }
        fn all_to_all_bytes(
            &mut self,
            _: &[u8],
            _: &[usize],
            _: &mut [u8],
            _: &[usize],
        ) -> Result<(), DistError> {
            unused()
        }
        fn broadcast_bytes(&mut self, _: &mut [u8], _: usize) -> Result<(), DistError> {
            unused()
        }
        fn barrier(&mut self) -> Result<(), DistError> {
            unused()
        }
        fn set_timeout(&mut self, _: std::time::Duration) -> Result<(), DistError> {
            unused()
        }
        fn new_group(&self, _: &[usize]) -> Result<Box<dyn Collective>, DistError> {
            unused()
        }
    }

    #[test]
    fn small_tensors_share_buckets_up_to_the_limit_and_big_ones_go_alone() {
        let sizes = [3, 2000, 0, 7, 995, 1, 1000, 600, 400];
        let mut tensors: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![1.5; n]).collect();
        let mut refs: Vec<&mut Vec<f32>> = tensors.iter_mut().collect();
        let mut group = Recorder(Vec::new());
        all_reduce_mean(&mut group, &mut refs, 1000).unwrap();
        // 2000 alone when reached; [3,0,7] flushed (10) when 995 would
        // overflow it; 1000 alone when reached, before the open bucket
        // 995+1 is flushed (996) by 600; 600 + 400 fill one bucket exactly.
        assert_eq!(group.0, vec![2000, 10, 1000, 996, 1000]);
        assert!(
            tensors.iter().flatten().all(|&v| v == 1.5),
            "mean of equal values"
        );
    }
}
