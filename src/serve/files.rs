//! Where `tvctl serve` writes guest recordings, and how much they take.
//!
//! The host alone chooses the path: `<dir>/<domain>/recordings/<UTC time>-<name>.dat`. The
//! guest's name is reduced to `[A-Za-z0-9._-]`, at most 64 bytes, never starting with a dot;
//! nothing else the guest sends becomes part of a path.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The folder of a domain's guest recordings.
pub const RECORDINGS: &str = "recordings";
/// Longest name kept from the guest.
pub const MAX_NAME_BYTES: usize = 64;

/// The guest's name as a file-name part: `[A-Za-z0-9._-]` only, at most 64 bytes, no leading
/// dot; `recording` if nothing is left.
pub fn sanitize_name(name: &str) -> String {
    let kept: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(MAX_NAME_BYTES)
        .collect();
    let kept = kept.trim_start_matches('.');
    if kept.is_empty() {
        "recording".to_string()
    } else {
        kept.to_string()
    }
}

/// `YYYYMMDDTHHMMSSZ` for `t`.
pub fn utc_stamp(t: SystemTime) -> String {
    let (y, m, d, hh, mm, ss, _) = utc_fields(t);
    format!("{y:04}{m:02}{d:02}T{hh:02}{mm:02}{ss:02}Z")
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` (RFC 3339) for log lines.
pub fn rfc3339(t: SystemTime) -> String {
    let (y, m, d, hh, mm, ss, ms) = utc_fields(t);
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{ms:03}Z")
}

/// (year, month, day, hour, minute, second, millisecond) of `t` in UTC.
fn utc_fields(t: SystemTime) -> (i64, u32, u32, u64, u64, u64, u32) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (y, m, day) = civil_from_days(i64::try_from(secs / 86_400).unwrap_or(0));
    let rem = secs % 86_400;
    (
        y,
        m,
        day,
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis(),
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A path for a new recording in `folder` that no file has: `<stamp>-<name>.dat`, then
/// `<stamp>-<name>-2.dat`, …
pub fn new_recording_path(folder: &Path, stamp: &str, name: &str) -> PathBuf {
    let first = folder.join(format!("{stamp}-{name}.dat"));
    if !first.exists() {
        return first;
    }
    (2u32..)
        .map(|n| folder.join(format!("{stamp}-{name}-{n}.dat")))
        .find(|p| !p.exists())
        .unwrap_or(first)
}

/// Bytes the recordings in `folder` take (regular files, hidden scratch folders included:
/// a recording being written counts).
pub fn bytes_used(folder: &Path) -> u64 {
    fn walk(p: &Path, depth: u32) -> u64 {
        let Ok(entries) = std::fs::read_dir(p) else {
            return 0;
        };
        entries
            .flatten()
            .filter_map(|e| {
                let meta = e.metadata().ok()?;
                if meta.is_file() {
                    Some(meta.len())
                } else if meta.is_dir() && depth < 2 {
                    Some(walk(&e.path(), depth + 1))
                } else {
                    None
                }
            })
            .fold(0, u64::saturating_add)
    }
    walk(folder, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn guest_names_keep_only_safe_characters() {
        for (given, kept) in [
            ("smoke", "smoke"),
            ("../../etc/passwd", "etcpasswd"),
            ("..", "recording"),
            ("", "recording"),
            (".hidden", "hidden"),
            ("a b\tc\n\u{1b}[31m", "abc31m"),
            ("dé/jà vu", "djvu"),
            ("run-1.2_x", "run-1.2_x"),
        ] {
            assert_eq!(sanitize_name(given), kept, "{given:?}");
        }
        let long = "x".repeat(300);
        assert_eq!(sanitize_name(&long).len(), MAX_NAME_BYTES);
    }

    #[test]
    fn stamps_are_utc() {
        let t = UNIX_EPOCH + Duration::from_secs(1_796_040_000); // 2026-11-30T12:00:00Z
        assert_eq!(utc_stamp(t), "20261130T120000Z");
        assert_eq!(
            rfc3339(t + Duration::from_millis(5)),
            "2026-11-30T12:00:00.005Z"
        );
        assert_eq!(utc_stamp(UNIX_EPOCH), "19700101T000000Z");
        // A leap day.
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(utc_stamp(leap), "20000229T000000Z");
    }

    #[test]
    fn a_taken_name_gets_a_number() {
        let dir = tempfile::tempdir().unwrap();
        let a = new_recording_path(dir.path(), "S", "n");
        assert_eq!(a, dir.path().join("S-n.dat"));
        std::fs::write(&a, b"x").unwrap();
        let b = new_recording_path(dir.path(), "S", "n");
        assert_eq!(b, dir.path().join("S-n-2.dat"));
    }

    #[test]
    fn used_bytes_count_files_and_scratch_folders() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.dat"), vec![0u8; 100]).unwrap();
        std::fs::create_dir(dir.path().join(".tvctl-trace-x")).unwrap();
        std::fs::write(dir.path().join(".tvctl-trace-x/cpu0.data"), vec![0u8; 50]).unwrap();
        assert_eq!(bytes_used(dir.path()), 150);
        assert_eq!(bytes_used(&dir.path().join("missing")), 0);
    }
}
