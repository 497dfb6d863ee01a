//! Domain events from libvirt, delivered as plain values over an `std::sync::mpsc` channel: the
//! safe wrapper around libvirt's event API that the `virt` crate 0.5 lacks.
//!
//! libvirt dispatches events only through an event loop the client registers and runs. The
//! first [`DomainEvents::open`] in a process registers libvirt's default implementation
//! (`virEventRegisterDefaultImpl`, once per process, as libvirt requires) and starts one
//! detached thread, `libvirt-events`, that runs `virEventRunDefaultImpl` for the rest of the
//! process. Each [`DomainEvents`] then opens its own connection (after the loop exists, so its
//! socket is watched by it), turns keepalive on, and registers:
//!
//! - `VIR_DOMAIN_EVENT_ID_LIFECYCLE` → [`Event::Lifecycle`] (started, stopped, suspended, …);
//! - `VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE` → [`Event::Agent`]; libvirt raises it only for the
//!   qemu-ga channel `org.qemu.guest_agent.0`, never for tvctl's own channels;
//! - `VIR_DOMAIN_EVENT_ID_CHANNEL_LIFECYCLE` → [`Event::Channel`], when the daemon knows it
//!   (libvirt ≥ 12.4; libvirt 9.0 refuses it, see [`DomainEvents::channel_events`]);
//! - a close callback → [`Event::ConnectionLost`]: libvirtd exited or stopped answering
//!   keepalives. The connection is dead after that; open a new `DomainEvents`.
//!
//! Ownership across the FFI boundary: every registration gets its own strong reference to the
//! shared sender (`Arc::into_raw`), which libvirt hands back to the free callback it calls when
//! the registration ends; so libvirt never sees a freed pointer, whatever the order in which
//! deregistration, connection close and the event thread run. Callbacks never unwind into C.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use virt::sys;

use super::{Hypervisor, LibvirtError};

/// What happened to a domain, from `virDomainEventType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainEventKind {
    Started,
    Stopped,
    Suspended,
    Resumed,
    /// Any other event type (defined, undefined, shutdown, pmsuspended, crashed, …).
    Other(i32),
}

impl DomainEventKind {
    fn from_raw(event: c_int) -> DomainEventKind {
        match u32::try_from(event) {
            Ok(sys::VIR_DOMAIN_EVENT_STARTED) => DomainEventKind::Started,
            Ok(sys::VIR_DOMAIN_EVENT_STOPPED) => DomainEventKind::Stopped,
            Ok(sys::VIR_DOMAIN_EVENT_SUSPENDED) => DomainEventKind::Suspended,
            Ok(sys::VIR_DOMAIN_EVENT_RESUMED) => DomainEventKind::Resumed,
            _ => DomainEventKind::Other(event),
        }
    }
}

/// One lifecycle event of one domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainEvent {
    pub name: String,
    pub uuid: String,
    pub kind: DomainEventKind,
    /// The event's detail code (`virDomainEvent*DetailType` of its kind), e.g. for `Stopped`
    /// 0 = shutdown, 1 = destroyed, 2 = crashed.
    pub detail: i32,
}

/// Whether a guest-side channel is open, from the agent/channel lifecycle events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelState {
    Connected,
    Disconnected,
    Other(i32),
}

impl ChannelState {
    fn from_raw(state: c_int) -> ChannelState {
        // The agent and channel events share these values (1 connected, 2 disconnected).
        match u32::try_from(state) {
            Ok(sys::VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED) => {
                ChannelState::Connected
            }
            Ok(sys::VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_DISCONNECTED) => {
                ChannelState::Disconnected
            }
            _ => ChannelState::Other(state),
        }
    }
}

/// Why libvirt closed the connection, from `virConnectCloseReason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// A read or write on the socket failed.
    Error,
    /// The daemon closed the socket (libvirtd exited or restarted).
    Eof,
    /// The daemon stopped answering keepalive probes.
    Keepalive,
    /// The client closed it.
    Client,
    Other(i32),
}

impl CloseReason {
    fn from_raw(reason: c_int) -> CloseReason {
        match u32::try_from(reason) {
            Ok(sys::VIR_CONNECT_CLOSE_REASON_ERROR) => CloseReason::Error,
            Ok(sys::VIR_CONNECT_CLOSE_REASON_EOF) => CloseReason::Eof,
            Ok(sys::VIR_CONNECT_CLOSE_REASON_KEEPALIVE) => CloseReason::Keepalive,
            Ok(sys::VIR_CONNECT_CLOSE_REASON_CLIENT) => CloseReason::Client,
            _ => CloseReason::Other(reason),
        }
    }
}

