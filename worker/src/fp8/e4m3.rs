//! The E4M3 format of FP8 training ("E4M3FN" in the OCP FP8 spec, CUDA's
//! `__nv_fp8_e4m3`): 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits,
//! no infinities, NaN only at `S.1111.111` (0x7F, 0xFF).
//!
//! - normal codes (exponent field 1..=15): `2^(e-7) × (1 + m/8)`, from 2^-6
//!   up to 448 (`0.1111.110`);
//! - subnormal codes (exponent field 0): `m × 2^-9`, so the smallest
//!   non-zero magnitude is 2^-9 and the step below 2^-6 is a uniform 2^-9.
//!
//! [`encode`] rounds to nearest, ties to even, and saturates everything at or
//! beyond ±448 (infinities included) to ±448, as the saturating conversions
//! of FP8 training do (`__nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3)`):
//! a scale that is slightly stale must clip, not produce NaN.

/// The largest finite magnitude.
pub const MAX: f32 = 448.0;

/// The positive NaN code; 0xFF is the negative one.
pub const NAN: u8 = 0x7F;

/// The code of +448 (0xFE is -448).
const MAX_CODE: u8 = 0x7E;

/// Mantissa bits.
const MANTISSA_BITS: i32 = 3;

/// The smallest normal magnitude, 2^-6; below it codes are multiples of 2^-9.
const MIN_NORMAL: f32 = 1.0 / 64.0;

/// Subnormal codes are multiples of 2^-9.
const SUBNORMAL_STEP_INVERSE: f32 = 512.0;

/// `2^exponent` for `exponent` in f32's normal range, built from its bits so
/// it is exact (multiplying by it only moves the binary point).
fn power_of_two(exponent: i32) -> f32 {
    debug_assert!((-126..=127).contains(&exponent));
    f32::from_bits(((exponent + 127) as u32) << 23)
}

/// `x` rounded to the nearest E4M3 value (ties to even), saturated to ±448.
/// NaN becomes NaN with `x`'s sign bit; -0.0 stays -0.0.
pub fn encode(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    if x.is_nan() {
        return sign | NAN;
    }
    let magnitude = x.abs();
    if magnitude >= MAX {
        return sign | MAX_CODE;
    }
    let code = if magnitude < MIN_NORMAL {
        // Subnormal: the code is the number of 2^-9 steps; rounding up to 8
        // steps gives 0x08, which is exactly the smallest normal code.
        (magnitude * SUBNORMAL_STEP_INVERSE).round_ties_even() as u8
    } else {
        // Normal: scale so the mantissa's 3 bits are the integer part. The
        // f32 `magnitude` is normal here (>= 2^-6), so its exponent field is
        // floor(log2 magnitude), in -6..=8.
        let exponent = ((magnitude.to_bits() >> 23) as i32) - 127;
        let steps = (magnitude * power_of_two(MANTISSA_BITS - exponent)).round_ties_even() as u8;
        // `steps` is 8..=16; 16 carries into the next exponent, which the
        // addition does by itself. It never reaches the NaN code: below 448
        // the top binade rounds to at most 14 steps (448).
        (((exponent + 7) as u8) << 3) + (steps - 8)
    };
    sign | code
}

