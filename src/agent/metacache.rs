//! Metadata that does not change within a boot, read once per agent process.
//!
//! Every session sends the same static files: event formats, `kallsyms` (~5 MiB on a Debian
//! kernel, and costly for the kernel to produce), `printk_formats`, the ftrace formats. They
//! change only when a module is loaded or unloaded (new symbols, new events) or at a reboot,
//! so the cache is keyed by the boot id and the contents of `/proc/modules`: any change there
//! empties it. What it holds is exactly what a fresh read would give at that key.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

/// What invalidates the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    boot_id: Vec<u8>,
    modules: Vec<u8>,
}

impl Key {
    fn now() -> Key {
        let read = |p: &str| super::tracefs::read_whole(Path::new(p)).unwrap_or_default();
        Key {
            boot_id: read("/proc/sys/kernel/random/boot_id"),
            modules: read("/proc/modules"),
        }
    }
}

#[derive(Default)]
struct Cache {
    key: Option<Key>,
    files: BTreeMap<String, Vec<u8>>,
    hits: u64,
    misses: u64,
}

static CACHE: Mutex<Option<Cache>> = Mutex::new(None);

fn lock() -> MutexGuard<'static, Option<Cache>> {
    CACHE.lock().unwrap_or_else(|p| p.into_inner())
}

/// A view of the cache for one session: checks the key once, then serves reads.
pub struct Session {
    guard: MutexGuard<'static, Option<Cache>>,
}

impl Session {
    /// Opens the cache for a session, emptying it if a module changed or the guest rebooted
    /// since it was filled.
    pub fn open() -> Session {
        let mut guard = lock();
        let key = Key::now();
        let cache = guard.get_or_insert_with(Cache::default);
        if cache.key.as_ref() != Some(&key) {
            cache.files.clear();
            cache.key = Some(key);
        }
        Session { guard }
    }

    /// `name`'s bytes from the cache, or from `read` (kept when it succeeds).
    pub fn get<E>(
        &mut self,
        name: &str,
        read: impl FnOnce() -> Result<Vec<u8>, E>,
    ) -> Result<Vec<u8>, E> {
        let cache = self.guard.get_or_insert_with(Cache::default);
        if let Some(bytes) = cache.files.get(name) {
            cache.hits += 1;
            return Ok(bytes.clone());
        }
        cache.misses += 1;
        let bytes = read()?;
        cache.files.insert(name.to_string(), bytes.clone());
        Ok(bytes)
    }
}

/// (hits, misses) so far, for the agent's log.
pub fn stats() -> (u64, u64) {
    lock().as_ref().map_or((0, 0), |c| (c.hits, c.misses))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_read_comes_from_the_cache_and_a_failed_read_is_not_kept() {
        let mut s = Session::open();
        let mut reads = 0;
        let mut read = || -> Result<Vec<u8>, ()> {
            reads += 1;
            Ok(b"fmt".to_vec())
        };
        assert_eq!(s.get("t/a", &mut read).unwrap(), b"fmt");
        assert_eq!(s.get("t/a", &mut read).unwrap(), b"fmt");
        assert_eq!(reads, 1);
        assert!(s.get::<()>("t/b", || Err(())).is_err());
        assert_eq!(s.get::<()>("t/b", || Ok(b"x".to_vec())).unwrap(), b"x");
    }
}
