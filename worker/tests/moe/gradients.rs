//! The whole layer's backward against central differences in f64.

use moe_worker::gradcheck::{STEP, max_scaled_error, numeric_gradient};
use moe_worker::moe::{GroupLimit, MoeConfig, MoeLayer, MoeParams, ScoreFunction};

use crate::{dot, random, random_layer, small_config};

/// Worst scaled error tolerated. Central differences with step h = 1e-5 carry
/// a rounding error of about `f64::EPSILON * |loss| / h` ≈ 2e-11 |loss| per
/// entry, i.e. up to ~1e-7 after dividing by [`FLOOR`] for these losses of
/// order 10-50; the truncation error is of the same size (h = 1e-4 and 1e-6
/// are both worse). Measured worst case over these tests: 7e-8. A wrong or
/// missing term in any backward shows up at 1e-3 or more.
const TOLERANCE: f64 = 1e-6;
/// Gradients here are of order 0.01-1; below the floor errors count as absolute.
const FLOOR: f64 = 1e-2;
const TOKENS: usize = 6;
const SEQ_LEN: usize = 3;

/// `loss = sum(output * r) + aux_loss` for a fixed random `r`, checked for
/// every parameter tensor and the input. The finite differences move each
/// value by only 1e-5, and every evaluation asserts the top-k choice did not
/// change, so the loss is smooth where it is sampled.
fn check_layer(config: MoeConfig, seed: u64) {
    let layer = random_layer(&config, seed, 0.5);
    let hidden = config.hidden;
    let x = random(TOKENS * hidden, seed + 1);
    let r = random(TOKENS * hidden, seed + 2);
    let pass = layer.forward(&x, SEQ_LEN);
    let selection = pass.routing.experts.clone();
    if config.aux_loss_alpha > 0.0 {
        assert!(pass.aux_loss > 0.0);
    }

    let mut dx = vec![0.0; x.len()];
    let mut grads = MoeParams::zeros(&config);
    layer.backward(&pass, &x, &r, &mut dx, &mut grads);

    let loss = |layer: &MoeLayer<f64>, x: &[f64]| {
        let pass = layer.forward(x, SEQ_LEN);
        assert_eq!(
            pass.routing.experts, selection,
            "a finite-difference step changed the top-k choice"
        );
        dot(&pass.output, &r) + pass.aux_loss
    };
    let with_params = |change: &dyn Fn(&mut MoeParams<f64>, &[f64]), values: &[f64]| {
        let mut moved = layer.clone();
        change(&mut moved.params, values);
        loss(&moved, &x)
    };
    type Tensor = fn(&MoeParams<f64>) -> &Vec<f64>;
    type Setter = fn(&mut MoeParams<f64>, &[f64]);
    let tensors: [(&str, Tensor, Setter); 7] = [
        ("router", |p| &p.router, |p, v| p.router = v.to_vec()),
        (
            "experts_w1",
            |p| &p.experts_w1,
            |p, v| p.experts_w1 = v.to_vec(),
        ),
        (
            "experts_w3",
            |p| &p.experts_w3,
            |p, v| p.experts_w3 = v.to_vec(),
        ),
        (
            "experts_w2",
            |p| &p.experts_w2,
            |p, v| p.experts_w2 = v.to_vec(),
        ),
        (
            "shared_w1",
            |p| &p.shared_w1,
            |p, v| p.shared_w1 = v.to_vec(),
        ),
        (
            "shared_w3",
            |p| &p.shared_w3,
            |p, v| p.shared_w3 = v.to_vec(),
        ),
        (
            "shared_w2",
            |p| &p.shared_w2,
            |p, v| p.shared_w2 = v.to_vec(),
        ),
    ];
    for (name, tensor, set) in tensors {
        let numeric = numeric_gradient(tensor(&layer.params), STEP, |v| with_params(&set, v));
        assert_close(name, tensor(&grads), &numeric);
    }
    let numeric = numeric_gradient(&x, STEP, |v| loss(&layer, v));
    assert_close("x", &dx, &numeric);
}

fn assert_close(name: &str, analytic: &[f64], numeric: &[f64]) {
    // A tensor whose gradient is identically zero would make the check vacuous.
    assert!(
        numeric.iter().any(|g| g.abs() > FLOOR),
        "{name}: gradient is ~0 everywhere"
    );
    let error = max_scaled_error(analytic, numeric, FLOOR);
    assert!(error < TOLERANCE, "{name}: scaled error {error:e}");
}

#[test]
fn softmax_routing_without_groups() {
    check_layer(small_config(ScoreFunction::Softmax, None), 100);
}

#[test]
fn softmax_routing_normalised_and_scaled_with_groups() {
    let config = MoeConfig {
        normalize_gates: true,
        routed_scaling_factor: 2.5,
        ..small_config(
            ScoreFunction::Softmax,
            Some(GroupLimit {
                n_groups: 4,
                top_groups: 2,
            }),
        )
    };
    check_layer(config, 200);
}

#[test]
fn sigmoid_routing_with_groups_and_balance_loss() {
    let config = MoeConfig {
        routed_scaling_factor: 2.5,
        aux_loss_alpha: 0.1,
        ..small_config(
            ScoreFunction::Sigmoid,
            Some(GroupLimit {
                n_groups: 2,
                top_groups: 1,
            }),
        )
    };
    check_layer(config, 300);
}

#[test]
fn softmax_routing_with_balance_loss_and_four_experts() {
    let config = MoeConfig {
        n_routed_experts: 4,
        aux_loss_alpha: 0.1,
        ..small_config(ScoreFunction::Softmax, None)
    };
    check_layer(config, 400);
}

/// With the downstream gradient zero, the router gradient is the balance
/// loss's alone: checks that term is not hidden by the much larger output term.
#[test]
fn balance_loss_gradient_alone() {
    for score_function in [ScoreFunction::Softmax, ScoreFunction::Sigmoid] {
        let config = MoeConfig {
            aux_loss_alpha: 0.5,
            ..small_config(score_function, None)
        };
        let layer = random_layer(&config, 500, 0.5);
        let x = random(TOKENS * config.hidden, 501);
        let pass = layer.forward(&x, SEQ_LEN);
        let mut dx = vec![0.0; x.len()];
        let mut grads = MoeParams::zeros(&config);
        layer.backward(&pass, &x, &vec![0.0; x.len()], &mut dx, &mut grads);
        let numeric = numeric_gradient(&layer.params.router, STEP, |v| {
            let mut moved = layer.clone();
            moved.params.router = v.to_vec();
            moved.forward(&x, SEQ_LEN).aux_loss
        });
        // The balance loss is small (alpha times an O(1) sum), so is its gradient.
        let error = max_scaled_error(&grads.router, &numeric, 1e-3);
        assert!(
            numeric.iter().any(|g| g.abs() > 1e-3),
            "{score_function:?}: balance gradient ~0"
        );
        assert!(
            error < TOLERANCE,
            "{score_function:?}: scaled error {error:e}"
        );
        assert!(grads.experts_w1.iter().all(|&g| g == 0.0));
    }
}