/// Everything a [`DomainEvents`] delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Lifecycle(DomainEvent),
    /// The qemu guest agent's channel (`org.qemu.guest_agent.0`) opened or closed.
    Agent {
        name: String,
        uuid: String,
        state: ChannelState,
        reason: i32,
    },
    /// Any virtio-serial channel opened or closed (libvirt ≥ 12.4 only).
    Channel {
        name: String,
        uuid: String,
        channel: String,
        state: ChannelState,
        reason: i32,
    },
    /// The connection is gone; no further events arrive on this `DomainEvents`.
    ConnectionLost(CloseReason),
}

/// How quickly a silent daemon is declared dead: a probe every `interval` seconds, the
/// connection closed after `count` unanswered ones. A daemon that exits is seen at once (EOF)
/// whatever these are; keepalive catches one that hangs or a link that drops silently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepAlive {
    pub interval_secs: i32,
    pub count: u32,
}

impl Default for KeepAlive {
    fn default() -> KeepAlive {
        KeepAlive {
            interval_secs: 5,
            count: 3,
        }
    }
}

/// What each registration's opaque pointer points to.
struct Shared {
    tx: Sender<Event>,
}

/// A live subscription to one connection's domain events. Dropping it deregisters every
/// callback and closes the connection.
pub struct DomainEvents {
    hv: Hypervisor,
    rx: Receiver<Event>,
    callback_ids: Vec<c_int>,
    close_registered: bool,
    channel_events: bool,
}

impl std::fmt::Debug for DomainEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DomainEvents")
            .field("uri", &self.hv.uri)
            .field("callbacks", &self.callback_ids.len())
            .field("channel_events", &self.channel_events)
            .finish()
    }
}

