//! Pre-tokenized training data (`data.tokenizer: pretokenized`): files of
//! little-endian token ids, as the usual data-preparation scripts write
//! them — nanoGPT's headerless `train.bin` (uint16), and llm.c's shards,
//! whose 1 KiB header (256 little-endian int32) starts with the magic
//! 20240520, the version (1: uint16 ids, 2: uint32) and the token count.

/// llm.c's `.bin` header: 256 int32, of which the first three are used.
const HEADER_BYTES: usize = 256 * 4;
const MAGIC: i32 = 20240520;

/// Why a token file could not be read as token ids (the caller adds the path).
#[derive(Debug, PartialEq, Eq)]
pub enum TokenFileError {
    /// llm.c's magic, with a version that names no id width.
    UnknownVersion(i32),
    /// The header's width disagrees with `data.tokenBytes`.
    WidthMismatch { header: usize, configured: usize },
    /// The header's token count does not match the bytes that follow it.
    CountMismatch { header: i64, in_file: usize },
    /// A headerless file whose length is not a whole number of ids.
    Ragged { bytes: usize, width: usize },
}

impl std::fmt::Display for TokenFileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UnknownVersion(version) => write!(
                f,
                "has llm.c's header with version {version}, which names no token width (1: uint16, 2: uint32)"
            ),
            Self::WidthMismatch { header, configured } => write!(
                f,
                "has llm.c's header for {header}-byte ids, but data.tokenBytes is {configured}"
            ),
            Self::CountMismatch { header, in_file } => write!(
                f,
                "has llm.c's header announcing {header} tokens, but {in_file} follow it (a truncated or \
                 still-growing file?)"
            ),
            Self::Ragged { bytes, width } => write!(
                f,
                "is {bytes} bytes, not a whole number of {width}-byte token ids (data.tokenBytes)"
            ),
        }
    }
}

/// Where one file's ids are: their width in bytes, the byte offset of the
/// first (past llm.c's header when the file starts with it) and their count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub width: usize,
    pub offset: usize,
    pub count: usize,
}

/// The [`Layout`] of a file of `bytes`: after llm.c's header when the file
/// starts with it (its width, which `token_bytes` must agree with when set,
/// and its count, which the length must match), else the whole file at
/// `token_bytes` (default 2) per id.
pub fn layout(bytes: &[u8], token_bytes: Option<usize>) -> Result<Layout, TokenFileError> {
    let int = |i: usize| i32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().expect("4 bytes"));
    if bytes.len() >= HEADER_BYTES && int(0) == MAGIC {
        let width = match int(1) {
            1 => 2,
            2 => 4,
            version => return Err(TokenFileError::UnknownVersion(version)),
        };
        if let Some(configured) = token_bytes.filter(|&w| w != width) {
            return Err(TokenFileError::WidthMismatch {
                header: width,
                configured,
            });
        }
        let body = bytes.len() - HEADER_BYTES;
        let announced = i64::from(int(2));
        if !body.is_multiple_of(width) || i64::try_from(body / width) != Ok(announced) {
            return Err(TokenFileError::CountMismatch {
                header: announced,
                in_file: body / width,
            });
        }
        return Ok(Layout {
            width,
            offset: HEADER_BYTES,
            count: body / width,
        });
    }
    let width = token_bytes.unwrap_or(2);
    if !bytes.len().is_multiple_of(width) {
        return Err(TokenFileError::Ragged {
            bytes: bytes.len(),
            width,
        });
    }
    Ok(Layout {
        width,
        offset: 0,
        count: bytes.len() / width,
    })
}

/// Id `i` of a file of `bytes` laid out as `layout`.
pub fn id(bytes: &[u8], layout: Layout, i: usize) -> u32 {
    let at = layout.offset + i * layout.width;
    match layout.width {
        2 => u32::from(u16::from_le_bytes([bytes[at], bytes[at + 1]])),
        _ => u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every id of a file of `bytes`: its [`layout`], then [`id`] for each.
    fn parse(bytes: &[u8], token_bytes: Option<usize>) -> Result<Vec<u32>, TokenFileError> {
        let layout = layout(bytes, token_bytes)?;
        Ok((0..layout.count).map(|i| id(bytes, layout, i)).collect())
    }

    fn llmc(version: i32, count: i32, ids: &[u32], width: usize) -> Vec<u8> {
        let mut header = vec![0i32; 256];
        header[..3].copy_from_slice(&[MAGIC, version, count]);
        let mut bytes: Vec<u8> = header.iter().flat_map(|h| h.to_le_bytes()).collect();
        for &id in ids {
            bytes.extend_from_slice(&id.to_le_bytes()[..width]);
        }
        bytes
    }

    #[test]
    fn headerless_files_are_ids_of_the_configured_width() {
        let u16s: Vec<u8> = [1u16, 300, 65535]
            .iter()
            .flat_map(|t| t.to_le_bytes())
            .collect();
        assert_eq!(parse(&u16s, None), Ok(vec![1, 300, 65535]));
        assert_eq!(parse(&u16s, Some(2)), Ok(vec![1, 300, 65535]));
        let u32s: Vec<u8> = [7u32, 128_000]
            .iter()
            .flat_map(|t| t.to_le_bytes())
            .collect();
        assert_eq!(parse(&u32s, Some(4)), Ok(vec![7, 128_000]));
        assert_eq!(
            parse(&u16s, Some(4)),
            Err(TokenFileError::Ragged { bytes: 6, width: 4 })
        );
        assert_eq!(parse(&[], None), Ok(vec![]));
    }

    #[test]
    fn llm_c_shards_give_their_width_and_count() {
        let gpt2 = llmc(1, 3, &[50256, 11, 0], 2);
        assert_eq!(parse(&gpt2, None), Ok(vec![50256, 11, 0]));
        assert_eq!(parse(&gpt2, Some(2)), Ok(vec![50256, 11, 0]));
        let llama3 = llmc(2, 2, &[128_000, 9], 4);
        assert_eq!(parse(&llama3, None), Ok(vec![128_000, 9]));
        assert_eq!(
            parse(&llama3, Some(2)),
            Err(TokenFileError::WidthMismatch {
                header: 4,
                configured: 2
            })
        );
        assert_eq!(
            parse(&llmc(1, 4, &[1, 2, 3], 2), None),
            Err(TokenFileError::CountMismatch {
                header: 4,
                in_file: 3
            }),
            "a truncated shard"
        );
        assert_eq!(
            parse(&llmc(3, 1, &[1], 2), None),
            Err(TokenFileError::UnknownVersion(3))
        );
    }
}
