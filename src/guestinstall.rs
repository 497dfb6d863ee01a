//! `tvctl agent install` and `tvctl agent status`: put the static `tvctl-agent` into a running
//! guest through the QEMU guest agent (qemu-ga) that cloud and virt-install guests have, so
//! nobody logs in to each guest (the seed's point (c)).
//!
//! Install, step by step (each step's failure is its own error, and nothing in the guest is
//! changed before step 4):
//! 1. qemu-ga answers `guest-info`, and enables every command we use ([`NEEDED`]).
//! 2. `guest-get-osinfo`'s `machine` matches the agent binary's ELF machine.
//! 3. The agent binary is found (`--agent-binary`, the package's, or the build's) and checked:
//!    an ELF executable with no interpreter (static: the guest may lack our libc).
//! 4. It is written to `/usr/local/bin/.tvctl-agent.new` with `guest-file-*` (base64, 64 KiB
//!    per call), then one `guest-exec` of `/bin/sh` moves it into place, checks that it runs
//!    (`--version`), and on a systemd guest installs `tvctl-agent.service` (the file in
//!    guest/), enables and (re)starts it. Without systemd the agent is started once, detached,
//!    and the error-free result says what to add to the guest's init.
//! 5. If the domain is set up, the agent must answer `Hello` on tvctl's control channel
//!    (taking the domain's lock, as `tvctl trace` does).
//!
//! Everything qemu-ga returns comes from the guest: parsed as JSON with bounds, and any text
//! of it shown to the user is escaped.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde::Serialize;
use serde_json::{json, Value};

use crate::collect::guest_input::clean_text;
use crate::libvirt::{Dom, QgaError};

/// Where the agent goes in the guest (the unit in guest/ names this path).
pub const GUEST_AGENT_PATH: &str = "/usr/local/bin/tvctl-agent";
/// Where the unit goes on a systemd guest.
pub const GUEST_UNIT_PATH: &str = "/etc/systemd/system/tvctl-agent.service";
/// The unit, as shipped in guest/.
pub const UNIT: &str = include_str!("../guest/tvctl-agent.service");
/// Where the `tvctl-agent` package puts the agent in the guest.
pub const PACKAGED_GUEST_AGENT: &str = "/usr/sbin/tvctl-agent";
/// Where the `tvctl` package puts the static agent.
pub const PACKAGED_AGENT: &str = "/usr/lib/tvctl/tvctl-agent";
/// qemu-ga commands install uses.
pub const NEEDED: [&str; 6] = [
    "guest-info",
    "guest-file-open",
    "guest-file-write",
    "guest-file-close",
    "guest-exec",
    "guest-exec-status",
];
/// Bytes per `guest-file-write`. qemu-ga 7.2 under TCG took 0.09 s for 64 KiB (87 KB of
/// base64); a 1 MiB chunk did not finish within 30 s.
const WRITE_CHUNK: usize = 64 * 1024;
/// How long a command that may be repeated is retried while libvirt says qemu-ga is not
/// available for now.
const QGA_PATIENCE: Duration = Duration::from_secs(60);
/// Longest wait for one qemu-ga command.
const QGA_TIMEOUT_S: i32 = 30;
/// Longest wait for the install script in the guest (it restarts a service).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);
/// Most bytes of a guest command's output kept (it is shown in errors).
const MAX_EXEC_OUTPUT: usize = 16 * 1024;

