//! The fake guest agent: the real wire protocol through `tvctl::proto`, scripted to behave
//! or to misbehave (floods, bad values, silence, writing past its count), plus the data FIFOs.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use tvctl::proto::{
    split_metadata, CpuStopped, ErrorCode, ErrorMessage, FrameDecoder, Hello, HelloReply, Message,
    Metadata, Pong, RecordRequest, Started, StopReason, Stopped, StreamMarker,
};

use super::*;

// ---------------------------------------------------------------------------------------------
// The agent's side of one connection.

/// One connection from tvctl, played by the test. Pings are answered while `answer_pings` is
/// set; every other message is returned to the script.
pub struct FakeAgent {
    sock: UnixStream,
    decoder: FrameDecoder,
    /// Messages read while only Pings were wanted, returned by the next `recv`.
    backlog: std::collections::VecDeque<Message>,
    version: u16,
    vcpus: u32,
    fifos: BTreeMap<u32, File>,
    /// The reply sent to the first Hello, sent again to a repeated Hello (as the agent does).
    reply: Option<HelloReply>,
    pub hello: Option<Hello>,
    pub request: Option<RecordRequest>,
    /// The page size the fake announced (HelloReply) and writes in its markers.
    pub page_size: u32,
    pub answer_pings: bool,
    pub pings_answered: u32,
    pub pings_ignored: u32,
    /// CPUs whose stream was started (marker written), in order.
    pub streamed: Vec<u32>,
    /// Bytes written after the marker, per CPU.
    pub written: BTreeMap<u32, u64>,
    /// Metadata sent right after Started, and before Stopped; scripts may edit them first.
    pub static_files: Vec<(String, Vec<u8>)>,
    pub final_files: Vec<(String, Vec<u8>)>,
    /// When Stop arrived.
    pub stop_at: Option<Instant>,
    pub log: Vec<String>,
}

impl FakeAgent {
    pub(super) fn new(sock: UnixStream, vcpus: u32, fifos: BTreeMap<u32, File>) -> FakeAgent {
        let files = guest_files();
        FakeAgent {
            sock,
            decoder: FrameDecoder::new(),
            backlog: std::collections::VecDeque::new(),
            version: tvctl::proto::PROTOCOL_VERSION,
            vcpus,
            fifos,
            reply: None,
            hello: None,
            request: None,
            page_size: files.page_size,
            answer_pings: true,
            pings_answered: 0,
            pings_ignored: 0,
            streamed: Vec::new(),
            written: BTreeMap::new(),
            static_files: files.static_metadata(),
            final_files: files.final_metadata(),
            stop_at: None,
            log: vec!["accepted tvctl's connection".into()],
        }
    }

    pub fn note(&mut self, line: impl Into<String>) {
        if self.log.len() < 200 {
            self.log.push(line.into());
        }
    }

    // --- receiving ---

    /// The next message from tvctl other than a Ping (Pings are answered or ignored here).
    pub fn recv(&mut self, timeout: Duration) -> Result<Message, FakeError> {
        match self.backlog.pop_front() {
            Some(msg) => Ok(msg),
            None => self.recv_from_socket(timeout),
        }
    }

