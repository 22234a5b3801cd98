//! The lab's client keys, and the access they hold.
//!
//! Nodes deny by default: a throw-away key reaches health only. The lab's
//! own clients (register writers and readers, steady traffic, the rollout's
//! load, the bench cluster's writers) and its CLI calls use keys from one
//! pool generated per run, and every node's config names them in
//! `[access] admins`, which the first node grants when it creates the
//! cluster. A pool rather than one key: the nodes bound connections and
//! in-flight bytes per peer id, and two iroh endpoints must not share an
//! identity, so clients take the keys in turn.

use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Keys in the pool: more than the clients any scenario runs at once, so
/// no two share a key (a collision would only share per-peer limits).
pub const CLIENT_KEYS: usize = 64;

static POOL: OnceLock<Vec<[u8; 32]>> = OnceLock::new();
static NEXT: AtomicUsize = AtomicUsize::new(0);

fn pool() -> &'static [[u8; 32]] {
    POOL.get_or_init(|| (0..CLIENT_KEYS).map(|_| rand::random()).collect())
}

/// The next key of the pool (in turn), never the CLI's (the first), so
/// the lab's own iroh endpoints never share an identity with a CLI call.
pub fn client_key() -> [u8; 32] {
    let pool = pool();
    pool[1 + NEXT.fetch_add(1, Ordering::Relaxed) % (pool.len() - 1)]
}

/// The ids of every pool key, for a config's `access.admins`: the first
/// node grants them admin when it creates the cluster.
pub fn admin_ids() -> Vec<String> {
    pool()
        .iter()
        .map(|k| tern_transport_grpc::tls::peer_id_of_secret(k).to_string())
        .collect()
}

/// The `[access]` section that makes every pool key an admin of a cluster
/// the node creates.
pub fn access_section() -> String {
    let ids: Vec<String> = admin_ids().iter().map(|id| format!("\"{id}\"")).collect();
    format!("[access]\nadmins = [{}]\n", ids.join(", "))
}

/// Writes the pool's first key to `path` (owner-only), for the CLI's
/// `--key`, unless it is there already.
pub fn write_cli_key(path: &Path) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if path.exists() {
        return Ok(());
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(&pool()[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_access_section_names_every_pool_key_and_parses() {
        let s = access_section();
        let v: toml::Value = toml::from_str(&s).unwrap();
        let admins = v["access"]["admins"].as_array().unwrap();
        assert_eq!(admins.len(), CLIENT_KEYS);
        assert_eq!(admins[0].as_str().unwrap().len(), 64);
        let a = client_key();
        let b = client_key();
        assert_ne!(a, b);
        assert!((0..CLIENT_KEYS).all(|_| client_key() != pool()[0]));
    }
}
