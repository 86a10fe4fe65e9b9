//! Choosing one option per slot under a bit budget so the summed error is least — the multiple-choice knapsack
//! behind error-aware mixes (a quantization type per tensor, a bit width per EXL2 slot).
//!
//! Two exact-in-the-limit methods, the better result kept: the Lagrangian one — each slot's options reduced
//! to the lower convex hull of (bits, error); from every slot's cheapest hull point, upgrades along the hulls
//! taken in order of error saved per bit while they fit (each prefix is optimal for the budget it spends) —
//! and dynamic programming over the budget cut into 65536 units (each option's cost rounded *up*, so every
//! answer fits; the optimum up to one unit per slot). Whatever budget is left is then filled by the best
//! single-slot changes among all options until none helps. A 32-layer model's 224 slots × 12 types take a few
//! milliseconds.

use crate::{Error, Result};

/// What an error-aware mix must fit (a GGUF auto mix, an EXL2 choice).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum MixBudget {
    /// Bits per weight over every parameter (tensor data bits / parameters, as the quantize report counts).
    Bpw(f64),
    /// The whole file, in bytes.
    FileBytes(u64),
    /// What llama.cpp holds in memory: the weights plus an f16 KV cache of `ctx` tokens (keys and values of
    /// every layer), in bytes.
    Memory { bytes: u64, ctx: u64 },
}

impl MixBudget {
    /// `"4.50bpw"`, `"95MB"`.
    pub fn label(&self) -> String {
        match self {
            MixBudget::Bpw(b) => format!("{b:.2}bpw"),
            MixBudget::FileBytes(n) if *n >= 10_000_000 => format!("{}MB", n / 1_000_000),
            MixBudget::FileBytes(n) => format!("{n}B"),
            MixBudget::Memory { bytes, ctx } => format!("{}MB-mem-ctx{ctx}", bytes / 1_000_000),
        }
    }
}

/// One option of a slot.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Choice {
    /// What the option costs (bits, bytes: any additive unit).
    pub bits: u64,
    /// What it costs in error (additive over slots, non-negative).
    pub err: f64,
}

/// The chosen option index of every slot, its total cost and error.
#[derive(Clone, Debug, PartialEq)]
pub struct Selection {
    pub picks: Vec<usize>,
    pub bits: u64,
    pub err: f64,
}

/// The cheapest and dearest totals `slots` can reach.
pub fn reachable(slots: &[Vec<Choice>]) -> (u64, u64) {
    slots.iter().fold((0, 0), |(lo, hi), s| {
        (
            lo + s.iter().map(|c| c.bits).min().unwrap_or(0),
            hi + s.iter().map(|c| c.bits).max().unwrap_or(0),
        )
    })
}

/// Indices of `opts`' lower convex hull in (bits, err), cheapest first, each strictly better in error.
fn hull(opts: &[Choice]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..opts.len()).collect();
    idx.sort_by(|&a, &b| {
        opts[a]
            .bits
            .cmp(&opts[b].bits)
            .then(opts[a].err.total_cmp(&opts[b].err))
    });
    let mut h: Vec<usize> = Vec::new();
    for i in idx {
        let c = opts[i];
        if let Some(&last) = h.last() {
            // Not cheaper in error than what is kept: dominated.
            if c.err >= opts[last].err {
                continue;
            }
            if opts[last].bits == c.bits {
                h.pop();
            }
        }
        // Keep the hull convex: drop the last point while it lies above the chord to c.
        while h.len() >= 2 {
            let (a, b) = (opts[h[h.len() - 2]], opts[h[h.len() - 1]]);
            let cross = (b.bits as f64 - a.bits as f64) * (c.err - a.err)
                - (b.err - a.err) * (c.bits as f64 - a.bits as f64);
            if cross <= 0.0 {
                h.pop();
            } else {
                break;
            }
        }
        h.push(i);
    }
    h
}

