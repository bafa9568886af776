//! Tokens in, text out: the tokenizer a served model uses, and the
//! assembly of a completion's text with stop strings.
//!
//! Streaming has two hazards the [`TextAssembler`] handles: a token can end
//! in the middle of a multi-byte UTF-8 character (its bytes are held until
//! the character is complete), and the text just generated can be the
//! beginning of a stop string (held until it is clear it is not, because
//! text already sent cannot be taken back).

use std::sync::Arc;

use crate::data::tokenizer;
use crate::serve::hf::HfTokenizer;

/// How a served model turns text into token ids and back.
#[derive(Clone, Debug)]
pub enum Tokenizer {
    /// One token per byte, as the worker's training data path tokenises
    /// ([`crate::data::tokenizer`]).
    Bytes,
    /// A Hugging Face model's `tokenizer.json` and chat template.
    HuggingFace(Arc<HfTokenizer>),
}

impl Tokenizer {
    /// A completion's prompt.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        match self {
            Self::Bytes => Ok(tokenizer::encode(text.as_bytes())),
            Self::HuggingFace(t) => t.encode(text),
        }
    }

    /// A chat's prompt: the model's chat template, or for models without one
    /// (own checkpoints) a plain [`transcript`]. The error is the template's
    /// (e.g. roles that do not alternate).
    pub fn encode_chat(&self, messages: &[(String, String)]) -> Result<Vec<u32>, String> {
        match self {
            Self::Bytes => self.encode(&transcript(messages)),
            Self::HuggingFace(t) => t.encode_chat(messages),
        }
    }

    /// The bytes of one token (none for an id the tokenizer never produces,
    /// or a special token).
    pub fn token_bytes(&self, token: u32) -> Vec<u8> {
        match self {
            Self::Bytes => tokenizer::decode(&[token]).unwrap_or_default(),
            Self::HuggingFace(t) => t.token_bytes(token).to_vec(),
        }
    }

    /// Ids below this can be decoded; the sampler draws only from them even
    /// when the model's vocabulary is larger.
    pub fn vocab(&self) -> usize {
        match self {
            Self::Bytes => tokenizer::VOCAB,
            Self::HuggingFace(t) => t.vocab(),
        }
    }

    /// Whether `token` ends the completion (`finish_reason: "stop"`, no text).
    /// The end-of-sequence tokens (none for the byte tokenizer).
    pub fn eos_ids(&self) -> &[u32] {
        match self {
            Self::Bytes => &[],
            Self::HuggingFace(t) => t.eos(),
        }
    }

    pub fn is_eos(&self, token: u32) -> bool {
        self.eos_ids().contains(&token)
    }
}

/// The prompt for a chat without a template: a plain transcript that ends
/// where the assistant speaks.
pub fn transcript(messages: &[(String, String)]) -> String {
    let mut prompt = String::new();
    for (role, content) in messages {
        prompt.push_str(role);
        prompt.push_str(": ");
        prompt.push_str(content);
        prompt.push('\n');
    }
    prompt.push_str("assistant:");
    prompt
}

/// What one more token did to the completion's text.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// Text that is now final, to send.
    pub text: String,
    /// A stop string appeared: the completion ends (the stop string is not part of it).
    pub stopped: bool,
}

/// A completion's text so far, with what has been released to the client.
#[derive(Clone, Debug, Default)]
pub struct TextAssembler {
    stops: Vec<String>,
    /// Bytes of an incomplete UTF-8 character.
    pending: Vec<u8>,
    /// Decoded text not yet released (it may begin a stop string).
    held: String,
}

impl TextAssembler {
    /// Empty stop strings are ignored (they would stop before any text).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ..Self::default()
        }
    }

    /// Adds one token's bytes.
    pub fn push(&mut self, bytes: &[u8]) -> Delta {
        self.push_checked(bytes, true)
    }

    /// [`Self::push`], looking for the stop strings only when `check_stops`
    /// (not before `min_tokens`: then every complete character is released).
    pub fn push_checked(&mut self, bytes: &[u8], check_stops: bool) -> Delta {
        self.pending.extend_from_slice(bytes);
        let decoded = take_complete_utf8(&mut self.pending);
        self.held.push_str(&decoded);
        if !check_stops {
            return Delta {
                text: std::mem::take(&mut self.held),
                stopped: false,
            };
        }
        if let Some(at) = self.earliest_stop() {
            self.held.truncate(at);
            self.pending.clear();
            return Delta {
                text: std::mem::take(&mut self.held),
                stopped: true,
            };
        }
        let keep = self.stop_prefix_len();
        let release = self.held.len() - keep;
        let text = self.held[..release].to_owned();
        self.held.drain(..release);
        Delta {
            text,
            stopped: false,
        }
    }

    /// The completion ended for another reason: everything still held is
    /// final (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let mut text = std::mem::take(&mut self.held);
        text.push_str(&String::from_utf8_lossy(&std::mem::take(&mut self.pending)));
        text
    }

    /// Byte offset in `held` where the first stop string begins, if any.
    fn earliest_stop(&self) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
    }

    /// Length of the longest end of `held` that begins some stop string.
    fn stop_prefix_len(&self) -> usize {
        let mut longest = 0;
        for stop in &self.stops {
            for (end, _) in stop.char_indices().skip(1) {
                if end > longest && self.held.ends_with(&stop[..end]) {
                    longest = end;
                }
            }
        }
        longest
    }
}

