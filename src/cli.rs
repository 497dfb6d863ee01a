//! The `tvctl` command line: clap definitions, their validation into a [`GlobalConfig`], the
//! dispatch to [`crate::setup`], and the output for people (concise) or scripts (`--json`,
//! schema in docs/json.md). Errors come back as `anyhow` chains; [`exit_code_of`] finds the
//! typed error in a chain and maps it to its documented [`ExitCode`].
//!
//! Subcommands share [`GlobalArgs`], so a new one (such as `trace`) only adds its own
//! arguments struct, a [`Command`] variant and an arm in [`run`].

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{ArgAction, Args, Parser, Subcommand};

use crate::channels::FileError;
use crate::domxml::DomXmlError;
use crate::exitcode::ExitCode;
use crate::libvirt::{self, Hypervisor, LibvirtError};
use crate::setup::{
    self, ChangeReport, DomainStatus, SetupError, SetupOptions, StatusReport, TeardownOptions,
};

/// Where the per-domain folders live unless `--dir` says otherwise. Under /var/lib, not
/// /tmp: the folders and FIFOs must survive a host reboot, as the domain XML names them.
pub const DEFAULT_DIR: &str = "/var/lib/tvctl";

/// Record ftrace data of libvirt/QEMU guests from the host over virtio-serial.
#[derive(Debug, Parser)]
#[command(name = "tvctl", version, after_help = crate::exitcode::help_table())]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand takes.
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// libvirt URI [default: $LIBVIRT_DEFAULT_URI, else qemu:///system]
    #[arg(short = 'c', long = "connect", value_name = "URI", global = true)]
    pub connect: Option<String>,
    /// Root of the per-domain folders
    #[arg(long, value_name = "PATH", default_value = DEFAULT_DIR, global = true)]
    pub dir: PathBuf,
    /// Machine-readable output on stdout (schema: docs/json.md)
    #[arg(long, global = true)]
    pub json: bool,
    /// More output: the XML diff and every file
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Less output: errors only
    #[arg(short, long, action = ArgAction::Count, global = true, conflicts_with = "verbose")]
    pub quiet: u8,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Add tvctl's channels to a domain and create their FIFOs (idempotent)
    Setup(SetupArgs),
    /// Remove exactly what setup added: channels, FIFOs, folder
    Teardown(TeardownArgs),
    /// Show whether domains are set up, and what is wrong if not
    Status(StatusArgs),
    /// Record guest events into a trace.dat (boots the domain if it is off)
    Trace(TraceArgs),
    /// Serve every set-up domain: users in guests record with `tvctl-agent record`
    Serve(ServeArgs),
    /// Install the guest agent into a running guest through qemu-guest-agent, or show it
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Print a shell completion script (bash: source it, or install it as
    /// /usr/share/bash-completion/completions/tvctl)
    Completions(CompletionsArgs),
    /// Write the man pages (tvctl.1, tvctl-SUBCOMMAND.1) into a folder; for packagers
    #[command(hide = true)]
    Man(ManArgs),
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Copy the static tvctl-agent into a running guest through its qemu-guest-agent,
    /// install and start its systemd unit, and check that it answers
    Install(AgentInstallArgs),
    /// Show the guest's tvctl-agent: version, uptime, service state, last session
    Status(AgentStatusArgs),
}

#[derive(Debug, Clone, Args)]
pub struct AgentInstallArgs {
    /// Domain name, UUID or id (running, with a qemu-guest-agent channel)
    pub domain: String,
    /// The static agent to install [default: /usr/lib/tvctl/tvctl-agent from the package,
    /// else the build's next to this tvctl]
    #[arg(long, value_name = "PATH")]
    pub agent_binary: Option<PathBuf>,
    /// Install this tvctl-agent_*.deb with dpkg in the guest instead (Debian and Ubuntu
    /// guests; the package's unit is enabled on install)
    #[arg(long, value_name = "DEB", conflicts_with = "agent_binary")]
    pub package: Option<PathBuf>,
    /// Seconds to wait for the installed agent to answer on tvctl's channel
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub agent_timeout: f64,
}

#[derive(Debug, Clone, Args)]
pub struct AgentStatusArgs {
    /// Domain name, UUID or id (running, with a qemu-guest-agent channel)
    pub domain: String,
}

