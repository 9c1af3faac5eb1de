//! The edge agent (in progress): sensor drivers and the on-disk reading log.

pub mod sensors;
pub mod store;
