//! The tensors of a Hugging Face model directory: `model.safetensors`, or the
//! shards `model.safetensors.index.json` maps every tensor to, read into
//! f32 (from F32, F16 or BF16, or block-scaled FP8: `F8_E4M3` weights
//! dequantized with their `weight_scale_inv`).
//!
//! Each file's header is read first, then only the tensors wanted, each
//! from its own byte range: an expert-parallel rank never reads the other
//! ranks' experts (nor their scales, nor a shard holding only those).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::fp8::e4m3;
use crate::serve::hf::{Fp8Blocks, HfError};

/// Every tensor of the model, by its Hugging Face name.
#[derive(Debug, Default)]
pub struct TensorStore {
    tensors: HashMap<String, Tensor>,
}

#[derive(Debug)]
struct Tensor {
    shape: Vec<usize>,
    values: Vec<f32>,
    /// Read from `F8_E4M3`: the values still lack their block scales.
    unscaled_fp8: bool,
}

/// The safetensors dtype of block-scaled FP8 weights.
const FP8_DTYPE: &str = "F8_E4M3";

/// How an FP8 weight's scale tensor is named: `….weight` → `….weight_scale_inv`.
const SCALE_SUFFIX: &str = "_scale_inv";

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
    /// `fp8`: the block size of an FP8 checkpoint's `quantization_config`.
    pub fn read(dir: &Path, fp8: Option<Fp8Blocks>) -> Result<Self, HfError> {
        Self::read_except(dir, &HashSet::new(), fp8)
    }

    /// [`Self::read`] without the tensors named in `skip` (nor their FP8
    /// scales), whose bytes are never read (with an index, files holding
    /// only those are not opened).
    pub fn read_except(
        dir: &Path,
        skip: &HashSet<String>,
        fp8: Option<Fp8Blocks>,
    ) -> Result<Self, HfError> {
        let mut store = Self::default();
        for file in weight_files(dir, skip)? {
            store.read_file(&file, skip)?;
        }
        // After every file: a scale may be in another shard than its weight.
        store.dequantize(dir, fp8)?;
        store.check_finite(dir)?;
        Ok(store)
    }

    /// The tensors of one safetensors file (a PEFT adapter's
    /// `adapter_model.safetensors`), checked as a model's are; FP8 is
    /// refused (no config says how it is scaled).
    pub fn read_single(path: &Path) -> Result<Self, HfError> {
        let mut store = Self::default();
        store.read_file(path, &HashSet::new())?;
        store.dequantize(path, None)?;
        store.check_finite(path)?;
        Ok(store)
    }

    /// Refuses a checkpoint with a NaN or infinite weight, naming the
    /// tensor: served, it would turn every logit into NaN with no error at
    /// all (an FP8 NaN code, a half-written file, a diverged run).
    fn check_finite(&self, dir: &Path) -> Result<(), HfError> {
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort();
        for name in names {
            let values = &self.tensors[name].values;
            let bad = values.iter().filter(|v| !v.is_finite()).count();
            if bad > 0 {
                return Err(HfError::Invalid {
                    path: dir.to_path_buf(),
                    problem: format!(
                        "tensor {name} holds {bad} non-finite value(s) (NaN or infinity) of {}; \
                         the checkpoint is corrupt",
                        values.len()
                    ),
                });
            }
        }
        Ok(())
    }

    /// Multiplies every FP8 weight by its block scales, consuming the scale
    /// tensors (so they are not left over as unused).
    fn dequantize(&mut self, dir: &Path, fp8: Option<Fp8Blocks>) -> Result<(), HfError> {
        let mut quantized: Vec<String> = self
            .tensors
            .iter()
            .filter(|(_, t)| t.unscaled_fp8)
            .map(|(name, _)| name.clone())
            .collect();
        // Sorted: the same tensor named first on every run.
        quantized.sort();
        let invalid = |problem: String| HfError::Invalid {
            path: dir.to_path_buf(),
            problem,
        };
        for name in quantized {
            let Some(blocks) = fp8 else {
                return Err(HfError::Invalid {
                    path: dir.join("config.json"),
                    problem: format!(
                        "tensor {name} is {FP8_DTYPE}, but there is no quantization_config \
                         (fp8 with a weight_block_size) to say how it is scaled"
                    ),
                });
            };
            let scale_name = scale_name(&name);
            let scale = self.tensors.remove(&scale_name).ok_or_else(|| {
                invalid(format!(
                    "tensor {name} is {FP8_DTYPE} without its scales {scale_name}"
                ))
            })?;
            // (Gone only if it was itself taken as another tensor's scales.)
            let Some(tensor) = self.tensors.get_mut(&name) else {
                continue;
            };
            let &[rows, cols] = tensor.shape.as_slice() else {
                return Err(invalid(format!(
                    "tensor {name} is {FP8_DTYPE} of shape {:?}; block scales apply to \
                     [out, in] matrices",
                    tensor.shape
                )));
            };
            if scale.unscaled_fp8 {
                return Err(invalid(format!(
                    "scales {scale_name} are {FP8_DTYPE}; this worker reads F32, F16 or BF16 scales"
                )));
            }
            let expected = vec![rows.div_ceil(blocks.rows), cols.div_ceil(blocks.cols)];
            if scale.shape != expected {
                return Err(HfError::Shape {
                    name: scale_name,
                    expected,
                    found: scale.shape,
                });
            }
            scale_blocks(&mut tensor.values, cols, &scale.values, blocks);
            tensor.unscaled_fp8 = false;
        }
        Ok(())
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
            if is_skipped(&name, skip) {
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
                    "tensor {name} is {}; this worker reads F32, F16, BF16 and (block-scaled) \
                     {FP8_DTYPE} weights",
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
                unscaled_fp8: entry.dtype == FP8_DTYPE,
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
            .filter(|(tensor, _)| !is_skipped(tensor, skip))
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

/// The scale tensor of FP8 weight `weight` (`transformers`' naming).
fn scale_name(weight: &str) -> String {
    format!("{weight}{SCALE_SUFFIX}")
}

/// Whether tensor `name` is not to be read: named in `skip`, or the scales
/// of a weight named there (an expert-parallel rank's other experts).
fn is_skipped(name: &str, skip: &HashSet<String>) -> bool {
    skip.contains(name)
        || name
            .strip_suffix(SCALE_SUFFIX)
            .is_some_and(|weight| skip.contains(weight))
}

/// Multiplies each value of the row-major `[rows, cols]` matrix `values` by
/// its block's scale, `scales[r / blocks.rows][c / blocks.cols]` (the last
/// blocks of each dimension may be partial), as `transformers` dequantizes
/// fine-grained FP8: the stored "inverse" scale is a multiplier.
fn scale_blocks(values: &mut [f32], cols: usize, scales: &[f32], blocks: Fp8Blocks) {
    if cols == 0 {
        return;
    }
    let scale_cols = cols.div_ceil(blocks.cols);
    for (r, row) in values.chunks_exact_mut(cols).enumerate() {
        let block_row = &scales[(r / blocks.rows) * scale_cols..][..scale_cols];
        for (block, &scale) in row.chunks_mut(blocks.cols).zip(block_row) {
            block.iter_mut().for_each(|v| *v *= scale);
        }
    }
}

/// Bytes per value of the dtypes read.
fn dtype_width(dtype: &str) -> Option<usize> {
    match dtype {
        "F32" => Some(4),
        "F16" | "BF16" => Some(2),
        FP8_DTYPE => Some(1),
        _ => None,
    }
}

/// Little-endian `data` of `dtype` as f32 (exact for all four types; FP8
/// still unscaled).
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
        FP8_DTYPE => data.iter().map(|&code| e4m3::decode(code)).collect(),
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

    const BLOCKS: Fp8Blocks = Fp8Blocks { rows: 2, cols: 3 };

    /// The dequantization written out element by element.
    fn naive_dequantize(codes: &[u8], cols: usize, scales: &[f32], blocks: Fp8Blocks) -> Vec<f32> {
        let scale_cols = cols.div_ceil(blocks.cols);
        codes
            .iter()
            .enumerate()
            .map(|(i, &code)| {
                let (r, c) = (i / cols, i % cols);
                e4m3::decode(code) * scales[(r / blocks.rows) * scale_cols + c / blocks.cols]
            })
            .collect()
    }

    /// A 5 × 7 matrix in 2 × 3 blocks: a partial last block row (1 row) and
    /// column (1 column); 35 varied codes, none NaN.
    fn fp8_matrix() -> (Vec<u8>, Vec<f32>) {
        let codes: Vec<u8> = (0..35u8)
            .map(|i| i.wrapping_mul(37).wrapping_add(11))
            .map(|c| if c & 0x7F == e4m3::NAN { c ^ 1 } else { c })
            .collect();
        let scales: Vec<f32> = (0..3 * 3).map(|i| 0.25 + i as f32 * 0.37).collect();
        (codes, scales)
    }

    #[test]
    fn block_scales_match_the_naive_dequantization_with_partial_edge_blocks() {
        let (codes, scales) = fp8_matrix();
        let mut values = to_f32(FP8_DTYPE, &codes).unwrap();
        scale_blocks(&mut values, 7, &scales, BLOCKS);
        assert_eq!(values, naive_dequantize(&codes, 7, &scales, BLOCKS));
        // The last row and column use the partial blocks' own scales.
        assert_eq!(values[34], e4m3::decode(codes[34]) * scales[8]);
        assert_eq!(values[6], e4m3::decode(codes[6]) * scales[2]);
    }

    /// A directory holding one safetensors file of `tensors` (name, dtype,
    /// shape, little-endian bytes).
    struct Checkpoint(PathBuf);

    impl Checkpoint {
        fn new(test: &str, tensors: &[(&str, &str, &[usize], Vec<u8>)]) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "moe-worker-hf-weights-{}-{test}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let mut header = serde_json::Map::new();
            let mut data = Vec::new();
            for (name, dtype, shape, bytes) in tensors {
                let start = data.len();
                data.extend_from_slice(bytes);
                header.insert(
                    (*name).into(),
                    serde_json::json!({"dtype": dtype, "shape": shape,
                        "data_offsets": [start, data.len()]}),
                );
            }
            let header = serde_json::to_vec(&header).unwrap();
            let mut file = (header.len() as u64).to_le_bytes().to_vec();
            file.extend(header);
            file.extend(data);
            std::fs::write(dir.join("model.safetensors"), file).unwrap();
            Self(dir)
        }
    }

    impl Drop for Checkpoint {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn bf16_bytes(values: &[f32]) -> Vec<u8> {
        values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect()
    }

    const WEIGHT: &str = "model.layers.0.mlp.experts.3.down_proj.weight";
    const SCALES: &str = "model.layers.0.mlp.experts.3.down_proj.weight_scale_inv";

    #[test]
    fn fp8_weights_are_read_dequantized_and_their_scales_consumed() {
        let (codes, scales) = fp8_matrix();
        // BF16 scales, as some checkpoints store them (these are exact in bf16).
        let scales: Vec<f32> = scales
            .iter()
            .map(|&s| half::bf16::from_f32(s).to_f32())
            .collect();
        let dir = Checkpoint::new(
            "dequantized",
            &[
                (WEIGHT, FP8_DTYPE, &[5, 7], codes.clone()),
                (SCALES, "BF16", &[3, 3], bf16_bytes(&scales)),
                ("model.norm.weight", "F32", &[2], f32_bytes(&[1.0, 2.0])),
            ],
        );
        let mut store = TensorStore::read(&dir.0, Some(BLOCKS)).unwrap();
        assert_eq!(
            store.left().into_iter().collect::<Vec<_>>(),
            [
                "model.layers.0.mlp.experts.3.down_proj.weight",
                "model.norm.weight"
            ]
        );
        assert_eq!(
            store.take(WEIGHT, &[5, 7]).unwrap(),
            naive_dequantize(&codes, 7, &scales, BLOCKS)
        );
        // A rank skipping the expert reads neither the weight nor its scales.
        let skip = HashSet::from([WEIGHT.to_owned()]);
        let store = TensorStore::read_except(&dir.0, &skip, Some(BLOCKS)).unwrap();
        assert_eq!(
            store.left().into_iter().collect::<Vec<_>>(),
            ["model.norm.weight"]
        );
    }

    fn read_error(test: &str, tensors: &[(&str, &str, &[usize], Vec<u8>)]) -> String {
        let dir = Checkpoint::new(test, tensors);
        TensorStore::read(&dir.0, Some(BLOCKS))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn non_finite_weights_are_refused_naming_the_tensor() {
        let error = read_error(
            "nan",
            &[
                ("model.norm.weight", "F32", &[2], f32_bytes(&[1.0, 2.0])),
                (WEIGHT, "BF16", &[1, 3], bf16_bytes(&[0.5, f32::NAN, 1.0])),
            ],
        );
        assert!(
            error.contains(WEIGHT) && error.contains("1 non-finite value(s)"),
            "{error}"
        );
        // An FP8 NaN code (0x7F) too, through its dequantization.
        let (mut codes, scales) = fp8_matrix();
        codes[3] = e4m3::NAN;
        let error = read_error(
            "fp8-nan",
            &[
                (WEIGHT, FP8_DTYPE, &[5, 7], codes),
                (SCALES, "F32", &[3, 3], f32_bytes(&scales)),
            ],
        );
        assert!(
            error.contains(WEIGHT) && error.contains("non-finite"),
            "{error}"
        );
        let error = read_error(
            "inf",
            &[(WEIGHT, "F32", &[1, 2], f32_bytes(&[f32::INFINITY, 0.0]))],
        );
        assert!(error.contains(WEIGHT), "{error}");
    }

    #[test]
    fn fp8_weights_without_usable_scales_are_named() {
        let (codes, scales) = fp8_matrix();
        let weight = (WEIGHT, FP8_DTYPE, &[5usize, 7][..], codes.clone());
        let error = read_error("missing", std::slice::from_ref(&weight));
        assert!(
            error.contains(WEIGHT) && error.contains(&format!("without its scales {SCALES}")),
            "{error}"
        );

        let error = read_error(
            "shape",
            &[
                weight.clone(),
                (SCALES, "F32", &[2, 3], f32_bytes(&scales[..6])),
            ],
        );
        assert!(
            error.contains(SCALES) && error.contains("[2, 3]") && error.contains("[3, 3]"),
            "{error}"
        );

        let error = read_error(
            "three-dimensional",
            &[
                (WEIGHT, FP8_DTYPE, &[1, 5, 7], codes.clone()),
                (SCALES, "F32", &[3, 3], f32_bytes(&scales)),
            ],
        );
        assert!(
            error.contains(WEIGHT) && error.contains("[1, 5, 7]"),
            "{error}"
        );

        // FP8 weights in a checkpoint whose config has no quantization_config.
        let dir = Checkpoint::new(
            "unconfigured",
            &[weight, (SCALES, "F32", &[3, 3], f32_bytes(&scales))],
        );
        let error = TensorStore::read(&dir.0, None).unwrap_err().to_string();
        assert!(
            error.contains(WEIGHT) && error.contains("no quantization_config"),
            "{error}"
        );
    }
}
