//! A world of one rank: every collective is a local copy or nothing. Lets
//! training code always hold a [`Collective`], distributed or not, without
//! opening sockets for a single process.

use super::collective::Collective;
use super::error::DistError;

#[derive(Clone, Copy, Debug, Default)]
pub struct Solo;

fn only_rank(op: &'static str, counts: &[usize], len: usize) -> Result<(), DistError> {
    if counts != [len] {
        return Err(DistError::invalid(
            op,
            format!("counts {counts:?} for a world of one holding {len}"),
        ));
    }
    Ok(())
}

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&mut self, _: &mut [f32]) -> Result<(), DistError> {
        Ok(())
    }

    fn all_reduce_max(&mut self, _: &mut [f32]) -> Result<(), DistError> {
        Ok(())
    }

    fn reduce_scatter_sum(
        &mut self,
        input: &[f32],
        counts: &[usize],
        output: &mut [f32],
    ) -> Result<(), DistError> {
        only_rank("reduce_scatter", counts, input.len())?;
        only_rank("reduce_scatter", counts, output.len())?;
        output.copy_from_slice(input);
        Ok(())
    }

    fn all_gather_bytes(
        &mut self,
        input: &[u8],
        counts: &[usize],
        output: &mut [u8],
    ) -> Result<(), DistError> {
        only_rank("all_gather", counts, input.len())?;
        only_rank("all_gather", counts, output.len())?;
        output.copy_from_slice(input);
        Ok(())
    }

    fn all_to_all_bytes(
        &mut self,
        send: &[u8],
        send_counts: &[usize],
        recv: &mut [u8],
        recv_counts: &[usize],
    ) -> Result<(), DistError> {
        only_rank("all_to_all", send_counts, send.len())?;
        only_rank("all_to_all", recv_counts, recv.len())?;
        recv.copy_from_slice(send);
        Ok(())
    }

    fn broadcast_bytes(&mut self, _: &mut [u8], root: usize) -> Result<(), DistError> {
        if root != 0 {
            return Err(DistError::invalid(
                "broadcast",
                format!("root {root} in a world of one"),
            ));
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), DistError> {
        Ok(())
    }

    fn set_timeout(&mut self, _: std::time::Duration) -> Result<(), DistError> {
        Ok(())
    }

    fn new_group(&self, ranks: &[usize]) -> Result<Box<dyn Collective>, DistError> {
        if ranks != [0] {
            return Err(DistError::invalid(
                "new_group",
                format!("{ranks:?} in a world of one"),
            ));
        }
        Ok(Box::new(Solo))
    }
}
