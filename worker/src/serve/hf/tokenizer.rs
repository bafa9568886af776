//! A Hugging Face model's tokenizer (`tokenizer.json`, with the `tokenizers`
//! crate), its end-of-sequence ids and its chat template (Jinja, rendered
//! with `minijinja` as `transformers`' `apply_chat_template` does).
//!
//! Streaming needs each token's *bytes*, since a token can hold part of a
//! UTF-8 character (byte-level BPE, SentencePiece byte fallback); the
//! [`crate::serve::text::TextAssembler`] joins them. They are computed once
//! per vocabulary entry from the tokenizer's decoder: byte-level (GPT-2,
//! Qwen), `▁`-for-space with `<0xNN>` byte tokens (Llama, Mistral), or, for
//! any other decoder, the token decoded alone. Special tokens have no text.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::serve::hf::HfError;
use crate::serve::hf::config::token_ids;

/// The tokenizer of a Hugging Face model directory.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    /// Each id's bytes when generated (empty for special tokens).
    bytes: Vec<Vec<u8>>,
    eos: Vec<u32>,
    template: Option<ChatTemplate>,
}

impl fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("vocab", &self.bytes.len())
            .field("eos", &self.eos)
            .field("chat_template", &self.template.is_some())
            .finish()
    }
}

/// A chat template with the special tokens it may name.
struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'a str,
    content: &'a str,
}

