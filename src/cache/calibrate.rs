//! Semantic thresholds from data: labeled question pairs (JSONL, optionally
//! gzip-compressed, fields `a`, `b`, `equivalent`) are scored with the
//! embedding model, and every threshold is judged by what a cache using it
//! would do with the pair: a hit when the similarity is at or above it, a
//! false hit when that hit answers a question that is not equivalent.
//!
//! - false-hit rate = false hits / hits (the CachePolicy's
//!   `semantic.maxFalseHitRate`: the share of served answers that are wrong);
//! - precision = 1 − false-hit rate; recall = true hits / equivalent pairs;
//! - hit rate = hits / pairs.
//!
//! The threshold picked is the lowest (most hits) whose false-hit rate meets
//! the target with 95% confidence: the Wilson upper bound of false hits among
//! hits, not the point estimate, must be at or below the target. With few
//! hits the bound is wide, so a small calibration set yields a conservative
//! threshold rather than an optimistic one.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use super::threshold::{Scored, ThresholdRow, Z95, evaluate, pick, wilson_upper};

/// Why a calibration could not run on its input.
/// Each variant is documented by its message.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum CalibrateError {
    #[error(
        "failed to read the pairs file {path}; expected JSONL (optionally gzipped) with fields a, b and equivalent"
    )]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "failed to parse the pairs file {path}, line {line}: {why}; expected one JSON object per line with fields a (string), b (string) and equivalent (true or false)"
    )]
    Parse {
        path: PathBuf,
        line: usize,
        why: String,
    },
    #[error("the pairs file {path} holds no pair; expected JSONL with fields a, b, equivalent")]
    Empty { path: PathBuf },
    #[error("--max-false-hit-rate must be in [0, 0.5) and --held-out in [0, 1)")]
    Targets,
}

/// One labeled pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pair {
    /// One sentence.
    pub a: String,
    /// The other.
    pub b: String,
    /// Whether they ask the same thing (the label).
    pub equivalent: bool,
}

/// A line of the pairs file at most: two questions and a label. Without a
/// cap, a small gzip of one endless line inflates into memory.
const MAX_LINE_BYTES: u64 = 64 << 10;
/// Pairs read at most (Quora's whole set is 400k).
const MAX_PAIRS: usize = 2_000_000;

/// Read labeled pairs from JSONL, gunzipped when the file starts with the
/// gzip magic.
pub fn read_pairs(path: &Path) -> Result<Vec<Pair>, CalibrateError> {
    let read_error = |source| CalibrateError::Read {
        path: path.into(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read_error)?;
    let mut magic = [0u8; 2];
    let n = file.read(&mut magic).map_err(read_error)?;
    let file = std::fs::File::open(path).map_err(read_error)?;
    let reader: Box<dyn BufRead> = if n == 2 && magic == [0x1f, 0x8b] {
        Box::new(BufReader::new(flate2::read::GzDecoder::new(file)))
    } else {
        Box::new(BufReader::new(file))
    };
    let mut pairs = Vec::new();
    let mut reader = reader;
    let mut line = Vec::new();
    for i in 1.. {
        line.clear();
        // At most one byte past the cap is read, however long the line.
        let n = (&mut reader)
            .take(MAX_LINE_BYTES + 1)
            .read_until(b'\n', &mut line)
            .map_err(read_error)?;
        if n == 0 {
            break;
        }
        if line.len() as u64 > MAX_LINE_BYTES {
            return Err(CalibrateError::Parse {
                path: path.into(),
                line: i,
                why: format!("the line is longer than {MAX_LINE_BYTES} bytes"),
            });
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let pair: Pair = serde_json::from_slice(&line).map_err(|e| CalibrateError::Parse {
            path: path.into(),
            line: i,
            why: e.to_string(),
        })?;
        pairs.push(pair);
        if pairs.len() > MAX_PAIRS {
            return Err(CalibrateError::Parse {
                path: path.into(),
                line: i,
                why: format!("more than {MAX_PAIRS} pairs; calibrate on a sample"),
            });
        }
    }
    if pairs.is_empty() {
        return Err(CalibrateError::Empty { path: path.into() });
    }
    Ok(pairs)
}

/// Split `items` into a calibration part and a held-out part, `held_out` of
/// every `of` items (by position, after a fixed shuffle), so that the
/// held-out check sees pairs the threshold was not picked on.
pub fn split<T: Clone>(items: &[T], seed: u64, held_out_share: f64) -> (Vec<T>, Vec<T>) {
    let mut order: Vec<usize> = (0..items.len()).collect();
    let mut rng = fastrand::Rng::with_seed(seed);
    rng.shuffle(&mut order);
    let cut = ((items.len() as f64) * (1.0 - held_out_share)).round() as usize;
    let (a, b) = order.split_at(cut.min(items.len()));
    (
        a.iter().map(|&i| items[i].clone()).collect(),
        b.iter().map(|&i| items[i].clone()).collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endless_line_is_refused_after_the_cap_not_read_whole() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pairs.jsonl.gz");
        let mut gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&path).unwrap(),
            flate2::Compression::best(),
        );
        gz.write_all(b"{\"a\": \"").unwrap();
        // 64 MiB of one line from a gzip of about 64 KiB.
        for _ in 0..1024 {
            gz.write_all(&[b'x'; 64 << 10]).unwrap();
        }
        gz.finish().unwrap();
        let err = read_pairs(&path).unwrap_err().to_string();
        assert!(
            err.contains("line 1") && err.contains("longer than 65536 bytes"),
            "{err}"
        );
    }

    #[test]
    fn split_is_fixed_by_the_seed_and_disjoint() {
        let items: Vec<u32> = (0..100).collect();
        let (a, b) = split(&items, 7, 0.25);
        assert_eq!((a.len(), b.len()), (75, 25));
        assert_eq!(split(&items, 7, 0.25), (a.clone(), b.clone()));
        assert!(a.iter().all(|x| !b.contains(x)));
    }
}

