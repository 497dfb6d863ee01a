//! Whether `setup --live` can work on a running domain, so that setup and status suggest it
//! only there and suggest a restart everywhere else.
//!
//! Two things must hold. The running domain needs a virtio-serial controller: libvirt cannot
//! hot-plug one for our channels. And libvirt must hot-plug `pipe` chardevs: libvirt 9.0
//! (Debian 12) refuses them with "Hotplug unsupported for char device type 'pipe'" (its QMP
//! `chardev-add` code has no pipe backend; measured here: the control socket goes in, the
//! first vCPU channel fails, setup rolls back). Current libvirt builds `pipe` backends for
//! `chardev-add` (src/qemu/qemu_chardev.c), but which release first did is not verified
//! here, so only libvirt 10 and later are taken to be able to. A wrong guess costs little
//! either way: `--live` that fails undoes everything and says to restart.

use crate::domxml;

/// The first libvirt (major * 1,000,000 + minor * 1,000 + micro) taken to hot-plug `pipe`
/// chardevs; see the module doc for what is and is not known.
pub const PIPE_HOTPLUG_SINCE: u32 = 10_000_000;

/// Whether `setup --live` can give the running domain (whose live XML is `live_xml`) our
/// channels under libvirt `libvirt_version`.
pub fn hotplug_possible(libvirt_version: u32, live_xml: &str) -> bool {
    libvirt_version >= PIPE_HOTPLUG_SINCE
        && domxml::virtio_serial_controllers(live_xml).is_ok_and(|c| !c.is_empty())
}

/// libvirt's version number as people write it.
pub fn version_text(version: u32) -> String {
    format!(
        "{}.{}.{}",
        version / 1_000_000,
        version / 1_000 % 1_000,
        version % 1_000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const WITH_CONTROLLER: &str =
        "<domain><devices><controller type='virtio-serial' index='0'/></devices></domain>";
    const WITHOUT: &str = "<domain><devices><serial type='pty'/></devices></domain>";

    #[test]
    fn libvirt_9_cannot_hot_plug_pipes_even_with_a_controller() {
        assert!(!hotplug_possible(9_000_000, WITH_CONTROLLER));
    }

    #[test]
    fn newer_libvirt_can_where_the_domain_has_a_controller() {
        assert!(hotplug_possible(10_000_000, WITH_CONTROLLER));
        assert!(!hotplug_possible(11_002_000, WITHOUT));
        assert!(!hotplug_possible(10_000_000, WITHOUT));
    }

    #[test]
    fn versions_read_as_people_write_them() {
        assert_eq!(version_text(9_000_000), "9.0.0");
        assert_eq!(version_text(10_010_002), "10.10.2");
    }
}
