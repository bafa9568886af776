//! How a batch's sequences are laid out, checked against the same weights
//! run on each sequence's (or document's) real tokens as a sequence of its
//! own: padding counts in no expert load and no balance loss; a packed
//! sequence's documents train as each would alone; a batch cut to its
//! longest sequence trains as the padded one.

use moe_worker::data::Batch;
use moe_worker::linear::GemmPrecision;
use moe_worker::model::{ActivationMemory, Gradients, Model, ModelConfig, Parallel};
use moe_worker::moe::{MoeConfig, ScoreFunction};
use moe_worker::ops::cross_entropy::{IGNORED, LossScale};
use moe_worker::rng::SplitMix64;

/// Two MoE blocks of 8 routed experts (top-2, sigmoid) with the
/// sequence-wise balance loss, over sequences of `seq_len`.
fn config(seq_len: usize) -> ModelConfig {
    ModelConfig {
        vocab: 32,
        hidden: 16,
        layers: 2,
        dense_layers: 0,
        dense_hidden: 32,
        heads: 2,
        kv_heads: 1,
        head_dim: 8,
        norm_eps: moe_worker::model::config::NORM_EPS,
        qk_norm: None,
        seq_len,
        rope_theta: 100.0,
        moe: MoeConfig {
            hidden: 16,
            n_routed_experts: 8,
            expert_hidden: 8,
            n_shared_experts: 1,
            shared_expert_hidden: 8,
            top_k: 2,
            score_function: ScoreFunction::Sigmoid,
            group_limit: None,
            normalize_gates: true,
            routed_scaling_factor: 1.0,
            aux_loss_alpha: 0.01,
        },
        bias_update_rate: Some(0.01),
        gemm_precision: GemmPrecision::Fp32,
        head_precision: GemmPrecision::Fp32,
    }
}

/// A batch of two sequences of 16: one whole, one of 9 real tokens padded
/// as the data loader pads a short conversation (its last token repeated,
/// the targets ignored). Its loads are the sum of each sequence's alone
/// (the short one through a model of `seqLen` 9 with the same weights), its
/// balance loss their mean; counted as real, the padding changes both.
#[test]
fn padding_is_counted_in_neither_the_expert_loads_nor_the_balance_loss() {
    let model = Model::<f64>::initial(config(16), 3);
    let short = Model::<f64>::initial(config(9), 3);
    let values = |m: &Model<f64>| -> Vec<Vec<f64>> {
        m.tensors().iter().map(|t| t.values.to_vec()).collect()
    };
    assert_eq!(values(&model), values(&short), "the same weights");
    let mut rng = SplitMix64::new(4);
    let mut stream = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.below(32) as u32).collect() };
    let (long, conversation) = (stream(17), stream(10));
    let mut inputs = long[..16].to_vec();
    inputs.extend(&conversation[..9]);
    inputs.extend([conversation[9]; 7]);
    let mut targets = long[1..].to_vec();
    targets.extend(&conversation[1..]);
    targets.extend([IGNORED; 7]);
    let batch = Batch {
        seq_len: 16,
        inputs,
        targets,
        real: vec![16, 9],
        documents: None,
    };
    let pass = |real: Vec<usize>| {
        let batch = Batch {
            real,
            ..batch.clone()
        };
        let (memory, one) = (ActivationMemory::KeepAll, Parallel::default());
        model
            .forward_parallel(&batch, memory, one, LossScale::PassMean)
            .expect("one process")
    };
    let padded = pass(vec![16, 9]);
    let whole = model.forward(&long[..16], &long[1..]);
    let alone = short.forward(&conversation[..9], &conversation[1..]);

    let summed: Vec<Vec<usize>> = whole
        .expert_loads()
        .iter()
        .zip(alone.expert_loads())
        .map(|(w, a)| w.iter().zip(a).map(|(w, a)| w + a).collect())
        .collect();
    assert_eq!(padded.expert_loads(), summed);
    let mean = (whole.aux_loss + alone.aux_loss) / 2.0;
    assert!(
        (padded.aux_loss - mean).abs() <= 1e-12 * mean,
        "{} vs {mean}",
        padded.aux_loss
    );
    // The same trained targets, whatever counts as padding.
    let counted = pass(vec![16, 16]);
    assert_eq!(counted.cross_entropy, padded.cross_entropy);
    assert_ne!(counted.expert_loads(), padded.expert_loads());
    assert!(
        (counted.aux_loss - padded.aux_loss).abs() > 1e-3 * mean,
        "{} vs {}",
        counted.aux_loss,
        padded.aux_loss
    );
}

