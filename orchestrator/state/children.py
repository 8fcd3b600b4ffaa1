"""Child processes that die with refitd, started without `preexec_fn`.

refitd owns a redis-server and rank agents; if refitd is SIGKILLed they must not linger on its
data directory. The kernel's PR_SET_PDEATHSIG does that, but it must be set in the child, and
`subprocess`'s `preexec_fn` (Python code between fork and exec) is unsafe in a threaded process:
a lock another thread held at fork stays locked in the child forever. So the child runs this
file as a tiny exec shim instead: a fresh interpreter (no threads, no inherited locks) that sets
the death signal and then execs the real command, which keeps the pid and the signal.

    python -I children.py PARENT_PID SIGNAL -- COMMAND...

The signal fires when the *thread* that started the child exits, so callers start children from
a thread that lives as long as they do (the main thread, or the supervisor's own thread).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
# What execvp's failure looks like from outside, as a shell reports "command not found".
_EXEC_FAILED = 127


def command(argv: list[str], *, sig: signal.Signals = signal.SIGTERM) -> list[str]:
    """`argv` wrapped so that the process it starts gets `sig` when this process dies.

    Start it with `subprocess.Popen(..., start_new_session=True)` (a safe flag, applied in C),
    so that a Ctrl-C at the terminal reaches refitd, which then stops its children in order.
    """
    # -I: the shim needs only the standard library and must not pick up PYTHON* variables
    # meant for the command it starts (which gets the environment Popen is given, unchanged).
    return [sys.executable, "-I", os.path.abspath(__file__), str(os.getpid()), str(int(sig)),
            "--", *argv]  # fmt: skip


def _main(args: list[str]) -> None:
    parent, sig, separator, argv = int(args[0]), int(args[1]), args[2], args[3:]
    if separator != "--" or not argv:
        raise SystemExit("usage: children.py PARENT_PID SIGNAL -- COMMAND...")
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, sig) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except AttributeError:
        pass  # not Linux: no prctl; the child then outlives a SIGKILLed parent
    # The parent may have died between fork and prctl, before there was anyone to signal us.
    if os.getppid() != parent:
        raise SystemExit(f"the parent (pid {parent}) exited before {argv[0]} could start")
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        print(f"cannot start {argv[0]}: {exc}", file=sys.stderr, flush=True)
        os._exit(_EXEC_FAILED)


if __name__ == "__main__":
    _main(sys.argv[1:])