#[derive(Debug, Clone, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for
    #[arg(value_enum)]
    pub shell: crate::generate::CompletionShell,
}

#[derive(Debug, Clone, Args)]
pub struct ManArgs {
    /// Folder to write the pages into (created if missing). Not --dir: that global option
    /// names the per-domain folders
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub out_dir: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Most bytes of recordings kept per domain (in <dir>/<domain>/recordings), e.g. 500M,
    /// 20G: a guest's request is refused once they take this much, and a running recording
    /// stops there with a complete file. Guests are not trusted with the host's disk, so
    /// there is always a limit
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "2G")]
    pub max_bytes: u64,
}

#[derive(Debug, Clone, Args)]
pub struct TraceArgs {
    /// Domain names, UUIDs or ids: several are recorded at once, clock-corrected
    #[arg(required = true, num_args = 1.., value_name = "DOMAIN")]
    pub domains: Vec<String>,
    /// Also record the host (its own tracefs instance); files: -o PREFIX.dat for the host,
    /// PREFIX-<domain>.dat per guest
    #[arg(long)]
    pub host: bool,
    /// Host events with --host, in -e's forms [default: sched:sched_switch,
    /// sched:sched_wakeup, and kvm:kvm_entry, kvm:kvm_exit where the host has them]
    #[arg(short = 'H', long = "host-event", value_name = "EVENT")]
    pub host_events: Vec<String>,
    /// How guest clocks are related to the host's when several files are written: kvm
    /// (debugfs tsc-offset, exact), probe (timestamp exchanges), none; auto is kvm where the
    /// domain runs under KVM, else probe
    #[arg(long, value_name = "METHOD", value_parser = ["auto", "kvm", "probe", "none"], default_value = "auto")]
    pub sync: String,
    /// Events to record, in trace-cmd's forms: sched, sched:sched_switch, sched_switch, 'sched*', 'irq:*'
    #[arg(short = 'e', long = "event", value_name = "EVENT", required = true)]
    pub events: Vec<String>,
    /// Output file [default: trace-<domain>.dat; with several domains or --host, trace.dat
    /// for the host and trace-<domain>.dat per guest]
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Stop after this many seconds (else on Ctrl-C, the command's end, or the domain stopping)
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Per-CPU ring buffer size in the guest, in KiB [default: the guest kernel's]
    #[arg(short = 'b', long = "buffer-kb", value_name = "KB")]
    pub buffer_kb: Option<u32>,
    /// Trace clock in the guest (local, global, mono, x86-tsc, ...) [default: the one the
    /// guest kernel chose for its top-level trace_clock; x86-tsc with several domains or
    /// --host]
    #[arg(short = 'C', long = "clock", value_name = "CLOCK")]
    pub clock: Option<String>,
    /// Do not boot the domain if it is off (fail instead)
    #[arg(long)]
    pub no_boot: bool,
    /// Run `tvctl setup` first (needed once per domain)
    #[arg(long)]
    pub setup: bool,
    /// Seconds to wait for the guest agent (boot included)
    #[arg(long, value_name = "SECS", default_value_t = 120.0)]
    pub agent_timeout: f64,
    /// Keep at most this much trace data (all CPUs), e.g. 500M, 2G; reaching it stops the
    /// recording like --duration
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_size: Option<u64>,
    /// trace.dat version: 7 (sections, zstd-compressed, as trace-cmd 3.x writes), or 6 for
    /// readers older than trace-cmd 3.0 (uncompressed)
    #[arg(long, value_name = "N", default_value_t = 7, value_parser = clap::value_parser!(u8).range(6..=7))]
    pub file_version: u8,
    /// Command to run in the guest while tracing (own session; stdin /dev/null); its end
    /// stops the trace, its stdout and stderr come to ours, escaped (stdout kept out of
    /// --json's), and its exit status is in the summary
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

impl TraceArgs {
    fn validate(&self) -> Result<crate::trace::TraceOptions, UsageError> {
        let secs = |what: &str, v: f64| {
            if v.is_finite() && v > 0.0 && v < 1e9 {
                Ok(std::time::Duration::from_secs_f64(v))
            } else {
                Err(UsageError(format!(
                    "{what} {v}: give a positive number of seconds"
                )))
            }
        };
        if self.buffer_kb == Some(0) {
            return Err(UsageError(
                "-b 0: give the per-CPU buffer size in KiB, e.g. -b 4096".into(),
            ));
        }
        if self.events.iter().any(|e| e.trim().is_empty()) {
            return Err(UsageError(
                "-e '': name an event, e.g. -e sched:sched_switch".into(),
            ));
        }
        let several = self.domains.len() > 1 || self.host;
        if several && self.domains.len() > 1 && !self.command.is_empty() {
            return Err(UsageError(
                "-- COMMAND runs in one guest: give one domain (with --host if you want the host too)".into(),
            ));
        }
        if !self.host && !self.host_events.is_empty() {
            return Err(UsageError("-H needs --host".into()));
        }
        let output = self.output.clone().unwrap_or_else(|| {
            if several {
                PathBuf::from("trace.dat")
            } else {
                PathBuf::from(format!("trace-{}.dat", self.domains[0]))
            }
        });
        Ok(crate::trace::TraceOptions {
            domain_dir: PathBuf::new(),
            output,
            events: self.events.clone(),
            duration: self.duration.map(|d| secs("--duration", d)).transpose()?,
            buffer_kb: self.buffer_kb,
            clock: self.clock.clone(),
            command: self.command.clone(),
            boot: !self.no_boot,
            agent_timeout: secs("--agent-timeout", self.agent_timeout)?,
            progress: true,
            relay_stdout: true,
            max_size: self.max_size,
            file_version: match self.file_version {
                6 => crate::trace::FileVersion::V6,
                _ => crate::trace::FileVersion::V7,
            },
        })
    }
}

/// A size in bytes: a number with an optional K, M, G or T suffix (powers of 1024), at least
/// one page (4 KiB).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, ""),
    };
    let shift = match unit.to_ascii_uppercase().trim_end_matches(['B', 'I']) {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("{text:?}: give a size such as 4096, 500M or 2G")),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?}: give a size such as 4096, 500M or 2G"))?;
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))?;
    if bytes < 4096 {
        return Err(format!("{text:?}: give at least one page (4K)"));
    }
    Ok(bytes)
}

