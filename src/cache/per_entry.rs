//! Per-entry thresholds, learned online (the idea of vCache, arXiv
//! 2502.03771): each entry carries the outcomes of verifications made when
//! it was the nearest candidate but not yet trusted, and serves a query only
//! when, given those outcomes, the chance that its answer is right at this
//! similarity is at least `1 - maxFalseHitRate`.
//!
//! The model: for an entry, P(right | similarity s) = σ(steepness · (s − m)),
//! with one shared steepness and a midpoint m of the entry's own. The prior
//! over m is normal around the midpoint fitted by `modelcache calibrate` on
//! labeled pairs; an entry's verified outcomes move its posterior, held on a
//! grid, and the decision uses the posterior predictive. An entry whose
//! answer is generic learns a low threshold; one whose close neighbours
//! want other answers learns a high one. Unlike a single static threshold,
//! this needs no labeled pairs from the serving traffic, only the checks the
//! caller makes anyway on a miss (it calls the LLM, and compares).

use serde::Serialize;

use super::threshold::Scored;

/// Outcomes an entry keeps (the most recent), 5 bytes each in Redis.
pub const MAX_OBSERVATIONS: usize = 64;
const GRID: usize = 161;

/// The shared part of the model, from [`fit`] (`modelcache calibrate`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Prior {
    /// How fast the chance of a right answer rises with similarity.
    pub steepness: f64,
    /// Similarity at which an answer is as likely right as wrong, before
    /// any outcome of the entry is known.
    pub midpoint: f64,
    /// Standard deviation of entries' midpoints around `midpoint`.
    pub spread: f64,
}

impl Prior {
    /// The similarity below which a candidate is not worth verifying: where
    /// the prior gives a right answer one chance in ten.
    pub fn explore_from(&self) -> f64 {
        self.midpoint - 9f64.ln() / self.steepness
    }
}

/// One verification: the similarity of the query to the entry, and whether
/// the entry's answer was right for it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// The similarity at which the entry served.
    pub similarity: f32,
    /// Whether its answer was right.
    pub correct: bool,
}

/// The Redis encoding of one observation: f32 LE similarity, then 0 or 1.
pub fn encode(o: Observation) -> [u8; 5] {
    let s = o.similarity.to_le_bytes();
    [s[0], s[1], s[2], s[3], u8::from(o.correct)]
}

/// Observations from their Redis encoding; a torn tail is ignored.
pub fn decode(bytes: &[u8]) -> Vec<Observation> {
    bytes
        .chunks_exact(5)
        .map(|c| Observation {
            similarity: f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
            correct: c[4] == 1,
        })
        .collect()
}

