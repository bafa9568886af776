//! Reading one golden safetensors file: float64 tensors, int64 indices and
//! the JSON config in its metadata.

use std::path::PathBuf;

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

pub struct Fixture {
    name: &'static str,
    bytes: Vec<u8>,
}

impl Fixture {
    /// Loads `tests/golden/<name>`; a missing fixture fails the test (it is
    /// committed; regenerate it with `generate.py`), never skips it.
    pub fn load(name: &'static str) -> Self {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "golden fixture {} is missing or unreadable ({e}); regenerate it with worker/tests/golden/generate.py",
                path.display()
            )
        });
        let fixture = Self { name, bytes };
        fixture.tensors();
        fixture
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes)
            .unwrap_or_else(|e| panic!("{}: not a safetensors file: {e}", self.name))
    }

    /// The model config the generator wrote into the metadata.
    pub fn config(&self) -> Value {
        let (_, metadata) = SafeTensors::read_metadata(&self.bytes).expect("valid header");
        let json = metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get("config"))
            .unwrap_or_else(|| panic!("{}: no config in the metadata", self.name));
        serde_json::from_str(json).expect("the config is JSON")
    }

    /// A float64 tensor, flattened row-major.
    pub fn f64(&self, name: &str) -> Vec<f64> {
        let tensor = self.tensors().tensor(name).unwrap_or_else(|e| {
            panic!("{}: no tensor {name}: {e}", self.name);
        });
        assert_eq!(tensor.dtype(), Dtype::F64, "{}: {name} dtype", self.name);
        tensor
            .data()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    /// An int64 tensor of indices (token ids, expert choices), flattened.
    pub fn indices(&self, name: &str) -> Vec<usize> {
        let tensor = self.tensors().tensor(name).unwrap_or_else(|e| {
            panic!("{}: no tensor {name}: {e}", self.name);
        });
        assert_eq!(tensor.dtype(), Dtype::I64, "{}: {name} dtype", self.name);
        tensor
            .data()
            .chunks_exact(8)
            .map(|b| usize::try_from(i64::from_le_bytes(b.try_into().unwrap())).unwrap())
            .collect()
    }

    /// Names of the tensors starting with `prefix`.
    pub fn names_with_prefix(&self, prefix: &str) -> Vec<String> {
        self.tensors()
            .names()
            .into_iter()
            .filter(|n| n.starts_with(prefix))
            .map(str::to_owned)
            .collect()
    }
}