#[derive(Debug, Clone, Args)]
pub struct SetupArgs {
    /// Domain name, UUID or id
    pub domain: String,
    /// Print the XML diff and the files it would create; change nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Also hot-plug the channels into the running domain
    #[arg(long)]
    pub live: bool,
    /// Group of the folder and FIFOs [default: QEMU's, from libvirt's DAC label]
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct TeardownArgs {
    /// Domain name, UUID or id
    pub domain: String,
    /// Print the XML diff and the files it would remove; change nothing
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Domain name, UUID or id [default: every set-up domain]
    pub domain: Option<String>,
}

/// How much to print for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verbosity {
    Quiet,
    Normal,
    Verbose,
}

/// The global options, checked.
#[derive(Debug, Clone)]
pub struct GlobalConfig {
    pub uri: String,
    /// Absolute: QEMU would resolve a relative path against its own working directory.
    pub dir: PathBuf,
    pub json: bool,
    pub verbosity: Verbosity,
}

/// A command-line value that parsed but makes no sense.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(String);

impl GlobalArgs {
    pub fn validate(&self) -> Result<GlobalConfig, UsageError> {
        let dir = std::path::absolute(&self.dir).map_err(|e| {
            UsageError(format!(
                "--dir {}: cannot make it absolute ({e}): pass an absolute path",
                self.dir.display()
            ))
        })?;
        let verbosity = match (self.quiet, self.verbose) {
            (q, _) if q > 0 => Verbosity::Quiet,
            (_, v) if v > 0 => Verbosity::Verbose,
            _ => Verbosity::Normal,
        };
        Ok(GlobalConfig {
            uri: libvirt::effective_uri(self.connect.as_deref()),
            dir,
            json: self.json,
            verbosity,
        })
    }
}

