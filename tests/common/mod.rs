//! Test lab shared by the integration and guest tiers: a real libvirtd and the built-in guest.
//!
//! `TestVm` defines a uniquely named domain from `xml-templates/test-guest.xml`, starts it and
//! destroys + undefines it (and removes its folder) when dropped, also when the test panics.
//! Every failure message carries the guest's console log, so a failing guest test explains
//! itself. Nothing here skips: if libvirt or the guest image is missing, the test fails and
//! says how to get them (scripts/install-deps.sh, scripts/build-guest.sh).
#![allow(dead_code)]

/// The Debian guest (systemd, qemu-guest-agent) reached through qemu-ga (tests/guest_debian.rs).
pub mod debian;
/// A paused domain whose guest agent the test plays (tests/hostile_agent.rs).
pub mod fake_guest;
/// A shell in the guest and `tvctl serve` as a child (tests/guest_serve.rs).
pub mod serve;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tvctl::libvirt::{Dom, Hypervisor};

/// Reads a tracefs file whole (tracefs files report size 0, and `fs::read`'s short first read
/// would cut a header), through the agent's own reader.
pub fn read_tracefs(path: &Path) -> Vec<u8> {
    tvctl::agent::tracefs::read_whole(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Where scripts/build-guest.sh installs the guest.
pub fn guest_dir() -> PathBuf {
    std::env::var_os("TVCTL_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/libvirt/images/tvctl"))
}

/// Root of the per-test folders (console logs, FIFOs); must be traversable by QEMU's user.
pub fn lab_root() -> PathBuf {
    let p = PathBuf::from("/var/lib/tvctl-lab");
    std::fs::create_dir_all(&p).expect("create /var/lib/tvctl-lab");
    set_mode(&p, 0o755);
    p
}

pub fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

pub const URI: &str = "qemu:///system";

/// A connection to the real libvirtd, or a loud failure saying how to start it.
pub fn hypervisor() -> Hypervisor {
    Hypervisor::connect(URI).unwrap_or_else(|e| {
        panic!("this test needs a running libvirtd: {e}\n(scripts/install-deps.sh installs and starts it)")
    })
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A domain name no other test (or test run) uses.
pub fn unique_name(tag: &str) -> String {
    format!(
        "tvctl-test-{tag}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// Domain XML of the built-in guest.
pub fn guest_xml(name: &str, vcpus: u32, memory_mib: u32, console_log: &Path) -> String {
    let kernel = guest_dir().join("vmlinuz");
    let initrd = guest_dir().join("initrd.img");
    for f in [&kernel, &initrd] {
        assert!(
            f.exists(),
            "the built-in guest is missing ({}): run scripts/build-guest.sh",
            f.display()
        );
    }
    let template = include_str!("../../xml-templates/test-guest.xml");
    template
        .replace("@NAME@", name)
        .replace("@VCPUS@", &vcpus.to_string())
        .replace("@MEMORY_MIB@", &memory_mib.to_string())
        .replace("@KERNEL@", &kernel.to_string_lossy())
        .replace("@INITRD@", &initrd.to_string_lossy())
        .replace("@CMDLINE@", "console=ttyS0 panic=-1 quiet")
        .replace("@CONSOLE_LOG@", &console_log.to_string_lossy())
}

/// Inserts extra device XML before `</devices>`.
pub fn with_devices(xml: &str, devices: &str) -> String {
    xml.replacen("</devices>", &format!("{devices}\n  </devices>"), 1)
}

/// The built-in guest's XML with its kernel replaced by a 512-byte disk whose boot sector
/// halts the vCPU for good (`cli; hlt`): QEMU and its chardevs are real and the domain is
/// running, but no guest code of ours runs and the vCPUs cost nothing. (A paused domain would
/// not do: tvctl rightly excuses the silence of a paused guest's agent.)
pub fn boot_a_halting_disk(xml: &str, dir: &Path) -> String {
    let mut sector = vec![0u8; 512];
    sector[..4].copy_from_slice(&[0xfa, 0xf4, 0xeb, 0xfd]); // cli; hlt; jmp back to hlt
    sector[510..].copy_from_slice(&[0x55, 0xaa]);
    let disk = dir.join("halt.img");
    std::fs::write(&disk, &sector).expect("write the boot sector");
    let (Some(from), Some(to)) = (xml.find("<kernel>"), xml.find("</cmdline>")) else {
        panic!("the built-in guest's XML boots no kernel:\n{xml}");
    };
    let xml = format!(
        "{}<boot dev='hd'/>{}",
        &xml[..from],
        &xml[to + "</cmdline>".len()..]
    );
    with_devices(
        &xml,
        &format!(
            "<disk type='file' device='disk'><driver name='qemu' type='raw'/>\
             <source file='{}'/><target dev='hda' bus='ide'/></disk>",
            disk.display()
        ),
    )
}

/// A test domain of the built-in guest, removed on drop.
pub struct TestVm {
    pub name: String,
    pub hv: Hypervisor,
    pub dom: Dom,
    /// This test's own folder under the lab root.
    pub dir: PathBuf,
    pub console_log: PathBuf,
    keep: bool,
}

impl TestVm {
    /// Defines (does not start) a built-in guest; `edit` may change the XML first.
    pub fn define(tag: &str, vcpus: u32, edit: impl FnOnce(&str, &Path) -> String) -> TestVm {
        let hv = hypervisor();
        let name = unique_name(tag);
        let dir = lab_root().join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create test folder");
        set_mode(&dir, 0o755);
        let console_log = dir.join("console.log");
        let xml = guest_xml(&name, vcpus, 256, &console_log);
        let xml = edit(&xml, &dir);
        let dom = hv
            .define(&xml)
            .unwrap_or_else(|e| panic!("define test domain {name}: {e}\n--- XML ---\n{xml}"));
        TestVm {
            name,
            hv,
            dom,
            dir,
            console_log,
            keep: std::env::var_os("TVCTL_KEEP_VM").is_some(),
        }
    }

    pub fn start(&self) {
        self.dom
            .start()
            .unwrap_or_else(|e| panic!("start {}: {e}\n{}", self.name, self.console_report()));
    }

    /// The console log so far ("" before QEMU created it).
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console_log).unwrap_or_default()
    }

    /// The console log framed for a failure message.
    pub fn console_report(&self) -> String {
        format!(
            "--- console log of {} ({}) ---\n{}\n--- end of console log ---",
            self.name,
            self.console_log.display(),
            self.console()
        )
    }

    /// Waits until the console shows a line containing `needle`; returns that line.
    pub fn wait_console_line(&self, needle: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Some(line) = self.complete_console_lines().find(|l| l.contains(needle)) {
                return line;
            }
            if start.elapsed() > timeout {
                panic!(
                    "guest {} printed no line containing {needle:?} within {timeout:?}\n{}",
                    self.name,
                    self.console_report()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The console's lines that end in a newline: the serial console is written a few bytes
    /// at a time, so the last line may still be growing.
    fn complete_console_lines(&self) -> impl Iterator<Item = String> {
        let text = self.console();
        let done = text.rfind('\n').map_or(0, |i| i + 1);
        text[..done]
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>()
            .into_iter()
    }

    /// Lines of the console log containing `needle`.
    pub fn console_count(&self, needle: &str) -> usize {
        self.complete_console_lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits until the console has more than `before` lines containing `needle`.
    pub fn wait_console_count(&self, needle: &str, before: usize, timeout: Duration) {
        let start = Instant::now();
        while self.console_count(needle) <= before {
            if start.elapsed() > timeout {
                panic!(
                    "guest {} printed no new line containing {needle:?} within {timeout:?}\n{}",
                    self.name,
                    self.console_report()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The guest's `TVCTL-REPORT` JSON (printed by init after boot).
    pub fn wait_report(&self) -> serde_json::Value {
        let line = self.wait_console_line("TVCTL-REPORT ", boot_timeout());
        let json = line.split_once("TVCTL-REPORT ").expect("prefix").1;
        serde_json::from_str(json.trim())
            .unwrap_or_else(|e| panic!("bad report line {line:?}: {e}\n{}", self.console_report()))
    }
}

/// How long a boot may take: TCG on a busy 2-core machine is slow.
pub fn boot_timeout() -> Duration {
    Duration::from_secs(
        std::env::var("TVCTL_BOOT_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(120),
    )
}

impl Drop for TestVm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.console_report());
        }
        if self.keep {
            eprintln!("TVCTL_KEEP_VM: leaving {} defined", self.name);
            return;
        }
        self.destroy_and_undefine();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl TestVm {
    fn destroy_and_undefine(&self) {
        destroy_and_undefine(&self.dom, &self.name);
    }
}

/// Destroys and undefines a test domain, through a fresh connection if this one died (a test
/// restarted libvirtd): a domain left running would slow every later test down.
pub fn destroy_and_undefine(dom: &Dom, name: &str) {
    let gone = |dom: &Dom| {
        if dom.is_active().unwrap_or(false) {
            let _ = dom.destroy();
        }
        dom.undefine().is_ok()
    };
    if gone(dom) {
        return;
    }
    if let Ok(dom) = Hypervisor::connect(URI).and_then(|hv| hv.lookup(name)) {
        gone(&dom);
    }
}

/// Adds tvctl's channels to `xml` (via the real domxml edit) and makes the FIFOs in `dir`, as
/// `tvctl setup` would; for tests of the agent that do not exercise setup itself.
pub fn with_tvctl_channels(xml: &str, dir: &Path, vcpus: u32) -> String {
    for cpu in 0..vcpus {
        for end in ["in", "out"] {
            let p = dir.join(format!("trace-path-cpu{cpu}.{end}"));
            nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o660))
                .expect("mkfifo");
        }
    }
    let plan = tvctl::domxml::ChannelPlan {
        dir: dir.to_string_lossy().into_owned(),
        vcpus,
    };
    tvctl::domxml::apply_plan(xml, &plan)
        .expect("add channels")
        .xml
}

/// A guest shared by all tests of one test binary: booted once, destroyed at process exit.
/// Tests take the lock for as long as they talk to it.
pub fn shared_vm(tag: &'static str, vcpus: u32) -> std::sync::MutexGuard<'static, TestVm> {
    use std::sync::{Mutex, OnceLock};
    static VM: OnceLock<Mutex<TestVm>> = OnceLock::new();
    static TAG: OnceLock<&'static str> = OnceLock::new();
    TAG.get_or_init(|| tag);
    let vm = VM.get_or_init(|| {
        let vm = TestVm::define(tag, vcpus, |xml, dir| with_tvctl_channels(xml, dir, vcpus));
        vm.start();
        let _ = vm.wait_console_line("tvctl-agent: ready", boot_timeout());
        extern "C" fn cleanup() {
            if let Some(m) = VM.get() {
                let vm = match m.lock() {
                    Ok(g) => g,
                    Err(p) => p.into_inner(),
                };
                vm.remove();
            }
        }
        // SAFETY: registering a plain extern "C" function with no arguments.
        unsafe { libc::atexit(cleanup) };
        Mutex::new(vm)
    });
    match vm.lock() {
        Ok(g) => g,
        // A failed test must not take the others down with it.
        Err(p) => p.into_inner(),
    }
}

impl TestVm {
    /// Destroys and undefines now (Drop does the same; statics are never dropped).
    pub fn remove(&self) {
        if self.keep {
            return;
        }
        self.destroy_and_undefine();
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// The control socket QEMU binds for `agent-ctl-path`.
    pub fn control_socket(&self) -> PathBuf {
        self.dir.join("agent-ctl-path.sock")
    }
}

/// Every key path of a JSON value (`a.b`, `list[].c`), for "every field is documented" tests.
/// An object is documented through its fields, so only leaves and arrays are listed.
pub fn key_paths(value: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, inner) in map {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                if !inner.is_object() {
                    out.push(path.clone());
                }
                key_paths(inner, &path, out);
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                key_paths(item, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

/// Asserts a process's exit code and returns its stdout; the failure message shows both streams.
pub fn expect_code(output: &std::process::Output, code: tvctl::exitcode::ExitCode) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(i32::from(code.code())),
        "expected exit code {} ({code:?})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        code.code()
    );
    stdout
}

/// Parses stdout as JSON, or fails showing it.
pub fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{stdout}"))
}

impl TestVm {
    /// Asserts the guest's boot report lists every port in `want`.
    pub fn assert_ports(&self, report: &serde_json::Value, want: &[&str]) {
        let ports: Vec<&str> = report["ports"]
            .as_array()
            .expect("ports array")
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        for name in want {
            assert!(
                ports.contains(name),
                "port {name} missing in the guest; it saw {ports:?}\n{}",
                self.console_report()
            );
        }
    }
}

/// Writes a trace.dat in `dir` from per-CPU page data, each CPU's pages coming from a file of
/// its own as in tvctl; returns its path and the writer's summary.
pub fn write_trace_file(
    dir: &Path,
    meta: &tvctl::tracedat::TraceMeta,
    cpu_data: &[Vec<u8>],
) -> (PathBuf, tvctl::tracedat::WriteSummary) {
    use std::io::Write;
    let mut files = Vec::new();
    for (cpu, data) in cpu_data.iter().enumerate() {
        let path = dir.join(format!("cpu{cpu}.raw"));
        std::fs::File::create(&path)
            .unwrap()
            .write_all(data)
            .unwrap();
        files.push(std::fs::File::open(&path).unwrap());
    }
    let cpus: Vec<_> = files
        .iter()
        .zip(cpu_data)
        .map(|(file, data)| tvctl::tracedat::CpuData {
            file,
            len: u64::try_from(data.len()).unwrap(),
        })
        .collect();
    let path = dir.join("trace.dat");
    let mut out = std::fs::File::create(&path).unwrap();
    let summary = tvctl::tracedat::write_trace_dat(&mut out, meta, &cpus).unwrap();
    (path, summary)
}

/// Starts virtlogd and libvirtd if they do not run, and waits (30 s at most) until libvirtd
/// answers, as scripts/install-deps.sh does. (Re)starts inside the loop, since a daemon that
/// was just killed still looks "running" for a moment.
pub fn start_libvirt_daemons() {
    use std::process::Command;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answers = Command::new("virsh")
            .args(["-c", URI, "version"])
            .output()
            .is_ok_and(|o| o.status.success());
        if answers {
            return;
        }
        for daemon in ["virtlogd", "libvirtd"] {
            let running = Command::new("pgrep")
                .args(["-x", daemon])
                .output()
                .is_ok_and(|o| o.status.success());
            if !running {
                let _ = Command::new(daemon).arg("-d").status();
            }
        }
        if Instant::now() > deadline {
            panic!(
                "libvirtd did not answer on {URI} within 30 s after the restart: run `libvirtd -d`"
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
