//! Health facts parsed from Redis `INFO`.

use std::collections::HashMap;

/// The INFO fields that tell whether a cache is healthy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RedisInfo {
    /// Server version.
    pub redis_version: Option<String>,
    /// Bytes used.
    pub used_memory: Option<u64>,
    /// The memory limit; 0 for none.
    pub maxmemory: Option<u64>,
    /// RSS / used memory.
    pub mem_fragmentation_ratio: Option<f64>,
    /// RSS minus used memory: what fragmentation costs, in bytes.
    pub mem_fragmentation_bytes: Option<i64>,
    /// Keys evicted since start.
    pub evicted_keys: Option<u64>,
    /// Lookups that found their key since start.
    pub keyspace_hits: Option<u64>,
    /// Lookups that did not.
    pub keyspace_misses: Option<u64>,
    /// Whether the allocator can defragment (`mem_allocator` is jemalloc and
    /// `active_defrag_running` is reported).
    pub defrag_supported: Option<bool>,
    /// Whether active defragmentation is running.
    pub active_defrag_running: Option<bool>,
}

impl RedisInfo {
    /// hits / (hits + misses); `None` before the first lookup.
    pub fn hit_rate(&self) -> Option<f64> {
        let (hits, misses) = (self.keyspace_hits?, self.keyspace_misses?);
        let total = hits + misses;
        (total > 0).then(|| hits as f64 / total as f64)
    }
}

/// Parses the text of `INFO` (any sections). Unknown and malformed fields are
/// skipped: INFO grows between versions and forks.
pub fn parse_info(text: &str) -> RedisInfo {
    let fields: HashMap<&str, &str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(':'))
        .collect();
    let int = |k: &str| fields.get(k).and_then(|v| v.parse::<u64>().ok());
    RedisInfo {
        redis_version: fields
            .get("valkey_version")
            .or_else(|| fields.get("redis_version"))
            .map(|v| v.to_string()),
        used_memory: int("used_memory"),
        maxmemory: int("maxmemory"),
        mem_fragmentation_ratio: fields
            .get("mem_fragmentation_ratio")
            .and_then(|v| v.parse().ok()),
        mem_fragmentation_bytes: fields
            .get("mem_fragmentation_bytes")
            .and_then(|v| v.parse().ok()),
        evicted_keys: int("evicted_keys"),
        keyspace_hits: int("keyspace_hits"),
        keyspace_misses: int("keyspace_misses"),
        defrag_supported: fields
            .get("mem_allocator")
            .map(|a| a.starts_with("jemalloc")),
        active_defrag_running: int("active_defrag_running").map(|n| n > 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "# Server\r\nredis_version:7.0.15\r\n\r\n# Memory\r\nused_memory:1048576\r\n\
        maxmemory:1717986918\r\nmem_fragmentation_ratio:1.73\r\nmem_fragmentation_bytes:765432\r\nmem_allocator:jemalloc-5.3.0\r\n\
        active_defrag_running:0\r\n\r\n# Stats\r\nevicted_keys:12\r\nkeyspace_hits:710\r\nkeyspace_misses:290\r\n";

    #[test]
    fn parses_memory_and_stats() {
        let info = parse_info(INFO);
        assert_eq!(info.redis_version.as_deref(), Some("7.0.15"));
        assert_eq!(info.used_memory, Some(1_048_576));
        assert_eq!(info.maxmemory, Some(1_717_986_918));
        assert_eq!(info.mem_fragmentation_ratio, Some(1.73));
        assert_eq!(info.mem_fragmentation_bytes, Some(765_432));
        assert_eq!(info.evicted_keys, Some(12));
        assert_eq!(info.hit_rate(), Some(0.71));
        assert_eq!(info.defrag_supported, Some(true));
        assert_eq!(info.active_defrag_running, Some(false));
    }

    #[test]
    fn no_lookups_means_no_hit_rate_and_junk_is_skipped() {
        let info =
            parse_info("keyspace_hits:0\nkeyspace_misses:0\nused_memory:lots\nnot a field\n");
        assert_eq!(info.hit_rate(), None);
        assert_eq!(info.used_memory, None);
    }
}