/// Runs the command; the exit code is not `Ok` when `status` finds problems.
pub fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    let config = cli.global.validate()?;
    match &cli.command {
        Command::Setup(args) => {
            // Before connecting, so that a user without root hears that, not libvirt's
            // refusal; setup checks again before it changes anything.
            if !args.dry_run {
                setup::require_root("setup")?;
            }
            let hv = Hypervisor::connect(&config.uri)?;
            let _lock = (!args.dry_run)
                .then(|| lock_domain(&hv, &config.dir, &args.domain, "setup"))
                .transpose()?;
            let options = SetupOptions {
                dry_run: args.dry_run,
                live: args.live,
                group: args.group.clone(),
            };
            let report = setup::setup(&hv, &config.dir, &args.domain, &options)?;
            emit(&config, &report, print_change)?;
            Ok(ExitCode::Ok)
        }
        Command::Teardown(args) => {
            if !args.dry_run {
                setup::require_root("teardown")?;
            }
            let hv = Hypervisor::connect(&config.uri)?;
            let _lock = (!args.dry_run)
                .then(|| lock_domain(&hv, &config.dir, &args.domain, "teardown"))
                .transpose()?;
            let options = TeardownOptions {
                dry_run: args.dry_run,
            };
            let report = setup::teardown(&hv, &config.dir, &args.domain, &options)?;
            emit(&config, &report, print_change)?;
            Ok(ExitCode::Ok)
        }
        Command::Status(args) => {
            let hv = Hypervisor::connect(&config.uri)?;
            let mut report = setup::status(&hv, &config.dir, args.domain.as_deref())?;
            if let Some(serve) = crate::serve::socket::status(&config.dir) {
                for d in &mut report.domains {
                    let served = serve.domains.iter().find(|s| s.domain == d.domain);
                    d.serve = Some(match served {
                        Some(s) => setup::ServeInfo {
                            state: s.state.clone(),
                            detail: s.detail.clone(),
                        },
                        None => setup::ServeInfo {
                            state: "not-served".into(),
                            detail: format!(
                                "tvctl serve (pid {}) serves running, set-up domains only",
                                serve.pid.unwrap_or(0)
                            ),
                        },
                    });
                }
            }
            emit(&config, &report, print_status)?;
            Ok(report.exit_code())
        }
        Command::Serve(args) => {
            setup::require_root("serve")?;
            let options = crate::serve::ServeOptions {
                uri: config.uri.clone(),
                dir: config.dir.clone(),
                max_bytes: Some(args.max_bytes),
                json: config.json,
            };
            Ok(crate::serve::run(&options)?)
        }
        Command::Agent(AgentCommand::Install(args)) => {
            setup::require_root("agent install")?;
            if !(args.agent_timeout.is_finite() && args.agent_timeout > 0.0) {
                return Err(UsageError(format!(
                    "--agent-timeout {}: give a number of seconds above 0",
                    args.agent_timeout
                ))
                .into());
            }
            let source = match &args.package {
                Some(deb) => crate::guestinstall::AgentSource::Package(
                    crate::guestinstall::load_package(deb)?,
                ),
                None => crate::guestinstall::AgentSource::Binary(
                    crate::guestinstall::find_agent_binary(args.agent_binary.as_deref())?,
                ),
            };
            let hv = Hypervisor::connect(&config.uri)?;
            let dom = hv.lookup(&args.domain)?;
            let timeout = std::time::Duration::from_secs_f64(args.agent_timeout);
            let mut verify = |dom: &crate::libvirt::Dom| verify_agent(&config.dir, dom, timeout);
            let report = crate::guestinstall::install(&dom, &source, &mut verify)?;
            emit(&config, &report, |r, _| r.to_text())?;
            Ok(if report.answered == Some(false) {
                ExitCode::AgentTimeout
            } else {
                ExitCode::Ok
            })
        }
        Command::Agent(AgentCommand::Status(args)) => {
            let hv = Hypervisor::connect(&config.uri)?;
            let dom = hv.lookup(&args.domain)?;
            let status = crate::guestinstall::status(&dom)?;
            emit(&config, &status, |s, _| s.to_text())?;
            Ok(ExitCode::Ok)
        }
        Command::Completions(args) => {
            let mut script = Vec::new();
            crate::generate::completions(args.shell, &mut script);
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(&script)
                .and_then(|()| stdout.flush())
                .context("write the completion script to standard output")?;
            Ok(ExitCode::Ok)
        }
        Command::Man(args) => {
            let pages = crate::generate::man_pages(&args.out_dir).with_context(|| {
                format!(
                    "write the man pages into {}: check that the folder is writable",
                    args.out_dir.display()
                )
            })?;
            if config.verbosity != Verbosity::Quiet {
                for page in pages {
                    println!("{}", page.display());
                }
            }
            Ok(ExitCode::Ok)
        }
        Command::Trace(args) => {
            let mut options = args.validate()?;
            options.progress = !config.json && config.verbosity != Verbosity::Quiet;
            options.relay_stdout = !config.json;
            let hv = Hypervisor::connect(&config.uri)?;
            let mut doms = Vec::new();
            for spec in &args.domains {
                doms.push(hv.lookup(spec)?);
            }
            // Before anything is checked or opened: a second trace must not touch the FIFOs.
            // A domain `tvctl serve` holds is borrowed from it for the run.
            let mut locks = Vec::new();
            for dom in &doms {
                locks.push(crate::lock::DomainHold::acquire(
                    &config.dir,
                    &dom.name(),
                    "trace",
                )?);
            }
            let mut dirs = Vec::new();
            let mut setups = Vec::new();
            for dom in &doms {
                // At once, on stderr: the trace may still fail, the XML has changed anyway.
                let mut tell = |report: &ChangeReport| {
                    if config.verbosity != Verbosity::Quiet {
                        eprint!("{}", print_change(report, Verbosity::Normal));
                    }
                };
                let prepared = crate::trace::prepare(&hv, &config.dir, dom, args.setup, &mut tell)?;
                dirs.push(prepared.folder);
                setups.push(prepared.setup);
            }
            if doms.len() == 1 && !args.host {
                options.domain_dir = dirs.remove(0);
                let mut outcome = crate::trace::run(&doms[0], &options)?;
                outcome.summary.setup = setups.remove(0);
                emit(&config, &outcome.summary, |s, _| s.to_text())?;
                return Ok(outcome.exit_code());
            }
            let timeline = crate::trace::timeline::TimelineOptions {
                domains: doms.iter().zip(dirs).collect(),
                host_events: args.host.then(|| host_events(&args.host_events)),
                sync: match args.sync.as_str() {
                    "kvm" => crate::trace::timeline::SyncMethod::Kvm,
                    "probe" => crate::trace::timeline::SyncMethod::Probe,
                    "none" => crate::trace::timeline::SyncMethod::None,
                    _ => crate::trace::timeline::SyncMethod::Auto,
                },
                // Tests point the kvm method at a synthetic tree; nothing else sets this.
                debugfs: std::env::var_os("TVCTL_TEST_DEBUGFS")
                    .map_or_else(|| PathBuf::from("/sys/kernel/debug"), PathBuf::from),
                base: options,
            };
            let mut summary = crate::trace::timeline::run(&timeline)?;
            for (dom, setup) in doms.iter().zip(setups) {
                let name = dom.name();
                if let Some(part) = summary.guests.iter_mut().find(|g| g.domain == name) {
                    part.setup = setup;
                }
            }
            emit(&config, &summary, |s, _| s.to_text())?;
            Ok(summary.exit_code())
        }
    }
}

