//! The key space that the serving caches, the controller and what comes
//! next share: the version-scoped key schema ([`keys`]), the version registry
//! that says which versions serve ([`registry`]), the sweeper that deletes
//! a retired version's keys ([`sweep`]), and the Redis users that may touch
//! them ([`acl`]).

pub mod acl;
pub mod keys;
pub mod registry;
pub mod sweep;
