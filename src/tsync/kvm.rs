//! The kvm method: reads the TSC offset KVM applies to each vCPU from debugfs, which gives
//! the guest→host offset exactly (`guest_tsc = host_tsc + tsc_offset`, so `offset =
//! −tsc_offset`) when the guest's TSC is not scaled.
//!
//! Layout (Linux `arch/x86/kvm/debugfs.c`, `virt/kvm/kvm_main.c`):
//! ```text
//! <debugfs>/kvm/<qemu pid>-<vm fd>/vcpu<N>/tsc-offset                    %lld
//!                                         /tsc-scaling-ratio             %llu  (only with TSC scaling)
//!                                         /tsc-scaling-ratio-frac-bits   %llu  (only with TSC scaling)
//! ```
//! As trace-cmd does, the `vcpu<N>` directories sorted by N are guest CPUs 0, 1, …, and their
//! number must equal the domain's vCPU count. A scaled TSC is refused rather than mis-handled:
//! trace-cmd's own kvm math for it is wrong (docs/clock-sync.md), and the probe method copes.
//! Every file is read with a bound (4 KiB); the kernel writes one number.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use super::ShiftSample;

/// Where debugfs normally is.
pub const DEBUGFS: &str = "/sys/kernel/debug";

/// Longest file we read: the kernel writes one number and a newline.
const MAX_FILE: u64 = 4096;

/// Why the kvm method cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("debugfs is not mounted at {}: mount it with `mount -t debugfs none {}`, or use --sync probe", .root.display(), .root.display())]
    DebugfsNotMounted { root: PathBuf },
    #[error("no KVM VM directory {}/{pid}-<fd>: the domain does not run under KVM (TCG?); use --sync probe", .kvm_dir.display())]
    NotKvm { pid: u32, kvm_dir: PathBuf },
    #[error("QEMU pid {pid} has {count} KVM VM directories under {}: cannot tell which one is the domain's; use --sync probe", .kvm_dir.display())]
    SeveralVms {
        pid: u32,
        kvm_dir: PathBuf,
        count: usize,
    },
    #[error("{} has {found} vcpu directories but the domain has {expected} vCPUs, so they cannot be matched to guest CPUs (vCPU hot-plug?): use --sync probe", .vm_dir.display())]
    VcpuCountMismatch {
        vm_dir: PathBuf,
        found: usize,
        expected: usize,
    },
    #[error("the guest's TSC is scaled ({}: ratio {ratio} with {frac_bits} fraction bits), which the kvm method cannot express exactly: use --sync probe", .vcpu_dir.display())]
    Scaled {
        vcpu_dir: PathBuf,
        ratio: u64,
        frac_bits: u32,
    },
    #[error("{} is readable by root only: run tvctl as root, or use --sync probe", .path.display())]
    NotPermitted { path: PathBuf },
    #[error("cannot read {}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} does not hold what KVM writes there ({why}); is something else mounted at debugfs? Use --sync probe", .path.display())]
    Malformed { path: PathBuf, why: &'static str },
}

/// One vCPU's clock as KVM applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvmVcpu {
    /// N of its `vcpu<N>` directory (KVM's vcpu id).
    pub debugfs_index: u32,
    /// `tsc-offset`: `guest_tsc = host_tsc + tsc_offset` (mod 2^64, as the hardware adds).
    pub tsc_offset: i64,
}

impl KvmVcpu {
    /// The TIME_SHIFT offset, `host = guest + offset`. Exact mod 2^64, which is how both KVM
    /// and trace-cmd add, so `tsc_offset = i64::MIN` is no exception.
    pub fn offset(&self) -> i64 {
        self.tsc_offset.wrapping_neg()
    }
}

/// The clocks of one VM's vCPUs, indexed by guest CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmClocks {
    pub vm_dir: PathBuf,
    pub vcpus: Vec<KvmVcpu>,
}

impl KvmClocks {
    /// TIME_SHIFT samples per guest CPU: one exact sample each (time 0: with one sample the
    /// reader ignores the time).
    pub fn time_shift_samples(&self) -> Vec<Vec<ShiftSample>> {
        self.vcpus
            .iter()
            .map(|vcpu| {
                vec![ShiftSample {
                    time: 0,
                    offset: vcpu.offset(),
                }]
            })
            .collect()
    }

    /// Guest CPUs whose offset differs from `earlier`'s (read at the start, this at the
    /// stop): the guest wrote its TSC or was migrated, at a time nobody knows, so their
    /// events before or after that are shifted. The caller reports them.
    pub fn changed_since(&self, earlier: &KvmClocks) -> Vec<usize> {
        (0..self.vcpus.len().max(earlier.vcpus.len()))
            .filter(|&cpu| {
                self.vcpus.get(cpu).map(KvmVcpu::offset)
                    != earlier.vcpus.get(cpu).map(KvmVcpu::offset)
            })
            .collect()
    }
}

