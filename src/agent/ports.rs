//! Finds the guest's virtio-serial ports by their channel names.
//!
//! Minimal guests have no udev, so `/dev/virtio-ports/<name>` links may not exist. The kernel
//! always publishes each port's name in `/sys/class/virtio-ports/vportNpM/name`, and the device
//! node is `/dev/vportNpM`; we read that first and use the udev links only as a fallback.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// Name of the control port (host side: a unix socket QEMU binds).
pub const CONTROL_PORT: &str = "agent-ctl-path";
/// Prefix of the per-CPU data ports: `trace-path-cpuN`.
pub const CPU_PORT_PREFIX: &str = "trace-path-cpu";

/// The ports of interest to the agent, keyed by channel name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortMap {
    ports: BTreeMap<String, PathBuf>,
}

impl PortMap {
    /// Scans `sysfs_dir` (normally `/sys/class/virtio-ports`) with device nodes in `dev_dir`
    /// (normally `/dev`), then adds names found only under `links_dir` (`/dev/virtio-ports`).
    pub fn scan(sysfs_dir: &Path, dev_dir: &Path, links_dir: &Path) -> PortMap {
        let mut ports = BTreeMap::new();
        if let Ok(entries) = fs::read_dir(sysfs_dir) {
            for entry in entries.flatten() {
                let Ok(name) = fs::read_to_string(entry.path().join("name")) else {
                    continue;
                };
                let name = name.trim();
                if name.is_empty() {
                    continue;
                }
                ports.insert(name.to_string(), dev_dir.join(entry.file_name()));
            }
        }
        if let Ok(entries) = fs::read_dir(links_dir) {
            for entry in entries.flatten() {
                if let Some(name) = entry.file_name().to_str() {
                    ports
                        .entry(name.to_string())
                        .or_insert_with(|| entry.path());
                }
            }
        }
        PortMap { ports }
    }

    /// A map of data ports only: CPU → the file its pages go to (the host records itself
    /// through FIFOs of its own, with the agent's pumps).
    pub fn with_cpu_ports(ports: impl IntoIterator<Item = (u32, PathBuf)>) -> PortMap {
        PortMap {
            ports: ports
                .into_iter()
                .map(|(cpu, path)| (format!("{CPU_PORT_PREFIX}{cpu}"), path))
                .collect(),
        }
    }

    /// The ports of this system.
    pub fn system() -> PortMap {
        PortMap::scan(
            Path::new("/sys/class/virtio-ports"),
            Path::new("/dev"),
            Path::new("/dev/virtio-ports"),
        )
    }

    /// Device path of the port named `name`.
    pub fn get(&self, name: &str) -> Option<&Path> {
        self.ports.get(name).map(PathBuf::as_path)
    }

    /// The control port's device path.
    pub fn control(&self) -> Option<&Path> {
        self.get(CONTROL_PORT)
    }

    /// CPU numbers that have a `trace-path-cpuN` port, ascending.
    pub fn cpu_ports(&self) -> Vec<u32> {
        let mut cpus: Vec<u32> = self
            .ports
            .keys()
            .filter_map(|name| name.strip_prefix(CPU_PORT_PREFIX))
            .filter_map(|n| n.parse().ok())
            .collect();
        cpus.sort_unstable();
        cpus
    }

    /// Device path of CPU `cpu`'s data port.
    pub fn cpu_port(&self, cpu: u32) -> Option<&Path> {
        self.get(&format!("{CPU_PORT_PREFIX}{cpu}"))
    }

    /// All names, ascending.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.ports.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_sysfs(dir: &Path, entries: &[(&str, &str)]) {
        for (node, name) in entries {
            let d = dir.join("sys").join(node);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("name"), format!("{name}\n")).unwrap();
        }
    }

    #[test]
    fn scan_maps_names_to_dev_nodes() {
        let tmp = tempfile::tempdir().unwrap();
        fake_sysfs(
            tmp.path(),
            &[
                ("vport1p1", "agent-ctl-path"),
                ("vport1p2", "trace-path-cpu0"),
                ("vport1p3", "trace-path-cpu1"),
                ("vport1p4", "org.qemu.guest_agent.0"),
            ],
        );
        let map = PortMap::scan(
            &tmp.path().join("sys"),
            Path::new("/dev"),
            &tmp.path().join("links"),
        );
        assert_eq!(map.control(), Some(Path::new("/dev/vport1p1")));
        assert_eq!(map.cpu_ports(), vec![0, 1]);
        assert_eq!(map.cpu_port(1), Some(Path::new("/dev/vport1p3")));
    }

    #[test]
    fn scan_ignores_nameless_ports_and_falls_back_to_links() {
        let tmp = tempfile::tempdir().unwrap();
        fake_sysfs(tmp.path(), &[("vport2p0", "")]);
        let links = tmp.path().join("links");
        fs::create_dir_all(&links).unwrap();
        fs::write(links.join("trace-path-cpu10"), "").unwrap();
        let map = PortMap::scan(&tmp.path().join("sys"), Path::new("/dev"), &links);
        assert_eq!(map.names().count(), 1);
        assert_eq!(map.cpu_ports(), vec![10]);
    }

    #[test]
    fn cpu_ports_sort_numerically() {
        let tmp = tempfile::tempdir().unwrap();
        fake_sysfs(
            tmp.path(),
            &[
                ("a", "trace-path-cpu10"),
                ("b", "trace-path-cpu2"),
                ("c", "trace-path-cpuX"),
            ],
        );
        let map = PortMap::scan(
            &tmp.path().join("sys"),
            Path::new("/dev"),
            Path::new("/nonexistent"),
        );
        assert_eq!(map.cpu_ports(), vec![2, 10]);
    }
}
