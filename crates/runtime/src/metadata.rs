//! What a VM learns about itself: its id, its name and, when it is on the
//! network, its address (with the pool's prefix length), gateway and MAC.
//!
//! - A process workload gets each item as an environment variable
//!   (`TERN_VM_ID`, `TERN_VM_NAME`, `TERN_VM_ADDRESS`, `TERN_VM_GATEWAY`,
//!   `TERN_VM_MAC`) and all of them in a file, `metadata` in its VM
//!   directory (`key=value` lines), whose path is in `TERN_METADATA_FILE`.
//! - A microVM guest gets them on its kernel command line as
//!   `tern.id=… tern.name=… tern.address=… tern.gateway=… tern.mac=…`
//!   (in `/proc/cmdline`), after the spec's own command line.
//!
//! Every value is safe to put there unquoted: ids and names are checked
//! to be letters, digits, `-`, `_` and `.`, and the rest are addresses.

use std::path::Path;

use tern_state::network::format_mac;

use crate::network::Attachment;

/// The file in a VM directory holding its metadata.
pub const METADATA_FILE_NAME: &str = "metadata";

/// The environment variable naming the metadata file.
pub const METADATA_FILE_ENV: &str = "TERN_METADATA_FILE";

/// The metadata of VM `vm_id` named `name`, as `(key, value)` pairs in a
/// fixed order; the network keys only when it is attached.
pub fn items(vm_id: &str, name: &str, network: Option<&Attachment>) -> Vec<(&'static str, String)> {
    let mut out = vec![("id", vm_id.to_owned()), ("name", name.to_owned())];
    if let Some(a) = network {
        out.push(("address", format!("{}/{}", a.address, a.pool.prefix())));
        out.push(("gateway", a.gateway().to_string()));
        out.push(("mac", format_mac(&a.mac)));
    }
    out
}

/// The environment variable of metadata key `key`: `TERN_VM_KEY`.
pub fn env_name(key: &str) -> String {
    format!("TERN_VM_{}", key.to_ascii_uppercase())
}

/// The kernel command line parameters of `items`.
pub fn cmdline(items: &[(&'static str, String)]) -> String {
    let parts: Vec<String> = items.iter().map(|(k, v)| format!("tern.{k}={v}")).collect();
    parts.join(" ")
}

/// Writes `items` as `key=value` lines into `dir`'s metadata file.
pub(crate) fn write_file(dir: &Path, items: &[(&'static str, String)]) -> std::io::Result<()> {
    let text: String = items.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    std::fs::write(dir.join(METADATA_FILE_NAME), text)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: test code; a failed unwrap is a failed test.

    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn items_name_the_vm_and_its_network() {
        let a = Attachment {
            address: Ipv4Addr::new(10, 213, 0, 9),
            mac: [2, 0x74, 0x6e, 213, 0, 9],
            pool: "10.213.0.0/16".parse().unwrap(),
        };
        let all = items("vm-9", "web", Some(&a));
        assert_eq!(
            cmdline(&all),
            "tern.id=vm-9 tern.name=web tern.address=10.213.0.9/16 \
             tern.gateway=10.213.0.1 tern.mac=02:74:6e:d5:00:09"
        );
        assert_eq!(env_name("address"), "TERN_VM_ADDRESS");
        assert_eq!(
            cmdline(&items("vm-1", "db", None)),
            "tern.id=vm-1 tern.name=db"
        );
    }
}