/// After `agent install`: the agent must answer `Hello` on tvctl's control channel, if the
/// domain is set up (its live XML has our control channel); None if it is not.
fn verify_agent(
    root: &std::path::Path,
    dom: &crate::libvirt::Dom,
    timeout: std::time::Duration,
) -> Option<Result<(), String>> {
    let xml = dom.live_xml().ok()?;
    let socket = crate::domxml::our_channels(&xml)
        .ok()?
        .into_iter()
        .find(|c| c.kind == crate::domxml::ChannelKind::Control)?
        .path?;
    let _hold = match crate::lock::DomainHold::acquire(root, &dom.name(), "agent install") {
        Ok(h) => h,
        Err(e) => return Some(Err(e.to_string())),
    };
    crate::sigcount::install();
    let seen = crate::sigcount::count();
    let mut interrupted = || crate::sigcount::count() > seen;
    match crate::control::ControlChannel::connect(
        std::path::Path::new(&socket),
        &crate::control::host_software("agent install"),
        timeout,
        &mut interrupted,
    ) {
        Ok(chan) => {
            chan.close();
            Some(Ok(()))
        }
        Err(e) => Some(Err(e.to_string())),
    }
}

/// `-H` as given, else the default host events the host has.
fn host_events(given: &[String]) -> Vec<String> {
    if !given.is_empty() {
        return given.to_vec();
    }
    let available = crate::agent::tracefs::Tracefs::find()
        .and_then(|t| t.available_events().ok())
        .unwrap_or_default();
    crate::trace::timeline::DEFAULT_HOST_EVENTS
        .iter()
        .filter(|e| available.iter().any(|a| a.to_string() == **e))
        .map(|e| e.to_string())
        .collect()
}

