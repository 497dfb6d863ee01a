//! One recording driven from the host: FIFO readers first, then the control session.
//!
//! Order matters. The per-CPU readers open their FIFOs before the agent is asked to record,
//! so the guest never writes into a FIFO nobody reads (it would stall). The control session
//! then handshakes, sends the request, and waits for `Started`. Stopping sends `Stop`,
//! collects the metadata, and gives each reader the byte count from `Stopped`; the data is
//! complete when every reader has reached its count.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::control::{random_u64, ControlChannel, ControlError};
use crate::proto::{Message, MetadataAssembler, MetadataError, RecordRequest, Started, Stopped};

use super::stream::{CpuStream, StreamOutcome};

/// What a recording needs.
#[derive(Debug, Clone)]
pub struct RecorderConfig {
    /// The agent's control socket (`<dir>/<domain>/agent-ctl-path.sock`).
    pub socket: PathBuf,
    /// The per-domain folder holding `trace-path-cpuN.out`.
    pub fifo_dir: PathBuf,
    /// Where per-CPU data files are written (`cpuN.data`).
    pub data_dir: PathBuf,
    pub events: Vec<String>,
    pub buffer_kb: Option<u32>,
    pub clock: Option<String>,
    pub command: Vec<String>,
    /// How long to wait for the agent to answer the handshake.
    pub connect_timeout: Duration,
    /// How long to wait for any other reply.
    pub reply_timeout: Duration,
}

/// Errors of a recording.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("cannot open the data FIFO {path}: {source}")]
    Fifo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no trace-path-cpuN.out FIFOs in {0}: run `tvctl setup` for this domain")]
    NoFifos(PathBuf),
    #[error("the guest sent bad metadata: {0}")]
    Metadata(#[from] MetadataError),
}

/// A recording in progress.
pub struct Recorder {
    chan: ControlChannel,
    streams: Vec<CpuStream>,
    pub started: Started,
    pub stream_nonce: u64,
    cfg: RecorderConfig,
    /// A `Stopped` that arrived on its own (the guest command ended), with its metadata.
    early_stop: Option<(BTreeMap<String, Vec<u8>>, Stopped)>,
    assembler: MetadataAssembler,
    page_size: u32,
}

/// Guest metadata files by name (docs/protocol.md lists the names).
pub type MetadataFiles = BTreeMap<String, Vec<u8>>;
/// Each CPU's stream outcome with the path of its data file.
pub type StreamResults = Vec<(StreamOutcome, PathBuf)>;

/// A finished recording.
#[derive(Debug)]
pub struct Finished {
    pub metadata: BTreeMap<String, Vec<u8>>,
    pub stopped: Stopped,
    pub streams: Vec<(StreamOutcome, PathBuf)>,
}

/// CPU numbers N with a `trace-path-cpuN.out` FIFO in `dir`.
pub fn fifo_cpus(dir: &Path) -> Vec<u32> {
    let mut cpus: Vec<u32> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_prefix("trace-path-cpu")?
                .strip_suffix(".out")?
                .parse()
                .ok()
        })
        .collect();
    cpus.sort_unstable();
    cpus
}

impl Recorder {
    /// Opens the FIFOs, handshakes, asks the agent to record, waits for `Started`.
    pub fn start(cfg: RecorderConfig) -> Result<Recorder, RecordError> {
        let cpus = fifo_cpus(&cfg.fifo_dir);
        if cpus.is_empty() {
            return Err(RecordError::NoFifos(cfg.fifo_dir.clone()));
        }
        let stream_nonce = random_u64();
        let mut streams = Vec::new();
        for cpu in cpus {
            let fifo = cfg.fifo_dir.join(format!("trace-path-cpu{cpu}.out"));
            let data = cfg.data_dir.join(format!("cpu{cpu}.data"));
            let s = CpuStream::start(cpu, &fifo, &data, stream_nonce)
                .map_err(|source| RecordError::Fifo { path: fifo, source })?;
            streams.push(s);
        }
        let cancel_all = |streams: &[CpuStream]| {
            for s in streams {
                s.shared.cancel.store(true, Ordering::SeqCst);
            }
        };
        let mut chan = match ControlChannel::connect(
            &cfg.socket,
            concat!("tvctl ", env!("CARGO_PKG_VERSION")),
            cfg.connect_timeout,
        ) {
            Ok(c) => c,
            Err(e) => {
                cancel_all(&streams);
                return Err(e.into());
            }
        };
        let request = Message::RecordRequest(RecordRequest {
            events: cfg.events.clone(),
            buffer_kb: cfg.buffer_kb,
            clock: cfg.clock.clone(),
            command: cfg.command.clone(),
            stream_nonce,
        });
        let started = match chan.request(&request, cfg.reply_timeout) {
            Ok(Message::Started(s)) => s,
            Ok(other) => {
                cancel_all(&streams);
                return Err(
                    ControlError::Unexpected(format!("{:?}", other.kind()), "Started").into(),
                );
            }
            Err(e) => {
                cancel_all(&streams);
                return Err(e.into());
            }
        };
        // Streams of CPUs the agent does not record will never see a marker.
        for s in &streams {
            if !started.cpus.contains(&s.cpu) {
                s.shared.cancel.store(true, Ordering::SeqCst);
            }
        }
        let page_size = chan.hello.page_size;
        Ok(Recorder {
            chan,
            streams,
            started,
            stream_nonce,
            cfg,
            early_stop: None,
            assembler: MetadataAssembler::new(),
            page_size,
        })
    }

