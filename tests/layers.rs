//! The library's layers point one way: nothing outside `controller/` uses the
//! controller, and no modules use each other in a circle, at any depth. Read
//! from the source (paths through `crate::` and `super::`, test modules left
//! out), so a new import that breaks either fails here with its path.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Module = Vec<String>;

/// Every module of the library (not the binary) and its source, test
/// modules and line comments removed.
fn modules() -> BTreeMap<Module, String> {
    fn walk(dir: &Path, src: &Path, out: &mut BTreeMap<Module, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, src, out);
                continue;
            }
            let rel = path.strip_prefix(src).unwrap().with_extension("");
            let mut module: Module = rel.iter().map(|c| c.to_string_lossy().into()).collect();
            if path.extension().is_none_or(|e| e != "rs") || module == ["main"] {
                continue;
            }
            if matches!(module.last().map(String::as_str), Some("mod" | "lib")) {
                module.pop();
            }
            out.insert(module, code_only(&std::fs::read_to_string(&path).unwrap()));
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    walk(&src, &src, &mut out);
    out
}

/// The source without `#[cfg(test)] mod tests { … }` blocks and `//` comments.
fn code_only(source: &str) -> String {
    let mut s = source.to_string();
    while let Some(start) = s.find("#[cfg(test)]\nmod tests") {
        let open = start + s[start..].find('{').unwrap();
        let mut depth = 0;
        let mut end = s.len();
        for (i, c) in s[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        s.replace_range(start..end, "");
    }
    s.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The modules `module` refers to through `crate::…` and `super::…` paths,
/// including `use crate::{a, b}` groups.
fn uses(module: &Module, source: &str, known: &BTreeSet<Module>) -> BTreeSet<Module> {
    let resolve = |path: Vec<String>| -> Option<Module> {
        (1..=path.len())
            .rev()
            .map(|n| path[..n].to_vec())
            .find(|m| known.contains(m))
    };
    let mut out = BTreeSet::new();
    let bytes = source.as_bytes();
    for (at, _) in source
        .match_indices("crate::")
        .chain(source.match_indices("super::"))
    {
        if at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_') {
            continue;
        }
        // The path's segments, and for `crate::{a, b::c}` each group member.
        let rest = &source[at..];
        let head: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        let mut segments: Vec<String> = head
            .split("::")
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        let mut base: Module = if segments[0] == "crate" {
            vec![]
        } else {
            // `super` from a file module is its parent; mod.rs files are
            // named after their folder, so the same rule holds.
            module[..module.len().saturating_sub(1)].to_vec()
        };
        segments.remove(0);
        while segments.first().is_some_and(|s| s == "super") {
            segments.remove(0);
            base.pop();
        }
        let group = rest[head.len()..].strip_prefix('{').map(|g| {
            g[..g.find('}').unwrap_or(g.len())]
                .split(',')
                .filter_map(|m| m.trim().split("::").next().map(str::trim))
                .filter(|m| !m.is_empty() && *m != "self")
                .map(String::from)
                .collect::<Vec<_>>()
        });
        let mut path = base;
        path.extend(segments);
        let targets = match group {
            Some(members) => members
                .into_iter()
                .map(|m| {
                    let mut p = path.clone();
                    p.push(m);
                    p
                })
                .collect(),
            None => vec![path],
        };
        for t in targets.into_iter().filter_map(resolve) {
            // A module's own items, and its ancestors (`super::Error` from a
            // child names the parent's items) are not an arrow between peers.
            if t != *module && !module.starts_with(&t) {
                out.insert(t);
            }
        }
    }
    out
}

fn graph() -> BTreeMap<Module, BTreeSet<Module>> {
    let modules = modules();
    let known: BTreeSet<Module> = modules.keys().cloned().collect();
    modules
        .iter()
        .map(|(m, s)| (m.clone(), uses(m, s, &known)))
        .collect()
}

fn name(m: &Module) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

#[test]
fn nothing_outside_the_controller_uses_it() {
    let wrong: Vec<String> = graph()
        .iter()
        // `fuzzing` is a top layer over everything, as main.rs is: the fuzz
        // targets' entry points, compiled only for `fuzz/`.
        .filter(|(m, _)| {
            m.first()
                .is_none_or(|top| top != "controller" && top != "fuzzing")
        })
        .flat_map(|(m, targets)| {
            targets
                .iter()
                .filter(|t| t.first().is_some_and(|top| top == "controller"))
                .map(move |t| format!("{} uses {}", name(m), name(t)))
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "the library reaches into the controller: {wrong:#?}"
    );
}

/// Each module's arrows, lifted to every depth: `a::x` using `b::y` is an
/// arrow a → b among the top-level modules and a::x → b::y below. Arrows
/// from a module into its own children or parents are not peers' arrows.
fn peer_arrows(graph: &BTreeMap<Module, BTreeSet<Module>>) -> BTreeMap<Module, BTreeSet<Module>> {
    let mut arrows: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (from, targets) in graph {
        for to in targets {
            let common = from.iter().zip(to).take_while(|(a, b)| a == b).count();
            if common == from.len() || common == to.len() {
                continue;
            }
            // The peers: the first differing segments under the common parent.
            arrows
                .entry(from[..=common].to_vec())
                .or_default()
                .insert(to[..=common].to_vec());
        }
    }
    arrows
}

/// A circle among the arrows, found by a depth-first search for a back edge.
fn find_circle(arrows: &BTreeMap<Module, BTreeSet<Module>>) -> Option<Vec<Module>> {
    fn visit(
        m: &Module,
        arrows: &BTreeMap<Module, BTreeSet<Module>>,
        path: &mut Vec<Module>,
        done: &mut BTreeSet<Module>,
    ) -> Option<Vec<Module>> {
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut circle = path[i..].to_vec();
            circle.push(m.clone());
            return Some(circle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.clone());
        for next in arrows.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, arrows, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.clone());
        None
    }
    let mut done = BTreeSet::new();
    arrows
        .keys()
        .find_map(|m| visit(m, arrows, &mut Vec::new(), &mut done))
}

#[test]
fn no_modules_use_each_other_in_a_circle() {
    if let Some(circle) = find_circle(&peer_arrows(&graph())) {
        let names: Vec<String> = circle.iter().map(name).collect();
        panic!("modules use each other in a circle: {}", names.join(" → "));
    }
}

#[test]
fn a_circle_and_an_arrow_into_the_controller_are_seen() {
    // The reader itself, on a made-up tree: both faults must show.
    let known: BTreeSet<Module> = [vec![], vec!["a".to_string()], vec!["controller".into()]]
        .into_iter()
        .collect();
    let a = uses(
        &vec!["a".into()],
        "use crate::controller::plan; fn f() { super::a::g(); }",
        &known,
    );
    assert!(a.contains(&vec!["controller".to_string()]), "{a:?}");
    let grouped = uses(&vec![], "use crate::{a, controller::x};", &known);
    assert_eq!(grouped.len(), 2, "{grouped:?}");
    assert_eq!(
        code_only("use a;\n#[cfg(test)]\nmod tests { fn x() { {} } }\nuse b; // c\n"),
        "use a;\n\nuse b; "
    );
    // cache::x → model → cache::y is a circle between cache and model.
    let m = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Module>();
    let graph: BTreeMap<Module, BTreeSet<Module>> = [
        (m(&["cache", "x"]), [m(&["model"])].into()),
        (m(&["model"]), [m(&["cache", "y"])].into()),
        (m(&["cache", "y"]), [m(&["cache"])].into()),
    ]
    .into();
    let circle = find_circle(&peer_arrows(&graph)).expect("a circle");
    assert_eq!(circle.first(), circle.last());
    assert_eq!(circle.len(), 3, "{circle:?}");
    let acyclic: BTreeMap<Module, BTreeSet<Module>> = [(
        m(&["cache", "x"]),
        [m(&["cache", "y"]), m(&["model"])].into(),
    )]
    .into();
    assert!(find_circle(&peer_arrows(&acyclic)).is_none());
}
