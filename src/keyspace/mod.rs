//! The key space that the serving caches, the controller and what comes
//! next share: the version-scoped key schema ([`keys`]), the version registry
//! that says which versions serve ([`registry`]), and the sweeper that
//! deletes a retired version's keys ([`sweep`]).

pub mod keys;
pub mod registry;
pub mod sweep;