/// One sequence of 16 packing three conversations (7, 5 and 2 inputs, the
/// first two targets of each ignored, as a prompt's are) and 2 tokens of
/// padding: the loss, every gradient and the expert loads are those of the
/// three run alone (each through a model of its own length, the same
/// weights), weighted by their trained targets. Attending across the
/// documents (one causal sequence, RoPE from its start) the later
/// conversations would see the earlier ones: another loss.
#[test]
fn packed_conversations_train_as_each_would_alone() {
    // The balance loss is per sequence, not per document: off here.
    let mut config = config(16);
    config.moe.aux_loss_alpha = 0.0;
    let at_len = |len: usize| ModelConfig {
        seq_len: len,
        ..config.clone()
    };
    let model = Model::<f64>::initial(config.clone(), 5);
    let mut rng = SplitMix64::new(6);
    let conversations: Vec<(Vec<u32>, Vec<u32>)> = [7, 5, 2]
        .iter()
        .map(|&len| {
            let tokens: Vec<u32> = (0..=len).map(|_| rng.below(32) as u32).collect();
            let mut targets = tokens[1..].to_vec();
            targets[..2].fill(IGNORED);
            (tokens[..len].to_vec(), targets)
        })
        .collect();
    let mut batch = Batch {
        seq_len: 16,
        inputs: Vec::new(),
        targets: Vec::new(),
        real: vec![14],
        documents: Some(Vec::new()),
    };
    for (inputs, targets) in &conversations {
        let start = batch.inputs.len() as u32;
        batch.inputs.extend(inputs);
        batch.targets.extend(targets);
        batch
            .documents
            .as_mut()
            .unwrap()
            .extend(vec![start; inputs.len()]);
    }
    batch.inputs.extend([7, 7]);
    batch.targets.extend([IGNORED, IGNORED]);
    batch.documents.as_mut().unwrap().extend([14, 14]);
    let forward = |batch: &Batch| {
        let (memory, one) = (ActivationMemory::KeepAll, Parallel::default());
        model
            .forward_parallel(batch, memory, one, LossScale::PassMean)
            .expect("one process")
    };
    let packed = forward(&batch);
    let mut grads = Gradients::zeros(&config);
    model.backward(&packed, &mut grads);

    let trained: Vec<usize> = conversations
        .iter()
        .map(|(_, t)| t.iter().filter(|&&t| t != IGNORED).count())
        .collect();
    let all: usize = trained.iter().sum();
    let (mut loss, mut loads) = (0.0, vec![vec![0; 8]; 2]);
    let mut want = Gradients::<f64>::zeros(&config);
    for ((inputs, targets), &n) in conversations.iter().zip(&trained) {
        let alone = Model::<f64>::initial(at_len(inputs.len()), 5);
        let pass = alone.forward(inputs, targets);
        let mut g = Gradients::zeros(&config);
        alone.backward(&pass, &mut g);
        let share = n as f64 / all as f64;
        loss += pass.cross_entropy * share;
        for (w, g) in want.tensors_mut().into_iter().zip(g.tensors_mut()) {
            for (w, g) in w.iter_mut().zip(g.iter()) {
                *w += share * g;
            }
        }
        for (total, layer) in loads.iter_mut().zip(pass.expert_loads()) {
            for (t, l) in total.iter_mut().zip(layer) {
                *t += l;
            }
        }
    }
    assert!(
        (packed.cross_entropy - loss).abs() < 1e-12,
        "{} vs {loss}",
        packed.cross_entropy
    );
    assert_eq!(packed.expert_loads(), loads);
    for (got, w) in grads.tensors(&config).iter().zip(want.tensors(&config)) {
        let scale = w.values.iter().fold(1e-3f64, |m, x| m.max(x.abs()));
        for (a, b) in got.values.iter().zip(w.values) {
            assert!((a - b).abs() < 1e-10 * scale, "{}: {a} vs {b}", got.name);
        }
    }
    let unpacked = forward(&Batch {
        documents: None,
        ..batch.clone()
    });
    assert!(
        (unpacked.cross_entropy - packed.cross_entropy).abs() > 1e-6,
        "attending across documents changes the loss"
    );
}