fn log_sigmoid(z: f64) -> f64 {
    // log σ(z) = −log(1 + e^{−z}), stable on both sides.
    if z > 0.0 {
        -(-z).exp().ln_1p()
    } else {
        z - z.exp().ln_1p()
    }
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// The posterior over the entry's midpoint: grid points and weights.
fn posterior(prior: &Prior, observations: &[Observation]) -> Vec<(f64, f64)> {
    let lo = prior.midpoint - 4.0 * prior.spread;
    let step = 8.0 * prior.spread / (GRID - 1) as f64;
    let log: Vec<(f64, f64)> = (0..GRID)
        .map(|i| {
            let m = lo + step * i as f64;
            let mut l = -0.5 * ((m - prior.midpoint) / prior.spread).powi(2);
            for o in observations {
                let z = prior.steepness * (f64::from(o.similarity) - m);
                l += if o.correct {
                    log_sigmoid(z)
                } else {
                    log_sigmoid(-z)
                };
            }
            (m, l)
        })
        .collect();
    let top = log.iter().map(|x| x.1).fold(f64::NEG_INFINITY, f64::max);
    let total: f64 = log.iter().map(|x| (x.1 - top).exp()).sum();
    log.into_iter()
        .map(|(m, l)| (m, (l - top).exp() / total))
        .collect()
}

/// The chance that the entry's answer is right for a query at `similarity`.
pub fn p_correct(prior: &Prior, observations: &[Observation], similarity: f32) -> f64 {
    posterior(prior, observations)
        .into_iter()
        .map(|(m, w)| w * sigmoid(prior.steepness * (f64::from(similarity) - m)))
        .sum()
}

/// The entry's threshold: the lowest similarity at which it serves under
/// `max_false_hit_rate`; `None` when not even an identical vector would.
pub fn threshold(
    prior: &Prior,
    observations: &[Observation],
    max_false_hit_rate: f64,
) -> Option<f32> {
    let post = posterior(prior, observations);
    let p = |s: f64| -> f64 {
        post.iter()
            .map(|&(m, w)| w * sigmoid(prior.steepness * (s - m)))
            .sum()
    };
    let want = 1.0 - max_false_hit_rate;
    if p(1.0) < want {
        return None;
    }
    // p rises with s: bisect.
    let (mut lo, mut hi) = (-1.0f64, 1.0f64);
    for _ in 0..40 {
        let mid = (lo + hi) / 2.0;
        if p(mid) >= want {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Some(hi as f32)
}

/// Fit the shared model to labeled pairs scoring at least `from` (where
/// candidates occur), by logistic regression (Newton's method). `None`
/// when the pairs cannot support a fit: too few, one label only, or
/// similarity that does not raise the chance of equivalence.
pub fn fit(scored: &[Scored], from: f32, spread: f64) -> Option<Prior> {
    let points: Vec<(f64, f64)> = scored
        .iter()
        .filter(|s| s.similarity >= from)
        .map(|s| {
            (
                f64::from(s.similarity),
                if s.equivalent { 1.0 } else { 0.0 },
            )
        })
        .collect();
    let positives = points.iter().filter(|p| p.1 == 1.0).count();
    if points.len() < 50 || positives == 0 || positives == points.len() {
        return None;
    }
    // logit = a + b·s
    let (mut a, mut b) = (0.0f64, 0.0f64);
    for _ in 0..50 {
        let (mut ga, mut gb, mut haa, mut hab, mut hbb) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for &(s, y) in &points {
            let p = sigmoid(a + b * s);
            let w = p * (1.0 - p);
            ga += y - p;
            gb += (y - p) * s;
            haa += w;
            hab += w * s;
            hbb += w * s * s;
        }
        let det = haa * hbb - hab * hab;
        if det.abs() < 1e-12 {
            return None;
        }
        let da = (hbb * ga - hab * gb) / det;
        let db = (haa * gb - hab * ga) / det;
        a += da;
        b += db;
        if da.abs() < 1e-9 && db.abs() < 1e-9 {
            break;
        }
    }
    (b > 0.0 && b.is_finite() && a.is_finite()).then(|| Prior {
        steepness: b,
        midpoint: -a / b,
        spread,
    })
}

/// What a replay of verified traffic did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Replay {
    /// Queries replayed.
    pub queries: usize,
    /// Queries served from the cache.
    pub hits: usize,
    /// Hits whose answer was wrong.
    pub false_hits: usize,
    /// Candidates verified (the LLM was called and its answer compared).
    pub verified: usize,
}

/// Replay `stream` — queries against a known entry (its index), with their
/// similarity and label — through per-entry decisions: a query is served
/// when the entry's outcomes so far allow it, else verified (from
/// `explore_from` up) and its outcome kept by the entry.
pub fn replay(
    prior: &Prior,
    max_false_hit_rate: f64,
    explore_from: f32,
    entries: usize,
    stream: &[(usize, Scored)],
) -> Replay {
    let mut observations: Vec<Vec<Observation>> = vec![Vec::new(); entries];
    let mut out = Replay {
        queries: stream.len(),
        ..Replay::default()
    };
    for &(entry, s) in stream {
        if s.similarity < explore_from {
            continue;
        }
        let seen = &mut observations[entry];
        if p_correct(prior, seen, s.similarity) >= 1.0 - max_false_hit_rate {
            out.hits += 1;
            out.false_hits += usize::from(!s.equivalent);
        } else {
            out.verified += 1;
            seen.push(Observation {
                similarity: s.similarity,
                correct: s.equivalent,
            });
            if seen.len() > MAX_OBSERVATIONS {
                seen.remove(0);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIOR: Prior = Prior {
        steepness: 11.0,
        midpoint: 0.81,
        spread: 0.1,
    };

    fn obs(similarity: f32, correct: bool) -> Observation {
        Observation {
            similarity,
            correct,
        }
    }

    #[test]
    fn observations_round_trip_and_a_torn_tail_is_ignored() {
        let o = [obs(0.93, true), obs(0.5, false)];
        let mut bytes: Vec<u8> = o.iter().flat_map(|&x| encode(x)).collect();
        assert_eq!(decode(&bytes), o);
        bytes.push(7);
        assert_eq!(decode(&bytes), o);
    }

    #[test]
    fn without_outcomes_the_prior_alone_decides() {
        // σ(11 · (0.95 − 0.81)) = 0.82, widened a little by the spread.
        let p = p_correct(&PRIOR, &[], 0.95);
        assert!((0.75..0.84).contains(&p), "{p}");
        assert!(p_correct(&PRIOR, &[], 0.99) > p);
        // At 20% the prior alone serves only very close queries; at 1% none.
        let t = threshold(&PRIOR, &[], 0.2).expect("reachable at 20%");
        assert!((0.9..1.0).contains(&t), "{t}");
        assert_eq!(threshold(&PRIOR, &[], 0.01), None);
    }

    #[test]
    fn right_answers_lower_an_entry_threshold_and_a_wrong_one_raises_it() {
        let before = threshold(&PRIOR, &[], 0.2).unwrap();
        let generic: Vec<Observation> = (0..12).map(|i| obs(0.8 + i as f32 * 0.01, true)).collect();
        let after = threshold(&PRIOR, &generic, 0.2).unwrap();
        assert!(after < before - 0.1, "{before} → {after}");
        assert!(p_correct(&PRIOR, &generic, 0.85) >= 0.8);
        // Enough right answers certify even 1% for this entry.
        let many: Vec<Observation> = (0..60).map(|i| obs(0.7 + i as f32 * 0.004, true)).collect();
        assert!(threshold(&PRIOR, &many, 0.01).is_some());
        // A near question that wanted another answer: the entry stops
        // serving at that similarity.
        let picky = [obs(0.96, false), obs(0.97, false)];
        assert!(p_correct(&PRIOR, &picky, 0.96) < p_correct(&PRIOR, &[], 0.96) - 0.2);
        assert_eq!(threshold(&PRIOR, &picky, 0.2), None);
    }

    #[test]
    fn the_fit_recovers_a_known_curve() {
        // Labels drawn from σ(12 · (s − 0.8)).
        let mut rng = fastrand::Rng::with_seed(3);
        let scored: Vec<Scored> = (0..20_000)
            .map(|_| {
                let s = 0.5 + rng.f32() * 0.5;
                Scored {
                    similarity: s,
                    equivalent: rng.f64() < sigmoid(12.0 * (f64::from(s) - 0.8)),
                }
            })
            .collect();
        let prior = fit(&scored, 0.5, 0.1).unwrap();
        assert!((prior.steepness - 12.0).abs() < 1.0, "{prior:?}");
        assert!((prior.midpoint - 0.8).abs() < 0.01, "{prior:?}");
        // One label only: nothing to fit.
        let same: Vec<Scored> = scored
            .iter()
            .map(|s| Scored {
                equivalent: true,
                ..*s
            })
            .collect();
        assert_eq!(fit(&same, 0.5, 0.1), None);
    }

    #[test]
    fn replay_serves_an_entry_once_its_outcomes_allow_it() {
        // One generic entry asked 30 times at 0.85 (always right), one picky
        // entry asked 30 times at 0.95 (always wrong).
        let mut stream = Vec::new();
        for _ in 0..30 {
            stream.push((
                0,
                Scored {
                    similarity: 0.85,
                    equivalent: true,
                },
            ));
            stream.push((
                1,
                Scored {
                    similarity: 0.95,
                    equivalent: false,
                },
            ));
        }
        let r = replay(&PRIOR, 0.2, 0.7, 2, &stream);
        assert_eq!(r.queries, 60);
        assert_eq!(r.false_hits, 0, "{r:?}");
        assert!(r.hits >= 20, "{r:?}");
        assert_eq!(r.hits + r.verified, 60);
        // A static threshold of 0.9 would have served the 30 wrong ones.
    }
}
