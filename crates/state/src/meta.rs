//! The metadata register: small operator key/value metadata (cluster
//! labels), each value stamped with the log index that wrote it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::command::{Rejection, Response};
pub use crate::limits::{MAX_META_KEY_LEN, MAX_META_VALUE_LEN};
use crate::state::ClusterState;

/// Most keys the metadata register holds: with the two bounds above, at
/// most about 42 MiB of state in the worst case, a few hundred KiB for the
/// labels it is meant for.
pub const MAX_META_KEYS: usize = 10_000;

/// One key of the metadata register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaEntry {
    /// The value.
    pub value: String,
    /// The log index of the put that wrote it.
    pub index: u64,
}

/// Checks a metadata key and value against the register's bounds (the
/// state applies the same check; services call it to refuse early).
pub fn check_meta(key: &str, value: &str) -> Result<(), Rejection> {
    check_meta_key(key)?;
    if value.len() > MAX_META_VALUE_LEN {
        return Err(Rejection::MetaValueTooLarge { len: value.len() });
    }
    Ok(())
}

/// Checks a metadata key against the register's bounds.
pub fn check_meta_key(key: &str) -> Result<(), Rejection> {
    if key.is_empty() || key.len() > MAX_META_KEY_LEN || key.chars().any(char::is_control) {
        return Err(Rejection::InvalidMetaKey { len: key.len() });
    }
    Ok(())
}

impl ClusterState {
    pub(crate) fn put_meta(&mut self, index: u64, key: String, value: String) -> Response {
        if let Err(why) = check_meta(&key, &value) {
            return Response::Rejected(why);
        }
        if self.meta.len() >= MAX_META_KEYS && !self.meta.contains_key(&key) {
            return Response::Rejected(Rejection::MetaFull);
        }
        self.meta.insert(key, MetaEntry { value, index });
        Response::MetaWritten { index }
    }

    /// One key of the metadata register, as applied on this node.
    pub fn meta(&self, key: &str) -> Option<&MetaEntry> {
        self.meta.get(key)
    }

    /// The whole metadata register, by key.
    pub fn meta_entries(&self) -> &BTreeMap<String, MetaEntry> {
        &self.meta
    }
}
