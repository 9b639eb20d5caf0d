//! The Redis that holds a model's caches: the settings it should run with
//! ([`settings`]), its live config ([`live`]) and its health ([`info`]).

pub mod info;
pub mod live;
pub mod settings;

pub use info::RedisInfo;
pub use live::{ConfigOutcome, LiveError, RedisTarget};
pub use settings::{RedisSettings, SettingsError};
