"""The built-in guest's root shell on the virtio-serial port tvctl.test.shell (guest/init,
tvctl.shell=1), as the benchmark scripts drive it: one command at a time, its output and exit
status found by a marker line. tests/common/serve.rs has the Rust twin the tests use."""

import socket
import time


class GuestShell:
    def __init__(self, path, timeout, die):
        self.die = die
        start = time.time()
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                if time.time() - start > timeout:
                    die(f"cannot connect to the guest shell {path}")
                time.sleep(0.5)
        self.pending, self.n = b"", 0
        while self.try_run("echo ready", 5) is None:
            if time.time() - start > timeout:
                die("the guest shell did not answer")

    def try_run(self, cmd, timeout):
        """(exit status, output) of `cmd`, or None if it did not finish within `timeout`."""
        self.n += 1
        marker = f"__TVCTL_END_{self.n}__".encode()
        # The marker is split in the command, so an echo of the command cannot match it.
        self.s.sendall(f'{cmd}\necho "__TVCTL_END_""{self.n}__ $?"\n'.encode())
        deadline = time.time() + timeout
        while True:
            at = self.pending.find(marker)
            if at >= 0:
                nl = self.pending.find(b"\n", at)
                if nl >= 0:
                    out = self.pending[:at]
                    rc = int(self.pending[at + len(marker):nl].strip() or -1)
                    self.pending = self.pending[nl + 1:]
                    return rc, out.decode(errors="replace")
            left = deadline - time.time()
            if left <= 0:
                return None
            self.s.settimeout(min(left, 0.5))
            try:
                b = self.s.recv(1 << 20)
            except socket.timeout:
                continue
            if not b:
                self.die("the guest shell closed")
            self.pending += b

    def run(self, cmd, timeout=600, ok=True):
        r = self.try_run(cmd, timeout)
        if r is None:
            self.die(f"guest command did not finish within {timeout} s: {cmd[:300]!r}")
        if ok and r[0] != 0:
            self.die(f"guest command failed ({r[0]}): {cmd[:300]!r}\n{r[1][-2000:]}")
        return r
