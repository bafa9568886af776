//! The grouped-by-expert dispatch against a naive per-token loop, and the
//! f32 path against the f64 one.

use moe_worker::moe::{GroupLimit, MoeConfig, MoeLayer, MoeParams, ScoreFunction};

use crate::{dot, random, random_layer, small_config};

/// Every token through its experts one at a time, no grouping, no scatter.
fn naive_forward(layer: &MoeLayer<f64>, x: &[f64]) -> Vec<f64> {
    let config = layer.config();
    let (hidden, k) = (config.hidden, config.top_k);
    let mut output = vec![0.0; x.len()];
    for (t, (x_row, out_row)) in x
        .chunks_exact(hidden)
        .zip(output.chunks_exact_mut(hidden))
        .enumerate()
    {
        let logits: Vec<f64> = layer
            .params
            .router
            .chunks_exact(hidden)
            .map(|w| dot(w, x_row))
            .collect();
        let routing = moe_worker::moe::routing::route(config, &logits, &layer.selection_bias);
        assert_eq!(routing.tokens(), 1);
        for (&e, &gate) in routing.experts.iter().zip(&routing.gates) {
            let mut y = vec![0.0; hidden];
            layer.params.expert(config, e).forward(&mut y, x_row);
            for (o, v) in out_row.iter_mut().zip(y) {
                *o += gate * v;
            }
        }
        if let Some(shared) = layer.params.shared(config) {
            let mut y = vec![0.0; hidden];
            shared.forward(&mut y, x_row);
            for (o, v) in out_row.iter_mut().zip(y) {
                *o += v;
            }
        }
        assert_eq!(routing.experts.len(), k, "token {t}");
    }
    output
}

#[test]
fn dispatch_equals_a_naive_per_token_loop() {
    let configs = [
        small_config(ScoreFunction::Softmax, None),
        MoeConfig {
            normalize_gates: true,
            routed_scaling_factor: 2.5,
            ..small_config(
                ScoreFunction::Sigmoid,
                Some(GroupLimit {
                    n_groups: 4,
                    top_groups: 2,
                }),
            )
        },
        MoeConfig {
            n_shared_experts: 0,
            top_k: 3,
            ..small_config(ScoreFunction::Softmax, None)
        },
    ];
    for (i, config) in configs.into_iter().enumerate() {
        let mut layer = random_layer(&config, 600 + i as u64, 0.5);
        layer.selection_bias = random(config.n_routed_experts, 610 + i as u64);
        let tokens = 40;
        let x = random(tokens * config.hidden, 620 + i as u64);
        let pass = layer.forward(&x, tokens);
        // Every token reached all k experts (dropless), and the load counts them.
        assert_eq!(
            pass.expert_load().iter().sum::<usize>(),
            tokens * config.top_k
        );
        assert_eq!(pass.expert_load(), pass.routing.expert_load());
        let reference = naive_forward(&layer, &x);
        // Only the order of the per-token sums differs: f64 rounding, ~1e-16 relative.
        for (got, want) in pass.output.iter().zip(&reference) {
            assert!((got - want).abs() < 1e-12, "config {i}: {got} vs {want}");
        }
    }
}

/// The f32 instantiation (the training path) tracks the f64 one to f32 precision.
#[test]
fn f32_forward_and_backward_track_f64() {
    let config = MoeConfig {
        aux_loss_alpha: 0.1,
        ..small_config(
            ScoreFunction::Sigmoid,
            Some(GroupLimit {
                n_groups: 4,
                top_groups: 2,
            }),
        )
    };
    let layer64 = random_layer(&config, 700, 0.5);
    let narrow = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
    let p = &layer64.params;
    let params32 = MoeParams {
        experts: p.experts.clone(),
        router: narrow(&p.router),
        experts_w1: narrow(&p.experts_w1),
        experts_w3: narrow(&p.experts_w3),
        experts_w2: narrow(&p.experts_w2),
        shared_w1: narrow(&p.shared_w1),
        shared_w3: narrow(&p.shared_w3),
        shared_w2: narrow(&p.shared_w2),
    };
    let layer32 = MoeLayer::new(config.clone(), params32).expect("valid");
    let tokens = 16;
    // Round the f64 input through f32 so both layers see the same values.
    let x32 = narrow(&random(tokens * config.hidden, 701));
    let x64: Vec<f64> = x32.iter().map(|&v| v.into()).collect();
    let dout64 = random(x64.len(), 702);
    let dout32 = narrow(&dout64);

    let pass64 = layer64.forward(&x64, 8);
    let pass32 = layer32.forward(&x32, 8);
    assert_eq!(pass32.routing.experts, pass64.routing.experts);
    let (mut dx64, mut g64) = (vec![0.0; x64.len()], MoeParams::zeros(&config));
    let (mut dx32, mut g32) = (vec![0.0f32; x32.len()], MoeParams::zeros(&config));
    layer64.backward(&pass64, &x64, &dout64, &mut dx64, &mut g64);
    layer32.backward(&pass32, &x32, &dout32, &mut dx32, &mut g32);

    // f32 carries ~7 digits; a few roundings per value through O(10)-term sums
    // leave ~1e-6 relative, so 1e-4 (on a floor of 1e-2) is well clear of both
    // that noise and of any real divergence between the two instantiations.
    let compare = |name: &str, a: &[f32], b: &[f64]| {
        let wide: Vec<f64> = a.iter().map(|&v| v.into()).collect();
        let error = moe_worker::gradcheck::max_scaled_error(&wide, b, 1e-2);
        assert!(error < 1e-4, "{name}: {error:e}");
    };
    compare("output", &pass32.output, &pass64.output);
    compare("aux_loss", &[pass32.aux_loss], &[pass64.aux_loss]);
    compare("dx", &dx32, &dx64);
    compare("router", &g32.router, &g64.router);
    compare("experts_w2", &g32.experts_w2, &g64.experts_w2);
    compare("shared_w1", &g32.shared_w1, &g64.shared_w1);
}