/// The least-error choice of one option per slot with total cost at most `budget`; an error naming the
/// reachable range when no choice fits.
pub fn choose(slots: &[Vec<Choice>], budget: u64) -> Result<Selection> {
    if let Some(i) = slots.iter().position(Vec::is_empty) {
        return Err(Error::Invalid(format!("slot {i} has no options")));
    }
    if let Some(c) = slots
        .iter()
        .flatten()
        .find(|c| !(c.err >= 0.0 && c.err.is_finite()))
    {
        return Err(Error::Invalid(format!("an option has error {}", c.err)));
    }
    let (lo, hi) = reachable(slots);
    if budget < lo {
        return Err(Error::Invalid(format!(
            "a budget of {budget} is below the cheapest choice, {lo} (reachable: {lo}..={hi})"
        )));
    }
    let hulls: Vec<Vec<usize>> = slots.iter().map(|s| hull(s)).collect();
    let mut at: Vec<usize> = vec![0; slots.len()];
    let mut picks: Vec<usize> = hulls.iter().map(|h| h[0]).collect();
    let mut used: u64 = slots.iter().zip(&picks).map(|(s, &p)| s[p].bits).sum();
    // Every hull step, by error saved per bit.
    let mut steps: Vec<(f64, usize, usize)> = Vec::new();
    for (si, h) in hulls.iter().enumerate() {
        for k in 1..h.len() {
            let (a, b) = (slots[si][h[k - 1]], slots[si][h[k]]);
            steps.push(((a.err - b.err) / (b.bits - a.bits) as f64, si, k));
        }
    }
    steps.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    let mut blocked = vec![false; slots.len()];
    for &(_, si, k) in &steps {
        if blocked[si] || at[si] + 1 != k {
            continue;
        }
        let h = &hulls[si];
        let extra = slots[si][h[k]].bits - slots[si][h[k - 1]].bits;
        if used + extra > budget {
            // Later steps of this slot depend on this one.
            blocked[si] = true;
            continue;
        }
        used += extra;
        at[si] = k;
        picks[si] = h[k];
    }
    // Dynamic programming on a coarse grid of the budget; keep whichever is better.
    if let Some(dp) = knapsack_dp(slots, budget, 1 << 16) {
        let err = |p: &[usize]| -> f64 { slots.iter().zip(p).map(|(s, &i)| s[i].err).sum() };
        if err(&dp) < err(&picks) {
            used = slots.iter().zip(&dp).map(|(s, &i)| s[i].bits).sum();
            picks = dp;
        }
    }
    // Fill what is left with the best single changes among all options.
    loop {
        let mut best: Option<(f64, usize, usize)> = None;
        for (si, s) in slots.iter().enumerate() {
            let cur = s[picks[si]];
            for (oi, c) in s.iter().enumerate() {
                let fits = used - cur.bits + c.bits <= budget;
                let gain = cur.err - c.err;
                if fits && gain > 1e-15 * cur.err.max(1e-300) && best.is_none_or(|b| gain > b.0) {
                    best = Some((gain, si, oi));
                }
            }
        }
        let Some((_, si, oi)) = best else { break };
        used = used - slots[si][picks[si]].bits + slots[si][oi].bits;
        picks[si] = oi;
    }
    let err = slots.iter().zip(&picks).map(|(s, &p)| s[p].err).sum();
    Ok(Selection {
        picks,
        bits: used,
        err,
    })
}

