//! Reading manifests: a file or standard input, holding one or more YAML
//! documents, each turned into a JSON value so that the schema walker sees
//! exactly what the apiserver would receive.

use std::io::Read;

use anyhow::Context;
use serde::Deserialize;
use serde_json::Value;

/// The name that stands for standard input, as in most Unix tools.
pub const STDIN: &str = "-";

/// The text of `source`: a path, or [`STDIN`]. Errors do not repeat the
/// source; callers prefix it, as in `FILE: problem`.
pub fn read(source: &str) -> anyhow::Result<String> {
    if source == STDIN {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read")?;
        Ok(text)
    } else {
        std::fs::read_to_string(source).context("cannot read")
    }
}

/// The documents of a YAML stream. Empty documents (a leading or trailing
/// `---`) are skipped, as `kubectl apply` skips them.
pub fn documents(text: &str) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value = Value::deserialize(document).context("not valid YAML")?;
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_a_stream_and_skips_empty_documents() {
        let docs = documents("---\na: 1\n---\n---\nb: [x]\n").unwrap();
        assert_eq!(
            docs,
            vec![serde_json::json!({"a": 1}), serde_json::json!({"b": ["x"]})]
        );
    }

    #[test]
    fn reports_broken_yaml() {
        assert!(documents("a: [1\n").is_err());
    }
}
