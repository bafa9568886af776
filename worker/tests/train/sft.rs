//! Supervised fine-tuning (`data.format: chat`): conversations rendered
//! through the model's chat template, the model trained on the assistant's
//! turns only.

use std::path::Path;

use moe_worker::serve::hf::HfTokenizer;
use serde_json::{Value, json};

use crate::{config_json, scratch_dir};

fn qwen3() -> std::path::PathBuf {
    crate::pretrained::fixture("qwen3_moe")
}

fn chat(turns: &[(&str, &str)]) -> Vec<(String, String)> {
    turns
        .iter()
        .map(|(r, c)| (r.to_string(), c.to_string()))
        .collect()
}

#[test]
fn only_the_assistants_turns_are_trained() {
    let tokenizer = HfTokenizer::read(&qwen3(), &[]).unwrap();
    let messages = chat(&[
        ("user", "Where is the fox?"),
        ("assistant", "In the forest."),
        ("user", "And the dog?"),
        ("assistant", "Asleep."),
    ]);
    let (ids, trained) = tokenizer.encode_conversation(&messages).unwrap();
    // The whole conversation as the template renders it (no assistant turn begun).
    assert!(ids.len() > 20);
    let text = |keep: bool| -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .zip(&trained)
            .filter(|(_, t)| **t == keep)
            .flat_map(|(&id, _)| tokenizer.token_bytes(id).to_vec())
            .collect();
        String::from_utf8(bytes).unwrap()
    };
    // The assistant's words (and the newline its turn ends with), nothing
    // of the template's headers or the user's.
    assert_eq!(text(true), "In the forest.\nAsleep.\n");
    let context = text(false);
    for part in ["Where is the fox?", "And the dog?", "assistant\n", "user\n"] {
        assert!(context.contains(part), "{part:?} in {context:?}");
    }
    // Without an assistant turn there is nothing to train.
    let (_, none) = tokenizer
        .encode_conversation(&chat(&[("user", "Hello?")]))
        .unwrap();
    assert!(!none.contains(&true));
}

/// Trains from the Qwen3-MoE fixture on `dir`'s `chats.jsonl` as `format`;
/// the summary.
fn train(dir: &Path, format: &str) -> Value {
    train_with(dir, format, 30, |_| {})
}

/// [`train`] for `steps` steps, `patch` applied to the config, on as many
/// local ranks as it asks for.
fn train_with(dir: &Path, format: &str, steps: u64, patch: impl Fn(&mut Value)) -> Value {
    train_with_env(dir, format, steps, patch, &[])
}