/// Holds `spec`'s domain against other tvctl runs (see [`crate::lock`]). An unknown domain
/// is left for the command itself to report.
fn lock_domain(
    hv: &Hypervisor,
    root: &std::path::Path,
    spec: &str,
    what: &str,
) -> anyhow::Result<Option<crate::lock::DomainHold>> {
    let Ok(dom) = hv.lookup(spec) else {
        return Ok(None);
    };
    Ok(Some(crate::lock::DomainHold::acquire(
        root,
        &dom.name(),
        what,
    )?))
}

/// Prints `report` as JSON or, unless quiet, for people.
fn emit<T: serde::Serialize>(
    config: &GlobalConfig,
    report: &T,
    human: fn(&T, Verbosity) -> String,
) -> anyhow::Result<()> {
    let text = if config.json {
        let mut json = serde_json::to_string_pretty(report).context("encode the JSON report")?;
        json.push('\n');
        json
    } else if config.verbosity == Verbosity::Quiet {
        return Ok(());
    } else {
        human(report, config.verbosity)
    };
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        // A closed pipe (`tvctl status | head`) is the reader's choice, not an error.
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(err).context("write to standard output")
        }
        _ => Ok(()),
    }
}

/// The exit code for an error chain: that of the first typed error in it.
pub fn exit_code_of(err: &anyhow::Error) -> ExitCode {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<SetupError>() {
            return e.exit_code();
        }
        if let Some(e) = cause.downcast_ref::<LibvirtError>() {
            return setup::libvirt_exit_code(e);
        }
        if let Some(e) = cause.downcast_ref::<FileError>() {
            return e.exit_code();
        }
        if cause.downcast_ref::<DomXmlError>().is_some() {
            return ExitCode::DomainXmlConflict;
        }
        if let Some(e) = cause.downcast_ref::<crate::trace::TraceError>() {
            return e.exit_code();
        }
        if let Some(e) = cause.downcast_ref::<crate::lock::LockError>() {
            return crate::lock::DomainLock::exit_code(e);
        }
        if let Some(e) = cause.downcast_ref::<crate::serve::ServeError>() {
            return e.exit_code();
        }
        if let Some(e) = cause.downcast_ref::<crate::guestinstall::InstallError>() {
            return e.exit_code();
        }
        if cause.downcast_ref::<UsageError>().is_some() {
            return ExitCode::Usage;
        }
    }
    ExitCode::Internal
}

/// `error: ...` and one `caused by:` line per cause, for stderr.
pub fn error_text(err: &anyhow::Error) -> String {
    let mut text = format!("error: {err}\n");
    for cause in err.chain().skip(1) {
        text.push_str(&format!("  caused by: {cause}\n"));
    }
    text
}

