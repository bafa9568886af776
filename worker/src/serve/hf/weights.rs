//! The tensors of a Hugging Face model directory: `model.safetensors`, or the
//! shards `model.safetensors.index.json` maps every tensor to, read into
//! f32 (from F32, F16 or BF16).
//!
//! Each file's header is read first, then only the tensors wanted, each
//! from its own byte range: an expert-parallel rank never reads the other
//! ranks' experts (nor a shard holding only those).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

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

/// One tensor's entry in a safetensors header.
#[derive(Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// Longer headers are refused (the safetensors crate's limit).
const MAX_HEADER: u64 = 100_000_000;

impl TensorStore {
    /// Reads the weights in `dir`: the shards an index names, else
    /// `model.safetensors`, else every `*.safetensors` file.
    pub fn read(dir: &Path) -> Result<Self, HfError> {
        Self::read_except(dir, &HashSet::new())
    }

    /// [`Self::read`] without the tensors named in `skip`, whose bytes are
    /// never read (with an index, files holding only those are not opened).
    pub fn read_except(dir: &Path, skip: &HashSet<String>) -> Result<Self, HfError> {
        let mut store = Self::default();
        for file in weight_files(dir, skip)? {
            store.read_file(&file, skip)?;
        }
        Ok(store)
    }

    fn read_file(&mut self, path: &Path, skip: &HashSet<String>) -> Result<(), HfError> {
        let invalid = |problem: String| HfError::Invalid {
            path: path.to_path_buf(),
            problem,
        };
        let io = |error| HfError::io(path, error);
        let mut file = File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut word = [0u8; 8];
        file.read_exact(&mut word)
            .map_err(|e| invalid(format!("not a safetensors file: {e}")))?;
        let header_len = u64::from_le_bytes(word);
        if header_len > MAX_HEADER || 8 + header_len > file_len {
            return Err(invalid(format!(
                "not a safetensors file: a header of {header_len} bytes in a file of {file_len}"
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(io)?;
        let mut entries: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| invalid(format!("not a safetensors file: the header: {e}")))?;
        entries.remove("__metadata__");
        let data_start = 8 + header_len;
        let mut wanted: Vec<(String, Entry)> = Vec::new();
        for (name, entry) in entries {
            if skip.contains(&name) {
                continue;
            }
            let entry: Entry = serde_json::from_value(entry)
                .map_err(|e| invalid(format!("not a safetensors file: tensor {name}: {e}")))?;
            wanted.push((name, entry));
        }
        // In file order: one forward pass over the bytes read.
        wanted.sort_by_key(|(_, e)| e.data_offsets[0]);
        let mut bytes = Vec::new();
        for (name, entry) in wanted {
            let Some(width) = dtype_width(&entry.dtype) else {
                return Err(invalid(format!(
                    "tensor {name} is {}; this worker reads F32, F16 and BF16 weights",
                    entry.dtype
                )));
            };
            let [start, end] = entry.data_offsets;
            let elements: usize = entry.shape.iter().product();
            let fits = start <= end
                && data_start.checked_add(end).is_some_and(|e| e <= file_len)
                && (end - start) == (elements * width) as u64;
            if !fits {
                return Err(invalid(format!(
                    "not a safetensors file: tensor {name} of shape {:?} ({}) at bytes {start}..{end} of a data section of {}",
                    entry.shape,
                    entry.dtype,
                    file_len - data_start
                )));
            }
            bytes.resize((end - start) as usize, 0);
            file.seek(SeekFrom::Start(data_start + start))
                .and_then(|_| file.read_exact(&mut bytes))
                .map_err(io)?;
            let values = to_f32(&entry.dtype, &bytes).expect("a dtype with a width");
            let tensor = Tensor {
                shape: entry.shape,
                values,
            };
            self.tensors.insert(name, tensor);
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

/// The safetensors files to read in `dir`, in a fixed order (with an index,
/// not those holding only tensors of `skip`).
fn weight_files(dir: &Path, skip: &HashSet<String>) -> Result<Vec<PathBuf>, HfError> {
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.is_file() {
        let bytes = fs::read(&index_path).map_err(|error| HfError::io(&index_path, error))?;
        let index: Index = serde_json::from_slice(&bytes).map_err(|e| HfError::Invalid {
            path: index_path.clone(),
            problem: format!("not a safetensors index (a weight_map of tensor to file): {e}"),
        })?;
        let files: BTreeSet<&String> = index
            .weight_map
            .iter()
            .filter(|(tensor, _)| !skip.contains(*tensor))
            .map(|(_, file)| file)
            .collect();
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

/// Bytes per value of the dtypes read.
fn dtype_width(dtype: &str) -> Option<usize> {
    match dtype {
        "F32" => Some(4),
        "F16" | "BF16" => Some(2),
        _ => None,
    }
}

/// Little-endian `data` of `dtype` as f32 (exact for all three types).
fn to_f32(dtype: &str, data: &[u8]) -> Option<Vec<f32>> {
    let values = match dtype {
        "F32" => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        "F16" => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        "BF16" => data
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
        assert_eq!(to_f32("BF16", &bf16), Some(vec![-1.5]));
        assert_eq!(to_f32("F16", &f16), Some(vec![0.099975586]));
        assert_eq!(to_f32("F32", &2.5f32.to_le_bytes()), Some(vec![2.5]));
        assert_eq!(to_f32("I8", &[1]), None);
        assert_eq!(dtype_width("I8"), None);
    }
}
