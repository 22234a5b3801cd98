//! The assets a real microVM boot test needs, prepared from Debian
//! packages: QEMU, a guest kernel and a busybox initramfs.
//!
//! [`prepare`] is the one entry point (also meant for `cargo xtask test`).
//! It runs, as root, only what is missing:
//!
//! 1. `apt-get update` and `apt-get install -y --no-install-recommends
//!    qemu-system-x86` when `qemu-system-x86_64` is not on `PATH`;
//! 2. the same for `busybox-static` when `/bin/busybox` is not a static
//!    binary;
//! 3. `apt-cache depends linux-image-cloud-amd64` to find the versioned
//!    kernel package, `apt-get download` of it into the cache dir and
//!    `dpkg-deb -x` to extract (never install) its `/boot/vmlinuz-*`,
//!    together with the `evdev` and ACPI `button` modules and virtio-net
//!    over MMIO with its dependencies and virtio-blk ([`GUEST_MODULES`]);
//! 4. an initramfs (a `newc` cpio archive written here, no `cpio` tool)
//!    holding the static busybox, those modules and an `/init` that prints
//!    its identity from the kernel command line ([`IDENTITY_MARKER`]) and
//!    from its config drive ([`CONFIG_DRIVE_MARKER`]),
//!    configures its address and pings its gateway when given one
//!    ([`GATEWAY_MARKER`]), prints
//!    [`BOOT_MARKER`] on the serial console, then waits, and powers off
//!    (printing [`POWER_OFF_MARKER`]) when the ACPI power button is
//!    pressed.
//!
//! Everything lands in the cache dir and is reused by later runs. Any
//! failure is returned as an error naming the command that failed.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The line the guest's `/init` prints once userspace runs.
pub(crate) const BOOT_MARKER: &str = "TERN-MICROVM-GUEST-BOOTED";

/// The line the guest prints when its power button is pressed, just
/// before it powers off.
pub(crate) const POWER_OFF_MARKER: &str = "TERN-MICROVM-GUEST-POWERING-OFF";

/// The Debian metapackage that depends on the current cloud kernel.
pub(crate) const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";

/// Where the static busybox comes from.
const BUSYBOX: &str = "/bin/busybox";

/// What a microVM boot test needs.
#[derive(Debug, Clone)]
pub(crate) struct MicrovmAssets {
    /// The guest kernel (a bzImage).
    pub(crate) kernel: PathBuf,
    /// The busybox initramfs.
    pub(crate) initrd: PathBuf,
}

/// Prepares the assets under `cache_dir`, installing system packages when
/// missing. See the module docs for the exact commands.
pub(crate) fn prepare(cache_dir: &Path) -> Result<MicrovmAssets, String> {
    std::fs::create_dir_all(cache_dir).map_err(|e| format!("cannot create {cache_dir:?}: {e}"))?;
    let mut updated = false;
    if !on_path("qemu-system-x86_64") {
        apt_install("qemu-system-x86", &mut updated)?;
        if !on_path("qemu-system-x86_64") {
            return Err("qemu-system-x86 installed but qemu-system-x86_64 is not on PATH".into());
        }
    }
    if !is_static_busybox(Path::new(BUSYBOX)) {
        apt_install("busybox-static", &mut updated)?;
        if !is_static_busybox(Path::new(BUSYBOX)) {
            return Err(format!(
                "busybox-static installed but {BUSYBOX} is not a static binary"
            ));
        }
    }
    let kernel = ensure_kernel(cache_dir, &mut updated)?;
    let initrd = cache_dir.join("initramfs.cpio");
    let busybox = std::fs::read(BUSYBOX).map_err(|e| format!("cannot read {BUSYBOX}: {e}"))?;
    let mut modules = Vec::new();
    for module in GUEST_MODULES {
        let path = cache_dir.join(module);
        let bytes = std::fs::read(&path).map_err(|e| format!("cannot read {path:?}: {e}"))?;
        modules.push((module, bytes));
    }
    let archive = initramfs(&busybox, &modules);
    let tmp = cache_dir.join("initramfs.cpio.tmp");
    std::fs::write(&tmp, archive).map_err(|e| format!("cannot write {tmp:?}: {e}"))?;
    std::fs::rename(&tmp, &initrd).map_err(|e| format!("cannot rename {tmp:?}: {e}"))?;
    Ok(MicrovmAssets { kernel, initrd })
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

/// Whether `path` is an ELF executable without a program interpreter
/// (`PT_INTERP`), i.e. statically linked: it must run alone in the guest.
fn is_static_busybox(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    // ELF64 little-endian: e_phoff at 0x20, e_phentsize at 0x36, e_phnum at 0x38.
    if bytes.len() < 0x40 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 {
        return false;
    }
    let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]) as usize;
    let phoff = u64::from_le_bytes(bytes[0x20..0x28].try_into().expect("8 bytes")) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| {
        let at = phoff + i * phentsize;
        // p_type 3 is PT_INTERP.
        bytes
            .get(at..at + 4)
            .is_some_and(|t| u32::from_le_bytes(t.try_into().expect("4 bytes")) != 3)
    })
}

