//! SIGINT and SIGTERM counted instead of obeyed, for the life of the process: every wait of
//! `tvctl` (and of `tvctl-agent record`) asks how many arrived, so a first Ctrl-C stops
//! gracefully and a second one stops waiting.

use std::sync::atomic::{AtomicU32, Ordering};

static SIGNALS: AtomicU32 = AtomicU32::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

/// From now on SIGINT and SIGTERM are counted (restarting interrupted system calls).
pub fn install() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only does an atomic add, which is async-signal-safe.
        let _ = unsafe { sigaction(sig, &action) };
    }
}

/// Signals counted so far.
pub fn count() -> u32 {
    SIGNALS.load(Ordering::SeqCst)
}
