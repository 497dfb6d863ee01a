//! Host tier: the Debian packages of scripts/build-deb.sh. Their contents and control data
//! (dpkg-deb), the agent package's maintainer scripts (run against a stand-in
//! deb-systemd-helper), and the host package installed on this machine with `dpkg -i`: man
//! page found by `man`, bash completion completing `tvctl tr` to `trace`, then purged, leaving
//! the machine as before. Needs root, dpkg-dev and man-db (scripts/install-deps.sh). The first
//! run builds release binaries (about 2.5 minutes on 2 cores); later runs take seconds.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The two packages, built once for every test of this file.
struct Debs {
    host: PathBuf,
    agent: PathBuf,
}

fn debs() -> &'static Debs {
    static DEBS: OnceLock<Debs> = OnceLock::new();
    DEBS.get_or_init(|| {
        let top = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = run(Command::new(top.join("scripts/build-deb.sh")).current_dir(top));
        assert!(
            out.status.success(),
            "scripts/build-deb.sh failed:\n{}",
            show(&out)
        );
        let dir = std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| top.join("target"), PathBuf::from)
            .join("debian");
        let debs = Debs {
            host: dir.join(format!("tvctl_{VERSION}_amd64.deb")),
            agent: dir.join(format!("tvctl-agent_{VERSION}_amd64.deb")),
        };
        for deb in [&debs.host, &debs.agent] {
            assert!(
                deb.is_file(),
                "build-deb.sh did not write {}",
                deb.display()
            );
        }
        debs
    })
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (install it: scripts/install-deps.sh)"))
}

fn show(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs a command that must succeed; returns its stdout.
fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(out.status.success(), "{cmd:?} failed:\n{}", show(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn dpkg_deb(args: &[&str], deb: &Path) -> String {
    ok(Command::new("dpkg-deb").args(args).arg(deb))
}

/// The paths a package holds, as `/usr/bin/tvctl`.
fn contents(deb: &Path) -> Vec<String> {
    dpkg_deb(&["--contents"], deb)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.').trim_end_matches('/').to_owned())
        .filter(|p| !p.is_empty())
        .collect()
}

fn field(deb: &Path, name: &str) -> Option<String> {
    let out = run(Command::new("dpkg-deb")
        .args(["--field"])
        .arg(deb)
        .arg(name));
    let value = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (!value.is_empty()).then_some(value)
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test installs a package with dpkg: run it as root"
    );
}

#[test]
fn host_package_holds_binary_completions_man_pages_docs_unit_and_agent() {
    let deb = &debs().host;
    let files = contents(deb);
    for want in [
        "/usr/bin/tvctl",
        "/usr/lib/tvctl/tvctl-agent",
        "/usr/share/bash-completion/completions/tvctl",
        "/usr/share/zsh/vendor-completions/_tvctl",
        "/usr/share/fish/vendor_completions.d/tvctl.fish",
        "/usr/share/man/man1/tvctl.1.gz",
        "/usr/share/man/man1/tvctl-trace.1.gz",
        "/usr/share/man/man1/tvctl-setup.1.gz",
        "/usr/share/doc/tvctl/copyright",
        "/usr/share/doc/tvctl/changelog.gz",
        "/usr/share/doc/tvctl/README.md",
        "/usr/share/doc/tvctl/protocol.md",
        "/lib/systemd/system/tvctl-serve.service",
    ] {
        assert!(
            files.iter().any(|f| f == want),
            "{want} missing in {files:#?}"
        );
    }
    assert!(
        !files.iter().any(|f| f.contains("tvctl-man")),
        "the hidden man subcommand got a page: {files:#?}"
    );
    assert_eq!(field(deb, "Version").as_deref(), Some(VERSION));
    assert_eq!(field(deb, "Package").as_deref(), Some("tvctl"));
    let depends = field(deb, "Depends").expect("a Depends field");
    assert!(depends.contains("libvirt0"), "{depends}");
    assert!(depends.contains("libc6"), "{depends}");
    assert_eq!(field(deb, "Recommends").as_deref(), Some("trace-cmd"));
    // Not enabled: no maintainer scripts that would enable tvctl-serve.
    let info = dpkg_deb(&["--info"], deb);
    assert!(!info.contains("postinst"), "{info}");
}

#[test]
fn agent_package_is_static_with_its_unit_and_no_dependencies() {
    let deb = &debs().agent;
    let files = contents(deb);
    for want in [
        "/usr/sbin/tvctl-agent",
        "/lib/systemd/system/tvctl-agent.service",
        "/usr/share/doc/tvctl-agent/copyright",
        "/usr/share/man/man8/tvctl-agent.8.gz",
    ] {
        assert!(
            files.iter().any(|f| f == want),
            "{want} missing in {files:#?}"
        );
    }
    assert_eq!(field(deb, "Depends"), None);
    assert_eq!(field(deb, "Version").as_deref(), Some(VERSION));

    let root = tempfile::tempdir().unwrap();
    ok(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root.path()));
    let agent = root.path().join("usr/sbin/tvctl-agent");
    let ldd = run(Command::new("ldd").arg(&agent).env("LC_ALL", "C"));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&ldd.stdout),
        String::from_utf8_lossy(&ldd.stderr)
    );
    assert!(
        said.contains("not a dynamic executable"),
        "not static: {said}"
    );
    let version = ok(Command::new(&agent).arg("--version"));
    assert_eq!(version.trim(), format!("tvctl-agent {VERSION}"));
    let unit =
        fs::read_to_string(root.path().join("lib/systemd/system/tvctl-agent.service")).unwrap();
    assert!(
        unit.contains("\nExecStart=/usr/sbin/tvctl-agent\n"),
        "{unit}"
    );
    assert!(unit.contains("WantedBy=multi-user.target"), "{unit}");
}