/// The outcome of a calibration.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Calibration {
    /// The false-hit rate the pick must meet with 95% confidence.
    pub max_false_hit_rate: f64,
    /// Pairs the threshold was picked on.
    pub calibration_pairs: usize,
    /// Pairs held out to check the pick.
    pub held_out_pairs: usize,
    /// Every threshold from 0.50 to 0.99 in steps of 0.01, on the
    /// calibration part.
    pub rows: Vec<ThresholdRow>,
    /// The lowest threshold meeting the target with 95% confidence.
    pub picked: Option<ThresholdRow>,
    /// What the picked threshold does on the held-out part.
    pub held_out: Option<ThresholdRow>,
    /// The reference design's static 0.92 on the held-out part.
    pub reference_092: Option<ThresholdRow>,
    /// The model per-entry thresholds start from, fitted on the
    /// calibration part where candidates occur (similarity ≥ 0.5).
    pub prior: Option<super::per_entry::Prior>,
    /// Distinct sentences embedded.
    pub sentences: usize,
    /// Seconds spent embedding.
    pub embed_seconds: f64,
}

/// Similarity from which the per-entry prior is fitted: below it a pair is
/// not a candidate of any useful threshold, and the curve there would
/// only bend the fit.
pub const PRIOR_FROM: f32 = 0.5;
/// The spread of entries' midpoints the prior assumes (see docs/benchmarks.md's
/// semantic-cache benchmark for its effect).
pub const PRIOR_SPREAD: f64 = 0.1;

/// Similarities of `pairs`, embedding each distinct sentence once; pairs
/// the cache's guard refuses ([`super::guard::guard_allows`]) score -1.
pub fn score(
    embedder: &crate::model::bert::SentenceEmbedder,
    pairs: &[Pair],
) -> Result<(Vec<Scored>, usize), crate::model::bert::EmbedError> {
    let mut slots: HashMap<&str, usize> = HashMap::new();
    let mut sentences: Vec<&str> = Vec::new();
    for p in pairs {
        for s in [p.a.as_str(), p.b.as_str()] {
            slots.entry(s).or_insert_with(|| {
                sentences.push(s);
                sentences.len() - 1
            });
        }
    }
    let vectors = embedder.embed(&sentences)?;
    // The cache's whole decision: a pair its guard refuses never hits.
    let scored = pairs
        .iter()
        .map(|p| Scored {
            similarity: if super::guard::guard_allows(&p.a, &p.b) {
                crate::model::bert::cosine(
                    &vectors[slots[p.a.as_str()]],
                    &vectors[slots[p.b.as_str()]],
                )
            } else {
                -1.0
            },
            equivalent: p.equivalent,
        })
        .collect();
    Ok((scored, sentences.len()))
}