fn run(command: &mut Command) -> Result<String, String> {
    let shown = format!("{command:?}");
    let output = command
        .output()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{shown} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn apt_update(updated: &mut bool) -> Result<(), String> {
    if !*updated {
        run(Command::new("apt-get").args(["update", "-q"]))?;
        *updated = true;
    }
    Ok(())
}

fn apt_install(package: &str, updated: &mut bool) -> Result<(), String> {
    apt_update(updated)?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-q", "--no-install-recommends", package]))?;
    Ok(())
}

/// The versioned kernel package the metapackage depends on.
fn kernel_package(updated: &mut bool) -> Result<String, String> {
    let depends = |_: ()| run(Command::new("apt-cache").args(["depends", KERNEL_METAPACKAGE]));
    let text = match depends(()) {
        Ok(text) => text,
        Err(_) => {
            apt_update(updated)?;
            depends(())?
        }
    };
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && p != &KERNEL_METAPACKAGE)
        .map(str::to_owned)
        .ok_or_else(|| {
            format!("`apt-cache depends {KERNEL_METAPACKAGE}` names no kernel package:\n{text}")
        })
}

fn ensure_kernel(cache_dir: &Path, updated: &mut bool) -> Result<PathBuf, String> {
    let kernel = cache_dir.join("vmlinuz");
    if kernel.is_file() && GUEST_MODULES.iter().all(|m| cache_dir.join(m).is_file()) {
        return Ok(kernel);
    }
    let package = kernel_package(updated)?;
    let download_dir = cache_dir.join("deb");
    let _ = std::fs::remove_dir_all(&download_dir);
    std::fs::create_dir_all(&download_dir)
        .map_err(|e| format!("cannot create {download_dir:?}: {e}"))?;
    run(Command::new("apt-get")
        .args(["download", "-q", &package])
        .current_dir(&download_dir))?;
    let deb = std::fs::read_dir(&download_dir)
        .map_err(|e| format!("cannot list {download_dir:?}: {e}"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| format!("`apt-get download {package}` left no .deb in {download_dir:?}"))?;
    let extract = download_dir.join("x");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&extract))?;
    let boot = extract.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .map_err(|e| format!("{package} has no /boot ({e})"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .ok_or_else(|| format!("{package} has no /boot/vmlinuz-*"))?;
    for module in GUEST_MODULES {
        let found = find_file(&extract.join("lib/modules"), module)
            .ok_or_else(|| format!("{package} has no {module}"))?;
        std::fs::copy(&found, cache_dir.join(module))
            .map_err(|e| format!("cannot copy {found:?}: {e}"))?;
    }
    std::fs::copy(&vmlinuz, &kernel).map_err(|e| format!("cannot copy {vmlinuz:?}: {e}"))?;
    let _ = std::fs::remove_dir_all(&download_dir);
    Ok(kernel)
}

/// Kernel modules the guest loads, in load order: the ACPI power button
/// driver and the event device it reports through (so that QMP
/// `system_powerdown` reaches it), then virtio over MMIO and virtio-net
/// with its dependencies (the guest's network card), and virtio-blk (the
/// config drive); all modules in Debian's cloud kernel.
pub(crate) const GUEST_MODULES: [&str; 9] = [
    "evdev.ko",
    "button.ko",
    "virtio_ring.ko",
    "virtio.ko",
    "virtio_mmio.ko",
    "failover.ko",
    "net_failover.ko",
    "virtio_net.ko",
    "virtio_blk.ko",
];

/// What the guest prints with its identity, read from `tern.*` kernel
/// parameters: `TERN-GUEST id=… name=… address=…`.
pub(crate) const IDENTITY_MARKER: &str = "TERN-GUEST id=";

/// What the guest prints before its decoded user data
/// (`tern.user_data`), when it has some.
pub(crate) const USER_DATA_MARKER: &str = "TERN-GUEST-USER-DATA";

/// What the guest prints with what it read from its config drive:
/// `TERN-GUEST-CONFIG-DRIVE name=… address=… user_data=…`.
pub(crate) const CONFIG_DRIVE_MARKER: &str = "TERN-GUEST-CONFIG-DRIVE";

/// What the guest prints once it has pinged its gateway.
pub(crate) const GATEWAY_MARKER: &str = "TERN-GUEST-GATEWAY-REACHED";

/// What the guest prints when its gateway never answered.
pub(crate) const NO_GATEWAY_MARKER: &str = "TERN-GUEST-GATEWAY-UNREACHABLE";

/// Finds a file named `name` anywhere under `dir`.
fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, name) {
                return Some(found);
            }
        } else if path.file_name().is_some_and(|n| n == name) {
            return Some(path);
        }
    }
    None
}