/// The least-error choice with every option's cost rounded up to units of `budget / resolution` (so the
/// answer always fits); `None` when no choice fits on that grid.
fn knapsack_dp(slots: &[Vec<Choice>], budget: u64, resolution: u64) -> Option<Vec<usize>> {
    let unit = (budget / resolution.max(1)).max(1);
    let cap = usize::try_from(budget / unit).ok()?;
    let cost = |c: &Choice| usize::try_from(c.bits.div_ceil(unit)).unwrap_or(usize::MAX);
    // best[c]: least error of the slots so far at total cost exactly c.
    let mut best = vec![f64::INFINITY; cap + 1];
    best[0] = 0.0;
    let mut pick: Vec<Vec<u8>> = Vec::with_capacity(slots.len());
    for s in slots {
        let mut next = vec![f64::INFINITY; cap + 1];
        let mut choice = vec![u8::MAX; cap + 1];
        for (c, &b) in best.iter().enumerate() {
            if !b.is_finite() {
                continue;
            }
            for (oi, o) in s.iter().enumerate().take(255) {
                let nc = c.saturating_add(cost(o));
                if nc <= cap && b + o.err < next[nc] {
                    next[nc] = b + o.err;
                    choice[nc] = oi as u8;
                }
            }
        }
        best = next;
        pick.push(choice);
    }
    let (mut c, _) = best
        .iter()
        .enumerate()
        .filter(|(_, e)| e.is_finite())
        .min_by(|a, b| a.1.total_cmp(b.1))?;
    let mut picks = vec![0usize; slots.len()];
    for (si, s) in slots.iter().enumerate().rev() {
        let oi = usize::from(pick[si][c]);
        picks[si] = oi;
        c -= cost(&s[oi]);
    }
    Some(picks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn instance(seed: u64, n: usize, k: usize) -> Vec<Vec<Choice>> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let size = rng.gen_range(100..5000u64);
                let sens = rng.gen_range(0.1..10.0f64);
                (0..k)
                    .map(|j| {
                        let bpw = 2.0 + j as f64 * 0.75 + rng.gen_range(0.0..0.3);
                        Choice {
                            bits: (size as f64 * bpw) as u64,
                            // Error falls ~4× per bit, with noise (not always convex).
                            err: sens * size as f64 * 4f64.powf(-bpw) * rng.gen_range(0.7..1.3),
                        }
                    })
                    .collect()
            })
            .collect()
    }

    fn brute(slots: &[Vec<Choice>], budget: u64) -> f64 {
        let mut best = f64::INFINITY;
        let mut idx = vec![0usize; slots.len()];
        loop {
            let bits: u64 = slots.iter().zip(&idx).map(|(s, &i)| s[i].bits).sum();
            if bits <= budget {
                best = best.min(slots.iter().zip(&idx).map(|(s, &i)| s[i].err).sum());
            }
            let mut d = 0;
            loop {
                if d == slots.len() {
                    return best;
                }
                idx[d] += 1;
                if idx[d] < slots[d].len() {
                    break;
                }
                idx[d] = 0;
                d += 1;
            }
        }
    }

    /// Simulated annealing over single-slot moves, infeasible states rejected: the baseline ExLlamaV2's
    /// optimiser resembles.
    fn annealing(slots: &[Vec<Choice>], budget: u64, seed: u64, iters: usize) -> f64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut picks: Vec<usize> = slots
            .iter()
            .map(|s| (0..s.len()).min_by_key(|&i| s[i].bits).unwrap_or(0))
            .collect();
        let mut bits: u64 = slots.iter().zip(&picks).map(|(s, &p)| s[p].bits).sum();
        let mut err: f64 = slots.iter().zip(&picks).map(|(s, &p)| s[p].err).sum();
        let mut best = err;
        let t0 = err / slots.len() as f64;
        for it in 0..iters {
            let t = t0 * (1.0 - it as f64 / iters as f64).max(1e-6);
            let si = rng.gen_range(0..slots.len());
            let oi = rng.gen_range(0..slots[si].len());
            let (cur, new) = (slots[si][picks[si]], slots[si][oi]);
            let nb = bits - cur.bits + new.bits;
            if nb > budget {
                continue;
            }
            let d = new.err - cur.err;
            if d < 0.0 || rng.gen::<f64>() < (-d / t).exp() {
                picks[si] = oi;
                bits = nb;
                err += d;
                best = best.min(err);
            }
        }
        best
    }

    #[test]
    fn small_instances_are_solved_within_a_percent_of_exact() {
        for seed in 0..40 {
            let s = instance(seed, 6, 4);
            let (lo, hi) = reachable(&s);
            for f in [0.1, 0.35, 0.6, 0.9] {
                let budget = lo + ((hi - lo) as f64 * f) as u64;
                let got = choose(&s, budget).expect("feasible");
                assert!(got.bits <= budget);
                let exact = brute(&s, budget);
                assert!(
                    got.err <= exact * 1.01 + 1e-9,
                    "seed {seed} f {f}: {} vs exact {exact}",
                    got.err
                );
            }
        }
    }

    #[test]
    fn never_worse_than_simulated_annealing_and_fast_for_a_32_layer_model() {
        for seed in 0..5 {
            let s = instance(100 + seed, 224, 12);
            let (lo, hi) = reachable(&s);
            let budget = lo + (hi - lo) * 2 / 5;
            let t = std::time::Instant::now();
            let got = choose(&s, budget).expect("feasible");
            let took = t.elapsed();
            assert!(took.as_secs_f64() < 1.0, "{took:?}");
            let sa = annealing(&s, budget, seed, 400_000);
            assert!(
                got.err <= sa + 1e-9,
                "seed {seed}: ours {} vs annealing {sa}",
                got.err
            );
        }
    }

    #[test]
    fn impossible_budgets_name_the_reachable_range() {
        let s = instance(7, 3, 3);
        let (lo, hi) = reachable(&s);
        let e = choose(&s, lo - 1).expect_err("too small");
        assert!(e.to_string().contains(&format!("{lo}..={hi}")), "{e}");
        // A budget above everything takes every slot's least-error option.
        let all = choose(&s, hi).expect("all");
        for (si, s) in s.iter().enumerate() {
            let min = s.iter().map(|c| c.err).fold(f64::INFINITY, f64::min);
            assert_eq!(s[all.picks[si]].err, min);
        }
    }
}
