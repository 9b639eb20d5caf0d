//! The in-process nearest-neighbour index of the semantic cache: HNSW
//! (hierarchical navigable small world graphs, Malkov and Yashunin) over unit
//! vectors, similarity = dot product = cosine.
//!
//! Removal leaves a tombstone that searches pass through but never return;
//! once tombstones make up a quarter of the graph it is rebuilt from the live
//! vectors, so memory stays proportional to the live entries. A brute-force
//! scan ([`Index::exact`]) is kept beside it for small indexes and as the
//! baseline of the benchmark.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet};

use crate::vector::dot;

/// Links per node above layer 0 (layer 0 has twice as many).
const M: usize = 16;
const EF_CONSTRUCTION: usize = 100;
/// Below this many entries a search is an exact scan: as fast, and exact.
const EXACT_BELOW: usize = 2048;

#[derive(Clone, Copy, PartialEq)]
struct Near {
    similarity: f32,
    node: u32,
}

impl Eq for Near {}
impl PartialOrd for Near {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Near {
    fn cmp(&self, other: &Self) -> Ordering {
        self.similarity
            .total_cmp(&other.similarity)
            .then(self.node.cmp(&other.node))
    }
}

/// A hit of a search: the entry's id and its similarity to the query.
#[derive(Debug, Clone, PartialEq)]
pub struct Neighbour {
    /// The entry's id.
    pub id: String,
    /// Its cosine similarity to the query.
    pub similarity: f32,
}

/// Unit vectors of one dimension, by entry id.
pub struct Index {
    dim: usize,
    vectors: Vec<f32>,
    ids: Vec<String>,
    slots: HashMap<String, u32>,
    /// Per node, per layer, its links.
    links: Vec<Vec<Vec<u32>>>,
    deleted: Vec<bool>,
    tombstones: usize,
    entry: Option<u32>,
    rng: fastrand::Rng,
    /// Candidates kept while searching; recall against speed.
    pub ef_search: usize,
}

impl Index {
    /// An empty index of `dim`-dimensional unit vectors.
    pub fn new(dim: usize) -> Index {
        Index {
            dim,
            vectors: Vec::new(),
            ids: Vec::new(),
            slots: HashMap::new(),
            links: Vec::new(),
            deleted: Vec::new(),
            tombstones: 0,
            entry: None,
            rng: fastrand::Rng::with_seed(0x5eed),
            ef_search: 64,
        }
    }

    /// The vectors' dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Live entries.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether it holds no entry.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Whether it holds `id`.
    pub fn contains(&self, id: &str) -> bool {
        self.slots.contains_key(id)
    }

    fn vector(&self, node: u32) -> &[f32] {
        let at = node as usize * self.dim;
        &self.vectors[at..at + self.dim]
    }

    /// Add `id`, or replace its vector.
    pub fn insert(&mut self, id: &str, vector: &[f32]) {
        assert_eq!(vector.len(), self.dim, "vector of the wrong dimension");
        if self.slots.contains_key(id) {
            self.remove(id);
        }
        let node = self.ids.len() as u32;
        self.vectors.extend_from_slice(vector);
        self.ids.push(id.to_owned());
        self.deleted.push(false);
        self.slots.insert(id.to_owned(), node);
        let level = self.random_level();
        self.links.push(vec![Vec::new(); level + 1]);

        let Some(entry) = self.entry else {
            self.entry = Some(node);
            return;
        };
        let top = self.links[entry as usize].len() - 1;
        let mut current = entry;
        for layer in (level + 1..=top).rev() {
            current = self.greedy(vector, current, layer);
        }
        for layer in (0..=level.min(top)).rev() {
            let found = self.search_layer(vector, &[current], EF_CONSTRUCTION, layer);
            let max = if layer == 0 { 2 * M } else { M };
            let chosen = self.select(&found, M);
            for &n in &chosen {
                self.links[n as usize][layer].push(node);
                if self.links[n as usize][layer].len() > max {
                    self.prune(n, layer, max);
                }
            }
            self.links[node as usize][layer] = chosen;
            if let Some(best) = found.first() {
                current = best.node;
            }
        }
        if level > top {
            self.entry = Some(node);
        }
    }

    fn random_level(&mut self) -> usize {
        let ml = 1.0 / (M as f64).ln();
        let u = self.rng.f64().max(f64::MIN_POSITIVE);
        ((-u.ln() * ml) as usize).min(16)
    }