/// Removes and returns the longest valid UTF-8 prefix of `bytes`, leaving an
/// incomplete trailing character; bytes that can never be valid become U+FFFD.
fn take_complete_utf8(bytes: &mut Vec<u8>) -> String {
    let mut out = String::new();
    loop {
        match std::str::from_utf8(bytes) {
            Ok(text) => {
                out.push_str(text);
                bytes.clear();
                return out;
            }
            Err(e) => {
                let valid = e.valid_up_to();
                out.push_str(std::str::from_utf8(&bytes[..valid]).unwrap_or_default());
                match e.error_len() {
                    // Invalid bytes: replace them and go on.
                    Some(bad) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        bytes.drain(..valid + bad);
                    }
                    // An incomplete character at the end: wait for more.
                    None => {
                        bytes.drain(..valid);
                        return out;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(assembler: &mut TextAssembler, text: &[u8]) -> (String, bool) {
        let mut out = String::new();
        for &b in text {
            let delta = assembler.push(&[b]);
            out.push_str(&delta.text);
            if delta.stopped {
                return (out, true);
            }
        }
        (out, false)
    }

    #[test]
    fn multibyte_characters_are_released_whole() {
        let mut a = TextAssembler::new(vec![]);
        let bytes = "é€".as_bytes();
        assert_eq!(a.push(&bytes[..1]).text, "");
        assert_eq!(a.push(&bytes[1..3]).text, "é");
        assert_eq!(a.push(&bytes[3..]).text, "€");
        assert_eq!(a.push(&[0xff]).text, "\u{fffd}");
        a.push(&[0xe2]);
        assert_eq!(a.finish(), "\u{fffd}");
    }

    #[test]
    fn stop_strings_end_the_text_before_them() {
        let mut a = TextAssembler::new(vec!["\n\n".into(), "END".into()]);
        assert_eq!(feed(&mut a, b"hello EN"), ("hello ".into(), false));
        assert_eq!(feed(&mut a, b"D tail"), (String::new(), true));
        let mut a = TextAssembler::new(vec!["END".into()]);
        // A near miss is released once it cannot be a stop string.
        assert_eq!(feed(&mut a, b"ENx EN"), ("ENx ".into(), false));
        assert_eq!(a.finish(), "EN");
    }

    #[test]
    fn the_earliest_stop_wins() {
        let mut a = TextAssembler::new(vec!["cd".into(), "b".into()]);
        let delta = a.push(b"abcd");
        assert_eq!((delta.text.as_str(), delta.stopped), ("a", true));
    }

    #[test]
    fn byte_tokens_round_trip() {
        let t = Tokenizer::Bytes;
        let ids = t.encode("hé").unwrap();
        assert_eq!(ids, [104, 195, 169]);
        let mut a = TextAssembler::new(vec![]);
        let text: String = ids
            .iter()
            .map(|&i| a.push(&t.token_bytes(i)).text)
            .collect();
        assert_eq!(text, "hé");
        assert!(t.token_bytes(300).is_empty());
    }

    /// Before min_tokens no stop string is looked for and every complete
    /// character is released; from then on stops end the text again.
    #[test]
    fn stops_are_looked_for_only_when_asked() {
        let mut t = TextAssembler::new(vec!["ab".into()]);
        let early: Vec<Delta> = ["a", "b", "x", "a"]
            .iter()
            .map(|p| t.push_checked(p.as_bytes(), false))
            .collect();
        assert!(early.iter().all(|d| !d.stopped));
        let text: String = early.iter().map(|d| d.text.as_str()).collect();
        assert_eq!(text, "abxa");
        // A character split across tokens still waits for its last byte.
        assert_eq!(t.push_checked(&[0xc3], false).text, "");
        assert_eq!(t.push_checked(&[0xa9], true).text, "é");
        let d = t.push_checked(b"zab", true);
        assert_eq!((d.text.as_str(), d.stopped), ("z", true));
    }
}
