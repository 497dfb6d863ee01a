//! Which filesystem a path lives on, from `/proc/self/mountinfo`, so that an error about a
//! filesystem without FIFOs can name it and its mount point.

use std::path::{Path, PathBuf};

/// A mounted filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filesystem {
    /// The type, as mount(8) prints it: `ext4`, `vfat`, `bpf`, ...
    pub fstype: String,
    pub mount_point: PathBuf,
}

/// The filesystem holding `path` (which need not exist; its nearest existing ancestor counts).
pub fn filesystem_of(path: &Path) -> Option<Filesystem> {
    let existing = path.ancestors().find_map(|p| p.canonicalize().ok())?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    longest_mount(&mountinfo, &existing)
}

/// The entry of `mountinfo` whose mount point is the longest ancestor of `path`; later
/// entries win ties, as a later mount hides an earlier one at the same place.
fn longest_mount(mountinfo: &str, path: &Path) -> Option<Filesystem> {
    let mut best: Option<Filesystem> = None;
    for line in mountinfo.lines() {
        // id parent major:minor root mount-point options [optional...] - fstype source super
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(dash) = fields.iter().position(|&f| f == "-") else {
            continue;
        };
        let (Some(mount_point), Some(fstype)) = (fields.get(4), fields.get(dash + 1)) else {
            continue;
        };
        let mount_point = PathBuf::from(unescape(mount_point));
        let longer = best
            .as_ref()
            .is_none_or(|b| mount_point.as_os_str().len() >= b.mount_point.as_os_str().len());
        if path.starts_with(&mount_point) && longer {
            best = Some(Filesystem {
                fstype: (*fstype).to_owned(),
                mount_point,
            });
        }
    }
    best
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            let text = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match octal {
            Some(byte) if bytes[i] == b'\\' => {
                out.push(byte);
                i += 4;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw
23 22 0:5 / /dev rw - devtmpfs devtmpfs rw
43 22 0:39 / /var/lib/my\\040lab rw,relatime shared:7 - bpf bpf rw
44 43 0:40 / /var/lib/my\\040lab/inner rw - tmpfs tmpfs rw
";

    #[test]
    fn deepest_mount_point_wins() {
        let fs = longest_mount(MOUNTINFO, Path::new("/var/lib/my lab/x/y")).unwrap();
        assert_eq!(fs.fstype, "bpf");
        assert_eq!(fs.mount_point, Path::new("/var/lib/my lab"));
        let fs = longest_mount(MOUNTINFO, Path::new("/var/lib/my lab/inner/z")).unwrap();
        assert_eq!(fs.fstype, "tmpfs");
        let fs = longest_mount(MOUNTINFO, Path::new("/var/lib/tvctl")).unwrap();
        assert_eq!(fs.fstype, "ext4");
    }

    #[test]
    fn mount_point_must_be_a_whole_path_prefix() {
        let fs = longest_mount(MOUNTINFO, Path::new("/devices")).unwrap();
        assert_eq!(fs.fstype, "ext4");
    }
}
