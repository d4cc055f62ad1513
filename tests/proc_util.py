"""Helpers for tests that drive training in child processes."""

import time


def wait_for_line(proc, line, timeout=120):
    """Reads ``proc``'s stdout until a line equal to ``line`` (stripped); fails with the child's
    stderr tail if it exits first, or after ``timeout`` seconds."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        got = proc.stdout.readline()
        if not got and proc.poll() is not None:
            raise AssertionError(f"process ended before {line!r}: {proc.stderr.read()[-3000:]}")
        if got.strip() == line:
            return
    raise AssertionError(f"timed out waiting for {line!r}")


class PtyProcess:
    """A child process whose stdin, stdout and stderr are one pseudo-terminal (what a user's
    terminal gives it: ``isatty()`` is true, as are ``TERM`` and a window size).

    ``read_until(pattern)`` collects its output until ``pattern`` (a regex) matches or the
    child exits; ``output`` is everything read so far (bytes decoded as UTF-8)."""

    def __init__(self, cmd, *, env=None, cwd=None, columns=100):
        import fcntl
        import os
        import pty
        import signal
        import struct
        import subprocess
        import termios

        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
        env = dict(os.environ if env is None else env, TERM="xterm")
        # SIGINT as a terminal delivers it: Python's default handler in the child, even when
        # this suite was started in the background (which leaves SIGINT ignored).
        self.proc = subprocess.Popen(
            cmd, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd, close_fds=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        os.close(slave)
        self.output = ""
        self.t0 = time.monotonic()

    def _read(self, timeout):
        import os
        import select

        r, _, _ = select.select([self.master], [], [], timeout)
        if not r:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the child closed the terminal
            return False
        if not data:
            return False
        self.output += data.decode("utf-8", errors="replace")
        return True

    def read_until(self, pattern, timeout=120):
        """Seconds since the start when ``pattern`` first matched; AssertionError (with the
        output) if the child exits or ``timeout`` passes first."""
        import re

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if re.search(pattern, self.output):
                return time.monotonic() - self.t0
            if not self._read(0.05) and self.proc.poll() is not None:
                break
        if re.search(pattern, self.output):
            return time.monotonic() - self.t0
        raise AssertionError(f"no {pattern!r} in the terminal output:\n{self.output[-3000:]}")

    def wait(self, timeout=120):
        """Reads until the child exits; its exit status."""
        import os

        end = time.monotonic() + timeout
        while time.monotonic() < end and (self._read(0.05) or self.proc.poll() is None):
            pass
        code = self.proc.wait(timeout=max(1.0, end - time.monotonic()))
        os.close(self.master)
        return code
