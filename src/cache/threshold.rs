//! What a static similarity threshold does on scored pairs: hits, false
//! hits, precision and recall, and the lowest threshold whose false-hit rate
//! meets a target with 95% confidence (the Wilson upper bound, not the point
//! estimate). Pure arithmetic, shared by calibration and the per-entry
//! thresholds' fit; see [`super::calibrate`] for the definitions.

use serde::Serialize;

/// z for a one-sided 95% bound.
pub const Z95: f64 = 1.645;

/// A pair's similarity and label.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    /// The pair's similarity (-1 when the guard refuses it).
    pub similarity: f32,
    /// Whether the pair is labeled equivalent.
    pub equivalent: bool,
}

/// What a threshold does on the pairs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ThresholdRow {
    /// The similarity from which a pair hits.
    pub threshold: f64,
    /// Pairs evaluated.
    pub pairs: usize,
    /// Pairs that hit.
    pub hits: usize,
    /// Hits on pairs that are not equivalent.
    pub false_hits: usize,
    /// hits / pairs.
    pub hit_rate: f64,
    /// Right hits / hits.
    pub precision: f64,
    /// Right hits / equivalent pairs.
    pub recall: f64,
    /// False hits / hits.
    pub false_hit_rate: f64,
    /// One-sided 95% Wilson upper bound of the false-hit rate.
    pub false_hit_rate_upper: f64,
}

/// The one-sided Wilson score upper bound of a proportion `k / n`.
pub fn wilson_upper(k: usize, n: usize, z: f64) -> f64 {
    if n == 0 {
        return 1.0;
    }
    let n = n as f64;
    let p = k as f64 / n;
    let z2 = z * z;
    let centre = p + z2 / (2.0 * n);
    let spread = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre + spread) / (1.0 + z2 / n)).min(1.0)
}

fn row(
    threshold: f64,
    pairs: usize,
    positives: usize,
    hits: usize,
    false_hits: usize,
) -> ThresholdRow {
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let true_hits = hits - false_hits;
    ThresholdRow {
        threshold,
        pairs,
        hits,
        false_hits,
        hit_rate: ratio(hits, pairs),
        precision: if hits == 0 {
            1.0
        } else {
            ratio(true_hits, hits)
        },
        recall: ratio(true_hits, positives),
        false_hit_rate: ratio(false_hits, hits),
        false_hit_rate_upper: wilson_upper(false_hits, hits, Z95),
    }
}

/// What each of `thresholds` does on `scored`.
pub fn evaluate(scored: &[Scored], thresholds: &[f64]) -> Vec<ThresholdRow> {
    let positives = scored.iter().filter(|s| s.equivalent).count();
    thresholds
        .iter()
        .map(|&t| {
            let hits: Vec<&Scored> = scored
                .iter()
                .filter(|s| f64::from(s.similarity) >= t)
                .collect();
            let false_hits = hits.iter().filter(|s| !s.equivalent).count();
            row(t, scored.len(), positives, hits.len(), false_hits)
        })
        .collect()
}

/// The lowest threshold whose false-hit rate meets `max_false_hit_rate` with
/// 95% confidence, over every similarity seen. `None` when none does (too
/// few pairs, or a model that cannot separate them).
pub fn pick(scored: &[Scored], max_false_hit_rate: f64) -> Option<ThresholdRow> {
    let positives = scored.iter().filter(|s| s.equivalent).count();
    let mut sorted: Vec<Scored> = scored.to_vec();
    sorted.sort_by(|a, b| b.similarity.total_cmp(&a.similarity));
    let mut best: Option<ThresholdRow> = None;
    let (mut hits, mut false_hits) = (0, 0);
    let mut i = 0;
    while i < sorted.len() {
        // Every pair at this similarity is in or out together.
        let s = sorted[i].similarity;
        while i < sorted.len() && sorted[i].similarity == s {
            hits += 1;
            false_hits += usize::from(!sorted[i].equivalent);
            i += 1;
        }
        let r = row(f64::from(s), sorted.len(), positives, hits, false_hits);
        if r.false_hit_rate_upper <= max_false_hit_rate {
            best = Some(r);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(similarity: f32, equivalent: bool) -> Scored {
        Scored {
            similarity,
            equivalent,
        }
    }

    #[test]
    fn wilson_bound_known_values() {
        // 0 of 100: z²/(n+z²) = 2.706/102.706.
        assert!((wilson_upper(0, 100, Z95) - 0.02635).abs() < 1e-4);
        // 10 of 100 at 95% one-sided: about 0.160.
        assert!((wilson_upper(10, 100, Z95) - 0.1604).abs() < 1e-3);
        assert_eq!(wilson_upper(0, 0, Z95), 1.0);
    }

    #[test]
    fn rows_count_hits_false_hits_precision_and_recall() {
        let scored = [s(0.9, true), s(0.8, false), s(0.7, true), s(0.2, false)];
        let rows = evaluate(&scored, &[0.75, 0.5]);
        assert_eq!((rows[0].hits, rows[0].false_hits), (2, 1));
        assert_eq!(rows[0].precision, 0.5);
        assert_eq!(rows[0].recall, 0.5);
        assert_eq!(rows[0].hit_rate, 0.5);
        assert_eq!((rows[1].hits, rows[1].recall), (3, 1.0));
    }

    #[test]
    fn pick_needs_the_upper_bound_under_the_target() {
        // 400 clean hits above 0.9, then false ones below.
        let mut scored: Vec<Scored> = (0..400).map(|i| s(0.9 + i as f32 * 1e-4, true)).collect();
        scored.extend((0..50).map(|i| s(0.5 + i as f32 * 1e-3, false)));
        let picked = pick(&scored, 0.01).expect("400 clean hits give a bound under 1%");
        assert!(picked.threshold >= f64::from(0.9f32), "{picked:?}");
        assert_eq!(picked.false_hits, 0);
        // With 100 clean hits the bound (2.6%) does not reach 1%.
        assert!(pick(&scored[300..], 0.01).is_none());
        assert!(pick(&scored[300..], 0.05).is_some());
    }
}
