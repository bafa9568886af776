//! The layer in a rayon pool (`moe-worker train --threads`) against one
//! thread: the experts run side by side there, and every output and
//! gradient must keep its bits.

use moe_worker::moe::{GroupLimit, MoeParams, ScoreFunction};

use crate::{random, random_layer, small_config};

#[test]
fn a_pool_of_threads_gives_the_bits_of_one() {
    let mut config = small_config(
        ScoreFunction::Sigmoid,
        Some(GroupLimit {
            n_groups: 4,
            top_groups: 2,
        }),
    );
    config.aux_loss_alpha = 0.01;
    let layer = random_layer(&config, 21, 0.5);
    // 40 tokens over 8 experts: uneven loads, some experts maybe empty.
    let (tokens, seq_len) = (40, 8);
    let x = random(tokens * config.hidden, 22);
    let dout = random(tokens * config.hidden, 23);
    let pass_and_grads = || {
        let pass = layer.forward(&x, seq_len);
        let mut dx = random(x.len(), 24);
        let mut grads = MoeParams::zeros(&config);
        layer.backward(&pass, &x, &dout, &mut dx, &mut grads);
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        [
            bits(&pass.output),
            bits(&[pass.aux_loss]),
            bits(&dx),
            bits(&grads.router),
            bits(&grads.experts_w1),
            bits(&grads.experts_w3),
            bits(&grads.experts_w2),
            bits(&grads.shared_w1),
        ]
    };
    let one = pass_and_grads();
    assert!(
        one[4].iter().any(|&b| b != 0),
        "the routed experts got gradients"
    );
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .expect("a pool of three");
    let pooled = pool.install(pass_and_grads);
    let names = [
        "output",
        "aux loss",
        "dx",
        "router",
        "w1",
        "w3",
        "w2",
        "shared w1",
    ];
    for ((name, pooled), one) in names.iter().zip(&pooled).zip(&one) {
        assert!(pooled == one, "{name} differs between 3 threads and 1");
    }
}
