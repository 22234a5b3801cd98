//! VM spec validation: every rule a [`VmSpec`] must meet before a runtime
//! will act on it, with errors that name the field and say why.
//!
//! Validation is pure except for one check: a `microvm` spec's kernel (and
//! initrd and image, when given) must exist on this node, because a path
//! that does not exist can only fail later, inside QEMU, with a worse error.

use std::fmt;
use std::path::{Path, PathBuf};

use tern_protocol::pb::VmSpec;

/// Longest VM name: a DNS label is at most 63 bytes (RFC 1035), and names
/// end up in host names and file names. The write limit, defined once.
pub const MAX_NAME_LEN: usize = tern_state::limits::MAX_VM_NAME_LEN;

/// Most bytes of user data: the write limit, defined once.
pub const MAX_USER_DATA_LEN: usize = tern_state::limits::MAX_USER_DATA_LEN;

/// Fewest vCPUs a VM may ask for.
pub const MIN_VCPUS: u32 = 1;

/// Most vCPUs a VM may ask for: well above any microVM we expect, low enough
/// that a typo (`640`) is caught rather than scheduled.
pub const MAX_VCPUS: u32 = 64;

/// Least memory a VM may ask for, in MiB: below this not even a minimal
/// Linux guest or a small process workload is meaningful.
pub const MIN_MEMORY_MIB: u64 = 16;

/// Most memory a VM may ask for, in MiB (1 TiB): catches unit mistakes
/// (bytes or KiB given as MiB).
pub const MAX_MEMORY_MIB: u64 = 1024 * 1024;

/// Longest VM id a runtime accepts. Ids name directories in the runtime's
/// state dir and a unix socket path, which is limited to 108 bytes. The
/// write limit, defined once.
pub const MAX_VM_ID_LEN: usize = tern_state::limits::MAX_VM_ID_LEN;

/// The runtimes a spec can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuntimeKind {
    /// QEMU's `microvm` machine.
    Microvm,
    /// A supervised host process.
    Process,
}

impl RuntimeKind {
    /// The name used in [`VmSpec::runtime`].
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Microvm => "microvm",
            RuntimeKind::Process => "process",
        }
    }

    /// Parses the name used in [`VmSpec::runtime`].
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "microvm" => Some(RuntimeKind::Microvm),
            "process" => Some(RuntimeKind::Process),
            _ => None,
        }
    }
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The field of a [`VmSpec`] an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecField {
    /// `name`
    Name,
    /// `vcpus`
    Vcpus,
    /// `memory_mib`
    MemoryMib,
    /// `runtime`
    Runtime,
    /// `kernel`
    Kernel,
    /// `initrd`
    Initrd,
    /// `image`
    Image,
    /// `command`
    Command,
    /// `user_data`
    UserData,
}

impl SpecField {
    /// The field's name in the protobuf schema.
    pub fn as_str(self) -> &'static str {
        match self {
            SpecField::Name => "name",
            SpecField::Vcpus => "vcpus",
            SpecField::MemoryMib => "memory_mib",
            SpecField::Runtime => "runtime",
            SpecField::Kernel => "kernel",
            SpecField::Initrd => "initrd",
            SpecField::Image => "image",
            SpecField::Command => "command",
            SpecField::UserData => "user_data",
        }
    }
}

impl fmt::Display for SpecField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A spec rule that was broken: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid VM spec: field `{field}`: {reason}")]
pub struct SpecError {
    /// The offending field.
    pub field: SpecField,
    /// Why it was rejected, in words an operator can act on.
    pub reason: String,
}

impl SpecError {
    fn new(field: SpecField, reason: impl Into<String>) -> Self {
        SpecError {
            field,
            reason: reason.into(),
        }
    }
}