/// Setup's or teardown's report for people.
pub fn print_change(report: &ChangeReport, verbosity: Verbosity) -> String {
    let mut out = String::new();
    let mut line = |text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    let setup = report.command == "setup";
    let would = if report.dry_run { "would " } else { "" };
    if report.dry_run || verbosity == Verbosity::Verbose {
        if !report.xml_diff.is_empty() {
            line(report.xml_diff.trim_end().to_owned());
        }
        for path in &report.files.created {
            line(format!("{would}create {path}"));
        }
        for path in &report.files.removed {
            line(format!("{would}remove {path}"));
        }
    }
    let now = if report.live_possible {
        " (setup --live hot-plugs them now)".to_owned()
    } else {
        format!(
            ": shut it down and start it again to use them now (a reboot inside the guest is not enough; --live cannot hot-plug them here, `tvctl status {}` says why)",
            report.domain
        )
    };
    let restart = format!(
        "{} is {}: the channels {} effect at its next boot{now}",
        report.domain,
        report.state.replace('_', " "),
        if report.dry_run { "would take" } else { "take" }
    );
    if !report.changed && !setup {
        line(format!(
            "{} is not set up (no tvctl channels in its configuration, no folder {}): nothing to remove",
            report.domain, report.folder
        ));
        return out;
    }
    if !report.changed {
        let vcpus = report.vcpus.unwrap_or_default();
        line(format!(
            "{} is already set up for {vcpus} vCPUs in {}: nothing changed",
            report.domain, report.folder
        ));
        if report.restart_needed {
            line(restart);
        }
        return out;
    }
    // "would add" in a dry run, "added" otherwise.
    let did = |verb: &str, past: &str| {
        if report.dry_run {
            format!("would {verb}")
        } else {
            past.to_owned()
        }
    };
    let mut parts = Vec::new();
    let ch = &report.channels;
    if !ch.added.is_empty() {
        parts.push(format!(
            "{} channels {}",
            did("add", "added"),
            ch.added.join(", ")
        ));
    }
    if !ch.removed.is_empty() {
        parts.push(format!(
            "{} channels {}",
            did("remove", "removed"),
            ch.removed.join(", ")
        ));
    }
    if !report.controllers.is_empty() {
        let list = join_numbers(&report.controllers);
        parts.push(if setup {
            format!("libvirt added virtio-serial controller {list}")
        } else {
            format!(
                "{} virtio-serial controller {list}",
                did("remove", "removed")
            )
        });
    }
    let files = &report.files;
    if !files.created.is_empty() {
        parts.push(format!(
            "{} {} files",
            did("create", "created"),
            files.created.len()
        ));
    }
    if !files.removed.is_empty() {
        parts.push(format!(
            "{} {} files",
            did("remove", "removed"),
            files.removed.len()
        ));
    }
    if !report.live.attached.is_empty() {
        let names = report.live.attached.join(", ");
        parts.push(format!(
            "{} {names} into the running domain",
            did("hot-plug", "hot-plugged")
        ));
    }
    if !report.live.detached.is_empty() {
        let names = report.live.detached.join(", ");
        parts.push(format!(
            "{} {names} from the running domain",
            did("hot-unplug", "hot-unplugged")
        ));
    }
    let group = report
        .group
        .as_ref()
        .map_or(String::new(), |g| format!(", group {}", g.name));
    line(format!(
        "{} {} ({}{group}): {}",
        report.command,
        report.domain,
        report.folder,
        parts.join("; ")
    ));
    if report.restart_needed {
        line(restart);
    }
    if report.dry_run {
        line("dry run: nothing changed".to_owned());
    }
    out
}

/// Status's report for people.
pub fn print_status(report: &StatusReport, _verbosity: Verbosity) -> String {
    if report.domains.is_empty() {
        return "no domain is set up\n".to_owned();
    }
    report.domains.iter().map(print_domain_status).collect()
}

fn print_domain_status(d: &DomainStatus) -> String {
    let verdict = if d.ok {
        "set up"
    } else if d.set_up {
        "set up, with problems"
    } else {
        "not set up"
    };
    let vcpus = d.vcpus.map_or("?".to_owned(), |v| v.to_string());
    let control = if d.channels.control { 1 } else { 0 };
    let live = d
        .live_channels
        .map_or(String::new(), |n| format!(", {n} in the running domain"));
    let folder = match &d.files.group {
        Some(group) if d.files.folder => format!(
            "{}, group {}, FIFOs {}/{} ok",
            d.folder, group.name, d.files.fifos_ok, d.files.fifos_expected
        ),
        _ => format!("{} missing", d.folder),
    };
    let socket = if d.control_socket {
        "present"
    } else {
        "absent"
    };
    let mut out = format!(
        "{} ({}): {verdict}\n  {vcpus} vCPUs; channels: {control} control + {} vCPU{live}\n  folder {folder}; control socket {socket}\n",
        d.domain,
        d.state.replace('_', " "),
        d.channels.cpus,
    );
    match d.agent_port.as_deref() {
        Some("connected") => {
            out.push_str("  guest agent: a program in the guest has the control port open\n")
        }
        Some(_) => out.push_str(&format!(
            "  guest agent: nothing in the guest has the control port open: is tvctl-agent \
             installed and running? (`tvctl agent install {}`)\n",
            d.domain
        )),
        None => {}
    }
    match &d.serve {
        Some(s) => out.push_str(&format!("  tvctl serve: {} ({})\n", s.state, s.detail)),
        None => out.push_str("  tvctl serve: not running\n"),
    }
    for problem in &d.problems {
        out.push_str(&format!("  problem: {}\n", problem.message));
    }
    out
}

fn join_numbers(numbers: &[u32]) -> String {
    let text: Vec<String> = numbers.iter().map(u32::to_string).collect();
    text.join(", ")
}