    /// The guest's page size, from its HelloReply.
    pub fn started_page_size(&self) -> u32 {
        self.page_size
    }

    /// Per-CPU readers (for progress).
    pub fn streams(&self) -> &[CpuStream] {
        &self.streams
    }

    /// Metadata files complete so far (the static batch arrives right after `Started`).
    pub fn metadata_so_far(&self) -> &BTreeMap<String, Vec<u8>> {
        match &self.early_stop {
            Some((files, _)) => files,
            None => self.assembler.files(),
        }
    }

    /// Waits up to `timeout` for the agent to stop on its own (its command ended). True once
    /// it has; then [`Recorder::stop`] only collects.
    pub fn poll_stopped(&mut self, timeout: Duration) -> Result<bool, RecordError> {
        if self.early_stop.is_some() {
            return Ok(true);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.chan.recv(left) {
                Ok(Message::Metadata(m)) => {
                    self.assembler.push(m)?;
                }
                Ok(Message::Stopped(s)) => {
                    let files = std::mem::take(&mut self.assembler).finish()?;
                    self.early_stop = Some((files, s));
                    return Ok(true);
                }
                Ok(_) => {}
                Err(ControlError::Timeout(_)) => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Stops (unless the agent already did), collects metadata and waits for every stream to
    /// reach the agent's byte count, at most `drain_timeout` (then keeps what arrived).
    pub fn stop(self, drain_timeout: Duration) -> Result<Finished, RecordError> {
        match self.stop_or_abandon(drain_timeout, &mut || false) {
            StopOutcome::Finished(f) => Ok(f),
            StopOutcome::Abandoned { error, .. } => {
                Err(error.unwrap_or(RecordError::Control(ControlError::Closed)))
            }
        }
    }

    /// Like [`Recorder::stop`], but gives up as soon as `abort()` says so (checked every
    /// 100 ms: a second Ctrl-C, a dead domain) or the agent goes away: then every stream is
    /// cancelled and what arrived is kept.
    pub fn stop_or_abandon(
        mut self,
        drain_timeout: Duration,
        abort: &mut dyn FnMut() -> bool,
    ) -> StopOutcome {
        let slice = Duration::from_millis(100);
        let (metadata, stopped) = match self.early_stop.take() {
            Some(done) => done,
            None => {
                if let Err(e) = self.chan.send(&Message::Stop) {
                    return self.abandon_outcome(Some(e.into()));
                }
                let deadline = Instant::now() + self.cfg.reply_timeout;
                loop {
                    if abort() {
                        return self.abandon_outcome(None);
                    }
                    if Instant::now() >= deadline {
                        let e = ControlError::Timeout(self.cfg.reply_timeout);
                        return self.abandon_outcome(Some(e.into()));
                    }
                    match self.chan.recv(slice) {
                        Ok(Message::Metadata(m)) => {
                            if let Err(e) = self.assembler.push(m) {
                                return self.abandon_outcome(Some(e.into()));
                            }
                        }
                        Ok(Message::Stopped(s)) => {
                            match std::mem::take(&mut self.assembler).finish() {
                                Ok(files) => break (files, s),
                                Err(e) => return self.abandon_outcome(Some(e.into())),
                            }
                        }
                        Ok(_) | Err(ControlError::Timeout(_)) => {}
                        Err(ControlError::Closed) => return self.abandon_outcome(None),
                        Err(e) => return self.abandon_outcome(Some(e.into())),
                    }
                }
            }
        };
        for s in &self.streams {
            match stopped.cpus.iter().find(|c| c.cpu == s.cpu) {
                Some(c) => s.shared.set_target(c.bytes),
                None => s.shared.cancel.store(true, Ordering::SeqCst),
            }
        }
        let deadline = Instant::now() + drain_timeout;
        let mut aborted = false;
        while Instant::now() < deadline && self.streams.iter().any(|s| !s.is_finished()) {
            if abort() {
                aborted = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let streams = self.join_streams();
        self.chan.close();
        if aborted {
            StopOutcome::Abandoned {
                metadata,
                streams,
                error: None,
            }
        } else {
            StopOutcome::Finished(Finished {
                metadata,
                stopped,
                streams,
            })
        }
    }

    /// Gives up on the agent (the domain died, or the user insisted): cancels every stream,
    /// keeps what arrived, and returns the metadata received so far.
    pub fn abandon_with_metadata(mut self) -> (MetadataFiles, StreamResults) {
        let files = self.metadata_so_far().clone();
        (files, self.join_streams())
    }

    fn abandon_outcome(mut self, error: Option<RecordError>) -> StopOutcome {
        let metadata = self.metadata_so_far().clone();
        let streams = self.join_streams();
        StopOutcome::Abandoned {
            metadata,
            streams,
            error,
        }
    }

    /// Cancels streams that are still running, and joins them all.
    fn join_streams(&mut self) -> StreamResults {
        for s in &self.streams {
            s.shared.cancel.store(true, Ordering::SeqCst);
        }
        std::mem::take(&mut self.streams)
            .into_iter()
            .map(|s| {
                let path = s.data_path.clone();
                (s.join(), path)
            })
            .collect()
    }
}

/// How [`Recorder::stop_or_abandon`] ended.
#[derive(Debug)]
pub enum StopOutcome {
    /// The agent stopped and every stream was read to its count (or to the drain timeout).
    Finished(Finished),
    /// Given up: what had arrived, without the agent's final counts. `error` says why when it
    /// was not the caller's `abort()` or the agent going away.
    Abandoned {
        metadata: MetadataFiles,
        streams: StreamResults,
        error: Option<RecordError>,
    },
}