/// Two conversations of 9 and 5 real tokens padded to sequences of 16, as
/// the data loader pads them, then cut to the longer one's 9
/// (`Batch::trim_padding`, what the trainer runs): the same loss, expert
/// loads and balance loss, and every gradient the same up to the order of
/// sums over tokens, from 18 tokens instead of 32.
#[test]
fn a_batch_cut_to_its_longest_sequence_trains_as_the_padded_one() {
    let config = config(16);
    let model = Model::<f64>::initial(config.clone(), 7);
    let mut rng = SplitMix64::new(8);
    let mut batch = Batch {
        seq_len: 16,
        inputs: Vec::new(),
        targets: Vec::new(),
        real: vec![9, 5],
        documents: None,
    };
    for real in [9, 5] {
        let tokens: Vec<u32> = (0..=real).map(|_| rng.below(32) as u32).collect();
        batch.inputs.extend(&tokens[..real]);
        batch.inputs.extend(vec![tokens[real - 1]; 16 - real]);
        let mut targets = tokens[1..].to_vec();
        targets[0] = IGNORED;
        batch.targets.extend(targets);
        batch.targets.extend(vec![IGNORED; 16 - real]);
    }
    let run = |batch: &Batch| {
        let (memory, one) = (ActivationMemory::KeepAll, Parallel::default());
        let pass = model
            .forward_parallel(batch, memory, one, LossScale::PassMean)
            .expect("one process");
        let mut grads = Gradients::zeros(&config);
        model.backward(&pass, &mut grads);
        (pass, grads)
    };
    let (padded, padded_grads) = run(&batch);
    let mut cut = batch.clone();
    cut.trim_padding();
    assert_eq!((cut.seq_len, cut.inputs.len()), (9, 18));
    assert_eq!(&cut.inputs[9..14], &batch.inputs[16..21]);
    let (trimmed, trimmed_grads) = run(&cut);
    assert!(
        (padded.cross_entropy - trimmed.cross_entropy).abs() < 1e-13,
        "{} vs {}",
        padded.cross_entropy,
        trimmed.cross_entropy
    );
    assert_eq!(padded.expert_loads(), trimmed.expert_loads());
    assert!((padded.aux_loss - trimmed.aux_loss).abs() < 1e-15);
    let tensors = padded_grads.tensors(&config);
    for (a, b) in tensors.iter().zip(trimmed_grads.tensors(&config)) {
        let scale = a.values.iter().fold(1e-3f64, |m, x| m.max(x.abs()));
        for (x, y) in a.values.iter().zip(b.values) {
            assert!((x - y).abs() <= 1e-12 * scale, "{}: {x} vs {y}", a.name);
        }
    }
    // To a whole number of 4 positions (what a GPU asks for): 12, the same loss.
    let mut to_4 = batch.clone();
    to_4.trim_padding_to(4);
    assert_eq!((to_4.seq_len, to_4.inputs.len()), (12, 24));
    let (rounded, _) = run(&to_4);
    assert!((padded.cross_entropy - rounded.cross_entropy).abs() < 1e-13);
    let mut to_32 = batch.clone();
    to_32.trim_padding_to(32);
    assert_eq!(to_32.seq_len, 16, "never beyond the sequences");
    // Nothing to cut when one sequence is whole.
    let mut whole = Batch {
        real: vec![16, 5],
        ..batch.clone()
    };
    whole.trim_padding();
    assert_eq!(whole.inputs, batch.inputs);
}

