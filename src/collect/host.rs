//! Recording the host itself, as the agent records a guest (`tvctl trace --host`).
//!
//! `trace-cmd record` cannot run everywhere (here it fails with "Can't enable ftrace"), so the
//! host is recorded the way the agent records a guest, with the agent's own code: a tracefs
//! instance of tvctl's own (`instances/tvctl-<nonce>`), events resolved in trace-cmd's forms,
//! one pinned splice pump per CPU. The pumps write into FIFOs of a scratch folder, and the same
//! per-CPU readers that collect a guest's streams ([`CpuStream`]: marker, splice, exact byte
//! counts, `--max-size` budget) move the pages into data files. So host data takes the same
//! path and gets the same lost-event accounting as a guest's, and the host's metadata passes
//! the same checks ([`MetadataInbox`]) on its way into the file.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::agent::ports::PortMap;
use crate::agent::recording::{Recording, Refusal};
use crate::agent::tracefs::Tracefs;
use crate::control::random_u64;
use crate::proto::{RecordRequest, StopReason, SyncReply};

use super::guest_input::{GuestProblems, GuestStarted, GuestStopped, MetadataInbox};
use super::recorder::{Collected, StopEnd};
use super::stream::{ByteBudget, CpuStream};

/// Why the host could not be recorded.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot use the host's tracefs: {0}. Mount it (mount -t tracefs nodev /sys/kernel/tracing) and run as root")]
    Tracefs(String),
    #[error("the host refused the recording: {0}")]
    Refused(String),
    #[error("cannot prepare the host's data FIFOs in {path}: {source}")]
    Fifo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<Refusal> for HostError {
    fn from(r: Refusal) -> HostError {
        HostError::Refused(r.text)
    }
}

/// The host's recording in progress.
pub struct HostRecorder {
    recording: Option<Recording>,
    streams: Vec<CpuStream>,
    pub started: GuestStarted,
    inbox: MetadataInbox,
    problems: GuestProblems,
    page_size: u32,
}

impl HostRecorder {
    /// Starts recording `events` (trace-cmd's forms) on every online host CPU with `clock`;
    /// pages go to `data_dir/host-cpuN.data`, FIFOs live in `fifo_dir`.
    pub fn start(
        events: &[String],
        clock: Option<&str>,
        buffer_kb: Option<u32>,
        data_dir: &Path,
        fifo_dir: &Path,
        budget: Option<Arc<ByteBudget>>,
    ) -> Result<HostRecorder, HostError> {
        let tracefs = Tracefs::find_or_mount().map_err(|e| HostError::Tracefs(e.to_string()))?;
        let cpus = crate::agent::report::online_cpus();
        let page_size = page_size();
        let nonce = random_u64();
        let mut ports = Vec::new();
        let mut streams = Vec::new();
        for cpu in 0..cpus {
            let fifo = fifo_dir.join(format!("host-cpu{cpu}.fifo"));
            let fifo_err = |source| HostError::Fifo {
                path: fifo.clone(),
                source,
            };
            nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
                .map_err(|e| fifo_err(e.into()))?;
            let data = data_dir.join(format!("host-cpu{cpu}.data"));
            // The reader first: the pump opens the FIFO for writing, which needs a reader.
            let stream =
                CpuStream::start(cpu, &fifo, &data, nonce, budget.clone()).map_err(fifo_err)?;
            streams.push(stream);
            ports.push((cpu, fifo));
        }
        let request = RecordRequest {
            events: events.to_vec(),
            buffer_kb,
            clock: clock.map(str::to_string),
            command: Vec::new(),
            stream_nonce: nonce,
        };
        let ports = PortMap::with_cpu_ports(ports);
        let (recording, started) = match Recording::start(
            &request,
            &tracefs,
            &ports,
            cpus,
            page_size,
            crate::agent::session::DataMode::Splice,
            false,
        ) {
            Ok(r) => r,
            Err(e) => {
                for s in &streams {
                    s.shared.cancel.store(true, Ordering::SeqCst);
                }
                return Err(e.into());
            }
        };
        let mut problems = GuestProblems::default();
        let mut inbox = MetadataInbox::new();
        for (name, data) in recording.static_metadata() {
            push_file(&mut inbox, &mut problems, &name, &data);
        }
        let all: Vec<u32> = (0..cpus).collect();
        let started = GuestStarted::check(&started, &all, &mut problems);
        Ok(HostRecorder {
            recording: Some(recording),
            streams,
            started,
            inbox,
            problems,
            page_size,
        })
    }

    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// Per-CPU readers (for progress).
    pub fn streams(&self) -> &[CpuStream] {
        &self.streams
    }