impl HfTokenizer {
    /// Reads `tokenizer.json`, `tokenizer_config.json` (special tokens, chat
    /// template), `chat_template.jinja` (preferred, as `transformers` does)
    /// and `generation_config.json` (end-of-sequence ids, added to
    /// `config_eos`, the model config's).
    pub fn read(dir: &Path, config_eos: &[u32]) -> Result<Self, HfError> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(HfError::Invalid {
                path: dir.to_path_buf(),
                problem: "has no tokenizer.json (the fast-tokenizer file); this worker does \
                          not read tokenizer.model or vocab files"
                    .into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| HfError::Invalid {
            path: path.clone(),
            problem: format!("not a tokenizer: {e}"),
        })?;
        let json = read_json(&path)?.unwrap_or(Value::Null);
        let bytes = token_bytes(&inner, json.get("decoder"));

        let tokenizer_config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or_default();
        let special = |key: &str| -> String {
            match tokenizer_config.get(key) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Object(o)) => o
                    .get("content")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                _ => String::new(),
            }
        };
        let (bos_token, eos_token) = (special("bos_token"), special("eos_token"));

        let mut eos = config_eos.to_vec();
        if let Some(generation) = read_json(&dir.join("generation_config.json"))? {
            eos.extend(token_ids(generation.get("eos_token_id")));
        }
        if eos.is_empty()
            && let Some(id) = inner.token_to_id(&eos_token)
        {
            eos.push(id);
        }
        eos.sort_unstable();
        eos.dedup();

        let jinja = dir.join("chat_template.jinja");
        let source = if jinja.is_file() {
            Some(fs_read_string(&jinja)?)
        } else {
            match tokenizer_config.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: the default one.
                Some(Value::Array(named)) => named
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str().map(str::to_owned)),
                _ => None,
            }
        };
        let template = source
            .map(|source| ChatTemplate::new(source, bos_token, eos_token))
            .transpose()
            .map_err(|e| HfError::Invalid {
                path: dir.join("tokenizer_config.json"),
                problem: format!("the chat template does not compile: {e}"),
            })?;
        Ok(Self {
            inner,
            bytes,
            eos,
            template,
        })
    }

    /// A completion's prompt: with the special tokens the tokenizer adds
    /// (Llama's and Mixtral's leading `<s>`), as `tokenizer(text)` does.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        self.encode_with(text, true)
    }

    fn encode_with(&self, text: &str, special: bool) -> Result<Vec<u32>, String> {
        self.inner
            .encode(text, special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| format!("cannot tokenise the prompt: {e}"))
    }

    /// A chat's prompt: the template's text (which holds its own special
    /// tokens, so none are added), or without a template the plain transcript.
    pub fn encode_chat(&self, messages: &[(String, String)]) -> Result<Vec<u32>, String> {
        match &self.template {
            Some(_) => self.encode_with(&self.render_chat(messages)?, false),
            None => self.encode(&crate::serve::text::transcript(messages)),
        }
    }

    /// The chat template applied to `messages`, with the assistant's turn begun
    /// (`apply_chat_template(messages, add_generation_prompt=True)`).
    pub fn render_chat(&self, messages: &[(String, String)]) -> Result<String, String> {
        let Some(template) = &self.template else {
            return Ok(crate::serve::text::transcript(messages));
        };
        render(template, messages, true)
    }

    /// A conversation for supervised fine-tuning: its tokens as the chat
    /// template renders the whole of it, and for each whether the model is
    /// trained to produce it — the assistant's turns, from after the
    /// template's assistant header (what a served model is prompted with)
    /// to the end of the turn, its end-of-turn tokens included. Each
    /// assistant turn is found by rendering the conversation up to it with
    /// the header (`add_generation_prompt`) and through it without: a
    /// template that does not render a conversation's beginning as a
    /// prefix of the whole is refused, naming the turn.
    pub fn encode_conversation(
        &self,
        messages: &[(String, String)],
    ) -> Result<(Vec<u32>, Vec<bool>), String> {
        let Some(template) = &self.template else {
            return Err(
                "the tokenizer has no chat template (tokenizer_config.json's \
                        chat_template, or chat_template.jinja)"
                    .into(),
            );
        };
        let encode = |messages: &[(String, String)], header: bool| {
            self.encode_with(&render(template, messages, header)?, false)
        };
        let ids = encode(messages, false)?;
        let mut trained = vec![false; ids.len()];
        for (turn, (role, _)) in messages.iter().enumerate() {
            if role != "assistant" {
                continue;
            }
            let before = encode(&messages[..turn], true)?;
            let through = encode(&messages[..=turn], false)?;
            if !(ids.starts_with(&through) && through.starts_with(&before)) {
                return Err(format!(
                    "messages[{turn}]: the chat template does not render the conversation up \
                     to this assistant turn as the beginning of the whole, so the turn's \
                     tokens cannot be told apart"
                ));
            }
            trained[before.len()..through.len()].fill(true);
        }
        Ok((ids, trained))
    }

    /// The bytes token `id` adds to a completion.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.bytes.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// Ids the tokenizer knows (its vocabulary and added tokens).
    pub fn vocab(&self) -> usize {
        self.bytes.len()
    }

    /// Ids that end a completion.
    pub fn eos(&self) -> &[u32] {
        &self.eos
    }
}

/// `template` applied to `messages`, with the assistant's turn begun when
/// `generation_prompt`.
fn render(
    template: &ChatTemplate,
    messages: &[(String, String)],
    generation_prompt: bool,
) -> Result<String, String> {
    let messages: Vec<Message<'_>> = messages
        .iter()
        .map(|(role, content)| Message { role, content })
        .collect();
    let rendered = template.env.get_template("chat").and_then(|t| {
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => generation_prompt,
            bos_token => template.bos_token,
            eos_token => template.eos_token,
        })
    });
    rendered.map_err(|e| match e.kind() {
        minijinja::ErrorKind::InvalidOperation => {
            format!(
                "messages: {}",
                e.detail().unwrap_or("rejected by the chat template")
            )
        }
        _ => format!("messages: the chat template failed: {e}"),
    })
}

impl ChatTemplate {
    /// Compiles `source` in an environment like `transformers`': blocks
    /// trimmed, loop controls, Python's string methods, `raise_exception`.
    fn new(source: String, bos_token: String, eos_token: String) -> Result<Self, minijinja::Error> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        env.add_template_owned("chat", source)?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
        })
    }
}

