//! Helpers for errors, shared by every layer: the serving library, the
//! artifact fetcher and the controller all report an error with its causes.

/// An error and its sources as one line, for conditions, Events and logs.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("failed to read the manifest")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn each_source_follows_its_error() {
        let e = Outer(std::io::Error::other("disk gone"));
        assert_eq!(super::chain(&e), "failed to read the manifest: disk gone");
    }
}