/// Checks every rule on `spec` and returns the runtime it asks for.
///
/// Rules: `name` is a DNS label (1 to [`MAX_NAME_LEN`] lowercase letters,
/// digits and `-`, starting with a letter, not ending with `-`); `vcpus` in
/// [`MIN_VCPUS`]`..=`[`MAX_VCPUS`]; `memory_mib` in
/// [`MIN_MEMORY_MIB`]`..=`[`MAX_MEMORY_MIB`]; `runtime` is `microvm` or
/// `process`; a `process` VM has a non-empty `command` whose program is not
/// empty; a `microvm` VM has a `kernel` that exists as a file, and its
/// `initrd` and `image`, when set, exist as files too.
///
/// The first broken rule is reported, in the order above.
pub fn validate(spec: &VmSpec) -> Result<RuntimeKind, SpecError> {
    validate_name(&spec.name)?;
    validate_user_data(&spec.user_data)?;
    if !(MIN_VCPUS..=MAX_VCPUS).contains(&spec.vcpus) {
        return Err(SpecError::new(
            SpecField::Vcpus,
            format!(
                "{} is out of range: a VM has {MIN_VCPUS} to {MAX_VCPUS} vCPUs",
                spec.vcpus
            ),
        ));
    }
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&spec.memory_mib) {
        return Err(SpecError::new(
            SpecField::MemoryMib,
            format!(
                "{} MiB is out of range: a VM has {MIN_MEMORY_MIB} MiB to {MAX_MEMORY_MIB} MiB (1 TiB)",
                spec.memory_mib
            ),
        ));
    }
    let kind = RuntimeKind::parse(&spec.runtime).ok_or_else(|| {
        SpecError::new(
            SpecField::Runtime,
            format!(
                "unknown runtime {:?}: expected \"microvm\" or \"process\"",
                spec.runtime
            ),
        )
    })?;
    match kind {
        RuntimeKind::Process => match spec.command.first() {
            None => {
                return Err(SpecError::new(
                    SpecField::Command,
                    "a process VM needs a command (argv) to run; it is empty",
                ));
            }
            Some(program) if program.trim().is_empty() => {
                return Err(SpecError::new(
                    SpecField::Command,
                    "the program (command[0]) is empty",
                ));
            }
            Some(_) => {}
        },
        RuntimeKind::Microvm => {
            if spec.kernel.is_empty() {
                return Err(SpecError::new(
                    SpecField::Kernel,
                    "a microvm VM needs a guest kernel path; it is empty",
                ));
            }
            require_file(SpecField::Kernel, &spec.kernel)?;
            if !spec.initrd.is_empty() {
                require_file(SpecField::Initrd, &spec.initrd)?;
            }
            if !spec.image.is_empty() {
                require_file(SpecField::Image, &spec.image)?;
            }
        }
    }
    Ok(kind)
}

/// User data is at most [`MAX_USER_DATA_LEN`] bytes, without NUL (it
/// becomes an environment variable).
fn validate_user_data(data: &str) -> Result<(), SpecError> {
    if data.contains('\0') {
        return Err(SpecError::new(
            SpecField::UserData,
            "contains a NUL byte, which an environment variable cannot hold",
        ));
    }
    if data.len() > MAX_USER_DATA_LEN {
        return Err(SpecError::new(
            SpecField::UserData,
            format!(
                "{} bytes: at most {MAX_USER_DATA_LEN} bytes (it reaches a microVM on its kernel command line)",
                data.len()
            ),
        ));
    }
    Ok(())
}