/// Calibrate on part of `pairs` and check the pick on the rest.
pub fn calibrate(
    embedder: &crate::model::bert::SentenceEmbedder,
    pairs: &[Pair],
    max_false_hit_rate: f64,
    held_out_share: f64,
    seed: u64,
) -> Result<Calibration, crate::model::bert::EmbedError> {
    let started = std::time::Instant::now();
    let (scored, sentences) = score(embedder, pairs)?;
    let embed_seconds = started.elapsed().as_secs_f64();
    let mut out = calibrate_scored(&scored, max_false_hit_rate, held_out_share, seed);
    out.sentences = sentences;
    out.embed_seconds = embed_seconds;
    Ok(out)
}

/// [`calibrate`] on pairs already scored (embedding counts left at zero).
pub fn calibrate_scored(
    scored: &[Scored],
    max_false_hit_rate: f64,
    held_out_share: f64,
    seed: u64,
) -> Calibration {
    let (fit, held) = split(scored, seed, held_out_share);
    let grid: Vec<f64> = (50..100).map(|i| f64::from(i) / 100.0).collect();
    let picked = pick(&fit, max_false_hit_rate);
    let held_out = picked
        .filter(|_| !held.is_empty())
        .map(|p| evaluate(&held, &[p.threshold])[0]);
    let reference_092 = (!held.is_empty()).then(|| evaluate(&held, &[0.92])[0]);
    Calibration {
        max_false_hit_rate,
        calibration_pairs: fit.len(),
        held_out_pairs: held.len(),
        rows: evaluate(&fit, &grid),
        picked,
        held_out,
        reference_092,
        prior: super::per_entry::fit(&fit, PRIOR_FROM, PRIOR_SPREAD),
        sentences: 0,
        embed_seconds: 0.0,
    }
}

impl Calibration {
    /// The human-readable report of `modelcache calibrate`: every fifth
    /// threshold row, the pick with its held-out check and the reference
    /// design's 0.92, and the CachePolicy lines to paste.
    pub fn table(&self, pairs: usize) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{pairs} pairs: {} to calibrate, {} held out; {} sentences embedded in {:.1} s",
            self.calibration_pairs, self.held_out_pairs, self.sentences, self.embed_seconds
        );
        out.push_str(
            "threshold  hits  false  precision  recall  hit rate  false-hit rate (95% upper)\n",
        );
        let line = |r: &ThresholdRow| {
            format!(
                "{:>9.4}  {:>4}  {:>5}  {:>9.4}  {:>6.4}  {:>8.4}  {:.4} ({:.4})",
                r.threshold,
                r.hits,
                r.false_hits,
                r.precision,
                r.recall,
                r.hit_rate,
                r.false_hit_rate,
                r.false_hit_rate_upper
            )
        };
        for r in self.rows.iter().step_by(5) {
            let _ = writeln!(out, "{}", line(r));
        }
        let target = self.max_false_hit_rate;
        if let Some(p) = &self.picked {
            let _ = writeln!(out, "picked: {}", line(p));
            if let Some(h) = &self.held_out {
                let _ = writeln!(out, "held out: {}", line(h));
            }
            if let Some(r) = &self.reference_092 {
                let _ = writeln!(out, "static 0.92 held out: {}", line(r));
            }
            let _ = writeln!(
                out,
                "CachePolicy: semantic: {{threshold: {:.4}, maxFalseHitRate: {target}}}",
                p.threshold
            );
        }
        if let Some(prior) = &self.prior {
            let _ = writeln!(
                out,
                "per-entry prior: P(right | s) = 1 / (1 + exp(-{:.3} (s - {:.4})))",
                prior.steepness, prior.midpoint
            );
            let _ = writeln!(
                out,
                "CachePolicy (per-entry): semantic: {{mode: PerEntry, maxFalseHitRate: {target}, prior: {{steepness: {:.3}, midpoint: {:.4}, spread: {}}}}}",
                prior.steepness, prior.midpoint, prior.spread
            );
        }
        out
    }

    /// Why nothing was picked, and what to do; `None` when a threshold was.
    pub fn unmet(&self) -> Option<String> {
        self.picked.is_none().then(|| {
            format!(
                "no threshold keeps the false-hit rate at or below {} with 95% confidence on {} pairs; give more labeled pairs, or a higher --max-false-hit-rate, or learn thresholds per entry (semantic.mode PerEntry with the prior printed above)",
                self.max_false_hit_rate, self.calibration_pairs
            )
        })
    }
}

/// The target and the held-out share `modelcache calibrate` accepts.
pub fn check_targets(max_false_hit_rate: f64, held_out: f64) -> Result<(), CalibrateError> {
    if (0.0..0.5).contains(&max_false_hit_rate) && (0.0..1.0).contains(&held_out) {
        Ok(())
    } else {
        Err(CalibrateError::Targets)
    }
}
