//! What a VM learns about itself: its id, its name and, when it is on the
//! network, its address (with the pool's prefix length), gateway and MAC.
//!
//! And the operator's user data (the spec's `user_data`, at most
//! [`MAX_USER_DATA_LEN`](crate::spec::MAX_USER_DATA_LEN) bytes).
//!
//! - A process workload gets each item as an environment variable
//!   (`TERN_VM_ID`, `TERN_VM_NAME`, `TERN_VM_ADDRESS`, `TERN_VM_GATEWAY`,
//!   `TERN_VM_MAC`) and all of them in a file, `metadata` in its VM
//!   directory (`key=value` lines), whose path is in `TERN_METADATA_FILE`;
//!   the user data as is in `TERN_VM_USER_DATA` and in the file
//!   `user-data` beside it, whose path is in `TERN_USER_DATA_FILE`.
//! - A microVM guest gets them on its kernel command line as
//!   `tern.id=… tern.name=… tern.address=… tern.gateway=… tern.mac=…`
//!   (in `/proc/cmdline`), after the spec's own command line, and the user
//!   data, when there is some, as `tern.user_data=` its base64 (standard
//!   alphabet, padded).
//!
//! Every value is safe to put there unquoted: ids and names are checked
//! to be letters, digits, `-`, `_` and `.`, the network items are
//! addresses, and base64 has no spaces.

use std::path::Path;

use tern_state::network::format_mac;

use crate::network::Attachment;

/// The file in a VM directory holding its metadata.
pub const METADATA_FILE_NAME: &str = "metadata";

/// The environment variable naming the metadata file.
pub const METADATA_FILE_ENV: &str = "TERN_METADATA_FILE";

/// The file in a VM directory holding its user data.
pub const USER_DATA_FILE_NAME: &str = "user-data";

/// The environment variable naming the user data file.
pub const USER_DATA_FILE_ENV: &str = "TERN_USER_DATA_FILE";

/// The environment variable holding the user data.
pub const USER_DATA_ENV: &str = "TERN_VM_USER_DATA";

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

/// The kernel command line parameters of `items` and `user_data`.
pub fn cmdline(items: &[(&'static str, String)], user_data: &str) -> String {
    use base64::Engine as _;
    let mut parts: Vec<String> = items.iter().map(|(k, v)| format!("tern.{k}={v}")).collect();
    if !user_data.is_empty() {
        let encoded = base64::engine::general_purpose::STANDARD.encode(user_data);
        parts.push(format!("tern.user_data={encoded}"));
    }
    parts.join(" ")
}

/// Sets the workload environment of `items` and `user_data` on
/// `command`, the files' paths (in `dir`) included.
pub(crate) fn set_env(
    command: &mut tokio::process::Command,
    dir: &Path,
    items: &[(&'static str, String)],
    user_data: &str,
) {
    command
        .env(METADATA_FILE_ENV, dir.join(METADATA_FILE_NAME))
        .env(USER_DATA_FILE_ENV, dir.join(USER_DATA_FILE_NAME))
        .env(USER_DATA_ENV, user_data);
    for (key, value) in items {
        command.env(env_name(key), value);
    }
}

/// Writes `items` as `key=value` lines into `dir`'s metadata file, and
/// `user_data` into its user data file.
pub(crate) fn write_files(
    dir: &Path,
    items: &[(&'static str, String)],
    user_data: &str,
) -> std::io::Result<()> {
    let text: String = items.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    std::fs::write(dir.join(METADATA_FILE_NAME), text)?;
    std::fs::write(dir.join(USER_DATA_FILE_NAME), user_data)
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
            cmdline(&all, ""),
            "tern.id=vm-9 tern.name=web tern.address=10.213.0.9/16 \
             tern.gateway=10.213.0.1 tern.mac=02:74:6e:d5:00:09"
        );
        assert_eq!(env_name("address"), "TERN_VM_ADDRESS");
        assert_eq!(
            cmdline(&items("vm-1", "db", None), ""),
            "tern.id=vm-1 tern.name=db"
        );
        assert_eq!(
            cmdline(&items("vm-1", "db", None), "a b\n"),
            "tern.id=vm-1 tern.name=db tern.user_data=YSBiCg=="
        );
    }
}
