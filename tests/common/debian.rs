//! The Debian guest tier's lab: a real Debian 12 guest (systemd, udev, qemu-guest-agent, no
//! tvctl) that tests reach only through qemu-ga, as a user without a login would.
//!
//! `DebianVm` defines a uniquely named domain from `xml-templates/debian-guest.xml` on a qcow2
//! overlay of its own over the shared `base.img` (scripts/build-debian-guest.sh), and on drop
//! destroys and undefines it and deletes the overlay and its folder, also when the test panics.
//! qemu-ga is spoken through `virsh qemu-agent-command` (src/libvirt.rs has no agent call, and
//! the tests need none in the library). Nothing skips: a missing image or a silent qemu-ga
//! fails the test with the guest's console log.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tvctl::libvirt::{Dom, Hypervisor};

use super::{boot_timeout, hypervisor, lab_root, set_mode, unique_name, URI};

/// Where scripts/build-debian-guest.sh installs the Debian guest.
pub fn debian_guest_dir() -> PathBuf {
    std::env::var_os("TVCTL_DEBIAN_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/libvirt/images/tvctl-debian"))
}

/// The kernel command line. `quiet` keeps the kernel's chatter (slow on an emulated UART) off
/// the console but not its warnings; `systemd.show_status=1` keeps systemd's unit lines, which
/// say how far a boot got. `SYSTEMD_COLORS=0` (passed to PID 1 as an environment variable)
/// keeps escape sequences out of the log.
pub const DEBIAN_CMDLINE: &str =
    "root=/dev/vda rw console=ttyS0 quiet systemd.show_status=1 SYSTEMD_COLORS=0";

/// Memory of a Debian guest: systemd and the cloud kernel boot well in 512 MiB under TCG.
pub const DEBIAN_MEMORY_MIB: u32 = 512;

/// Domain XML of the Debian guest on `overlay`.
pub fn debian_xml(name: &str, vcpus: u32, overlay: &Path, console_log: &Path) -> String {
    let dir = debian_guest_dir();
    let template = include_str!("../../xml-templates/debian-guest.xml");
    template
        .replace("@NAME@", name)
        .replace("@VCPUS@", &vcpus.to_string())
        .replace("@MEMORY_MIB@", &DEBIAN_MEMORY_MIB.to_string())
        .replace("@KERNEL@", &dir.join("vmlinuz").to_string_lossy())
        .replace("@INITRD@", &dir.join("initrd.img").to_string_lossy())
        .replace("@CMDLINE@", DEBIAN_CMDLINE)
        .replace("@OVERLAY@", &overlay.to_string_lossy())
        .replace("@CONSOLE_LOG@", &console_log.to_string_lossy())
}