    /// The closest node reachable by always moving closer, on one layer.
    fn greedy(&self, query: &[f32], mut current: u32, layer: usize) -> u32 {
        let mut best = dot(query, self.vector(current));
        loop {
            let mut moved = false;
            for &n in &self.links[current as usize][layer] {
                let s = dot(query, self.vector(n));
                if s > best {
                    best = s;
                    current = n;
                    moved = true;
                }
            }
            if !moved {
                return current;
            }
        }
    }

    /// Up to `ef` nodes closest to `query` on `layer`, best first
    /// (tombstones included: they still route).
    fn search_layer(&self, query: &[f32], starts: &[u32], ef: usize, layer: usize) -> Vec<Near> {
        let mut visited: HashSet<u32> = starts.iter().copied().collect();
        let mut candidates: BinaryHeap<Near> = BinaryHeap::new();
        let mut results: BinaryHeap<std::cmp::Reverse<Near>> = BinaryHeap::new();
        for &s in starts {
            let near = Near {
                similarity: dot(query, self.vector(s)),
                node: s,
            };
            candidates.push(near);
            results.push(std::cmp::Reverse(near));
        }
        while let Some(c) = candidates.pop() {
            let worst = results.peek().map(|r| r.0.similarity).unwrap_or(f32::MIN);
            if c.similarity < worst && results.len() >= ef {
                break;
            }
            for &n in &self.links[c.node as usize][layer] {
                if !visited.insert(n) {
                    continue;
                }
                let s = dot(query, self.vector(n));
                let worst = results.peek().map(|r| r.0.similarity).unwrap_or(f32::MIN);
                if results.len() < ef || s > worst {
                    let near = Near {
                        similarity: s,
                        node: n,
                    };
                    candidates.push(near);
                    results.push(std::cmp::Reverse(near));
                    if results.len() > ef {
                        results.pop();
                    }
                }
            }
        }
        let mut out: Vec<Near> = results.into_iter().map(|r| r.0).collect();
        out.sort_by(|a, b| b.cmp(a));
        out
    }

    /// HNSW's neighbour heuristic: keep a candidate only when it is closer
    /// to the new node than to every neighbour kept so far, so links spread
    /// in all directions instead of clustering.
    fn select(&self, found: &[Near], m: usize) -> Vec<u32> {
        let mut kept: Vec<u32> = Vec::with_capacity(m);
        for c in found {
            if kept.len() == m {
                break;
            }
            let v = self.vector(c.node);
            if kept.iter().all(|&k| dot(v, self.vector(k)) < c.similarity) {
                kept.push(c.node);
            }
        }
        // Fill with the closest left out, so that no node is under-linked.
        for c in found {
            if kept.len() == m {
                break;
            }
            if !kept.contains(&c.node) {
                kept.push(c.node);
            }
        }
        kept
    }

    fn prune(&mut self, node: u32, layer: usize, max: usize) {
        let v = self.vector(node).to_vec();
        let mut near: Vec<Near> = self.links[node as usize][layer]
            .iter()
            .map(|&n| Near {
                similarity: dot(&v, self.vector(n)),
                node: n,
            })
            .collect();
        near.sort_by(|a, b| b.cmp(a));
        self.links[node as usize][layer] = self.select(&near, max);
    }

    /// Forget `id`. Returns whether it was there.
    pub fn remove(&mut self, id: &str) -> bool {
        let Some(node) = self.slots.remove(id) else {
            return false;
        };
        self.deleted[node as usize] = true;
        self.tombstones += 1;
        if self.tombstones * 4 > self.ids.len() && self.ids.len() > 64 {
            self.rebuild();
        }
        true
    }

    /// Rebuild from the live entries: tombstones gone, memory back.
    fn rebuild(&mut self) {
        let live: Vec<(String, Vec<f32>)> = self
            .slots
            .iter()
            .map(|(id, &n)| (id.clone(), self.vector(n).to_vec()))
            .collect();
        let ef = self.ef_search;
        *self = Index::new(self.dim);
        self.ef_search = ef;
        for (id, v) in live {
            self.insert(&id, &v);
        }
    }