/// The value of an E4M3 code; NaN for 0x7F and 0xFF.
pub fn decode(code: u8) -> f32 {
    let exponent = i32::from((code >> 3) & 0x0F);
    let mantissa = i32::from(code & 0x07);
    if exponent == 0x0F && mantissa == 0x07 {
        return if code & 0x80 == 0 {
            f32::NAN
        } else {
            -f32::NAN
        };
    }
    let magnitude = if exponent == 0 {
        mantissa as f32 / SUBNORMAL_STEP_INVERSE
    } else {
        (8 + mantissa) as f32 * power_of_two(exponent - 7 - MANTISSA_BITS)
    };
    if code & 0x80 == 0 {
        magnitude
    } else {
        -magnitude
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of `code` from the format's definition, in f64, independent
    /// of [`decode`]'s bit tricks.
    fn reference_value(code: u8) -> f64 {
        let sign = if code & 0x80 == 0 { 1.0 } else { -1.0 };
        let e = i32::from((code >> 3) & 0x0F);
        let m = f64::from(code & 0x07);
        if e == 0 {
            sign * m / 8.0 * 2f64.powi(-6)
        } else {
            sign * (1.0 + m / 8.0) * 2f64.powi(e - 7)
        }
    }

    fn is_nan_code(code: u8) -> bool {
        code & 0x7F == NAN
    }

    /// The nearest finite code to `x` by brute force over every code, ties
    /// to the even code (the one with a clear mantissa LSB), saturating.
    fn nearest_code(x: f32) -> u8 {
        let x = f64::from(x);
        let mut best: Option<(f64, u8)> = None;
        for code in (0..=255u8).filter(|&c| !is_nan_code(c)) {
            // Only codes of x's sign (zero of either sign is tried by both).
            if (code & 0x80 != 0) != (x.is_sign_negative()) {
                continue;
            }
            let distance = (reference_value(code) - x).abs();
            best = match best {
                Some((d, c)) if d < distance || (d == distance && c & 1 == 0) => Some((d, c)),
                _ => Some((distance, code)),
            };
        }
        best.map(|(_, c)| c).unwrap_or(0)
    }

    #[test]
    fn every_code_decodes_to_its_definition_and_encodes_back() {
        for code in 0..=255u8 {
            let value = decode(code);
            if is_nan_code(code) {
                assert!(value.is_nan(), "{code:#04x}");
                assert_eq!(encode(value), code, "NaN keeps its sign");
                continue;
            }
            assert_eq!(f64::from(value), reference_value(code), "{code:#04x}");
            assert_eq!(encode(value), code, "{code:#04x} = {value}");
            assert_eq!(value.is_sign_negative(), code & 0x80 != 0, "{code:#04x}");
        }
    }

    #[test]
    fn positive_codes_are_strictly_increasing_up_to_448() {
        let values: Vec<f32> = (0..=MAX_CODE).map(decode).collect();
        assert!(values.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(values.last(), Some(&448.0));
        assert_eq!(decode(0x01), 2f32.powi(-9), "smallest subnormal");
        assert_eq!(decode(0x08), 2f32.powi(-6), "smallest normal");
        assert_eq!(decode(0x38), 1.0);
    }

    /// Every midpoint between neighbouring codes, one f32 ulp either side,
    /// and the codes themselves, against brute-force nearest-even rounding.
    #[test]
    fn encoding_is_round_to_nearest_even_around_every_midpoint() {
        let mut checked = 0;
        for code in 0..MAX_CODE {
            let (low, high) = (decode(code), decode(code + 1));
            let mid = (low + high) / 2.0; // exact: both have at most 4 significant bits
            for x in [low, mid, mid.next_down(), mid.next_up(), high.next_down()] {
                for signed in [x, -x] {
                    assert_eq!(encode(signed), nearest_code(signed), "x = {signed:e}");
                    checked += 1;
                }
            }
        }
        assert!(checked > 1000);
    }

    #[test]
    fn ties_go_to_the_even_mantissa() {
        // Halfway between 1 (0x38) and 1.125 (0x39): down to 1.
        assert_eq!(encode(1.0625), 0x38);
        // Halfway between 1.125 (0x39) and 1.25 (0x3A): up to 1.25.
        assert_eq!(encode(1.1875), 0x3A);
        // Halfway between 1.875 (0x3F) and 2 (0x40): up, across the binade.
        assert_eq!(encode(1.9375), 0x40);
        // Halfway between 416 (0x7D) and 448 (0x7E): up to 448.
        assert_eq!(encode(432.0), 0x7E);
        // Halfway between 384 (0x7C) and 416 (0x7D): down to 384.
        assert_eq!(encode(400.0), 0x7C);
        assert_eq!(encode(-1.0625), 0xB8);
    }

    #[test]
    fn out_of_range_values_saturate_to_448() {
        for x in [448.0, 449.0, 464.0, 480.0, 1e6, f32::MAX, f32::INFINITY] {
            assert_eq!(decode(encode(x)), 448.0, "{x}");
            assert_eq!(decode(encode(-x)), -448.0, "{x}");
        }
        assert_eq!(encode(447.9), 0x7E);
    }

    #[test]
    fn subnormals_are_exact_multiples_of_two_to_the_minus_nine() {
        let step = 2f32.powi(-9);
        assert_eq!(encode(step), 0x01);
        for m in 0..8u8 {
            assert_eq!(decode(encode(f32::from(m) * step)), f32::from(m) * step);
        }
        // Halfway between 0 and 2^-9: ties to 0 (even); just above: 2^-9.
        assert_eq!(encode(step / 2.0), 0x00);
        assert_eq!(encode((step / 2.0).next_up()), 0x01);
        assert_eq!(encode(-(step / 2.0)), 0x80, "negative zero");
        // Halfway between 1 and 2 steps: 2 (even); between 2 and 3: 2.
        assert_eq!(encode(1.5 * step), 0x02);
        assert_eq!(encode(2.5 * step), 0x02);
        assert_eq!(encode(3.5 * step), 0x04);
        // Halfway between 7 steps and the smallest normal (8 steps): normal.
        assert_eq!(encode(7.5 * step), 0x08);
        // Far below half a step: zero.
        assert_eq!(encode(1e-30), 0x00);
        assert_eq!(encode(f32::from_bits(1)), 0x00, "f32 subnormal input");
    }

    #[test]
    fn nan_encodes_to_nan_and_keeps_its_sign() {
        assert_eq!(encode(f32::NAN), NAN);
        assert_eq!(encode(-f32::NAN), 0xFF);
        assert!(decode(NAN).is_nan() && decode(0xFF).is_nan());
        assert_eq!(encode(0.0), 0x00);
        assert_eq!(encode(-0.0), 0x80);
    }
}