    /// Writes `tvctl-sync <nonce>` into the host's trace between two readings of its clock
    /// (one end of a causal chain with a guest's `SyncProbe`).
    pub fn mark(&self, nonce: u64) -> SyncReply {
        match &self.recording {
            Some(r) => r.sync_probe(nonce),
            None => {
                let (clock, ts) = crate::agent::session::read_clock("");
                SyncReply {
                    nonce,
                    clock,
                    before: ts,
                    after: ts,
                    marked: false,
                }
            }
        }
    }

    /// Stops tracing, drains every CPU to its count (at most `drain` in all), and hands back
    /// what was recorded, shaped like a guest's recording.
    pub fn stop(mut self, drain: Duration) -> Collected {
        let finished = self
            .recording
            .take()
            .map(|r| r.finish(StopReason::HostRequest));
        let mut stopped = None;
        if let Some(f) = finished {
            for (name, data) in &f.metadata {
                push_file(&mut self.inbox, &mut self.problems, name, data);
            }
            let counts = GuestStopped::check(&f.stopped, &self.started.cpus, &mut self.problems);
            for s in &self.streams {
                match counts.cpus.get(&s.cpu) {
                    Some(c) => s.shared.set_target(c.bytes),
                    None => s.shared.cancel.store(true, Ordering::SeqCst),
                }
            }
            stopped = Some(counts);
        }
        let deadline = Instant::now() + drain;
        while Instant::now() < deadline && self.streams.iter().any(|s| !s.is_finished()) {
            std::thread::sleep(Duration::from_millis(10));
        }
        let end = if self.streams.iter().all(CpuStream::is_finished) {
            StopEnd::Finished
        } else {
            StopEnd::AgentLost(format!(
                "the host's own streams did not drain within {} s",
                drain.as_secs()
            ))
        };
        for s in &self.streams {
            s.shared.cancel.store(true, Ordering::SeqCst);
        }
        let streams = std::mem::take(&mut self.streams)
            .into_iter()
            .map(|s| {
                let path = s.data_path.clone();
                (s.join(), path)
            })
            .collect();
        let mut problems = std::mem::take(&mut self.problems);
        let (metadata, formats) = std::mem::take(&mut self.inbox).finish(&mut problems);
        Collected {
            metadata,
            formats,
            stopped,
            streams,
            end,
            problems,
            agent_errors: Vec::new(),
            channel: None,
            output: super::output::CommandOutputLog::default(),
            protocol: crate::proto::PROTOCOL_VERSION,
        }
    }
}

impl Drop for HostRecorder {
    fn drop(&mut self) {
        // Stopped without `stop` (an error elsewhere): still remove the instance.
        if let Some(r) = self.recording.take() {
            let _ = r.finish(StopReason::HostGone);
        }
        for s in &self.streams {
            s.shared.cancel.store(true, Ordering::SeqCst);
        }
    }
}

fn push_file(inbox: &mut MetadataInbox, problems: &mut GuestProblems, name: &str, data: &[u8]) {
    if let Ok(chunks) = crate::proto::split_metadata(name, data) {
        for chunk in chunks {
            inbox.push(chunk, problems);
        }
    }
}

/// The host's page size.
fn page_size() -> u32 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(4096)
}
