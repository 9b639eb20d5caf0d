//! Vector arithmetic shared by the embedding model and the semantic index,
//! kept below both so that neither imports the other.

/// Dot product; for unit vectors, their cosine similarity.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight lanes so that the compiler vectorizes the loop.
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8 * 8;
    for (x, y) in a[..chunks].chunks_exact(8).zip(b[..chunks].chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = a[chunks..]
        .iter()
        .zip(&b[chunks..])
        .map(|(x, y)| x * y)
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// Whether `v` has `dim` finite components and unit length (within 1e-3):
/// the only vectors whose dot product is a cosine similarity. A NaN
/// component would make every comparison with a threshold false.
pub fn is_unit(v: &[f32], dim: usize) -> bool {
    v.len() == dim && v.iter().all(|x| x.is_finite()) && (dot(v, v) - 1.0).abs() <= 1e-3
}

#[cfg(test)]
mod tests {
    #[test]
    fn dot_covers_the_lanes_and_the_tail() {
        let a: Vec<f32> = (1..=11).map(|i| i as f32).collect();
        let b = vec![1.0; 11];
        assert_eq!(super::dot(&a, &b), 66.0);
    }

    #[test]
    fn only_finite_unit_vectors_of_the_dimension_pass() {
        assert!(super::is_unit(&[0.6, 0.8], 2));
        assert!(!super::is_unit(&[0.6, 0.8], 3));
        assert!(!super::is_unit(&[1.2, 1.6], 2));
        assert!(!super::is_unit(&[f32::NAN, 1.0], 2));
        assert!(!super::is_unit(&[f32::INFINITY, 0.0], 2));
    }
}
