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
//!   The same items and the user data are also on a **config drive**: a
//!   read-only virtio block device whose serial is
//!   [`CONFIG_DRIVE_SERIAL`] (`/sys/block/vdX/serial` in the guest), the
//!   last block device the VM has. Its content is a POSIX tar archive
//!   (ustar) of two files, [`CONFIG_DRIVE_METADATA`] (`key=value` lines, as
//!   the process workload's metadata file) and [`CONFIG_DRIVE_USER_DATA`]
//!   (the user data as is), so a guest with nothing but busybox reads it
//!   with `tar -x -f /dev/vdX`; the command line is bounded by the
//!   kernel's limit, the drive is not. The runtime writes it
//!   ([`config_drive`]) into the VM directory before each start.
//!
//! Every value is safe to put on the command line unquoted: ids and names
//! are checked to be letters, digits, `-`, `_` and `.`, the network items
//! are addresses, and base64 has no spaces.

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

/// The serial of a microVM's config drive, by which the guest finds it.
pub const CONFIG_DRIVE_SERIAL: &str = "tern-config";

/// The config drive's file in a VM directory.
pub const CONFIG_DRIVE_FILE_NAME: &str = "config-drive.tar";

/// The config drive's file of `key=value` metadata lines.
pub const CONFIG_DRIVE_METADATA: &str = "meta-data";

/// The config drive's file of user data.
pub const CONFIG_DRIVE_USER_DATA: &str = "user-data";

/// One tar block.
const BLOCK: usize = 512;

/// The config drive of `items` and `user_data`: a ustar archive of
/// [`CONFIG_DRIVE_METADATA`] and [`CONFIG_DRIVE_USER_DATA`], ending with
/// the two zero blocks tar expects.
pub fn config_drive(items: &[(&'static str, String)], user_data: &str) -> Vec<u8> {
    let mut out = Vec::new();
    tar_entry(
        &mut out,
        CONFIG_DRIVE_METADATA,
        metadata_text(items).as_bytes(),
    );
    tar_entry(&mut out, CONFIG_DRIVE_USER_DATA, user_data.as_bytes());
    out.resize(out.len() + 2 * BLOCK, 0);
    out
}

/// Appends a regular file `name` (ASCII, under 100 bytes: the constants
/// above) holding `data`, mode 0444, owner root, time 0.
fn tar_entry(out: &mut Vec<u8>, name: &str, data: &[u8]) {
    fn put(header: &mut [u8; BLOCK], at: usize, field: &[u8]) {
        header[at..at + field.len()].copy_from_slice(field);
    }
    let mut header = [0u8; BLOCK];
    let h = &mut header;
    put(h, 0, name.as_bytes());
    put(h, 100, b"0000444\0");
    put(h, 108, b"0000000\0");
    put(h, 116, b"0000000\0");
    put(h, 124, format!("{:011o}\0", data.len()).as_bytes());
    put(h, 136, b"00000000000\0");
    put(h, 156, b"0");
    put(h, 257, b"ustar\0");
    put(h, 263, b"00");
    // The checksum is computed with its own field as eight spaces.
    put(h, 148, b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    put(h, 148, format!("{sum:06o}\0 ").as_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(BLOCK) * BLOCK, 0);
}

/// `items` as `key=value` lines.
fn metadata_text(items: &[(&'static str, String)]) -> String {
    items.iter().map(|(k, v)| format!("{k}={v}\n")).collect()
}

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
    std::fs::write(dir.join(METADATA_FILE_NAME), metadata_text(items))?;
    std::fs::write(dir.join(USER_DATA_FILE_NAME), user_data)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // reason: test code; a failed unwrap is a failed test.

    use super::*;
    use std::net::Ipv4Addr;

    /// `archive` extracted by the system's tar into a new directory.
    fn untar(archive: &[u8]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("drive.tar");
        std::fs::write(&file, archive).unwrap();
        let out = std::process::Command::new("tar")
            .arg("-x")
            .arg("-f")
            .arg(&file)
            .arg("-C")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tar refused the drive: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    }

    #[test]
    fn the_config_drive_is_a_tar_archive_of_metadata_and_user_data() {
        let drive = config_drive(&items("vm-1", "db", None), "line one\nline two\n");
        assert_eq!(drive.len() % BLOCK, 0);
        let dir = untar(&drive);
        assert_eq!(
            std::fs::read_to_string(dir.path().join(CONFIG_DRIVE_METADATA)).unwrap(),
            "id=vm-1\nname=db\n"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join(CONFIG_DRIVE_USER_DATA)).unwrap(),
            "line one\nline two\n"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// Any user data up to the limit (empty, block-sized, not UTF-8
        /// safe for a shell) comes out of tar byte for byte.
        #[test]
        fn any_user_data_survives_the_drive(
            user_data in proptest::collection::vec(proptest::char::any(), 0..crate::spec::MAX_USER_DATA_LEN / 4)
        ) {
            let user_data: String = user_data.into_iter().collect();
            let dir = untar(&config_drive(&items("vm-2", "web", None), &user_data));
            proptest::prop_assert_eq!(
                std::fs::read_to_string(dir.path().join(CONFIG_DRIVE_USER_DATA)).unwrap(),
                user_data
            );
        }
    }

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
