//! A request's `Cache-Control`, as HTTP caches read it (RFC 9111 §5.2.1):
//! `no-cache` skips the read, `no-store` the write, `max-age=N` accepts only
//! entries at most N seconds old. Directives are case-insensitive; unknown
//! ones are ignored, as a cache must.

/// What a request allows the cache to do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Controls {
    /// Do not answer from the cache (the answer may still be stored).
    pub no_cache: bool,
    /// Do not store the answer.
    pub no_store: bool,
    /// Accept only entries at most this many seconds old.
    pub max_age: Option<u64>,
}

impl Controls {
    /// The controls of every `Cache-Control` header value of a request.
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a str>) -> Controls {
        let mut controls = Controls::default();
        for directive in values.into_iter().flat_map(|v| v.split(',')) {
            let (name, arg) = match directive.split_once('=') {
                Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                None => (directive.trim(), None),
            };
            match name.to_ascii_lowercase().as_str() {
                "no-cache" => controls.no_cache = true,
                "no-store" => controls.no_store = true,
                // An invalid max-age is stale (RFC 9111 §4.2.1): take 0.
                "max-age" => {
                    let age = arg.and_then(|a| a.parse::<u64>().ok()).unwrap_or(0);
                    controls.max_age = Some(controls.max_age.map_or(age, |m| m.min(age)));
                }
                _ => {}
            }
        }
        controls
    }

    /// Whether an entry `age` seconds old may answer.
    pub fn accepts(&self, age: u64) -> bool {
        !self.no_cache && self.max_age.is_none_or(|max| age <= max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directives_as_http_caches_read_them() {
        assert_eq!(Controls::parse([]), Controls::default());
        let c = Controls::parse(["No-Cache, no-store", "max-age=60, private"]);
        assert_eq!(
            c,
            Controls {
                no_cache: true,
                no_store: true,
                max_age: Some(60)
            }
        );
        assert!(!c.accepts(0));
        let fresh = Controls::parse(["max-age=\"30\""]);
        assert!(fresh.accepts(30) && !fresh.accepts(31));
        assert_eq!(Controls::parse(["max-age=soon"]).max_age, Some(0));
        assert_eq!(
            Controls::parse(["max-age=10,max-age=5"]).max_age,
            Some(5),
            "the stricter of two"
        );
        assert!(Controls::parse(["only-if-cached"]).accepts(1_000_000));
    }
}
