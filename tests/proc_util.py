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
