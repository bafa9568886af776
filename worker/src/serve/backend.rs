//! The engine the scheduler thread drives, with the KV cache it steps
//! over: the CPU [`Engine`] and its [`KvStore`], or (feature `cuda`) the
//! GPU's `DeviceEngine` and its device page pool. Both take the same
//! chunks, indexed by the same page ids, and return the same logits rows,
//! so the scheduler, the page allocator and sampling do not know which runs.

use crate::serve::engine::{Chunk, Engine, StepError};
use crate::serve::kv_cache::KvStore;
use crate::serve::model::ServeConfig;
use crate::serve::rebalance::LayerRebalance;

pub enum Backend {
    Cpu {
        engine: Box<Engine>,
        store: KvStore,
    },
    #[cfg(feature = "cuda")]
    Cuda {
        engine: Box<crate::cuda::serve::DeviceEngine<'static>>,
        cache: crate::cuda::serve::DeviceKvCache,
    },
}

impl Backend {
    /// The CPU engine with a cache of `pages` pages of `page_size` positions.
    pub fn cpu(engine: Engine, page_size: usize, pages: usize) -> Self {
        let store = KvStore::new(engine.kv_shape(page_size), pages);
        Self::Cpu {
            engine: Box::new(engine),
            store,
        }
    }

    /// The GPU engine with a device cache of `pages` pages.
    #[cfg(feature = "cuda")]
    pub fn cuda(
        engine: crate::cuda::serve::DeviceEngine<'static>,
        page_size: usize,
        pages: usize,
    ) -> crate::cuda::Result<Self> {
        let cache = engine.cache(page_size, pages)?;
        Ok(Self::Cuda {
            engine: Box::new(engine),
            cache,
        })
    }

    pub fn config(&self) -> &ServeConfig {
        match self {
            Self::Cpu { engine, .. } => engine.config(),
            #[cfg(feature = "cuda")]
            Self::Cuda { engine, .. } => engine.config(),
        }
    }

    pub fn context(&self) -> usize {
        self.config().context
    }

    /// Positions per KV page.
    pub fn page_size(&self) -> usize {
        match self {
            Self::Cpu { store, .. } => store.shape().page_size,
            #[cfg(feature = "cuda")]
            Self::Cuda { cache, .. } => cache.shape().page_size,
        }
    }

    /// [`Engine::step`] on whichever engine this is.
    pub fn step(&mut self, chunks: &[Chunk<'_>]) -> Result<Vec<f32>, StepError> {
        match self {
            Self::Cpu { engine, store } => engine.step(store, chunks),
            #[cfg(feature = "cuda")]
            Self::Cuda { engine, cache } => engine.step(cache, chunks),
        }
    }

    /// [`Engine::take_expert_rows`] of whichever engine this is.
    pub fn take_expert_rows(&self) -> Vec<(usize, usize, u64)> {
        match self {
            Self::Cpu { engine, .. } => engine.take_expert_rows(),
            #[cfg(feature = "cuda")]
            Self::Cuda { engine, .. } => engine.take_expert_rows(),
        }
    }

    /// [`Engine::rebalance_experts`]; the GPU engine holds no expert
    /// copies (refused with the options), so it has nothing to do.
    pub fn rebalance_experts(&mut self) -> Result<Vec<LayerRebalance>, StepError> {
        match self {
            Self::Cpu { engine, .. } => engine.rebalance_experts(),
            #[cfg(feature = "cuda")]
            Self::Cuda { .. } => Ok(Vec::new()),
        }
    }

    /// [`Engine::expert_parallel_bytes`] of whichever engine this is.
    pub fn expert_parallel_bytes(&self) -> (u64, u64) {
        match self {
            Self::Cpu { engine, .. } => engine.expert_parallel_bytes(),
            #[cfg(feature = "cuda")]
            Self::Cuda { engine, .. } => engine.expert_parallel_bytes(),
        }
    }
}