/// Why `agent install` or `agent status` failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("domain '{0}' is not running: start it first (virsh start {0}); qemu-ga works only in a running guest")]
    NotRunning(String),
    #[error("domain '{domain}' has no qemu-guest-agent channel ({message}). Add one to its XML and restart it: <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>, and install qemu-guest-agent in the guest; or install tvctl-agent by hand (README, \"Tracing your own domain\")")]
    NoQgaChannel { domain: String, message: String },
    #[error("qemu-guest-agent in '{domain}' does not answer ({command}: {message}): install and start it in the guest (Debian/Ubuntu: apt install qemu-guest-agent; Fedora: dnf install qemu-guest-agent), or wait until the guest has booted")]
    QgaNotAnswering {
        domain: String,
        command: &'static str,
        message: String,
    },
    #[error("qemu-guest-agent in '{domain}' forbids {} (its allow-rpcs/block-rpcs setting, e.g. in /etc/qemu/qemu-ga.conf or the unit's --block-rpcs): allow them, or install tvctl-agent by hand", .commands.join(", "))]
    QgaForbids {
        domain: String,
        commands: Vec<String>,
    },
    #[error("qemu-ga command {command} failed in '{domain}': {message}")]
    Qga {
        domain: String,
        command: &'static str,
        message: String,
    },
    #[error("the guest is {guest}, but {path} is built for {agent}: build the agent for the guest's architecture (cargo build --release --target <arch>-unknown-linux-gnu ...) and pass it with --agent-binary")]
    ArchMismatch {
        guest: String,
        agent: String,
        path: PathBuf,
    },
    #[error("no static tvctl-agent found (looked at {}): install the tvctl package, or build one with `RUSTFLAGS=\"-C target-feature=+crt-static -C relocation-model=static\" cargo build --release --no-default-features --bin tvctl-agent --target x86_64-unknown-linux-gnu` and pass --agent-binary", .looked.join(", "))]
    NoAgentBinary { looked: Vec<String> },
    #[error("{path} cannot be installed in a guest: {why}")]
    BadAgentBinary { path: PathBuf, why: String },
    #[error("installing in '{domain}' failed: {what} (exit {code}){output}")]
    GuestStep {
        domain: String,
        what: String,
        code: i64,
        output: String,
    },
}

impl InstallError {
    pub fn exit_code(&self) -> crate::exitcode::ExitCode {
        use crate::exitcode::ExitCode;
        match self {
            InstallError::NotRunning(_) => ExitCode::DomainStopped,
            InstallError::NoQgaChannel { .. }
            | InstallError::QgaNotAnswering { .. }
            | InstallError::QgaForbids { .. }
            | InstallError::Qga { .. } => ExitCode::NoGuestAgent,
            InstallError::ArchMismatch { .. }
            | InstallError::NoAgentBinary { .. }
            | InstallError::BadAgentBinary { .. }
            | InstallError::GuestStep { .. } => ExitCode::InstallFailed,
        }
    }
}

/// The qemu-ga of one running domain.
pub struct Qga<'a> {
    dom: &'a Dom,
    name: String,
}

/// What `guest-exec` reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    pub code: i64,
    pub stdout: String,
    pub stderr: String,
}