/// A step of conversations is drawn whole and grouped by length before it
/// is dealt out (`draw_step`): each micro-batch holds conversations of
/// about one length, longest first, so each is cut close to its own; and
/// the micro-batches are the same whatever the layout, one process's six
/// being two ranks' three each (every second one), the stream left at the
/// same place.
#[test]
fn a_steps_conversations_are_grouped_by_length_alike_on_every_layout() {
    use moe_worker::data::{Corpus, DataLoader};
    use moe_worker::settings::{OptimizerSettings, TrainingSettings};
    use moe_worker::train::{Shard, draw_step};
    // Twelve conversations of 3 to 14 tokens, in shuffled lengths.
    let lengths = [9, 3, 14, 5, 11, 7, 4, 13, 6, 10, 8, 12];
    let mut ranges = Vec::new();
    let mut start = 0;
    for len in lengths {
        ranges.push(start..start + len);
        start += len;
    }
    let tokens: Vec<u32> = (0..start as u32).map(|t| t % 32).collect();
    let trained = vec![true; start];
    let corpus = Corpus::with_conversations(tokens, trained, ranges);
    let loader = DataLoader::new(corpus, 16, 5, "test").unwrap();
    let settings = |micro_steps: usize| TrainingSettings {
        steps: 1,
        micro_batch: 2,
        micro_steps,
        optimizer: OptimizerSettings {
            learning_rate: 1e-3,
            min_learning_rate: 1e-4,
            warmup_steps: 0,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.95,
            epsilon: 1e-8,
            grad_clip: 1.0,
        },
        seed: 5,
        log_interval: 1,
        activation_memory: ActivationMemory::KeepAll,
        lora: None,
    };
    let mut one = loader.clone();
    let whole = draw_step(&mut one, &settings(6), Shard::WHOLE, None, None).unwrap();
    let reals: Vec<usize> = whole.batches.iter().flat_map(|b| b.real.clone()).collect();
    assert_eq!(reals.len(), 12);
    assert!(
        reals.windows(2).all(|w| w[0] >= w[1]),
        "longest first: {reals:?}"
    );
    for (rank, batches) in [0, 1].map(|rank| {
        let mut data = loader.clone();
        let shard = Shard { rank, ranks: 2 };
        let step = draw_step(&mut data, &settings(3), shard, None, None).unwrap();
        assert_eq!(
            data.position(),
            one.position(),
            "the stream at the same place"
        );
        (rank, step.batches)
    }) {
        let mine: Vec<&Batch> = whole.batches.iter().skip(rank).step_by(2).collect();
        assert_eq!(batches.iter().collect::<Vec<_>>(), mine, "rank {rank}");
    }
    // Cut, the step's twelve conversations fill about what they are.
    let cut: usize = whole
        .batches
        .into_iter()
        .map(|mut b| {
            b.trim_padding();
            b.inputs.len()
        })
        .sum();
    let real: usize = reals.iter().sum();
    assert!(cut <= real + 6, "{cut} tokens run for {real} real");

    // A trainer's step counts the FLOPs of the micro-batches as cut (what
    // MFU divides by the time), the tokens as drawn: here every
    // micro-batch's tokens at its own length, not the 16 it was drawn at.
    let mut trainer = moe_worker::train::Trainer::new(config(16), settings(6), loader.clone());
    let report = trainer.step(&|| false).expect("not stopped");
    let model_flops = moe_worker::model::flops::training_flops(&config(16));
    let mut data = loader.clone();
    let drawn = draw_step(&mut data, &settings(6), Shard::WHOLE, None, None).unwrap();
    let want: f64 = drawn
        .batches
        .into_iter()
        .map(|mut b| {
            b.trim_padding();
            b.inputs.len() as f64 * model_flops.per_token_at(b.seq_len)
        })
        .sum();
    assert_eq!(report.tokens, 12 * 16, "the tokens as drawn");
    assert!(
        (report.flops - want).abs() <= 1e-12 * want,
        "{} FLOPs counted, {want} run",
        report.flops
    );
    assert!(report.flops < 0.8 * report.tokens as f64 * model_flops.per_token);
}