/// A stand-in deb-systemd-helper/-invoke and systemctl that log their arguments.
fn fake_systemd_tools(dir: &Path, log: &Path) {
    for tool in ["deb-systemd-helper", "deb-systemd-invoke", "systemctl"] {
        let path = dir.join(tool);
        fs::write(
            &path,
            format!(
                "#!/bin/sh\necho \"{tool} $*\" >> '{}'\nexit 0\n",
                log.display()
            ),
        )
        .unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }
}

#[test]
fn agent_maintainer_scripts_enable_on_install_and_purge_on_purge() {
    // Arrange: the control scripts, and stand-ins for the systemd helpers on PATH.
    let deb = &debs().agent;
    let control = tempfile::tempdir().unwrap();
    ok(Command::new("dpkg-deb")
        .arg("-e")
        .arg(deb)
        .arg(control.path()));
    let bin = tempfile::tempdir().unwrap();
    let log = bin.path().join("log");
    fake_systemd_tools(bin.path(), &log);
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap()
    );
    let script = |name: &str, args: &[&str]| {
        let file = control.path().join(name);
        ok(Command::new("sh").arg("-n").arg(&file));
        fs::write(&log, "").unwrap();
        ok(Command::new("sh").arg(&file).args(args).env("PATH", &path));
        fs::read_to_string(&log).unwrap()
    };
    // This machine, like a chroot, has no /run/systemd/system: nothing may be started.
    let systemd_runs = Path::new("/run/systemd/system").is_dir();

    // Act + Assert: a first installation enables the unit (symlinks only).
    let installed = script("postinst", &["configure"]);
    assert!(
        installed.contains("deb-systemd-helper enable tvctl-agent.service"),
        "{installed}"
    );
    assert_eq!(
        installed.contains("deb-systemd-invoke start"),
        systemd_runs,
        "{installed}"
    );

    let removed = script("prerm", &["remove"]);
    assert_eq!(
        removed.contains("deb-systemd-invoke stop"),
        systemd_runs,
        "{removed}"
    );
    let removed = script("postrm", &["remove"]);
    assert!(
        removed.contains("deb-systemd-helper mask tvctl-agent.service"),
        "{removed}"
    );
    let purged = script("postrm", &["purge"]);
    assert!(
        purged.contains("deb-systemd-helper purge tvctl-agent.service"),
        "{purged}"
    );
    assert!(
        purged.contains("deb-systemd-helper unmask tvctl-agent.service"),
        "{purged}"
    );
}