impl<'a> Qga<'a> {
    pub fn new(dom: &'a Dom) -> Result<Qga<'a>, InstallError> {
        let name = dom.name();
        if !dom.is_active().unwrap_or(false) {
            return Err(InstallError::NotRunning(name));
        }
        Ok(Qga { dom, name })
    }

    /// Runs one command; its `return` value.
    fn call(&self, command: &'static str, args: Option<Value>) -> Result<Value, InstallError> {
        let mut req = json!({ "execute": command });
        if let Some(a) = args {
            req["arguments"] = a;
        }
        let reply = self
            .dom
            .qemu_agent_command(&req.to_string(), QGA_TIMEOUT_S)
            .map_err(|e| match e {
                QgaError::NoChannel(message) => InstallError::NoQgaChannel {
                    domain: self.name.clone(),
                    message,
                },
                QgaError::NotAnswering(message) => InstallError::QgaNotAnswering {
                    domain: self.name.clone(),
                    command,
                    message,
                },
                QgaError::Other(message) => InstallError::Qga {
                    domain: self.name.clone(),
                    command,
                    message: clean_text(&message),
                },
            })?;
        let v: Value = serde_json::from_str(&reply).map_err(|e| InstallError::Qga {
            domain: self.name.clone(),
            command,
            message: format!("reply is not JSON: {e}"),
        })?;
        match v.get("return") {
            Some(r) => Ok(r.clone()),
            None => Err(InstallError::Qga {
                domain: self.name.clone(),
                command,
                message: clean_text(&v.to_string()),
            }),
        }
    }

    /// [`Qga::call`] for a command that may be sent twice (it changes nothing): libvirt's
    /// "not available for now" (its sync with qemu-ga timed out: a busy guest, common under
    /// TCG) is retried for up to [`QGA_PATIENCE`].
    fn call_idempotent(
        &self,
        command: &'static str,
        args: Option<Value>,
    ) -> Result<Value, InstallError> {
        let start = Instant::now();
        loop {
            match self.call(command, args.clone()) {
                Err(InstallError::QgaNotAnswering { .. }) if start.elapsed() < QGA_PATIENCE => {
                    std::thread::sleep(Duration::from_secs(1));
                }
                other => return other,
            }
        }
    }

    /// qemu-ga's version, after checking it enables every command in [`NEEDED`].
    pub fn check_commands(&self) -> Result<String, InstallError> {
        let info = self.call_idempotent("guest-info", None)?;
        let version = clean_text(info["version"].as_str().unwrap_or("?"));
        let missing = missing_commands(&info);
        if !missing.is_empty() {
            return Err(InstallError::QgaForbids {
                domain: self.name.clone(),
                commands: missing,
            });
        }
        Ok(version)
    }

    /// `guest-get-osinfo`: (machine, pretty name).
    pub fn osinfo(&self) -> Result<(String, String), InstallError> {
        let os = self.call_idempotent("guest-get-osinfo", None)?;
        let field = |k: &str| clean_text(os[k].as_str().unwrap_or(""));
        let pretty = match field("pretty-name") {
            p if p.is_empty() => field("name"),
            p => p,
        };
        Ok((field("machine"), pretty))
    }

    /// Writes `data` to `path` in the guest (created or truncated).
    pub fn write_file(&self, path: &str, data: &[u8]) -> Result<(), InstallError> {
        let handle = self.call("guest-file-open", Some(json!({"path": path, "mode": "w"})))?;
        let Some(handle) = handle.as_i64() else {
            return Err(InstallError::Qga {
                domain: self.name.clone(),
                command: "guest-file-open",
                message: format!(
                    "no handle in its reply: {}",
                    clean_text(&handle.to_string())
                ),
            });
        };
        let result = (|| {
            for chunk in data.chunks(WRITE_CHUNK) {
                let b64 = base64::engine::general_purpose::STANDARD.encode(chunk);
                let r = self.call(
                    "guest-file-write",
                    Some(json!({"handle": handle, "buf-b64": b64})),
                )?;
                let count = r["count"].as_u64().unwrap_or(0);
                if usize::try_from(count).ok() != Some(chunk.len()) {
                    return Err(InstallError::Qga {
                        domain: self.name.clone(),
                        command: "guest-file-write",
                        message: format!("wrote {count} of {} bytes to {path}", chunk.len()),
                    });
                }
            }
            Ok(())
        })();
        let closed = self.call("guest-file-close", Some(json!({"handle": handle})));
        result.and(closed.map(|_| ()))
    }

    /// Runs `/bin/sh -c script` in the guest and waits (at most `timeout`) for its end.
    pub fn sh(&self, script: &str, timeout: Duration) -> Result<ExecResult, InstallError> {
        let started = self.call(
            "guest-exec",
            Some(json!({"path": "/bin/sh", "arg": ["-c", script], "capture-output": true})),
        )?;
        let Some(pid) = started["pid"].as_i64() else {
            return Err(InstallError::Qga {
                domain: self.name.clone(),
                command: "guest-exec",
                message: "no pid in its reply".into(),
            });
        };
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.call_idempotent("guest-exec-status", Some(json!({ "pid": pid })))?;
            if st["exited"].as_bool() == Some(true) {
                let text = |k: &str| {
                    let b = st[k].as_str().unwrap_or("");
                    let mut bytes = base64::engine::general_purpose::STANDARD
                        .decode(b)
                        .unwrap_or_default();
                    bytes.truncate(MAX_EXEC_OUTPUT);
                    String::from_utf8_lossy(&bytes).into_owned()
                };
                return Ok(ExecResult {
                    code: st["exitcode"]
                        .as_i64()
                        .or_else(|| st["signal"].as_i64().map(|s| 128 + s))
                        .unwrap_or(-1),
                    stdout: text("out-data"),
                    stderr: text("err-data"),
                });
            }
            if Instant::now() >= deadline {
                return Err(InstallError::GuestStep {
                    domain: self.name.clone(),
                    what: format!("the guest command did not end within {timeout:?}"),
                    code: -1,
                    output: String::new(),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The commands of [`NEEDED`] that a `guest-info` answer does not list as enabled.
pub fn missing_commands(info: &Value) -> Vec<String> {
    let enabled = |name: &str| {
        info["supported_commands"].as_array().is_some_and(|cmds| {
            cmds.iter()
                .any(|c| c["name"] == name && c["enabled"].as_bool() == Some(true))
        })
    };
    NEEDED
        .iter()
        .filter(|c| !enabled(c))
        .map(|c| c.to_string())
        .collect()
}

/// An agent binary that can go into a guest.
#[derive(Debug, Clone)]
pub struct AgentBinary {
    pub path: PathBuf,
    pub data: Vec<u8>,
    /// As qemu-ga's `machine` names it (`x86_64`, `aarch64`, …).
    pub arch: String,
}

/// The ELF machine of `data` as `uname -m` names it, if `data` is a static ELF executable.
pub fn check_elf(data: &[u8]) -> Result<String, String> {
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if data.get(..4) != Some(b"\x7fELF") {
        return Err("not an ELF file".into());
    }
    if data.get(4) != Some(&2) || data.get(5) != Some(&1) {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    match u16_at(16) {
        Some(2) | Some(3) => {}
        _ => return Err("not an executable".into()),
    }
    let arch = match u16_at(18) {
        Some(62) => "x86_64",
        Some(183) => "aarch64",
        Some(243) => "riscv64",
        Some(21) => "ppc64le",
        Some(22) => "s390x",
        other => return Err(format!("unknown ELF machine {other:?}")),
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(32), u16_at(54), u16_at(56)) else {
        return Err("truncated ELF header".into());
    };
    for i in 0..u64::from(phnum) {
        let off = phoff.saturating_add(i.saturating_mul(u64::from(phentsize)));
        let Some(kind) = usize::try_from(off)
            .ok()
            .and_then(|o| data.get(o..o + 4))
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        else {
            return Err("truncated program headers".into());
        };
        if kind == 3 {
            return Err(
                "it is dynamically linked (it has an ELF interpreter); the guest may not have \
                 its libraries: use the static build"
                    .into(),
            );
        }
    }
    Ok(arch.to_string())
}

/// A `tvctl-agent` Debian package to install with `dpkg -i` in the guest.
#[derive(Debug, Clone)]
pub struct AgentPackage {
    pub path: PathBuf,
    pub data: Vec<u8>,
    /// As qemu-ga's `machine` names it (from the package's Architecture).
    pub arch: String,
    pub version: String,
}

/// What `agent install` puts into the guest.
#[derive(Debug, Clone)]
pub enum AgentSource {
    /// The static binary, with tvctl's unit (in /usr/local/bin, /etc/systemd/system).
    Binary(AgentBinary),
    /// The `tvctl-agent` package (in /usr/sbin, /lib/systemd/system; dpkg enables it).
    Package(AgentPackage),
}

impl AgentSource {
    fn arch(&self) -> &str {
        match self {
            AgentSource::Binary(b) => &b.arch,
            AgentSource::Package(p) => &p.arch,
        }
    }

    fn path(&self) -> &Path {
        match self {
            AgentSource::Binary(b) => &b.path,
            AgentSource::Package(p) => &p.path,
        }
    }
}

/// Reads a `tvctl-agent` .deb and its control fields (with the host's `dpkg-deb`).
pub fn load_package(path: &Path) -> Result<AgentPackage, InstallError> {
    let bad = |why: String| InstallError::BadAgentBinary {
        path: path.to_path_buf(),
        why,
    };
    let data = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    let out = std::process::Command::new("dpkg-deb")
        .args(["--field"])
        .arg(path)
        .args(["Package", "Architecture", "Version"])
        .output()
        .map_err(|e| bad(format!("cannot run dpkg-deb ({e}): apt install dpkg")))?;
    if !out.status.success() {
        return Err(bad(format!(
            "not a Debian package: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let fields = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |k: &str| {
        fields.lines().find_map(|l| {
            l.strip_prefix(k)?
                .strip_prefix(':')
                .map(|v| v.trim().to_string())
        })
    };
    if field("Package").as_deref() != Some("tvctl-agent") {
        return Err(bad(format!(
            "it is the package {:?}, not tvctl-agent (scripts/build-deb.sh builds it)",
            field("Package").unwrap_or_default()
        )));
    }
    let arch = match field("Architecture").as_deref() {
        Some("amd64") => "x86_64",
        Some("arm64") => "aarch64",
        Some("riscv64") => "riscv64",
        Some("ppc64el") => "ppc64le",
        Some("s390x") => "s390x",
        other => return Err(bad(format!("unknown Architecture {other:?}"))),
    };
    Ok(AgentPackage {
        path: path.to_path_buf(),
        data,
        arch: arch.to_string(),
        version: field("Version").unwrap_or_default(),
    })
}

/// The agent binary to install: `given`, else the package's, else the build's (next to this
/// `tvctl`, or cargo's static target folder).
pub fn find_agent_binary(given: Option<&Path>) -> Result<AgentBinary, InstallError> {
    let load = |path: &Path| -> Result<AgentBinary, InstallError> {
        let bad = |why: String| InstallError::BadAgentBinary {
            path: path.to_path_buf(),
            why,
        };
        let data = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let arch = check_elf(&data).map_err(bad)?;
        Ok(AgentBinary {
            path: path.to_path_buf(),
            data,
            arch,
        })
    };
    if let Some(p) = given {
        return load(p);
    }
    let mut candidates = vec![PathBuf::from(PACKAGED_AGENT)];
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join("tvctl-agent"));
            // target/{release,debug}/tvctl → target/x86_64-unknown-linux-gnu/release/tvctl-agent
            if let Some(target) = dir.parent() {
                candidates.push(target.join("x86_64-unknown-linux-gnu/release/tvctl-agent"));
            }
        }
    }
    for c in &candidates {
        if let Ok(bin) = load(c) {
            return Ok(bin);
        }
    }
    Err(InstallError::NoAgentBinary {
        looked: candidates.iter().map(|c| c.display().to_string()).collect(),
    })
}

/// What `agent install` did (docs/json.md).
#[derive(Debug, Clone, Serialize)]
pub struct InstallReport {
    pub command: &'static str,
    pub domain: String,
    /// The host file installed.
    pub agent_binary: String,
    /// `"binary"` (the static agent and tvctl's unit) or `"package"` (`dpkg -i` of
    /// tvctl-agent_*.deb).
    pub installed_from: &'static str,
    /// What the installed agent says of itself (`tvctl-agent --version`).
    pub agent_version: String,
    pub guest_arch: String,
    pub guest_os: String,
    pub qga_version: String,
    pub path: String,
    /// `systemd` (unit installed, enabled, started) or `none` (started once; add it to init).
    pub init: String,
    /// The agent answered on tvctl's control channel; null when the domain is not set up.
    pub answered: Option<bool>,
    /// What to do next, if anything.
    pub notes: Vec<String>,
}

/// Installs and starts the agent in `dom`; `verify(dom)` then asks it to answer on tvctl's
/// control channel (None: the domain is not set up).
pub fn install(
    dom: &Dom,
    source: &AgentSource,
    verify: &mut dyn FnMut(&Dom) -> Option<Result<(), String>>,
) -> Result<InstallReport, InstallError> {
    let qga = Qga::new(dom)?;
    let name = dom.name();
    let qga_version = qga.check_commands()?;
    let (arch, os) = qga.osinfo()?;
    if !arch.is_empty() && arch != source.arch() {
        return Err(InstallError::ArchMismatch {
            guest: arch,
            agent: source.arch().to_string(),
            path: source.path().to_path_buf(),
        });
    }
    let systemd = qga
        .sh("test -d /run/systemd/system", Duration::from_secs(10))?
        .code
        == 0;
    // A name of its own per attempt: a handle an earlier, failed attempt left open in qemu-ga
    // would make the file busy (ETXTBSY) when it runs.
    let nonce = crate::control::random_u64();
    let (script, path) = match source {
        AgentSource::Binary(binary) => {
            let staged = format!("/usr/local/bin/.tvctl-agent.new.{nonce:016x}");
            let mkdir = qga.sh("mkdir -p /usr/local/bin", Duration::from_secs(10))?;
            if mkdir.code != 0 {
                return Err(step_failed(&name, "mkdir -p /usr/local/bin", &mkdir));
            }
            qga.write_file(&staged, &binary.data)?;
            if systemd {
                qga.write_file(GUEST_UNIT_PATH, UNIT.as_bytes())?;
            }
            (binary_script(&staged, binary.data.len()), GUEST_AGENT_PATH)
        }
        AgentSource::Package(package) => {
            let staged = format!("/var/tmp/.tvctl-agent.{nonce:016x}.deb");
            qga.write_file(&staged, &package.data)?;
            (
                package_script(&staged, package.data.len()),
                PACKAGED_GUEST_AGENT,
            )
        }
    };
    let done = qga.sh(&script, SCRIPT_TIMEOUT)?;
    if done.code != 0 {
        return Err(step_failed(&name, "the install script", &done));
    }
    let agent_version = clean_text(done.stdout.lines().last().unwrap_or("").trim());
    let mut notes = Vec::new();
    if !systemd {
        notes.push(format!(
            "the guest has no systemd: the agent runs now, but add `{path}` to the \
             guest's init (busybox: `::respawn:{path}` in /etc/inittab; OpenRC or \
             sysvinit: a service script) so it starts at every boot"
        ));
    }
    let answered = match verify(dom) {
        None => {
            notes.push(format!(
                "the domain is not set up for tvctl: run `tvctl setup {name}` and restart the \
                 domain; then `tvctl trace {name} -e sched` works"
            ));
            None
        }
        Some(Ok(())) => Some(true),
        Some(Err(why)) => {
            notes.push(format!(
                "the agent did not answer on tvctl's channel: {why}"
            ));
            Some(false)
        }
    };
    Ok(InstallReport {
        command: "agent-install",
        domain: name,
        agent_binary: source.path().display().to_string(),
        installed_from: match source {
            AgentSource::Binary(_) => "binary",
            AgentSource::Package(_) => "package",
        },
        agent_version,
        guest_arch: arch,
        guest_os: os,
        qga_version,
        path: path.to_string(),
        init: if systemd { "systemd" } else { "none" }.to_string(),
        answered,
        notes,
    })
}

/// The script that puts the static binary in place and starts it (its last line of output
/// is the agent's `--version`).
fn binary_script(staged: &str, size: usize) -> String {
    format!(
        "set -e\n\
         test \"$(wc -c < {staged})\" -eq {size} || {{ echo 'the copy has the wrong size' >&2; exit 90; }}\n\
         chmod 0755 {staged}\n\
         mv -f {staged} {GUEST_AGENT_PATH}\n\
         rm -f /usr/local/bin/.tvctl-agent.new.*\n\
         {GUEST_AGENT_PATH} --version >/dev/null\n\
         if [ -d /run/systemd/system ]; then\n\
           chmod 0644 {GUEST_UNIT_PATH}\n\
           systemctl daemon-reload\n\
           systemctl enable tvctl-agent.service >/dev/null 2>&1\n\
           systemctl restart tvctl-agent.service\n\
           systemctl is-active tvctl-agent.service >/dev/null\n\
         else\n\
           pkill -x tvctl-agent 2>/dev/null || killall tvctl-agent 2>/dev/null || true\n\
           setsid {GUEST_AGENT_PATH} </dev/null >/dev/null 2>&1 &\n\
         fi\n\
         {GUEST_AGENT_PATH} --version\n"
    )
}

/// The script that installs the package with dpkg (its postinst enables and starts the
/// service) and retires an agent installed earlier from the binary (whose unit in /etc
/// would shadow the package's).
fn package_script(staged: &str, size: usize) -> String {
    format!(
        "set -e\n\
         trap 'rm -f {staged}' EXIT\n\
         command -v dpkg >/dev/null || {{ echo 'the guest has no dpkg: install the static binary instead (drop --package)' >&2; exit 91; }}\n\
         test \"$(wc -c < {staged})\" -eq {size} || {{ echo 'the copy has the wrong size' >&2; exit 90; }}\n\
         if grep -qs '^ExecStart={GUEST_AGENT_PATH}$' {GUEST_UNIT_PATH}; then\n\
           systemctl disable --now tvctl-agent.service >/dev/null 2>&1 || true\n\
           rm -f {GUEST_UNIT_PATH} {GUEST_AGENT_PATH}\n\
           systemctl daemon-reload || true\n\
         fi\n\
         dpkg -i {staged} >&2\n\
         if [ -d /run/systemd/system ]; then\n\
           systemctl restart tvctl-agent.service\n\
           systemctl is-active tvctl-agent.service >/dev/null\n\
         fi\n\
         {PACKAGED_GUEST_AGENT} --version\n"
    )
}

fn step_failed(domain: &str, what: &str, r: &ExecResult) -> InstallError {
    let text = format!("{}{}", r.stdout, r.stderr);
    let text = clean_text(text.trim());
    InstallError::GuestStep {
        domain: domain.to_string(),
        what: what.to_string(),
        code: r.code,
        output: if text.is_empty() {
            String::new()
        } else {
            format!(": {text}")
        },
    }
}

impl InstallReport {
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "{}: installed {} at {} ({}, {}; qemu-ga {})\n",
            self.domain,
            self.agent_version,
            self.path,
            self.guest_arch,
            self.guest_os,
            self.qga_version
        );
        s.push_str(&match self.init.as_str() {
            "systemd" => {
                "  tvctl-agent.service enabled and started (it starts at every boot)\n".to_string()
            }
            _ => "  started once (no systemd in the guest)\n".to_string(),
        });
        if self.answered == Some(true) {
            s.push_str("  it answered on tvctl's control channel\n");
        }
        for n in &self.notes {
            s.push_str(&format!("  note: {n}\n"));
        }
        s
    }
}

/// What `agent status` found (docs/json.md).
#[derive(Debug, Clone, Serialize)]
pub struct AgentStatus {
    pub command: &'static str,
    pub domain: String,
    /// `tvctl-agent --version` in the guest; null when it is not installed there.
    pub agent_version: Option<String>,
    /// The path of the agent found in the guest.
    pub path: Option<String>,
    /// Whether a tvctl-agent process runs, and for how long (seconds).
    pub running: bool,
    pub uptime_s: Option<u64>,
    /// systemd's view (`active`/`inactive`/…, `enabled`/`disabled`), null without systemd.
    pub service: Option<String>,
    pub enabled: Option<String>,
    /// The agent's note of its last session: when (Unix seconds), with which host, protocol.
    pub last_session: Option<LastSession>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LastSession {
    pub unix_time: u64,
    pub protocol: u16,
    pub host: String,
}

/// Parses the agent's `/run/tvctl-agent.last-session` line (guest data: bounded, escaped).
pub fn parse_last_session(line: &str) -> Option<LastSession> {
    let mut it = line.trim().splitn(4, ' ');
    let unix_time = it.next()?.parse().ok()?;
    if it.next()? != "protocol" {
        return None;
    }
    let protocol = it.next()?.parse().ok()?;
    let host: String = it.next().unwrap_or("").chars().take(256).collect();
    Some(LastSession {
        unix_time,
        protocol,
        host: clean_text(&host),
    })
}

/// Asks the guest, through qemu-ga, about its tvctl-agent.
pub fn status(dom: &Dom) -> Result<AgentStatus, InstallError> {
    let qga = Qga::new(dom)?;
    qga.check_commands()?;
    const LAST: &str = crate::agent::session::LAST_SESSION_FILE;
    let script = format!(
        "p=$(command -v tvctl-agent || true)\n\
         [ -n \"$p\" ] || {{ [ -x {GUEST_AGENT_PATH} ] && p={GUEST_AGENT_PATH}; }}\n\
         [ -n \"$p\" ] || {{ [ -x {PACKAGED_GUEST_AGENT} ] && p={PACKAGED_GUEST_AGENT}; }}\n\
         echo \"path=$p\"\n\
         [ -n \"$p\" ] && echo \"version=$($p --version 2>/dev/null | head -n1)\"\n\
         pid=$(pidof tvctl-agent 2>/dev/null | cut -d' ' -f1)\n\
         if [ -n \"$pid\" ]; then\n\
           echo \"start=$(cut -d' ' -f22 /proc/$pid/stat)\"\n\
           echo \"hz=$(getconf CLK_TCK 2>/dev/null || echo 100)\"\n\
           echo \"uptime=$(cut -d' ' -f1 /proc/uptime)\"\n\
         fi\n\
         if [ -d /run/systemd/system ]; then\n\
           echo \"service=$(systemctl is-active tvctl-agent.service 2>/dev/null)\"\n\
           echo \"enabled=$(systemctl is-enabled tvctl-agent.service 2>/dev/null)\"\n\
         fi\n\
         [ -r {LAST} ] && echo \"last=$(head -c 600 {LAST})\"\n\
         exit 0\n"
    );
    let r = qga.sh(&script, Duration::from_secs(20))?;
    let get = |k: &str| {
        r.stdout.lines().find_map(|l| {
            let v = l.strip_prefix(k)?.strip_prefix('=')?.trim();
            (!v.is_empty()).then(|| v.to_string())
        })
    };
    let start: Option<u64> = get("start").and_then(|v| v.parse().ok());
    let hz: u64 = get("hz").and_then(|v| v.parse().ok()).unwrap_or(100).max(1);
    // /proc/uptime's seconds, whole ones are enough.
    let up: Option<u64> = get("uptime").and_then(|v| v.split('.').next()?.parse().ok());
    let uptime_s = match (start, up) {
        (Some(st), Some(up)) => up.checked_sub(st / hz),
        _ => None,
    };
    Ok(AgentStatus {
        command: "agent-status",
        domain: dom.name(),
        agent_version: get("version").map(|v| clean_text(&v)),
        path: get("path").map(|v| clean_text(&v)),
        running: start.is_some(),
        uptime_s,
        service: get("service").map(|v| clean_text(&v)),
        enabled: get("enabled").map(|v| clean_text(&v)),
        last_session: get("last").and_then(|l| parse_last_session(&l)),
    })
}

impl AgentStatus {
    pub fn to_text(&self) -> String {
        let mut s = match (&self.agent_version, &self.path) {
            (Some(v), Some(p)) => format!("{}: {v} at {p}", self.domain),
            (None, Some(p)) => format!("{}: {p} (does not run: --version failed)", self.domain),
            _ => format!(
                "{}: tvctl-agent is not installed (tvctl agent install {})",
                self.domain, self.domain
            ),
        };
        match (self.running, self.uptime_s) {
            (true, Some(u)) => s.push_str(&format!(", running for {}\n", human_secs(u))),
            (true, None) => s.push_str(", running\n"),
            (false, _) => s.push_str(", not running\n"),
        }
        if let Some(svc) = &self.service {
            s.push_str(&format!(
                "  systemd: {svc}, {}\n",
                self.enabled.as_deref().unwrap_or("unknown")
            ));
        }
        match &self.last_session {
            Some(l) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                s.push_str(&format!(
                    "  last session: {} ago, protocol {}, with {}\n",
                    human_secs(now.saturating_sub(l.unix_time)),
                    l.protocol,
                    l.host
                ));
            }
            None => s.push_str("  last session: none since the guest booted\n"),
        }
        s
    }
}

fn human_secs(s: u64) -> String {
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        _ => format!("{} h", s / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_checks_tell_static_dynamic_and_foreign_apart() {
        // This test binary is a dynamic x86_64 (or other) executable.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let err = check_elf(&me).unwrap_err();
        assert!(err.contains("dynamically linked"), "{err}");
        assert_eq!(check_elf(b"#!/bin/sh\n").unwrap_err(), "not an ELF file");
        // A minimal static aarch64 executable header: no program headers.
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        h[16] = 2;
        h[18..20].copy_from_slice(&183u16.to_le_bytes());
        assert_eq!(check_elf(&h).unwrap(), "aarch64");
        h[18..20].copy_from_slice(&62u16.to_le_bytes());
        assert_eq!(check_elf(&h).unwrap(), "x86_64");
        assert!(check_elf(&h[..40]).is_err());
    }

    #[test]
    fn commands_qemu_ga_disables_or_lacks_are_named() {
        let mut cmds: Vec<Value> = NEEDED
            .iter()
            .map(|n| json!({"name": n, "enabled": true, "success-response": true}))
            .collect();
        let all = json!({"version": "7.2.22", "supported_commands": cmds.clone()});
        assert!(missing_commands(&all).is_empty());
        // --block-rpcs=guest-exec turns it off; a qemu-ga too old for guest-exec lacks it.
        cmds[4]["enabled"] = json!(false);
        cmds.remove(5);
        let some = json!({"supported_commands": cmds});
        assert_eq!(missing_commands(&some), ["guest-exec", "guest-exec-status"]);
        assert_eq!(missing_commands(&json!({})).len(), NEEDED.len());
    }

    #[test]
    fn last_session_lines_are_parsed_bounded_and_escaped() {
        assert_eq!(
            parse_last_session("1765080000 protocol 4 tvctl 0.1.0 trace (pid 12)\n"),
            Some(LastSession {
                unix_time: 1_765_080_000,
                protocol: 4,
                host: "tvctl 0.1.0 trace (pid 12)".into()
            })
        );
        let evil = parse_last_session("1 protocol 4 a\x1b]52;c;x\x07").unwrap();
        assert_eq!(evil.host, "a\\x1b]52;c;x\\x07");
        assert_eq!(parse_last_session("garbage"), None);
        assert_eq!(parse_last_session("1 version 4 x"), None);
    }
}