fn fs_read_string(path: &Path) -> Result<String, HfError> {
    std::fs::read_to_string(path).map_err(|error| HfError::io(path, error))
}

/// A JSON file's contents; `None` when it does not exist.
fn read_json(path: &Path) -> Result<Option<Value>, HfError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = fs_read_string(path)?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| HfError::Invalid {
            path: path.to_path_buf(),
            problem: format!("not JSON: {e}"),
        })
}

/// How the decoder turns tokens back into bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decoding {
    /// GPT-2's byte-to-character map.
    ByteLevel,
    /// `▁` is a space; `<0xNN>` is byte NN.
    Metaspace,
    /// Anything else: the token decoded alone.
    Other,
}

fn decoding(decoder: Option<&Value>) -> Decoding {
    let kind = |d: &Value| d.get("type").and_then(Value::as_str).map(str::to_owned);
    let Some(decoder) = decoder else {
        return Decoding::Other;
    };
    let kinds: Vec<String> = match kind(decoder).as_deref() {
        Some("Sequence") => decoder
            .get("decoders")
            .and_then(Value::as_array)
            .map(|ds| ds.iter().filter_map(kind).collect())
            .unwrap_or_default(),
        Some(k) => vec![k.to_owned()],
        None => Vec::new(),
    };
    if kinds.iter().any(|k| k == "ByteLevel") {
        Decoding::ByteLevel
    } else if kinds
        .iter()
        .any(|k| k == "Metaspace" || k == "ByteFallback" || k == "Replace")
    {
        Decoding::Metaspace
    } else {
        Decoding::Other
    }
}

/// The bytes of every id (see the module's documentation).
fn token_bytes(tokenizer: &tokenizers::Tokenizer, decoder: Option<&Value>) -> Vec<Vec<u8>> {
    let decoding = decoding(decoder);
    let byte_level = byte_level_decoder();
    let added = tokenizer.get_added_tokens_decoder();
    (0..tokenizer.get_vocab_size(true) as u32)
        .map(|id| {
            if let Some(token) = added.get(&id) {
                return if token.special {
                    Vec::new()
                } else {
                    token.content.as_bytes().to_vec()
                };
            }
            let Some(token) = tokenizer.id_to_token(id) else {
                return Vec::new();
            };
            match decoding {
                Decoding::ByteLevel => token
                    .chars()
                    .map(|c| byte_level.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .unwrap_or_else(|| token.as_bytes().to_vec()),
                Decoding::Metaspace => match byte_token(&token) {
                    Some(byte) => vec![byte],
                    None => token.replace('\u{2581}', " ").into_bytes(),
                },
                Decoding::Other => tokenizer
                    .decode(&[id], false)
                    .map(String::into_bytes)
                    .unwrap_or_default(),
            }
        })
        .collect()
}

/// `<0x41>` → 0x41.
fn byte_token(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok())?
}

/// GPT-2's `bytes_to_unicode`, the character each byte stands for:
/// printable bytes stand for themselves, the others for the characters
/// from U+0100 on, in order.
pub(crate) fn byte_level_chars() -> Vec<char> {
    let mut next = 0x100;
    (0..=255u8)
        .map(|b| {
            let printable = matches!(b, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff);
            if printable {
                char::from(b)
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap_or(char::REPLACEMENT_CHARACTER)
            }
        })
        .collect()
}

/// [`byte_level_chars`], inverted.
fn byte_level_decoder() -> HashMap<char, u8> {
    (0..=255u8)
        .zip(byte_level_chars())
        .map(|(b, c)| (c, b))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_characters_map_back_to_bytes() {
        let map = byte_level_decoder();
        assert_eq!(map.len(), 256);
        assert_eq!(map[&'A'], b'A');
        assert_eq!(map[&'\u{120}'], b' '); // 'Ġ'
        assert_eq!(map[&'\u{10a}'], b'\n'); // 'Ċ'
        assert_eq!(byte_token("<0xE2>"), Some(0xe2));
        assert_eq!(byte_token("<0xE>"), None);
    }
}