    /// [`recv`](Self::recv) from the socket only, not the backlog.
    fn recv_from_socket(&mut self, timeout: Duration) -> Result<Message, FakeError> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match self.decoder.next_message() {
                Ok(Some((_, Message::Ping(p)))) => {
                    if self.answer_pings {
                        self.pings_answered += 1;
                        let pong = Pong {
                            nonce: p.nonce,
                            clock: "local".into(),
                            ts: monotonic_ns(),
                        };
                        self.send(pong)?;
                    } else {
                        self.pings_ignored += 1;
                    }
                    continue;
                }
                Ok(Some((_, msg))) => {
                    self.note(format!("tvctl sent {:?}", msg.kind()));
                    if matches!(msg, Message::Stop) && self.stop_at.is_none() {
                        self.stop_at = Some(Instant::now());
                    }
                    return Ok(msg);
                }
                Ok(None) => {}
                Err(e) if e.is_fatal() => {
                    return Err(FakeError::Unexpected(format!(
                        "tvctl sent a broken frame: {e}"
                    )))
                }
                Err(e) => {
                    self.note(format!("tvctl sent a frame the fake cannot use: {e}"));
                    continue;
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(FakeError::Timeout("a message from tvctl".into()));
            }
            self.sock.set_read_timeout(Some(left))?;
            let want = buf.len().min(self.decoder.space().max(1));
            match self.sock.read(&mut buf[..want]) {
                Ok(0) => return Err(FakeError::HostClosed),
                Ok(n) => {
                    self.decoder.push(&buf[..n]);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(FakeError::Timeout("a message from tvctl".into()))
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Answers the Pings that have arrived, without waiting; keeps other messages for `recv`.
    pub fn answer_pending_pings(&mut self) -> Result<(), FakeError> {
        loop {
            match self.recv_from_socket(Duration::from_millis(1)) {
                Ok(msg) => self.backlog.push_back(msg),
                Err(FakeError::Timeout(_)) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits for tvctl's Hello.
    pub fn expect_hello(&mut self, timeout: Duration) -> Result<Hello, FakeError> {
        match self.recv(timeout)? {
            Message::Hello(h) => {
                self.hello = Some(h.clone());
                Ok(h)
            }
            other => Err(FakeError::Unexpected(format!(
                "{:?} where Hello was expected",
                other.kind()
            ))),
        }
    }

    /// The reply a real agent would give to the Hello received.
    pub fn hello_reply(&self) -> HelloReply {
        let hello = self.hello.as_ref().expect("expect_hello first");
        HelloReply {
            version: hello.max_version.min(tvctl::proto::PROTOCOL_VERSION),
            nonce: hello.nonce,
            agent_version: "fake-agent (tests/common/fake_guest.rs)".into(),
            kernel_release: guest_files().kernel_release.clone(),
            cpus: self.vcpus,
            page_size: guest_files().page_size,
            trace_clocks: ["local", "global", "mono", "x86-tsc"]
                .map(String::from)
                .to_vec(),
            data_ports: (0..self.vcpus).collect(),
        }
    }

    pub fn reply_hello(&mut self, reply: HelloReply) -> Result<(), FakeError> {
        self.version = reply.version;
        self.page_size = reply.page_size;
        self.reply = Some(reply.clone());
        self.send(reply)
    }

    /// Hello, and the reply a real agent would give.
    pub fn handshake(&mut self) -> Result<(), FakeError> {
        self.expect_hello(REPLY_TIMEOUT)?;
        let reply = self.hello_reply();
        self.reply_hello(reply)
    }

    /// Waits for the RecordRequest (answering repeated Hellos meanwhile, as the agent does).
    pub fn expect_record_request(&mut self, timeout: Duration) -> Result<RecordRequest, FakeError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left)? {
                Message::RecordRequest(r) => {
                    self.request = Some(r.clone());
                    return Ok(r);
                }
                Message::Hello(h) => {
                    if let Some(mut reply) = self.reply.clone() {
                        reply.nonce = h.nonce;
                        self.send(reply)?;
                    }
                }
                other => {
                    return Err(FakeError::Unexpected(format!(
                        "{:?} where RecordRequest was expected",
                        other.kind()
                    )))
                }
            }
        }
    }

    /// Answers Pings until Stop arrives (other messages are noted and ignored).
    pub fn serve_until_stop(&mut self, timeout: Duration) -> Result<(), FakeError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Message::Stop = self.recv(left)? {
                return Ok(());
            }
        }
    }

    /// Answers Pings for `how_long` (Stop or Close end it early: Err(Unexpected)).
    pub fn serve_pings_for(&mut self, how_long: Duration) -> Result<(), FakeError> {
        let deadline = Instant::now() + how_long;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            match self.recv(left) {
                Ok(Message::Stop) | Ok(Message::Close) => {
                    return Err(FakeError::Unexpected(
                        "tvctl stopped while the fake was answering pings".into(),
                    ))
                }
                Ok(_) => {}
                Err(FakeError::Timeout(_)) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Answers Pings while `go_on()` says so, at most `max` (Stop or Close: Err(Unexpected)).
    pub fn serve_pings_while(
        &mut self,
        mut go_on: impl FnMut() -> bool,
        max: Duration,
    ) -> Result<(), FakeError> {
        let deadline = Instant::now() + max;
        while go_on() && Instant::now() < deadline {
            self.serve_pings_for(Duration::from_millis(100))?;
        }
        Ok(())
    }

    /// Answers nothing more (keeps reading, so tvctl's writes never block) until tvctl closes
    /// the connection, at most `max`.
    pub fn go_silent_until_closed(&mut self, max: Duration) -> Result<(), FakeError> {
        self.answer_pings = false;
        self.note("going silent");
        let deadline = Instant::now() + max;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Ok(_) => {}
                Err(FakeError::HostClosed) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits for Close (or the end of the connection).
    pub fn expect_close(&mut self, timeout: Duration) -> Result<(), FakeError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Ok(Message::Close) | Err(FakeError::HostClosed) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    }

    // --- sending ---

    pub fn send(&mut self, msg: impl Into<Message>) -> Result<(), FakeError> {
        let msg = msg.into();
        let frame = msg
            .encode_frame(self.version)
            .map_err(|e| FakeError::Unexpected(format!("encode {:?}: {e}", msg.kind())))?;
        self.send_raw(&frame)
    }

    /// Bytes as they are, on the control socket.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), FakeError> {
        self.sock.set_write_timeout(Some(REPLY_TIMEOUT))?;
        self.sock.write_all(bytes).map_err(FakeError::from)
    }

    /// One file as Metadata chunks.
    pub fn send_metadata(&mut self, name: &str, data: &[u8]) -> Result<(), FakeError> {
        let chunks = split_metadata(name, data)
            .map_err(|e| FakeError::Unexpected(format!("split {name}: {e}")))?;
        for chunk in chunks {
            self.send(chunk)?;
        }
        Ok(())
    }

    pub fn send_error(&mut self, code: ErrorCode, text: &str) -> Result<(), FakeError> {
        self.send(ErrorMessage {
            code,
            text: text.into(),
        })
    }

    /// `Started` as a real agent sends it for the streamed CPUs.
    pub fn started(&self) -> Started {
        let request = self.request.as_ref();
        Started {
            instance: "tvctl-fake".into(),
            events: vec!["sched:sched_switch".into()],
            cpus: self.streamed.clone(),
            buffer_kb: request.and_then(|r| r.buffer_kb).unwrap_or(1408),
            clock: request
                .and_then(|r| r.clock.clone())
                .unwrap_or_else(|| "local".into()),
            splice: true,
            note: String::new(),
        }
    }

    /// `Stopped` with the byte counts written and a plausible stats text per streamed CPU.
    pub fn stopped(&self) -> Stopped {
        Stopped {
            reason: StopReason::HostRequest,
            command_status: None,
            cpus: self
                .streamed
                .iter()
                .map(|&cpu| cpu_stopped(cpu, self.written.get(&cpu).copied().unwrap_or(0)))
                .collect(),
        }
    }

    /// Floods Metadata with empty files named by `name(i)`, as fast as tvctl takes them, until
    /// `count` were sent, `max` passed, or tvctl hung up. Returns how many were sent.
    pub fn flood_empty_metadata(
        &mut self,
        count: usize,
        name: impl Fn(usize) -> String,
        max: Duration,
    ) -> Result<usize, FakeError> {
        const BATCH: usize = 4096;
        let deadline = Instant::now() + max;
        let mut sent = 0;
        let mut batch = Vec::with_capacity(BATCH * 64);
        // A batch is always written whole: a frame cut in two would desynchronise the stream.
        self.sock.set_write_timeout(Some(Duration::from_secs(30)))?;
        while sent < count && Instant::now() < deadline {
            batch.clear();
            let end = (sent + BATCH).min(count);
            for i in sent..end {
                let frame = Message::Metadata(Metadata {
                    name: name(i),
                    total_len: 0,
                    offset: 0,
                    data: Vec::new(),
                })
                .encode_frame(self.version)
                .map_err(|e| FakeError::Unexpected(format!("encode: {e}")))?;
                batch.extend_from_slice(&frame);
            }
            match self.sock.write_all(&batch) {
                // Between batches the agent still answers Pings: only the flood is wrong.
                Ok(()) => {
                    sent = end;
                    match self.answer_pending_pings() {
                        Ok(()) => {}
                        Err(FakeError::HostClosed) => return Ok(sent),
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => {
                    self.note(format!("flood ended after {sent} files: {e}"));
                    return match FakeError::from(e) {
                        FakeError::HostClosed => Ok(sent),
                        other => Err(other),
                    };
                }
            }
        }
        self.note(format!("flooded {sent} empty metadata files"));
        Ok(sent)
    }

    // --- data streams ---

    /// The nonce of the RecordRequest received.
    fn stream_nonce(&self) -> u64 {
        self.request
            .as_ref()
            .expect("expect_record_request first")
            .stream_nonce
    }

    /// Writes the start marker of this recording to CPU `cpu`'s FIFO.
    pub fn write_marker(&mut self, cpu: u32) -> Result<(), FakeError> {
        let marker = StreamMarker {
            stream_nonce: self.stream_nonce(),
            cpu,
            page_size: self.page_size,
        };
        let fifo = self.fifo(cpu)?;
        let n = write_fifo(&fifo, &marker.to_bytes(), Instant::now() + REPLY_TIMEOUT)?;
        if n != StreamMarker::LEN {
            return Err(FakeError::Timeout(format!("tvctl to read cpu{cpu}'s FIFO")));
        }
        if !self.streamed.contains(&cpu) {
            self.streamed.push(cpu);
        }
        self.written.entry(cpu).or_insert(0);
        Ok(())
    }

    /// Writes `data` after the marker (counted in `written`).
    pub fn write_data(&mut self, cpu: u32, data: &[u8]) -> Result<(), FakeError> {
        let fifo = self.fifo(cpu)?;
        let n = write_fifo(&fifo, data, Instant::now() + REPLY_TIMEOUT)?;
        *self.written.entry(cpu).or_insert(0) += u64::try_from(n).expect("usize fits in u64");
        if n != data.len() {
            return Err(FakeError::Timeout(format!(
                "tvctl to read cpu{cpu}'s FIFO ({n} of {} bytes written)",
                data.len()
            )));
        }
        Ok(())
    }

    /// Marker, then `data`.
    pub fn write_stream(&mut self, cpu: u32, data: &[u8]) -> Result<(), FakeError> {
        self.write_marker(cpu)?;
        self.write_data(cpu, data)
    }

    /// A writer of this CPU's FIFO (a new descriptor of the one the fixture holds).
    pub fn fifo(&self, cpu: u32) -> Result<File, FakeError> {
        let fifo = self
            .fifos
            .get(&cpu)
            .ok_or_else(|| FakeError::Unexpected(format!("no FIFO for cpu{cpu}")))?;
        Ok(fifo.try_clone()?)
    }

    /// Streams real pages to CPU `cpu` in the background (after its marker), from page index
    /// `first` on, until stopped, `max_bytes` written, or `max_time` passed.
    pub fn stream_pages(
        &self,
        cpu: u32,
        first: usize,
        max_bytes: u64,
        max_time: Duration,
    ) -> Result<Streamer, FakeError> {
        self.stream_pages_paced(cpu, first, max_bytes, max_time, None)
    }

    /// [`stream_pages`](Self::stream_pages) at most 16 pages per `pause`, like a guest whose
    /// pages come at a finite rate: after the host's `Stop` a real agent sends at most its ring
    /// buffer more, while an unpaced writer at memory speed (~600 MB/s) overruns the host's
    /// drain allowance whenever the fake sees `Stop` a few ms late.
    pub fn stream_pages_paced(
        &self,
        cpu: u32,
        first: usize,
        max_bytes: u64,
        max_time: Duration,
        pause: Option<Duration>,
    ) -> Result<Streamer, FakeError> {
        let fifo = self.fifo(cpu)?;
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let (t_stop, t_written) = (Arc::clone(&stop), Arc::clone(&written));
        let handle = std::thread::spawn(move || {
            let files = guest_files();
            let deadline = Instant::now() + max_time;
            let mut index = first;
            while !t_stop.load(Ordering::SeqCst)
                && t_written.load(Ordering::SeqCst) < max_bytes
                && Instant::now() < deadline
            {
                let page = files.page(cpu, index);
                // One page is PIPE_BUF: a non-blocking write takes all of it or nothing.
                match nix::unistd::write(fifo.as_fd(), &page) {
                    Ok(n) => {
                        t_written.fetch_add(u64::try_from(n).unwrap_or(0), Ordering::SeqCst);
                        if n == page.len() {
                            index += 1;
                            if let Some(p) = pause.filter(|_| index % 16 == 0) {
                                std::thread::sleep(p);
                            }
                        } else {
                            return; // a partial page would make the count meaningless
                        }
                    }
                    Err(Errno::EAGAIN) | Err(Errno::EINTR) => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(_) => return,
                }
            }
        });
        Ok(Streamer {
            cpu,
            stop,
            written,
            handle: Some(handle),
        })
    }

    /// Stops a background streamer and counts what it wrote.
    pub fn stop_streamer(&mut self, streamer: Streamer) -> u64 {
        let cpu = streamer.cpu;
        let n = streamer.stop();
        *self.written.entry(cpu).or_insert(0) += n;
        n
    }

    // --- whole phases ---

    /// The start of every recording: handshake, then [`record`](Self::record).
    pub fn start_recording_with(
        &mut self,
        data: &[(u32, Vec<u8>)],
        edit: impl FnOnce(&mut Started),
    ) -> Result<(), FakeError> {
        self.handshake()?;
        self.record(data, edit)
    }

    /// After the handshake: RecordRequest, marker and `data` on each CPU listed, Started (as
    /// `edit` leaves it), and the static metadata.
    pub fn record(
        &mut self,
        data: &[(u32, Vec<u8>)],
        edit: impl FnOnce(&mut Started),
    ) -> Result<(), FakeError> {
        self.expect_record_request(REPLY_TIMEOUT)?;
        for (cpu, bytes) in data {
            self.write_stream(*cpu, bytes)?;
        }
        let mut started = self.started();
        edit(&mut started);
        self.send(started)?;
        for (name, file) in std::mem::take(&mut self.static_files) {
            self.send_metadata(&name, &file)?;
        }
        Ok(())
    }

    pub fn start_recording(&mut self, data: &[(u32, Vec<u8>)]) -> Result<(), FakeError> {
        self.start_recording_with(data, |_| {})
    }

    /// The metadata sent after tracing stopped (saved_cmdlines, saved_tgids).
    pub fn send_final_metadata(&mut self) -> Result<(), FakeError> {
        for (name, file) in std::mem::take(&mut self.final_files) {
            self.send_metadata(&name, &file)?;
        }
        Ok(())
    }

    /// The end of a recording: the final metadata, `stopped`, then tvctl's Close.
    pub fn finish_with(&mut self, stopped: Stopped) -> Result<(), FakeError> {
        self.send_final_metadata()?;
        self.send(stopped)?;
        self.expect_close(Duration::from_secs(60))
    }

    /// [`finish_with`](Self::finish_with) the byte counts written.
    pub fn finish(&mut self) -> Result<(), FakeError> {
        let stopped = self.stopped();
        self.finish_with(stopped)
    }

    /// A well-behaved recording of `data`: start, answer Pings until Stop, finish.
    pub fn well_behaved(&mut self, data: &[(u32, Vec<u8>)]) -> Result<(), FakeError> {
        self.start_recording(data)?;
        self.serve_until_stop(Duration::from_secs(60))?;
        self.finish()
    }
}

/// Writes as much of `data` as tvctl reads before `deadline`; returns how much that was.
fn write_fifo(fifo: &File, data: &[u8], deadline: Instant) -> Result<usize, FakeError> {
    let mut done = 0;
    while done < data.len() {
        match nix::unistd::write(fifo.as_fd(), &data[done..]) {
            Ok(n) => done += n,
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => {
                if Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(io::Error::from(e).into()),
        }
    }
    Ok(done)
}

/// Pages written by a background thread; see [`FakeAgent::stream_pages`].
pub struct Streamer {
    cpu: u32,
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl Streamer {
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::SeqCst)
    }

    /// The thread ended by itself (limit reached, or its FIFO failed).
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_finished())
    }

    /// Stops the thread; returns the bytes it wrote.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.written()
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| {
            u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
                + u64::try_from(t.tv_nsec()).unwrap_or(0)
        })
        .unwrap_or(0)
}

/// One CPU's entry of `Stopped`: `bytes` sent, nothing lost.
pub fn cpu_stopped(cpu: u32, bytes: u64) -> CpuStopped {
    CpuStopped {
        cpu,
        bytes,
        entries: 0,
        overrun: 0,
        commit_overrun: 0,
        dropped_events: 0,
        read_events: 0,
        stats_text: stats_text(bytes),
    }
}

/// A `per_cpu/cpuN/stats` text as the kernel writes it.
pub fn stats_text(bytes: u64) -> String {
    format!(
        "entries: 0\noverrun: 0\ncommit overrun: 0\nbytes: {bytes}\noldest event ts:     0.000000\n\
         now ts:     1.000000\ndropped events: 0\nread events: 0\n"
    )
}