/// The guest's `/init`: mount `/proc`, `/sys` and `/dev`, load the power
/// button driver and power off when it is pressed, load the network
/// driver; print its identity from the `tern.*` kernel parameters and
/// what its config drive holds ([`CONFIG_DRIVE_MARKER`]) and,
/// given an address, configure `eth0` with it and ping the gateway; print
/// the marker, then wait (the test stops the VM from outside).
fn init_script() -> String {
    format!(
        r#"#!/bin/busybox sh
bb=/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t sysfs sys /sys
$bb mount -t devtmpfs dev /dev
for m in {modules}; do $bb insmod /lib/modules/$m 2>/dev/null; done
for p in $($bb cat /proc/cmdline); do
  case "$p" in
    tern.id=*) t_id=${{p#*=}} ;;
    tern.name=*) t_name=${{p#*=}} ;;
    tern.address=*) t_address=${{p#*=}} ;;
    tern.gateway=*) t_gateway=${{p#*=}} ;;
    tern.user_data=*) t_user_data=${{p#*=}} ;;
  esac
done
$bb echo "{IDENTITY_MARKER}${{t_id:-none}} name=${{t_name:-none}} address=${{t_address:-none}}"
for b in /sys/block/vd*; do
  if [ "$($bb cat $b/serial 2>/dev/null)" = "{serial}" ]; then drive=/dev/${{b##*/}}; fi
done
if [ -n "$drive" ]; then
  $bb mkdir -p /run/tern
  $bb tar -x -f "$drive" -C /run/tern
  d_name=$($bb sed -n 's/^name=//p' /run/tern/{meta})
  d_address=$($bb sed -n 's/^address=//p' /run/tern/{meta})
  $bb echo "{CONFIG_DRIVE_MARKER} name=${{d_name:-none}} address=${{d_address:-none}} user_data=$($bb cat /run/tern/{user})"
else
  $bb echo "{CONFIG_DRIVE_MARKER} missing"
fi
if [ -n "$t_user_data" ]; then
  $bb echo "{USER_DATA_MARKER} $($bb echo "$t_user_data" | $bb base64 -d)"
fi
if [ -n "$t_address" ]; then
  $bb ip link set lo up
  $bb ip link set eth0 up
  $bb ip addr add "$t_address" dev eth0
  ok=
  for i in 1 2 3 4 5 6 7 8 9 10; do
    if $bb ping -c 1 -W 3 "$t_gateway" >/dev/null 2>&1; then ok=1; break; fi
  done
  if [ -n "$ok" ]; then $bb echo "{GATEWAY_MARKER} $t_gateway"; else $bb echo "{NO_GATEWAY_MARKER} $t_gateway"; $bb ip addr; fi
fi
for d in /sys/class/input/event*; do
  if $bb grep -q "Power Button" $d/device/name 2>/dev/null; then ev=${{d##*/}}; fi
done
$bb echo "power button: ${{ev:-none}}"
if [ -n "$ev" ]; then
  ( $bb head -c 1 /dev/input/$ev >/dev/null; $bb echo "{POWER_OFF_MARKER}"; $bb poweroff -f ) &
fi
$bb echo "{BOOT_MARKER} uptime=$($bb cut -d' ' -f1 /proc/uptime)"
while :; do $bb sleep 3600; done
"#,
        modules = GUEST_MODULES.join(" "),
        serial = tern_runtime::metadata::CONFIG_DRIVE_SERIAL,
        meta = tern_runtime::metadata::CONFIG_DRIVE_METADATA,
        user = tern_runtime::metadata::CONFIG_DRIVE_USER_DATA,
    )
}

/// A `newc` cpio archive: `/bin/busybox`, `/init`, the [`GUEST_MODULES`]
/// under `/lib/modules`, mount points and `/dev/console`.
pub(crate) fn initramfs(busybox: &[u8], modules: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut ino = 1;
    let mut entry = |out: &mut Vec<u8>, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]| {
        let name_len = name.len() + 1;
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            data.len() as u32,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name_len as u32,
            0, // check
        ];
        ino += 1;
        out.extend_from_slice(b"070701");
        for field in fields {
            out.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        pad4(out);
        out.extend_from_slice(data);
        pad4(out);
    };
    const DIR: u32 = 0o040_755;
    const EXEC: u32 = 0o100_755;
    const FILE: u32 = 0o100_644;
    const CONSOLE: u32 = 0o020_600;
    for dir in ["bin", "dev", "proc", "sys", "lib", "lib/modules"] {
        entry(&mut out, dir, DIR, (0, 0), &[]);
    }
    entry(&mut out, "dev/console", CONSOLE, (5, 1), &[]);
    entry(&mut out, "bin/busybox", EXEC, (0, 0), busybox);
    for (name, bytes) in modules {
        entry(
            &mut out,
            &format!("lib/modules/{name}"),
            FILE,
            (0, 0),
            bytes,
        );
    }
    entry(&mut out, "init", EXEC, (0, 0), init_script().as_bytes());
    entry(&mut out, "TRAILER!!!", 0, (0, 0), &[]);
    out
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}
