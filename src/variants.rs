//! A campaign's variants: which one a new dialog gets, and how they
//! compare.
//!
//! Allocation:
//! - `fixed`: at random, in proportion to the variants' weights.
//! - `bandit`: Thompson sampling on the campaign's goal. Each variant's
//!   success rate has a Beta(1 + successes, 1 + failures) posterior (a
//!   uniform prior updated with its dialogs); a new dialog goes to the
//!   variant whose posterior draw is highest, so a variant gets new dialogs
//!   in proportion to the chance that it is the best. With probability
//!   `floor × variants` a variant is instead taken uniformly, so every
//!   variant keeps at least `floor` of new dialogs and a slow start is
//!   never final.
//!
//! Comparison: rates with Wilson 95% intervals, and the probability that
//! each variant is best, estimated by drawing from the same posteriors
//! ([`probability_best`]; Monte Carlo, 20,000 draws, fixed seed, so the
//! figure does not flicker between views).
//!
//! Everything random here takes the RNG it is given: under the host's seed
//! the choices repeat.

use rand::{Rng, SeedableRng};
use rand_distr::{Beta, Distribution};

use crate::config::{AllocationMethod, Campaign};

/// A variant's dialogs so far, for allocation: how many count as trials
/// and how many reached the goal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub trials: u64,
    pub successes: u64,
}

/// The index (in `camp.variants`) of the variant a new dialog gets;
/// `tallies` is in the same order. `None` when the campaign has none.
pub fn choose(camp: &Campaign, tallies: &[Tally], rng: &mut impl Rng) -> Option<usize> {
    let n = camp.variants.len();
    if n == 0 {
        return None;
    }
    debug_assert_eq!(tallies.len(), n, "one tally per variant");
    match camp.allocation.method {
        AllocationMethod::Fixed => {
            let weights: Vec<f64> = camp.variants.iter().map(|v| v.weight).collect();
            Some(by_weight(&weights, rng))
        }
        AllocationMethod::Bandit => {
            let explore = (camp.allocation.floor * n as f64).min(1.0);
            if rng.random::<f64>() < explore {
                return Some(rng.random_range(0..n));
            }
            let draws = tallies.iter().map(|t| draw(*t, rng));
            Some(argmax(draws))
        }
    }
}

fn by_weight(weights: &[f64], rng: &mut impl Rng) -> usize {
    let total: f64 = weights.iter().sum();
    let mut x = rng.random::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if x < *w {
            return i;
        }
        x -= w;
    }
    weights.len() - 1
}

/// One draw from a tally's Beta posterior.
fn draw(t: Tally, rng: &mut impl Rng) -> f64 {
    let failures = t.trials.saturating_sub(t.successes);
    // Both parameters are at least 1: the distribution always exists.
    Beta::new(1.0 + t.successes as f64, 1.0 + failures as f64)
        .map(|b| b.sample(rng))
        .unwrap_or(0.5)
}

fn argmax(values: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::MIN);
    for (i, v) in values.enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0
}

/// Draws [`probability_best`] takes.
pub const DRAWS: usize = 20_000;

/// The probability that each variant has the highest true rate, given
/// the tallies: the share of [`DRAWS`] joint posterior draws it wins.
pub fn probability_best(tallies: &[Tally]) -> Vec<f64> {
    let mut wins = vec![0usize; tallies.len()];
    if tallies.is_empty() {
        return Vec::new();
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x5eed);
    for _ in 0..DRAWS {
        let i = argmax(tallies.iter().map(|t| draw(*t, &mut rng)));
        wins[i] += 1;
    }
    wins.iter().map(|w| *w as f64 / DRAWS as f64).collect()
}

/// The Wilson score interval at 95% for `successes` of `trials`; (0, 1)
/// with no trials.
pub fn wilson(successes: u64, trials: u64) -> (f64, f64) {
    if trials == 0 {
        return (0.0, 1.0);
    }
    let z = 1.959_964;
    let n = trials as f64;
    let p = successes as f64 / n;
    let centre = p + z * z / (2.0 * n);
    let spread = z * ((p * (1.0 - p) + z * z / (4.0 * n)) / n).sqrt();
    let d = 1.0 + z * z / n;
    (
        ((centre - spread) / d).max(0.0),
        ((centre + spread) / d).min(1.0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Allocation, Goal, Variant};
    use rand_chacha::ChaCha8Rng;

    fn campaign(method: AllocationMethod, weights: &[f64], floor: f64) -> Campaign {
        let text = "name = \"c\"\nengine = \"e\"\naudiences = [\"a\"]\naccounts = [\"x\"]\n";
        let mut c: Campaign = toml::from_str(text).unwrap();
        c.variants = weights
            .iter()
            .enumerate()
            .map(|(i, w)| Variant {
                name: format!("v{i}"),
                engine: None,
                prompt_template: None,
                weight: *w,
            })
            .collect();
        c.allocation = Allocation {
            method,
            goal: Goal::Reply,
            floor,
        };
        c
    }

    fn shares(c: &Campaign, tallies: &[Tally], seed: u64) -> Vec<usize> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut n = vec![0; c.variants.len()];
        for _ in 0..10_000 {
            n[choose(c, tallies, &mut rng).unwrap()] += 1;
        }
        n
    }

    #[test]
    fn fixed_follows_the_weights() {
        let c = campaign(AllocationMethod::Fixed, &[1.0, 3.0], 0.0);
        let n = shares(&c, &[Tally::default(); 2], 1);
        assert!((2_300..2_700).contains(&n[0]), "{n:?}");
    }

    #[test]
    fn bandit_favours_the_better_variant_and_keeps_the_floor() {
        let c = campaign(AllocationMethod::Bandit, &[1.0, 1.0, 1.0], 0.05);
        let t = |s| Tally {
            trials: 200,
            successes: s,
        };
        let n = shares(&c, &[t(20), t(40), t(22)], 2);
        assert!(n[1] > 8_000, "{n:?}");
        assert!(n[0] >= 450 && n[2] >= 450, "floor of 5% each: {n:?}");
        // The same seed, the same choices.
        assert_eq!(n, shares(&c, &[t(20), t(40), t(22)], 2));
    }

    #[test]
    fn bandit_without_data_spreads_evenly() {
        let c = campaign(AllocationMethod::Bandit, &[1.0, 1.0], 0.0);
        let n = shares(&c, &[Tally::default(); 2], 3);
        assert!((4_700..5_300).contains(&n[0]), "{n:?}");
    }

    #[test]
    fn probability_best_and_intervals() {
        let p = probability_best(&[
            Tally {
                trials: 500,
                successes: 50,
            },
            Tally {
                trials: 500,
                successes: 100,
            },
        ]);
        assert!(p[1] > 0.99, "{p:?}");
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        let (lo, hi) = wilson(50, 500);
        assert!(
            (lo - 0.0766).abs() < 0.001 && (hi - 0.1294).abs() < 0.001,
            "{lo} {hi}"
        );
        assert_eq!(wilson(0, 0), (0.0, 1.0));
    }
}
