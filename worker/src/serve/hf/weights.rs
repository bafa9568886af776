//! The tensors of a Hugging Face model directory: `model.safetensors`, or the
//! shards `model.safetensors.index.json` maps every tensor to, read into
//! f32 (from F32, F16 or BF16).

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::serve::hf::HfError;

/// Every tensor of the model, by its Hugging Face name.
#[derive(Debug, Default)]
pub struct TensorStore {
    tensors: HashMap<String, Tensor>,
}

#[derive(Debug)]
struct Tensor {
    shape: Vec<usize>,
    values: Vec<f32>,
}

/// `model.safetensors.index.json`: which shard holds each tensor.
#[derive(Deserialize)]
struct Index {
    weight_map: HashMap<String, String>,
}

impl TensorStore {
    /// Reads the weights in `dir`: the shards an index names, else
    /// `model.safetensors`, else every `*.safetensors` file.
    pub fn read(dir: &Path) -> Result<Self, HfError> {
        let mut store = Self::default();
        for file in weight_files(dir)? {
            store.read_file(&file)?;
        }
        Ok(store)
    }

    fn read_file(&mut self, path: &Path) -> Result<(), HfError> {
        let bytes = fs::read(path).map_err(|error| HfError::io(path, error))?;
        let file = SafeTensors::deserialize(&bytes).map_err(|e| HfError::Invalid {
            path: path.to_path_buf(),
            problem: format!("not a safetensors file: {e}"),
        })?;
        for (name, view) in file.iter() {
            let values = to_f32(view.dtype(), view.data()).ok_or_else(|| HfError::Invalid {
                path: path.to_path_buf(),
                problem: format!(
                    "tensor {name} is {:?}; this worker reads F32, F16 and BF16 weights",
                    view.dtype()
                ),
            })?;
            let tensor = Tensor {
                shape: view.shape().to_vec(),
                values,
            };
            self.tensors.insert(name.to_owned(), tensor);
        }
        Ok(())
    }

    /// Fails naming every one of `names` that is missing (at most 10, then a count).
    pub fn require(&self, dir: &Path, names: &[String]) -> Result<(), HfError> {
        let missing: Vec<&str> = names
            .iter()
            .filter(|n| !self.tensors.contains_key(n.as_str()))
            .map(String::as_str)
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let mut list = missing
            .iter()
            .take(10)
            .copied()
            .collect::<Vec<_>>()
            .join(", ");
        if missing.len() > 10 {
            list.push_str(&format!(" and {} more", missing.len() - 10));
        }
        Err(HfError::MissingTensors {
            dir: dir.to_path_buf(),
            names: list,
        })
    }

    /// Removes tensor `name`, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, HfError> {
        let tensor = self
            .tensors
            .remove(name)
            .ok_or_else(|| HfError::MissingTensors {
                dir: PathBuf::from("the weight files"),
                names: name.to_owned(),
            })?;
        if tensor.shape != shape {
            return Err(HfError::Shape {
                name: name.to_owned(),
                expected: shape.to_vec(),
                found: tensor.shape,
            });
        }
        Ok(tensor.values)
    }

    /// Names not taken yet, sorted.
    pub fn left(&self) -> BTreeSet<&str> {
        self.tensors.keys().map(String::as_str).collect()
    }
}

/// The safetensors files to read in `dir`, in a fixed order.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, HfError> {
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.is_file() {
        let bytes = fs::read(&index_path).map_err(|error| HfError::io(&index_path, error))?;
        let index: Index = serde_json::from_slice(&bytes).map_err(|e| HfError::Invalid {
            path: index_path.clone(),
            problem: format!("not a safetensors index (a weight_map of tensor to file): {e}"),
        })?;
        let files: BTreeSet<&String> = index.weight_map.values().collect();
        return files
            .into_iter()
            .map(|f| {
                let path = dir.join(f);
                if path.is_file() {
                    Ok(path)
                } else {
                    Err(HfError::Invalid {
                        path: index_path.clone(),
                        problem: format!("names shard {f}, which is missing"),
                    })
                }
            })
            .collect();
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|error| HfError::io(dir, error))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(HfError::Invalid {
            path: dir.to_path_buf(),
            problem: "holds no model.safetensors, model.safetensors.index.json or *.safetensors"
                .into(),
        });
    }
    Ok(files)
}

/// Little-endian `data` of `dtype` as f32 (exact for all three types).
fn to_f32(dtype: Dtype, data: &[u8]) -> Option<Vec<f32>> {
    let values = match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    };
    Some(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_widens_exactly() {
        let bf16 = half::bf16::from_f32(-1.5).to_le_bytes();
        let f16 = half::f16::from_f32(0.099975586).to_le_bytes();
        assert_eq!(to_f32(Dtype::BF16, &bf16), Some(vec![-1.5]));
        assert_eq!(to_f32(Dtype::F16, &f16), Some(vec![0.099975586]));
        assert_eq!(to_f32(Dtype::F32, &2.5f32.to_le_bytes()), Some(vec![2.5]));
        assert_eq!(to_f32(Dtype::I8, &[1]), None);
    }
}