/// [`train_with`] with `env` set for the worker.
fn train_with_env(
    dir: &Path,
    format: &str,
    steps: u64,
    patch: impl Fn(&mut Value),
    env: &[(&str, &str)],
) -> Value {
    let mut config = config_json(dir);
    // Each sequence is one conversation from its start: long enough for
    // the longest here (65 to 96 tokens), so every answer is in it.
    config["model"] = crate::pretrained::qwen3_model(json!({
        "seqLen": 96,
        "moe": {"balancing": {"auxLossFree": {"enabled": false}}}
    }));
    config["dataDir"] = dir.to_string_lossy().into();
    config["data"] = json!({"volume": {"claimName": "local", "path": "chats.jsonl"},
                            "tokenizer": "huggingface", "format": format});
    config["initDir"] = qwen3().to_string_lossy().into();
    config["training"]["steps"] = steps.into();
    config["training"]["optimizer"] = json!({"learningRate": 0.005, "minLearningRate": 0.001,
                                             "warmupSteps": 2});
    patch(&mut config);
    let ranks = config["parallelism"]["processesPerNode"]
        .as_u64()
        .unwrap_or(1);
    let out = crate::train_binary_with(dir, &config, ranks as usize, env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Conversations in which users ask anything (`questions` random words)
/// and the assistant always answers `answer`, as JSONL.
fn conversations(questions: usize, answer: impl Fn(usize) -> String) -> String {
    let words = [
        "fox", "dog", "tree", "river", "stone", "cloud", "moon", "bread",
    ];
    let mut rng = moe_worker::rng::SplitMix64::new(11);
    let mut lines = String::new();
    for i in 0..200 {
        let question: Vec<&str> = (0..questions)
            .map(|_| words[rng.below(words.len())])
            .collect();
        let line = json!({"messages": [
            {"role": "user", "content": question.join(" ")},
            {"role": "assistant", "content": answer(i)}
        ]});
        lines.push_str(&line.to_string());
        lines.push('\n');
    }
    lines
}

/// Each logged step's `trainedTokens` in `dir`'s `metrics.jsonl`.
fn trained_tokens(dir: &Path) -> Vec<u64> {
    std::fs::read_to_string(dir.join("out").join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| {
            serde_json::from_str::<Value>(line).unwrap()["trainedTokens"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

#[test]
fn the_loss_is_the_assistants_alone() {
    // Users ask anything (random words); the assistant always answers the
    // same. Trained on the answers alone, the loss falls toward 0; trained
    // on the whole text it cannot, the questions being random.
    let lines = conversations(6, |_| "Yes.".into());
    let run = |format: &str| {
        let dir = scratch_dir(&format!("sft-{format}"));
        std::fs::write(dir.join("chats.jsonl"), &lines).unwrap();
        (train(&dir, format), trained_tokens(&dir))
    };
    let (chat, chat_trained) = run("chat");
    let (text, text_trained) = run("text");
    // A global batch of 4 sequences of 96: text trains on every token; a
    // conversation on its answer alone ("Yes." and the end of the turn).
    assert!(
        text_trained.iter().all(|&t| t == 4 * 96),
        "{text_trained:?}"
    );
    assert!(
        chat_trained.iter().all(|&t| (4..=4 * 8).contains(&t)),
        "{chat_trained:?}"
    );
    let loss = |v: &Value, key: &str| v[key].as_f64().unwrap();
    eprintln!("chat: {chat}\ntext: {text}");
    assert!(
        loss(&chat, "initialLoss") > 1.0,
        "the answers are trained: {chat}"
    );
    assert!(
        loss(&chat, "finalLoss") < 0.5,
        "the answers are learnt: {chat}"
    );
    assert!(
        loss(&text, "finalLoss") > 3.0 * loss(&chat, "finalLoss"),
        "the whole text's loss counts the random questions: {text}"
    );
}

/// Fine-tuning with each sequence split over 2 ranks (Ulysses): every
/// rank's slice holds its own number of the answers' tokens (some slices
/// none), and the loss is still the mean over all of the step's. The run
/// of two processes trains like one; a mean of the ranks' means would not
/// (docs/distributed.md; the in-process test `dist_sequence_parallel`
/// measures every split). Both at `seqLen`, padding and all
/// (`MOE_KEEP_PADDING=1`): cut, one process and two ranks cut a
/// micro-batch to different lengths (the ranks to a multiple of 2 tokens),
/// and the trajectories part by more than rounding once a routing choice
/// flips. Cut and grouped by length (the default), one process and the
/// two ranks each train the same first step as padded.
#[test]
fn fine_tuning_splits_each_conversation_over_sequence_parallel_ranks() {
    // Answers of 1 to 12 words, after questions of 2 words.
    let lines = conversations(2, |i| vec!["yes"; 1 + i % 12].join(" "));
    let run = |ranks: usize, keep_padding: &str| {
        let dir = scratch_dir(&format!("sft-sp-{ranks}-{keep_padding}"));
        std::fs::write(dir.join("chats.jsonl"), &lines).unwrap();
        let summary = train_with_env(
            &dir,
            "chat",
            8,
            |config| {
                config["training"]["logIntervalSteps"] = 1.into();
                config["parallelism"] =
                    json!({"processesPerNode": ranks, "sequenceParallel": ranks});
            },
            &[("MOE_KEEP_PADDING", keep_padding)],
        );
        (summary, crate::logged_steps(&dir))
    };
    let (one, one_steps) = run(1, "1");
    let (two, two_steps) = run(2, "1");
    let (_, cut_steps) = run(1, "0");
    let (_, two_cut_steps) = run(2, "0");
    let padded = one_steps[0].1;
    for (what, cut) in [
        ("one process", cut_steps[0].1),
        ("SP 2", two_cut_steps[0].1),
    ] {
        assert!(
            (padded - cut).abs() <= 1e-6 * padded,
            "first step: padded {padded}, {what} cut and grouped {cut}"
        );
    }
    eprintln!("one process: {one}\nSP 2: {two}");
    assert_eq!(one_steps.len(), 8);
    assert!(one_steps[0].1 > 1.0, "the answers are trained: {one}");
    assert_eq!(
        one_steps.iter().map(|s| s.0).collect::<Vec<_>>(),
        two_steps.iter().map(|s| s.0).collect::<Vec<_>>()
    );
    for ((step, a), (_, b)) in one_steps.iter().zip(&two_steps) {
        assert!(
            (a - b).abs() <= 1e-5 * a,
            "step {step}: one process {a}, SP 2 {b}"
        );
    }
}

/// Packed (`data.packing`), a sequence of 192 holds three of these
/// conversations (about 60 tokens each) rather than one and its padding:
/// the same steps train on three times the answers, and they are learnt
/// as well.
#[test]
fn packing_trains_several_conversations_per_sequence() {
    let lines = conversations(2, |_| "Yes.".into());
    // Without packing, a few steps to count what each trains.
    let run = |packing: bool| {
        let dir = scratch_dir(&format!("sft-packing-{packing}"));
        std::fs::write(dir.join("chats.jsonl"), &lines).unwrap();
        let steps = if packing { 20 } else { 4 };
        let summary = train_with(&dir, "chat", steps, |config| {
            config["model"]["seqLen"] = 192.into();
            config["data"]["packing"] = packing.into();
        });
        (summary, trained_tokens(&dir))
    };
    let (one, one_trained) = run(false);
    let (packed, packed_trained) = run(true);
    eprintln!("one per sequence: {one} {one_trained:?}\npacked: {packed} {packed_trained:?}");
    let most = one_trained.iter().max().unwrap();
    assert!(
        packed_trained.iter().all(|t| *t >= 2 * most),
        "packed: {packed_trained:?}, one per sequence: {one_trained:?}"
    );
    let loss = |v: &Value, key: &str| v[key].as_f64().unwrap();
    assert!(
        loss(&packed, "initialLoss") > 1.0,
        "the answers are trained: {packed}"
    );
    assert!(
        loss(&packed, "finalLoss") < 0.5,
        "the answers are learnt: {packed}"
    );
}

/// A packed run resumed from its step-3 checkpoint trains steps 4 to 6 as
/// the run straight through did: the checkpoint's data position counts the
/// conversations packed so far, so the same ones are packed next (a count
/// of sequences alone would restart the packing elsewhere).
#[test]
fn a_packed_run_resumes_where_it_stopped() {
    let lines = conversations(2, |i| vec!["yes"; 1 + i % 5].join(" "));
    let run = |name: &str| {
        let dir = scratch_dir(name);
        std::fs::write(dir.join("chats.jsonl"), &lines).unwrap();
        dir
    };
    let patch = |config: &mut Value| {
        config["model"]["seqLen"] = 192.into();
        config["data"]["packing"] = true.into();
        config["training"]["logIntervalSteps"] = 1.into();
    };
    let straight_dir = run("sft-packing-straight");
    let straight = train_with(&straight_dir, "chat", 6, patch);
    let resumed_dir = run("sft-packing-resumed");
    let step3 = straight_dir.join("checkpoints").join("step-00000003");
    let into = resumed_dir.join("checkpoints").join("step-00000003");
    std::fs::create_dir_all(&into).unwrap();
    for file in std::fs::read_dir(&step3).unwrap() {
        let file = file.unwrap();
        std::fs::copy(file.path(), into.join(file.file_name())).unwrap();
    }
    let resumed = train_with(&resumed_dir, "chat", 6, patch);
    let (a, b) = (
        crate::logged_steps(&straight_dir),
        crate::logged_steps(&resumed_dir),
    );
    eprintln!("straight: {a:?}\nresumed: {b:?}");
    assert_eq!(b.iter().map(|s| s.0).collect::<Vec<_>>(), [4, 5, 6]);
    for ((step, want), (_, got)) in a[3..].iter().zip(&b) {
        assert_eq!(got.to_bits(), want.to_bits(), "step {step}");
    }
    assert_eq!(resumed["finalLoss"], straight["finalLoss"]);
}

#[test]
fn a_line_that_is_not_a_conversation_is_named() {
    let dir = scratch_dir("sft-bad");
    std::fs::write(
        dir.join("chats.jsonl"),
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n{\"text\": \"plain\"}\n",
    )
    .unwrap();
    let mut config = config_json(&dir);
    config["model"]["vocabSize"] = 330.into();
    config["dataDir"] = dir.to_string_lossy().into();
    std::fs::copy(qwen3().join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    std::fs::copy(
        qwen3().join("chat_template.jinja"),
        dir.join("chat_template.jinja"),
    )
    .unwrap();
    config["data"] = json!({"volume": {"claimName": "local", "path": "chats.jsonl"},
                            "tokenizer": "huggingface", "tokenizerFile": "tokenizer.json",
                            "format": "chat"});
    let out = crate::train_binary(&dir, &config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("data.format chat:") && stderr.contains("chats.jsonl:2:"),
        "{stderr}"
    );
}