/// Registers libvirt's default event loop and starts the thread running it, once per process.
fn ensure_event_loop() -> Result<(), LibvirtError> {
    static LOOP: OnceLock<Result<(), String>> = OnceLock::new();
    LOOP.get_or_init(|| {
        // libvirt's default handler prints every error to stderr; ours carry them instead.
        virt::error::clear_error_callback();
        virt::event::event_register_default_impl()
            .map_err(|e| format!("register the default event loop: {}", e.message()))?;
        std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| loop {
                // Fails only if no implementation is registered, which cannot happen here;
                // the pause keeps a broken libvirt from spinning a core.
                if virt::event::event_run_default_impl().is_err() {
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
            .map_err(|e| format!("start the libvirt event thread: {e}"))?;
        Ok(())
    })
    .clone()
    .map_err(|message| LibvirtError::Other {
        op: "event loop",
        message,
    })
}

impl DomainEvents {
    /// Opens a connection to `uri` that delivers domain events, with libvirt's keepalive.
    pub fn open(uri: &str) -> Result<DomainEvents, LibvirtError> {
        DomainEvents::open_with(uri, KeepAlive::default())
    }

    pub fn open_with(uri: &str, keepalive: KeepAlive) -> Result<DomainEvents, LibvirtError> {
        // The loop must exist before the connection is opened, or its socket is not watched.
        ensure_event_loop()?;
        let hv = Hypervisor::connect(uri)?;
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared { tx });
        let mut events = DomainEvents {
            hv,
            rx,
            callback_ids: Vec::new(),
            close_registered: false,
            channel_events: false,
        };
        events
            .hv
            .conn
            .set_keep_alive(keepalive.interval_secs, keepalive.count)
            .map_err(|e| LibvirtError::other("turn keepalive on", e))?;
        events.register_close(&shared)?;
        let lifecycle: LifecycleCb = on_lifecycle;
        // SAFETY: `LifecycleCb` is the signature libvirt documents for
        // VIR_DOMAIN_EVENT_ID_LIFECYCLE; libvirt casts the generic callback back to it.
        let lifecycle = unsafe { std::mem::transmute::<LifecycleCb, GenericCb>(lifecycle) };
        events.register(&shared, sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle)?;
        let agent: AgentCb = on_agent;
        // SAFETY: as above, for VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE.
        let agent = unsafe { std::mem::transmute::<AgentCb, GenericCb>(agent) };
        events.register(&shared, sys::VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE, agent)?;
        let channel: ChannelCb = on_channel;
        // SAFETY: as above, for VIR_DOMAIN_EVENT_ID_CHANNEL_LIFECYCLE.
        let channel = unsafe { std::mem::transmute::<ChannelCb, GenericCb>(channel) };
        // Older daemons reject the event id; the other events still work without it.
        events.channel_events = events
            .register(&shared, sys::VIR_DOMAIN_EVENT_ID_CHANNEL_LIFECYCLE, channel)
            .is_ok();
        Ok(events)
    }

    /// Whether the daemon delivers the generic channel lifecycle event ([`Event::Channel`]).
    pub fn channel_events(&self) -> bool {
        self.channel_events
    }

    pub fn uri(&self) -> &str {
        &self.hv.uri
    }

    /// The channel events arrive on; it disconnects when this `DomainEvents` is dropped.
    pub fn receiver(&self) -> &Receiver<Event> {
        &self.rx
    }

    /// The next event, or `Err` if none came within `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Event, RecvTimeoutError> {
        self.rx.recv_timeout(timeout)
    }

    fn register(
        &mut self,
        shared: &Arc<Shared>,
        event_id: sys::virDomainEventID,
        cb: GenericCb,
    ) -> Result<(), LibvirtError> {
        let event_id = c_int::try_from(event_id).map_err(|_| LibvirtError::Other {
            op: "register domain events",
            message: format!("event id {event_id} out of range"),
        })?;
        let opaque = Arc::into_raw(Arc::clone(shared))
            .cast_mut()
            .cast::<c_void>();
        // SAFETY: the connection is open for as long as `self` lives; a null domain means
        // "all domains"; `opaque` is a strong reference that `free_shared` releases when
        // libvirt ends the registration, so it outlives every callback.
        let id = unsafe {
            sys::virConnectDomainEventRegisterAny(
                self.hv.conn.as_ptr(),
                std::ptr::null_mut(),
                event_id,
                Some(cb),
                opaque,
                Some(free_shared),
            )
        };
        if id < 0 {
            // SAFETY: libvirt refused the registration, so it kept no copy of `opaque` and
            // never calls `free_shared` with it; this releases the reference taken above.
            unsafe { drop(Arc::from_raw(opaque.cast::<Shared>())) };
            return Err(LibvirtError::other(
                "register domain events",
                virt::error::Error::last_error(),
            ));
        }
        self.callback_ids.push(id);
        Ok(())
    }

    fn register_close(&mut self, shared: &Arc<Shared>) -> Result<(), LibvirtError> {
        let opaque = Arc::into_raw(Arc::clone(shared))
            .cast_mut()
            .cast::<c_void>();
        // SAFETY: as in `register`: the connection is open, and `opaque` is a strong
        // reference released by `free_shared` when the callback is unregistered.
        let rc = unsafe {
            sys::virConnectRegisterCloseCallback(
                self.hv.conn.as_ptr(),
                Some(on_close),
                opaque,
                Some(free_shared),
            )
        };
        if rc < 0 {
            // SAFETY: the registration failed, libvirt kept no copy of `opaque`.
            unsafe { drop(Arc::from_raw(opaque.cast::<Shared>())) };
            return Err(LibvirtError::other(
                "register the close callback",
                virt::error::Error::last_error(),
            ));
        }
        self.close_registered = true;
        Ok(())
    }
}

impl Drop for DomainEvents {
    fn drop(&mut self) {
        // Errors are ignored: on a dead connection libvirt has already dropped the callbacks
        // on its side, and a registration it failed to end only leaks its `Arc`.
        for id in self.callback_ids.drain(..) {
            // SAFETY: `id` came from virConnectDomainEventRegisterAny on this connection,
            // which is still open (it is closed when `self.hv` drops, after this).
            unsafe { sys::virConnectDomainEventDeregisterAny(self.hv.conn.as_ptr(), id) };
        }
        if self.close_registered {
            // SAFETY: `on_close` was registered on this still open connection.
            unsafe {
                sys::virConnectUnregisterCloseCallback(self.hv.conn.as_ptr(), Some(on_close))
            };
        }
    }
}

type GenericCb = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void);
type LifecycleCb =
    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void) -> c_int;
type AgentCb =
    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void);
type ChannelCb = unsafe extern "C" fn(
    sys::virConnectPtr,
    sys::virDomainPtr,
    *const c_char,
    c_int,
    c_int,
    *mut c_void,
);