fn validate_name(name: &str) -> Result<(), SpecError> {
    let bad = |why: String| Err(SpecError::new(SpecField::Name, why));
    if name.is_empty() {
        return bad("empty: a VM needs a DNS-label name".into());
    }
    if name.len() > MAX_NAME_LEN {
        return bad(format!(
            "{} bytes long: a DNS label is at most {MAX_NAME_LEN}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return bad(format!(
            "{name:?} contains {c:?}: only lowercase letters, digits and '-' are allowed"
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return bad(format!("{name:?} must start with a lowercase letter"));
    }
    if name.ends_with('-') {
        return bad(format!("{name:?} must not end with '-'"));
    }
    Ok(())
}

/// Checks that `path` (after resolving symlinks and `..`) lies inside one
/// of `allowed` (directories, resolved the same way): how a node confines
/// the host files a microvm may boot from or attach as a disk. The error
/// names the field and the allowed directories.
pub fn require_allowed(field: SpecField, path: &str, allowed: &[PathBuf]) -> Result<(), SpecError> {
    let resolved = std::fs::canonicalize(path).map_err(|e| {
        SpecError::new(
            field,
            format!("{path:?} cannot be resolved on this node: {e}"),
        )
    })?;
    let inside = allowed.iter().any(|dir| {
        std::fs::canonicalize(dir)
            .map(|dir| resolved.starts_with(dir))
            .unwrap_or(false)
    });
    if inside {
        return Ok(());
    }
    let dirs: Vec<String> = allowed.iter().map(|d| d.display().to_string()).collect();
    Err(SpecError::new(
        field,
        if dirs.is_empty() {
            format!(
                "{path:?} is not allowed: this node allows microvm files from no directory (set vm.image_dirs in its config)"
            )
        } else {
            format!(
                "{path:?} is outside the directories this node allows ({}; vm.image_dirs in its config)",
                dirs.join(", ")
            )
        },
    ))
}

fn require_file(field: SpecField, path: &str) -> Result<(), SpecError> {
    match std::fs::metadata(Path::new(path)) {
        Ok(meta) if meta.is_file() => Ok(()),
        Ok(_) => Err(SpecError::new(
            field,
            format!("{path:?} exists but is not a regular file"),
        )),
        Err(e) => Err(SpecError::new(
            field,
            format!("{path:?} cannot be read on this node: {e}"),
        )),
    }
}

/// Why a VM id cannot be used (as a directory name, by a runtime).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmIdError {
    /// Empty, or longer than [`MAX_VM_ID_LEN`].
    #[error("must be 1 to {MAX_VM_ID_LEN} bytes long")]
    Length,
    /// Starts with `.` (a hidden or parent directory).
    #[error("must not start with '.'")]
    LeadingDot,
    /// Holds a character outside the allowed set.
    #[error("contains '{}': only ASCII letters, digits, '-', '_' and '.' are allowed", .0.escape_default())]
    Character(char),
}

/// Checks a VM id before a runtime uses it as a directory name: 1 to
/// [`MAX_VM_ID_LEN`] ASCII letters, digits, `-`, `_` or `.`, not starting
/// with `.`. Returns why not.
pub fn check_vm_id(vm_id: &str) -> Result<(), VmIdError> {
    if vm_id.is_empty() || vm_id.len() > MAX_VM_ID_LEN {
        return Err(VmIdError::Length);
    }
    if vm_id.starts_with('.') {
        return Err(VmIdError::LeadingDot);
    }
    if let Some(c) = vm_id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(VmIdError::Character(c));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn microvm_files_must_lie_in_an_allowed_directory() {
        let root = tempfile::tempdir().unwrap();
        let images = root.path().join("images");
        std::fs::create_dir(&images).unwrap();
        let kernel = images.join("vmlinuz");
        std::fs::write(&kernel, b"k").unwrap();
        let outside = root.path().join("secret.img");
        std::fs::write(&outside, b"s").unwrap();
        let allowed = vec![images.clone()];
        let path = |p: &Path| p.to_str().unwrap().to_owned();
        require_allowed(SpecField::Kernel, &path(&kernel), &allowed).unwrap();
        // Outside, directly, through `..`, and through a symlink placed
        // inside the allowed directory: all refused, naming the field.
        let e = require_allowed(SpecField::Image, &path(&outside), &allowed).unwrap_err();
        assert_eq!(e.field, SpecField::Image);
        assert!(e.to_string().contains("outside"), "{e}");
        let dotdot = format!("{}/../secret.img", images.display());
        assert!(require_allowed(SpecField::Image, &dotdot, &allowed).is_err());
        let link = images.join("escape.img");
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        assert!(require_allowed(SpecField::Image, &path(&link), &allowed).is_err());
        // No directory allowed at all: refused, saying how to allow one.
        let e = require_allowed(SpecField::Kernel, &path(&kernel), &[]).unwrap_err();
        assert!(e.to_string().contains("vm.image_dirs"), "{e}");
    }

    fn process_spec() -> VmSpec {
        VmSpec {
            name: "web-1".into(),
            vcpus: 1,
            memory_mib: 64,
            runtime: "process".into(),
            command: vec!["true".into()],
            ..VmSpec::default()
        }
    }

    #[test]
    fn accepts_a_good_process_spec() {
        assert_eq!(validate(&process_spec()), Ok(RuntimeKind::Process));
    }

    #[test]
    fn user_data_over_its_limit_is_refused_by_name() {
        let mut spec = process_spec();
        spec.user_data = "x".repeat(MAX_USER_DATA_LEN);
        assert!(validate(&spec).is_ok());
        spec.user_data.push('x');
        let err = validate(&spec).unwrap_err();
        assert_eq!(err.field, SpecField::UserData);
        assert!(err.to_string().contains("user_data"), "{err}");
        spec.user_data = "a\0b".into();
        assert_eq!(validate(&spec).unwrap_err().field, SpecField::UserData);
    }

    #[test]
    fn names_follow_dns_label_rules() {
        for bad in ["", "Web", "1web", "web-", "web_1", "wéb", &"a".repeat(64)] {
            let spec = VmSpec {
                name: bad.into(),
                ..process_spec()
            };
            let err = validate(&spec).expect_err(bad);
            assert_eq!(err.field, SpecField::Name, "{bad:?}: {err}");
        }
        let spec = VmSpec {
            name: "a".repeat(63),
            ..process_spec()
        };
        assert!(validate(&spec).is_ok());
    }

    #[test]
    fn ranges_are_checked_at_both_ends() {
        for vcpus in [0, 65] {
            let err = validate(&VmSpec {
                vcpus,
                ..process_spec()
            })
            .expect_err("vcpus");
            assert_eq!(err.field, SpecField::Vcpus);
        }
        for memory_mib in [15, MAX_MEMORY_MIB + 1] {
            let err = validate(&VmSpec {
                memory_mib,
                ..process_spec()
            })
            .expect_err("memory");
            assert_eq!(err.field, SpecField::MemoryMib);
        }
    }

    #[test]
    fn runtime_specific_fields_are_required() {
        let err = validate(&VmSpec {
            runtime: "docker".into(),
            ..process_spec()
        })
        .expect_err("runtime");
        assert_eq!(err.field, SpecField::Runtime);
        let err = validate(&VmSpec {
            command: vec![],
            ..process_spec()
        })
        .expect_err("command");
        assert_eq!(err.field, SpecField::Command);
        let err = validate(&VmSpec {
            runtime: "microvm".into(),
            kernel: "/nonexistent/vmlinuz".into(),
            ..process_spec()
        })
        .expect_err("kernel");
        assert_eq!(err.field, SpecField::Kernel);
        assert!(err.to_string().contains("/nonexistent/vmlinuz"), "{err}");
    }

    #[test]
    fn vm_ids_are_path_safe() {
        assert!(check_vm_id("vm-0001_a.b").is_ok());
        for bad in ["", ".hidden", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(check_vm_id(bad).is_err(), "{bad:?}");
        }
    }
}
