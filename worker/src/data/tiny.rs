//! The built-in `tiny` corpus: simple English generated from a small fixed
//! grammar and a fixed set of facts, so it ships as code rather than as a
//! data file and is identical on every machine.
//!
//! It is learnable at three levels a small model picks up in turn: spelling
//! (a few dozen words), sentence templates, and facts that never change
//! (each animal's colour, food and home; each person's pet; where each thing
//! is kept; sums of small numbers; counting order). That structure is what
//! lets training drive the loss well below the corpus's unigram entropy.

use crate::rng::SplitMix64;

/// About 200 KB: large enough that a few hundred steps of a few thousand
/// tokens rarely see the same window twice, small enough to build instantly.
const TARGET_BYTES: usize = 200_000;
/// The corpus is fixed; this seed is not the training seed.
const SEED: u64 = 0x7117_C0A9;

/// (animal, colour, food, home).
const ANIMALS: [(&str, &str, &str, &str); 8] = [
    ("cat", "black", "fish", "kitchen"),
    ("dog", "brown", "bones", "garden"),
    ("fox", "red", "berries", "forest"),
    ("owl", "grey", "mice", "barn"),
    ("hen", "white", "seeds", "yard"),
    ("frog", "green", "flies", "pond"),
    ("bear", "dark", "honey", "cave"),
    ("duck", "yellow", "bread", "river"),
];
/// Person `i` owns animal `i`.
const NAMES: [&str; 8] = [
    "anna", "ben", "clara", "david", "emma", "felix", "grace", "henry",
];
/// (thing, where it is kept).
const THINGS: [(&str, &str); 8] = [
    ("key", "drawer"),
    ("book", "shelf"),
    ("cup", "cupboard"),
    ("hat", "hall"),
    ("ball", "box"),
    ("lamp", "desk"),
    ("coat", "closet"),
    ("map", "bag"),
];
const NUMBERS: [&str; 21] = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
    "twenty",
];

/// The corpus text.
pub fn corpus() -> Vec<u8> {
    let mut rng = SplitMix64::new(SEED);
    let mut text = String::with_capacity(TARGET_BYTES + 200);
    while text.len() < TARGET_BYTES {
        for _ in 0..4 + rng.below(4) {
            text.push_str(&sentence(&mut rng));
            text.push(' ');
        }
        text.pop();
        text.push('\n');
    }
    text.into_bytes()
}

fn sentence(rng: &mut SplitMix64) -> String {
    let mut pick = |n: usize| rng.below(n);
    match pick(6) {
        0 => {
            let (animal, colour, food, home) = ANIMALS[pick(ANIMALS.len())];
            format!("the {colour} {animal} eats {food} in the {home}.")
        }
        1 => {
            let i = pick(NAMES.len());
            let (animal, colour, _, home) = ANIMALS[i];
            format!(
                "{} has a {animal}. the {animal} is {colour} and lives in the {home}.",
                NAMES[i]
            )
        }
        2 => {
            let (a, b) = (pick(11), pick(11));
            format!("{} plus {} is {}.", NUMBERS[a], NUMBERS[b], NUMBERS[a + b])
        }
        3 => {
            let start = pick(NUMBERS.len() - 4);
            let run = NUMBERS[start..start + 4].join(", ");
            format!("count with me: {run}.")
        }
        4 => {
            let (asker, answerer) = (NAMES[pick(NAMES.len())], NAMES[pick(NAMES.len())]);
            let (thing, place) = THINGS[pick(THINGS.len())];
            format!(
                "{asker} asks {answerer}: where is the {thing}? {answerer} says: the {thing} is in the {place}."
            )
        }
        _ => {
            let i = pick(NAMES.len());
            let (thing, place) = THINGS[pick(THINGS.len())];
            let (animal, ..) = ANIMALS[i];
            format!(
                "{} puts the {thing} in the {place}, and the {animal} watches.",
                NAMES[i]
            )
        }
    }
}
