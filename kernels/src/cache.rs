//! Per-device module cache: each family is compiled by NVRTC for the
//! device's architecture the first time one of its kernels is asked for,
//! then loaded once and reused for the life of the context.

use crate::compile::{CompileFailure, arch_for, compile, compile_all};
use crate::registry::Family;
use crate::toolkit::{self, CudaHome};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, DriverError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "NVRTC (libnvrtc.so.{major}) was not found: run kernels/setup-cuda.sh, or point \
         MOE_CUDA_HOME at a CUDA {major} toolkit"
    )]
    NvrtcMissing { major: u32 },
    #[error(
        "the CUDA headers (cuda_bf16.h, cuda_fp8.h) were not found in any of {searched}: run \
         kernels/setup-cuda.sh, or point MOE_CUDA_HOME at a CUDA toolkit"
    )]
    HeadersMissing { searched: String },
    #[error(transparent)]
    Compile(#[from] CompileFailure),
    #[error("CUDA driver: {0}")]
    Driver(#[from] DriverError),
    #[error("{family}.cu has no kernel named {entry}")]
    UnknownEntry { family: &'static str, entry: String },
}

/// The compiled families of one device.
pub struct ModuleCache {
    context: Arc<CudaContext>,
    arch: &'static str,
    home: CudaHome,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
}

impl ModuleCache {
    /// Finds NVRTC and the headers, and reads the device's architecture.
    pub fn new(context: Arc<CudaContext>) -> Result<Self, KernelError> {
        if !toolkit::nvrtc_available() {
            return Err(KernelError::NvrtcMissing {
                major: toolkit::CUDA_MAJOR,
            });
        }
        let home = toolkit::find_home().ok_or_else(|| KernelError::HeadersMissing {
            searched: toolkit::candidate_homes()
                .iter()
                .map(|h| h.root.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
        let (major, minor) = context.compute_capability()?;
        Ok(Self {
            arch: arch_for(major, minor)?,
            context,
            home,
            modules: Mutex::new(HashMap::new()),
        })
    }

    pub fn arch(&self) -> &'static str {
        self.arch
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.context
    }

    /// A kernel of `family`, compiling and loading the family on first use.
    pub fn function(&self, family: &Family, entry: &str) -> Result<CudaFunction, KernelError> {
        if !family.entry_points.contains(&entry) {
            return Err(KernelError::UnknownEntry {
                family: family.id,
                entry: entry.to_string(),
            });
        }
        let module = self.module(family)?;
        Ok(module.load_function(entry)?)
    }

    /// Compiles and loads every family now (so the first step is not the
    /// slow one), the families not loaded yet compiled side by side.
    pub fn warm_up(&self, families: &[Family]) -> Result<(), KernelError> {
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        let missing: Vec<&Family> = families
            .iter()
            .filter(|family| !modules.contains_key(family.id))
            .collect();
        for (family, ptx) in missing
            .iter()
            .zip(compile_all(&missing, self.arch, &self.home))
        {
            let module = self.context.load_module(ptx?)?;
            modules.insert(family.id, module);
        }
        Ok(())
    }

    fn module(&self, family: &Family) -> Result<Arc<CudaModule>, KernelError> {
        // Compiling under the lock keeps two threads from compiling the same
        // family twice; it happens once per family per process.
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(module) = modules.get(family.id) {
            return Ok(module.clone());
        }
        let ptx = compile(family, self.arch, &self.home)?;
        let module = self.context.load_module(ptx)?;
        modules.insert(family.id, module.clone());
        Ok(module)
    }
}