/// Reads the vCPU clocks of the VM that QEMU process `qemu_pid` runs, from the debugfs tree
/// at `debugfs` ([`DEBUGFS`] on a real host), checking that it has `vcpu_count` vCPUs.
pub fn read_clocks(
    debugfs: &Path,
    qemu_pid: u32,
    vcpu_count: usize,
) -> Result<KvmClocks, KvmError> {
    let vm_dir = find_vm_dir(debugfs, qemu_pid)?;
    let mut vcpu_dirs: Vec<(u32, PathBuf)> = list_dir(&vm_dir)?
        .into_iter()
        .filter_map(|(name, path)| {
            let digits = name.strip_prefix("vcpu")?;
            Some((parse_digits(digits)?, path))
        })
        .filter(|(_, path)| path.is_dir())
        .collect();
    vcpu_dirs.sort_unstable();
    if vcpu_dirs.len() != vcpu_count {
        return Err(KvmError::VcpuCountMismatch {
            vm_dir,
            found: vcpu_dirs.len(),
            expected: vcpu_count,
        });
    }
    let vcpus = vcpu_dirs
        .into_iter()
        .map(|(index, dir)| read_vcpu(index, &dir))
        .collect::<Result<_, _>>()?;
    Ok(KvmClocks { vm_dir, vcpus })
}

/// `<debugfs>/kvm/<pid>-<fd>`, the only one.
fn find_vm_dir(debugfs: &Path, pid: u32) -> Result<PathBuf, KvmError> {
    let mounted = match fs::read_dir(debugfs) {
        Ok(mut entries) => entries.next().is_some(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(source) => return Err(io_error(debugfs, source)),
    };
    if !mounted {
        // An unmounted debugfs is an empty directory.
        return Err(KvmError::DebugfsNotMounted {
            root: debugfs.to_path_buf(),
        });
    }
    let kvm_dir = debugfs.join("kvm");
    let not_kvm = || KvmError::NotKvm {
        pid,
        kvm_dir: kvm_dir.clone(),
    };
    let entries = match list_dir(&kvm_dir) {
        Err(KvmError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Err(not_kvm());
        }
        other => other?,
    };
    let prefix = format!("{pid}-");
    let mut vms: Vec<PathBuf> = entries
        .into_iter()
        .filter(|(name, path)| {
            name.strip_prefix(&prefix)
                .is_some_and(|fd| parse_digits(fd).is_some())
                && path.is_dir()
        })
        .map(|(_, path)| path)
        .collect();
    match vms.len() {
        0 => Err(not_kvm()),
        1 => Ok(vms.remove(0)),
        count => Err(KvmError::SeveralVms {
            pid,
            kvm_dir,
            count,
        }),
    }
}

fn read_vcpu(debugfs_index: u32, dir: &Path) -> Result<KvmVcpu, KvmError> {
    let tsc_offset = read_number(&dir.join("tsc-offset"))?
        .ok_or_else(|| io_error(&dir.join("tsc-offset"), io::ErrorKind::NotFound.into()))?;
    let ratio: Option<u64> = read_number(&dir.join("tsc-scaling-ratio"))?;
    let frac_bits_path = dir.join("tsc-scaling-ratio-frac-bits");
    let frac_bits: Option<u32> = read_number(&frac_bits_path)?;
    match (ratio, frac_bits) {
        (None, None) => {}
        (Some(ratio), Some(frac_bits)) => {
            let default = 1u64.checked_shl(frac_bits).ok_or(KvmError::Malformed {
                path: frac_bits_path,
                why: "more than 63 fraction bits",
            })?;
            if ratio != default {
                return Err(KvmError::Scaled {
                    vcpu_dir: dir.to_path_buf(),
                    ratio,
                    frac_bits,
                });
            }
        }
        (Some(_), None) | (None, Some(_)) => {
            return Err(KvmError::Malformed {
                path: dir.to_path_buf(),
                why: "tsc-scaling-ratio and tsc-scaling-ratio-frac-bits come together",
            })
        }
    }
    Ok(KvmVcpu {
        debugfs_index,
        tsc_offset,
    })
}

/// Reads a file holding one decimal number; `None` if it does not exist.
fn read_number<T: std::str::FromStr>(path: &Path) -> Result<Option<T>, KvmError> {
    let file = match fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(io_error(path, source)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| io_error(path, source))?;
    let malformed = |why| KvmError::Malformed {
        path: path.to_path_buf(),
        why,
    };
    if u64::try_from(bytes.len()).map_or(true, |len| len > MAX_FILE) {
        return Err(malformed("longer than 4 KiB"));
    }
    let text = std::str::from_utf8(&bytes).map_err(|_| malformed("not text"))?;
    let text = text.trim_ascii();
    let digits = text.strip_prefix('-').unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed("not a decimal number"));
    }
    text.parse()
        .map(Some)
        .map_err(|_| malformed("number out of range"))
}

/// `(name, path)` of every entry of a directory.
fn list_dir(dir: &Path) -> Result<Vec<(String, PathBuf)>, KvmError> {
    let entries = fs::read_dir(dir).map_err(|source| io_error(dir, source))?;
    let mut list = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| io_error(dir, source))?;
        if let Some(name) = entry.file_name().to_str() {
            list.push((name.to_owned(), entry.path()));
        }
    }
    Ok(list)
}

/// A plain decimal number (no sign, no spaces), as the kernel names directories.
fn parse_digits(text: &str) -> Option<u32> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn io_error(path: &Path, source: io::Error) -> KvmError {
    let path = path.to_path_buf();
    match source.kind() {
        io::ErrorKind::PermissionDenied => KvmError::NotPermitted { path },
        _ => KvmError::Io { path, source },
    }
}

#[cfg(test)]
mod tests;
