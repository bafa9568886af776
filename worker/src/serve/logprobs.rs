//! `logprobs`: each generated token's log-probability under the model and
//! the most likely alternatives at its position, in the two shapes the
//! OpenAI API has (the legacy completions object, the chat `content` list).
//! Pure: the runner computes them from a step's logits, the HTTP side
//! shapes them.
//!
//! The probabilities are the model's own, `log_softmax(logits)`, before
//! temperature, top-k or top-p (as OpenAI and vLLM report them), so they do
//! not depend on how the token was sampled. The sum runs in f64 around the
//! largest logit, so a log-probability near 0 keeps its small digits.

use serde_json::{Map, Value, json};

/// Most alternatives a completions request may ask for (OpenAI's bound).
pub const MAX_COMPLETION_TOP: usize = 5;
/// Most alternatives a chat request may ask for (`top_logprobs`).
pub const MAX_CHAT_TOP: usize = 20;

/// One token and its log-probability.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub id: u32,
    /// The token's bytes (a token may hold part of a UTF-8 character).
    pub bytes: Vec<u8>,
    pub logprob: f32,
}

impl Candidate {
    /// The token as text, invalid UTF-8 replaced (the API's `token` field;
    /// `bytes` keeps the exact value).
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// A generated token's log-probability and the `top` most likely tokens at
/// its position, most likely first.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    pub chosen: Candidate,
    pub top: Vec<Candidate>,
}

/// A prompt's tokens with their log-probabilities under the model (echo
/// with logprobs: what evaluation harnesses score): the first token has
/// none (nothing precedes it), token `i` its probability given tokens
/// `0..i` and the likeliest tokens at its position.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptLogprobs {
    /// The first token's bytes.
    pub first: Vec<u8>,
    /// Tokens `1..`, in order.
    pub scored: Vec<TokenLogprobs>,
}

/// `log_softmax(logits)[token]` and the `top` largest entries, most likely
/// first (ties: lower id first), as `(id, logprob)`.
pub fn logprobs(logits: &[f32], token: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l));
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let log_sum = sum.ln();
    let logprob = |l: f32| (f64::from(l - max) - log_sum) as f32;
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    let top = top.min(logits.len());
    let by_logit = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if top > 0 && top < order.len() {
        order.select_nth_unstable_by(top - 1, by_logit);
    }
    order.truncate(top);
    order.sort_by(by_logit);
    let best = order
        .into_iter()
        .map(|id| (id, logprob(logits[id as usize])))
        .collect();
    (logprob(logits[token as usize]), best)
}

/// The completions endpoint's `logprobs` object for `tokens`, after the
/// prompt's when given (echo: its first token's log-probability and
/// alternatives are `null`); `offset` is the text's length in characters
/// before them (the first token's `text_offset`), advanced past them.
pub fn completion_object(
    prompt: Option<&PromptLogprobs>,
    tokens: &[TokenLogprobs],
    offset: &mut usize,
) -> Value {
    let scored = prompt.map_or(&[][..], |p| &p.scored[..]);
    let count = usize::from(prompt.is_some()) + scored.len() + tokens.len();
    let mut texts = Vec::with_capacity(count);
    let mut offsets = Vec::with_capacity(count);
    let mut values = Vec::with_capacity(count);
    let mut tops = Vec::with_capacity(count);
    let mut push = |text: String, logprob: Value, top: Value| {
        offsets.push(*offset);
        *offset += text.chars().count();
        texts.push(text);
        values.push(logprob);
        tops.push(top);
    };
    if let Some(prompt) = prompt {
        push(
            String::from_utf8_lossy(&prompt.first).into_owned(),
            Value::Null,
            Value::Null,
        );
    }
    for t in scored.iter().chain(tokens) {
        // Two tokens may decode to the same text; the likelier one stays.
        let mut map = Map::new();
        for c in &t.top {
            map.entry(c.text()).or_insert(json!(c.logprob));
        }
        push(t.chosen.text(), json!(t.chosen.logprob), Value::Object(map));
    }
    json!({
        "tokens": texts,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    })
}

/// The chat endpoint's `logprobs` object for `tokens`.
pub fn chat_object(tokens: &[TokenLogprobs]) -> Value {
    let entry = |c: &Candidate| json!({"token": c.text(), "logprob": c.logprob, "bytes": c.bytes});
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut value = entry(&t.chosen);
            value["top_logprobs"] = t.top.iter().map(entry).collect();
            value
        })
        .collect();
    json!({"content": content, "refusal": null})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_probabilities_are_the_log_of_the_softmax() {
        let logits = [1.0f32, 3.0, -2.0, 3.0, 0.5];
        let z: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        let expected = |i: usize| (f64::from(logits[i]).exp() / z).ln() as f32;
        let (chosen, top) = logprobs(&logits, 4, 3);
        assert!((chosen - expected(4)).abs() < 1e-6);
        // Most likely first; the tie between 1 and 3 goes to the lower id.
        let ids: Vec<u32> = top.iter().map(|&(id, _)| id).collect();
        assert_eq!(ids, [1, 3, 0]);
        for (id, lp) in top {
            assert!((lp - expected(id as usize)).abs() < 1e-6);
        }
        assert!(logprobs(&logits, 0, 0).1.is_empty());
        assert_eq!(logprobs(&logits, 0, 9).1.len(), logits.len());
    }

    #[test]
    fn a_near_certain_token_keeps_its_small_log_probability() {
        let (lp, _) = logprobs(&[40.0, 0.0], 0, 0);
        // log(1 / (1 + e^-40)) = -e^-40 = -4.25e-18, not 0 from 1 - tiny.
        assert!(lp <= 0.0 && lp > -1e-17);
    }

    fn candidate(id: u32, text: &str, logprob: f32) -> Candidate {
        Candidate {
            id,
            bytes: text.as_bytes().to_vec(),
            logprob,
        }
    }

    #[test]
    fn both_api_shapes() {
        let tokens = vec![
            TokenLogprobs {
                chosen: candidate(7, "hé", -0.5),
                top: vec![candidate(7, "hé", -0.5), candidate(3, "x", -1.5)],
            },
            TokenLogprobs {
                chosen: candidate(2, "!", -0.25),
                top: vec![candidate(2, "!", -0.25)],
            },
        ];
        let mut offset = 4;
        let completion = completion_object(None, &tokens, &mut offset);
        assert_eq!(
            completion,
            json!({
                "tokens": ["hé", "!"],
                "token_logprobs": [-0.5, -0.25],
                "top_logprobs": [{"hé": -0.5, "x": -1.5}, {"!": -0.25}],
                "text_offset": [4, 6],
            })
        );
        assert_eq!(offset, 7);
        // Echoed: the prompt's tokens first, its first without a value.
        let prompt = PromptLogprobs {
            first: b"<s>".to_vec(),
            scored: vec![tokens[1].clone()],
        };
        let mut offset = 0;
        assert_eq!(
            completion_object(Some(&prompt), &tokens[..1], &mut offset),
            json!({
                "tokens": ["<s>", "!", "hé"],
                "token_logprobs": [null, -0.25, -0.5],
                "top_logprobs": [null, {"!": -0.25}, {"hé": -0.5, "x": -1.5}],
                "text_offset": [0, 3, 4],
            })
        );
        assert_eq!(offset, 6);
        let chat = chat_object(&tokens[1..]);
        assert_eq!(
            chat,
            json!({"content": [{"token": "!", "logprob": -0.25, "bytes": [33],
                "top_logprobs": [{"token": "!", "logprob": -0.25, "bytes": [33]}]}],
                "refusal": null})
        );
    }
}