/// Runs `f` on the registration's sender, never letting a panic cross into libvirt.
///
/// # Safety
/// `opaque` must be a pointer made by `Arc::into_raw` on an `Arc<Shared>` that is still alive.
unsafe fn deliver(opaque: *mut c_void, f: impl FnOnce() -> Event) {
    // SAFETY: the caller guarantees the pointee lives; only a shared borrow is taken.
    let shared = unsafe { &*opaque.cast::<Shared>() };
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // A dropped receiver just means nobody listens any more.
        let _ = shared.tx.send(f());
    }));
}

/// The name and UUID of a domain libvirt lends to a callback.
///
/// # Safety
/// `dom` must be a valid domain pointer for the duration of the call.
unsafe fn domain_identity(dom: sys::virDomainPtr) -> (String, String) {
    // SAFETY: `dom` is valid (caller); the name is owned by the domain object and copied
    // before the callback returns.
    let name = unsafe {
        let p = sys::virDomainGetName(dom);
        if p.is_null() {
            String::new()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    let mut buf = [0 as c_char; 64];
    debug_assert!(buf.len() >= usize::try_from(sys::VIR_UUID_STRING_BUFLEN).unwrap_or(usize::MAX));
    // SAFETY: `buf` holds VIR_UUID_STRING_BUFLEN (37) bytes and more; libvirt NUL-terminates.
    let uuid = unsafe {
        if sys::virDomainGetUUIDString(dom, buf.as_mut_ptr()) == 0 {
            CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
        } else {
            String::new()
        }
    };
    (name, uuid)
}

unsafe extern "C" fn on_lifecycle(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    // SAFETY: libvirt passes back the opaque pointer of a live registration (freed only by
    // `free_shared`, after the last callback) and a domain valid during the call.
    unsafe {
        deliver(opaque, || {
            let (name, uuid) = domain_identity(dom);
            Event::Lifecycle(DomainEvent {
                name,
                uuid,
                kind: DomainEventKind::from_raw(event),
                detail,
            })
        })
    };
    0
}

unsafe extern "C" fn on_agent(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    state: c_int,
    reason: c_int,
    opaque: *mut c_void,
) {
    // SAFETY: as in `on_lifecycle`.
    unsafe {
        deliver(opaque, || {
            let (name, uuid) = domain_identity(dom);
            Event::Agent {
                name,
                uuid,
                state: ChannelState::from_raw(state),
                reason,
            }
        })
    };
}

unsafe extern "C" fn on_channel(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    channel: *const c_char,
    state: c_int,
    reason: c_int,
    opaque: *mut c_void,
) {
    // SAFETY: as in `on_lifecycle`; `channel` is a NUL-terminated string valid during the call.
    unsafe {
        deliver(opaque, || {
            let (name, uuid) = domain_identity(dom);
            let channel = if channel.is_null() {
                String::new()
            } else {
                CStr::from_ptr(channel).to_string_lossy().into_owned()
            };
            Event::Channel {
                name,
                uuid,
                channel,
                state: ChannelState::from_raw(state),
                reason,
            }
        })
    };
}

unsafe extern "C" fn on_close(_conn: sys::virConnectPtr, reason: c_int, opaque: *mut c_void) {
    // SAFETY: libvirt passes back the opaque pointer of the live close registration.
    unsafe {
        deliver(opaque, || {
            Event::ConnectionLost(CloseReason::from_raw(reason))
        })
    };
}

/// libvirt's free callback: releases the registration's strong reference.
unsafe extern "C" fn free_shared(opaque: *mut c_void) {
    let _ = catch_unwind(|| {
        // SAFETY: libvirt calls this exactly once per successful registration, with the
        // pointer `Arc::into_raw` made for it, and never uses the pointer afterwards.
        unsafe { drop(Arc::from_raw(opaque.cast::<Shared>())) };
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_event_types_map_to_kinds() {
        assert_eq!(DomainEventKind::from_raw(2), DomainEventKind::Started);
        assert_eq!(DomainEventKind::from_raw(5), DomainEventKind::Stopped);
        assert_eq!(DomainEventKind::from_raw(3), DomainEventKind::Suspended);
        assert_eq!(DomainEventKind::from_raw(4), DomainEventKind::Resumed);
        assert_eq!(DomainEventKind::from_raw(0), DomainEventKind::Other(0));
        assert_eq!(DomainEventKind::from_raw(-1), DomainEventKind::Other(-1));
    }

    #[test]
    fn raw_close_reasons_map_to_reasons() {
        assert_eq!(CloseReason::from_raw(1), CloseReason::Eof);
        assert_eq!(CloseReason::from_raw(2), CloseReason::Keepalive);
        assert_eq!(CloseReason::from_raw(9), CloseReason::Other(9));
    }
}