    /// Up to `k` live entries most similar to `query`, best first.
    pub fn search(&self, query: &[f32], k: usize) -> Vec<Neighbour> {
        if self.len() < EXACT_BELOW {
            return self.exact(query, k);
        }
        let Some(entry) = self.entry else {
            return Vec::new();
        };
        let top = self.links[entry as usize].len() - 1;
        let mut current = entry;
        for layer in (1..=top).rev() {
            current = self.greedy(query, current, layer);
        }
        self.search_layer(query, &[current], self.ef_search.max(k), 0)
            .into_iter()
            .filter(|n| !self.deleted[n.node as usize])
            .take(k)
            .map(|n| Neighbour {
                id: self.ids[n.node as usize].clone(),
                similarity: n.similarity,
            })
            .collect()
    }

    /// The exact answer: every live entry compared.
    pub fn exact(&self, query: &[f32], k: usize) -> Vec<Neighbour> {
        let mut best: BinaryHeap<std::cmp::Reverse<Near>> = BinaryHeap::new();
        for (node, deleted) in self.deleted.iter().enumerate() {
            if *deleted {
                continue;
            }
            let near = Near {
                similarity: dot(query, self.vector(node as u32)),
                node: node as u32,
            };
            if best.len() < k {
                best.push(std::cmp::Reverse(near));
            } else if best.peek().is_some_and(|w| near > w.0) {
                best.pop();
                best.push(std::cmp::Reverse(near));
            }
        }
        let mut out: Vec<Near> = best.into_iter().map(|r| r.0).collect();
        out.sort_by(|a, b| b.cmp(a));
        out.into_iter()
            .map(|n| Neighbour {
                id: self.ids[n.node as usize].clone(),
                similarity: n.similarity,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(rng: &mut fastrand::Rng, dim: usize) -> Vec<f32> {
        let v: Vec<f32> = (0..dim).map(|_| rng.f32() * 2.0 - 1.0).collect();
        let n = dot(&v, &v).sqrt();
        v.into_iter().map(|x| x / n).collect()
    }

    #[test]
    fn hnsw_finds_what_the_exact_scan_finds() {
        let mut rng = fastrand::Rng::with_seed(1);
        let dim = 32;
        let mut index = Index::new(dim);
        let vectors: Vec<Vec<f32>> = (0..5000).map(|_| unit(&mut rng, dim)).collect();
        for (i, v) in vectors.iter().enumerate() {
            index.insert(&format!("e{i}"), v);
        }
        assert_eq!(index.len(), 5000);
        let mut agree = 0;
        for _ in 0..200 {
            let q = unit(&mut rng, dim);
            if index.search(&q, 1)[0] == index.exact(&q, 1)[0] {
                agree += 1;
            }
        }
        assert!(agree >= 190, "recall@1 {agree}/200");
        // A stored vector finds itself.
        assert_eq!(index.search(&vectors[42], 1)[0].id, "e42");
    }

    #[test]
    fn removed_entries_are_never_returned_and_rebuilds_keep_the_rest() {
        let mut rng = fastrand::Rng::with_seed(2);
        let dim = 16;
        let mut index = Index::new(dim);
        let vectors: Vec<Vec<f32>> = (0..6000).map(|_| unit(&mut rng, dim)).collect();
        for (i, v) in vectors.iter().enumerate() {
            index.insert(&format!("e{i}"), v);
        }
        let check = |index: &Index, removed_below: usize| {
            for i in (0..6000).step_by(97) {
                let hit = &index.search(&vectors[i], 1)[0];
                if i < removed_below {
                    assert_ne!(hit.id, format!("e{i}"));
                } else {
                    assert_eq!(hit.id, format!("e{i}"));
                }
            }
        };
        // A quarter removed: tombstones, searched through, never returned.
        for i in 0..1500 {
            assert!(index.remove(&format!("e{i}")));
        }
        assert!(!index.remove("e0"));
        assert_eq!((index.len(), index.tombstones), (4500, 1500));
        check(&index, 1500);
        // One more: rebuilt from the live entries.
        index.remove("e1500");
        assert_eq!((index.len(), index.tombstones), (4499, 0));
        assert_eq!(index.ids.len(), 4499);
        check(&index, 1501);
    }

    #[test]
    fn reinserting_an_id_replaces_its_vector() {
        let mut index = Index::new(2);
        index.insert("a", &[1.0, 0.0]);
        index.insert("b", &[0.0, 1.0]);
        index.insert("a", &[0.0, -1.0]);
        assert_eq!(index.len(), 2);
        assert_eq!(index.search(&[1.0, 0.0], 2).len(), 2);
        let top = &index.search(&[0.0, -1.0], 1)[0];
        assert_eq!((top.id.as_str(), top.similarity), ("a", 1.0));
    }
}
