"""Run a command and print its peak RSS in KiB on the last line of stdout (from wait4)."""

from __future__ import annotations

import os
import subprocess
import sys

proc = subprocess.Popen(sys.argv[1:])
_pid, status, usage = os.wait4(proc.pid, 0)
code = os.waitstatus_to_exitcode(status)
sys.stdout.flush()
print(usage.ru_maxrss, flush=True)
sys.exit(code)