/// Makes a fresh qcow2 overlay over base.img at `overlay` (replacing an old one).
fn create_overlay(overlay: &Path) {
    let dir = debian_guest_dir();
    for f in ["vmlinuz", "initrd.img", "base.img"] {
        assert!(
            dir.join(f).exists(),
            "the Debian guest is missing ({}): run scripts/build-debian-guest.sh",
            dir.join(f).display()
        );
    }
    let overlays = overlay.parent().expect("overlay has a folder");
    std::fs::create_dir_all(overlays).expect("create the overlay folder");
    set_mode(overlays, 0o755);
    let _ = std::fs::remove_file(overlay);
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(dir.join("base.img"))
        .arg(overlay)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run qemu-img ({e}): run scripts/install-deps.sh (package qemu-utils)")
        });
    assert!(
        out.status.success(),
        "qemu-img create {} failed: {}",
        overlay.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What a command run through qemu-ga's guest-exec left behind.
#[derive(Debug)]
pub struct GuestOutput {
    /// The exit code, or None when a signal ended the process (then `signal` says which).
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl GuestOutput {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// A test domain of the Debian guest, removed with its overlay on drop.
pub struct DebianVm {
    pub name: String,
    pub hv: Hypervisor,
    pub dom: Dom,
    /// This test's own folder under the lab root (the console log).
    pub dir: PathBuf,
    pub console_log: PathBuf,
    /// The domain's disk: a qcow2 overlay over base.img, deleted on drop.
    pub overlay: PathBuf,
    keep: bool,
}

impl DebianVm {
    /// Defines (does not start) a Debian guest on a fresh overlay; `edit` may change the XML
    /// first (it gets the XML and the test's folder, as `TestVm::define`'s does).
    pub fn define(tag: &str, vcpus: u32, edit: impl FnOnce(&str, &Path) -> String) -> DebianVm {
        let hv = hypervisor();
        let name = unique_name(tag);
        let overlay = debian_guest_dir()
            .join("overlays")
            .join(format!("{name}.qcow2"));
        create_overlay(&overlay);
        let dir = lab_root().join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create test folder");
        set_mode(&dir, 0o755);
        let console_log = dir.join("console.log");
        let xml = edit(&debian_xml(&name, vcpus, &overlay, &console_log), &dir);
        let dom = hv.define(&xml).unwrap_or_else(|e| {
            let _ = std::fs::remove_file(&overlay);
            panic!("define Debian test domain {name}: {e}\n--- XML ---\n{xml}")
        });
        DebianVm {
            name,
            hv,
            dom,
            dir,
            console_log,
            overlay,
            keep: std::env::var_os("TVCTL_KEEP_VM").is_some(),
        }
    }

    /// Defines and starts a Debian guest and waits until qemu-ga answers.
    pub fn boot(tag: &str, vcpus: u32) -> DebianVm {
        let vm = DebianVm::define(tag, vcpus, |xml, _| xml.to_string());
        vm.start();
        vm.wait_qga(boot_timeout());
        vm
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

    /// The console log framed for a failure message: its last 150 lines (a systemd boot
    /// prints a few hundred).
    pub fn console_report(&self) -> String {
        let text = self.console();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(150)..].join("\n");
        format!(
            "--- console log of {} ({}, last {} of {} lines) ---\n{tail}\n--- end of console log ---",
            self.name,
            self.console_log.display(),
            lines.len().min(150),
            lines.len()
        )
    }

    /// Sends one qemu-ga command (`{"execute": ..., "arguments": ...}`) through libvirt and
    /// returns its `return` value, or the error virsh printed. `timeout` bounds the wait for
    /// the guest's answer (libvirt's own default would wait for ever on a hung agent).
    ///
    /// Two limits of this path, both measured: the command travels as one argument of virsh,
    /// and Linux caps one argument at 128 KiB (so guest-exec input-data or a guest-file-write
    /// chunk of more than about 90 KiB of raw bytes fails with E2BIG: split it); and libvirt
    /// refuses an answer over 10 MiB ("No complete agent response found in 10485760 bytes")
    /// and then treats that domain's agent as broken until QEMU restarts (destroy + start; a
    /// guest reboot is not enough). Base64 makes 10 MiB about 7.5 MiB of output.
    pub fn qga(&self, command: &Value, timeout: Duration) -> Result<Value, String> {
        let command = command.to_string();
        if command.len() >= MAX_VIRSH_ARG {
            return Err(format!(
                "qemu-ga command of {} bytes: over the {MAX_VIRSH_ARG}-byte limit of one virsh argument; split the data",
                command.len()
            ));
        }
        let secs = timeout.as_secs().max(1).to_string();
        let out = Command::new("virsh")
            .args(["-c", URI, "qemu-agent-command", "--timeout", &secs])
            .arg(&self.name)
            .arg(&command)
            .output()
            .map_err(|e| format!("cannot run virsh: {e} (scripts/install-deps.sh installs it)"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        let reply: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
            format!(
                "qemu-ga answered with no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
        reply
            .get("return")
            .cloned()
            .ok_or_else(|| format!("qemu-ga's answer has no \"return\": {reply}"))
    }

    /// `qga` that must succeed; a failure panics with the console log.
    pub fn qga_ok(&self, command: &Value) -> Value {
        self.qga(command, Duration::from_secs(30))
            .unwrap_or_else(|e| {
                panic!(
                    "qemu-ga command {command} on {} failed: {e}\n{}",
                    self.name,
                    self.console_report()
                )
            })
    }

    /// Polls guest-ping until qemu-ga answers; returns how long that took. Before the guest's
    /// udev has seen the port, libvirt says the agent is not connected, at once.
    pub fn wait_qga(&self, timeout: Duration) -> Duration {
        let start = Instant::now();
        let ping = json!({"execute": "guest-ping"});
        loop {
            let last = match self.qga(&ping, Duration::from_secs(2)) {
                Ok(_) => return start.elapsed(),
                Err(e) => e,
            };
            if start.elapsed() > timeout {
                panic!(
                    "qemu-ga of {} did not answer guest-ping within {timeout:?} (last error: {last})\n{}",
                    self.name,
                    self.console_report()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Runs `argv` in the guest through guest-exec (argv[0] an absolute path: qemu-ga does
    /// not search PATH in a way to count on) and polls guest-exec-status until it exits,
    /// within `timeout`. qemu-ga 7.2 keeps at most 16 MiB of each stream (more panics here),
    /// but libvirt takes no answer over 10 MiB (see `qga`): keep the output of one command
    /// under about 7 MiB, or write it to a file and read that in pieces.
    pub fn qga_exec_timeout(&self, argv: &[&str], timeout: Duration) -> GuestOutput {
        self.exec(argv, None, timeout)
    }

    /// `qga_exec_timeout` with a minute to finish.
    pub fn qga_exec(&self, argv: &[&str]) -> GuestOutput {
        self.exec(argv, None, Duration::from_secs(60))
    }

    /// `qga_exec` with `stdin` fed to the command (guest-exec's input-data).
    pub fn qga_exec_input(&self, argv: &[&str], stdin: &[u8]) -> GuestOutput {
        self.exec(argv, Some(stdin), Duration::from_secs(60))
    }

    fn exec(&self, argv: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> GuestOutput {
        let (path, args) = argv.split_first().expect("qga_exec needs a program");
        let mut arguments = json!({"path": path, "arg": args, "capture-output": true});
        if let Some(input) = stdin {
            arguments["input-data"] = Value::String(base64_encode(input));
        }
        let started = self.qga_ok(&json!({"execute": "guest-exec", "arguments": arguments}));
        let pid = started["pid"]
            .as_i64()
            .unwrap_or_else(|| panic!("guest-exec gave no pid: {started}"));
        let start = Instant::now();
        loop {
            let status =
                self.qga_ok(&json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}));
            if status["exited"] == Value::Bool(true) {
                for stream in ["out", "err"] {
                    assert!(
                        status[format!("{stream}-truncated")] != Value::Bool(true),
                        "qemu-ga truncated the std{stream} of {argv:?} (it keeps 16 MiB)"
                    );
                }
                let stream = |key: &str| {
                    status[key].as_str().map_or_else(Vec::new, |s| {
                        base64_decode(s).unwrap_or_else(|e| panic!("{key} of {argv:?}: {e}"))
                    })
                };
                let number = |key: &str| {
                    status[key]
                        .as_i64()
                        .map(|n| i32::try_from(n).expect("exit code or signal fits i32"))
                };
                return GuestOutput {
                    code: number("exitcode"),
                    signal: number("signal"),
                    stdout: stream("out-data"),
                    stderr: stream("err-data"),
                };
            }
            if start.elapsed() > timeout {
                panic!(
                    "{argv:?} in {} did not exit within {timeout:?}\n{}",
                    self.name,
                    self.console_report()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Destroys and undefines the domain (through a fresh connection if this one died) and
    /// deletes its overlay and folder; Drop does the same, and statics are never dropped.
    pub fn remove(&self) {
        if self.keep {
            eprintln!(
                "TVCTL_KEEP_VM: leaving {} defined (overlay {})",
                self.name,
                self.overlay.display()
            );
            return;
        }
        super::destroy_and_undefine(&self.dom, &self.name);
        let _ = std::fs::remove_file(&self.overlay);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for DebianVm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.console_report());
        }
        self.remove();
    }
}

/// A Debian guest shared by all tests of one test binary: booted once (qemu-ga answering),
/// removed at process exit. Tests take the lock for as long as they use it.
pub fn shared_debian_vm(tag: &'static str, vcpus: u32) -> std::sync::MutexGuard<'static, DebianVm> {
    use std::sync::{Mutex, OnceLock};
    static VM: OnceLock<Mutex<DebianVm>> = OnceLock::new();
    let vm = VM.get_or_init(|| {
        let vm = DebianVm::boot(tag, vcpus);
        extern "C" fn cleanup() {
            if let Some(m) = VM.get() {
                match m.lock() {
                    Ok(vm) => vm.remove(),
                    Err(p) => p.into_inner().remove(),
                }
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

/// Linux's cap on one argument of a program (MAX_ARG_STRLEN, 32 pages).
const MAX_VIRSH_ARG: usize = 128 * 1024;

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding, as qemu-ga's input-data wants.
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(
                    BASE64[usize::try_from((n >> (18 - 6 * i)) & 63).unwrap()],
                ));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64 (qemu-ga's out-data and err-data; padding optional).
pub fn base64_decode(text: &str) -> Result<Vec<u8>, String> {
    let digits: Vec<u8> = text.trim_end_matches('=').bytes().collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        if chunk.len() == 1 {
            return Err(format!("base64 of {} digits is cut short", digits.len()));
        }
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            let v = BASE64
                .iter()
                .position(|&d| d == c)
                .ok_or_else(|| format!("not a base64 digit: {:?}", char::from(c)))?;
            n |= u32::try_from(v).unwrap() << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Ok(out)
}