/// Whether dpkg's configuration drops `path` on installation (Debian's minimal images
/// exclude /usr/share/man through /etc/dpkg/dpkg.cfg.d/excludes).
fn dpkg_excludes(path: &str) -> bool {
    let mut excluded = false;
    let Ok(dir) = fs::read_dir("/etc/dpkg/dpkg.cfg.d") else {
        return false;
    };
    let mut files: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
    files.sort();
    for file in files {
        for line in fs::read_to_string(&file).unwrap_or_default().lines() {
            let line = line.trim();
            if let Some(glob) = line.strip_prefix("path-exclude=") {
                excluded |= tvctl::agent::tracefs::glob_match(glob.trim(), path);
            } else if let Some(glob) = line.strip_prefix("path-include=") {
                excluded &= !tvctl::agent::tracefs::glob_match(glob.trim(), path);
            }
        }
    }
    excluded
}

fn installed(package: &str) -> bool {
    let out = run(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]));
    String::from_utf8_lossy(&out.stdout).contains("install ok installed")
}

/// Purges the package when dropped, so that a failing test leaves the machine as it found it.
struct Installed(&'static str);

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", self.0]).output();
    }
}

#[test]
fn host_package_installs_with_man_page_and_bash_completion_and_purges_cleanly() {
    // Arrange
    require_root();
    let deb = &debs().host;
    assert!(
        !installed("tvctl"),
        "the tvctl package is already installed here; this test would remove it: dpkg --purge tvctl first"
    );
    let files = contents(deb);
    for f in &files {
        let p = Path::new(f);
        assert!(
            p.is_dir() || !p.exists(),
            "{f} exists but belongs to no tvctl package; dpkg -i would overwrite it: move it away first"
        );
    }

    // Act
    let _guard = Installed("tvctl");
    ok(Command::new("dpkg").arg("-i").arg(deb));

    // Assert: the binary runs; man finds and renders the page (unless dpkg drops man pages).
    let version = ok(Command::new("/usr/bin/tvctl").arg("--version"));
    assert_eq!(version.trim(), format!("tvctl {VERSION}"));
    let page = "/usr/share/man/man1/tvctl.1.gz";
    if dpkg_excludes(page) {
        eprintln!(
            "dpkg's path-exclude drops {page} here: checking the page from the package instead"
        );
        let root = tempfile::tempdir().unwrap();
        ok(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root.path()));
        let text = ok(Command::new("man")
            .arg("-l")
            .arg(root.path().join(&page[1..]))
            .env("MANPAGER", "cat"));
        assert!(text.contains("EXIT STATUS"), "{text}");
    } else {
        assert!(Path::new(page).is_file(), "{page} not installed");
        let found = ok(Command::new("man").args(["-w", "tvctl"]));
        assert_eq!(found.trim(), page);
        let text = ok(Command::new("man")
            .args(["-P", "cat", "tvctl-trace"])
            .env("MANWIDTH", "100"));
        assert!(text.contains("--duration"), "{text}");
        let text = ok(Command::new("man")
            .args(["-P", "cat", "tvctl"])
            .env("MANWIDTH", "1000"));
        let words = text.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(words.contains("EXIT STATUS"), "{text}");
        assert!(
            words.contains("15 another tvctl holds the domain"),
            "{text}"
        );
    }
    let complete = ok(Command::new("bash").args([
        "-c",
        "source /usr/share/bash-completion/completions/tvctl && complete -p tvctl",
    ]));
    assert!(complete.contains("-F _tvctl"), "{complete}");
    let offered = ok(Command::new("bash").args([
        "-c",
        "source /usr/share/bash-completion/completions/tvctl
         COMP_WORDS=(tvctl tr); COMP_CWORD=1; COMP_LINE='tvctl tr'; COMP_POINT=8
         _tvctl tvctl tr tvctl
         printf '%s\\n' \"${COMPREPLY[@]}\"",
    ]));
    assert_eq!(offered.lines().collect::<Vec<_>>(), ["trace"], "{offered}");
    assert!(Path::new("/lib/systemd/system/tvctl-serve.service").is_file());

    // Act + Assert: purge leaves nothing of the package behind.
    ok(Command::new("dpkg").args(["--purge", "tvctl"]));
    assert!(!installed("tvctl"));
    for f in &files {
        let p = Path::new(f);
        assert!(
            p.is_dir() || !p.exists(),
            "{f} left behind after dpkg --purge"
        );
    }
    assert!(!Path::new("/usr/share/doc/tvctl").exists());
    assert!(!Path::new("/usr/lib/tvctl").exists());
}
