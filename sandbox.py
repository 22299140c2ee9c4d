"""
The sandbox for model-written code, and the test harness that scores it. This file is a security boundary: a
policy under RL searches for whatever raises its reward, so everything here treats the program as an adversary.

  run_python(code)            one program in a fresh, isolated interpreter -> SandboxResult
  run_tests(code, tests)      the fraction of unit tests that pass after `code` runs
  sandbox_info()              how programs run on this machine (namespaces, uid, interpreter)

Used by eval.py (the verifiers of the code families, HumanEval) and sample.py (the `python` tool of --chat).
Model-written code never runs in the training process: only here, in a child process.

Footguns
- What it does NOT protect against: kernel exploits (it is rlimits + namespaces + an unprivileged uid, not a VM or
  seccomp); CPU and memory bandwidth contention with the trainer; a program that deliberately writes fake test
  results to the harness's report descriptor (reachable from the same process); reading world-readable files of
  the host (the filesystem is visible, only its world-writable temp directories are replaced by private tmpfs);
  when the trainer is not root, the child keeps its uid, so files that user may write outside the temp
  directories stay writable. Without `unshare` (not Linux, or namespaces forbidden) there is no network, pid or
  mount isolation: sandbox_info() says so and eval.evaluate() prints it. When the trainer runs as root, the child
  drops to uid/gid 65534; RLIMIT_NPROC counts all processes of that uid, so concurrent sandboxes share it (NPROC
  is sized for a pool of workers).
- The sandbox interpreter must be readable by the unprivileged user: a Python under /root (pyenv) is not, so the
  system python3 is used then (sandbox_info()["python"]); programs get its standard library only.
- Rewards are deterministic (fixed PYTHONHASHSEED in the sandbox) except for a program that runs close to its time
  limit, which can pass on one run and time out on another.
- Limits are set by the boot script inside the child (no preexec_fn: eval.score_many forks from threads).
"""
import ast
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

#
# A fresh interpreter (never a fork of the trainer) started through `unshare` in new network, pid and mount
# namespaces: no network, every descendant dies with it (killing pid 1 of a pid namespace kills the namespace, so
# even a grandchild that called setsid() cannot survive), and private tmpfs over /tmp, /var/tmp and /dev/shm,
# capped at disk_mb. rlimits bound CPU time, address space, file size, open files and processes; as root the
# child drops to uid/gid 65534 first (RLIMIT_NPROC does not apply to root). Output goes to unlinked files of
# at most RLIMIT_FSIZE bytes, of which max_output are read back; the environment is scrubbed.

SANDBOX_UID = 65534
NPROC = 64  # per uid, shared by concurrent sandboxes

_BOOT = r"""
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1])
src = sys.stdin.read()
if cfg["mount"]:
    libc = ctypes.CDLL(None, use_errno=True)
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(d) and libc.mount(b"tmpfs", d.encode(), b"tmpfs", 0, b"size=%dm,mode=1777" % cfg["disk_mb"]):
            sys.exit(f"sandbox: mounting a tmpfs on {d} failed (errno {ctypes.get_errno()})")
os.makedirs(cfg["work"], exist_ok=True)
with open(os.path.join(cfg["work"], "main.py"), "w") as f:
    f.write(src)
os.chdir(cfg["work"])
for name, v in cfg["limits"].items():
    resource.setrlimit(getattr(resource, name), (v, v))
if cfg["uid"] is not None:
    os.chown(cfg["work"], cfg["uid"], cfg["uid"])
    os.setgroups([]); os.setgid(cfg["uid"]); os.setuid(cfg["uid"])
del ctypes, json, resource, cfg, src, f
import runpy
sys.argv = ["main.py"]
runpy.run_path("main.py", run_name="__main__")
"""


@dataclass
class SandboxResult:
    returncode: int | None   # None when killed on timeout
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float


def _can_run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, timeout=30, cwd="/").returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@functools.cache
def sandbox_info():
    """How programs run here: python (the interpreter), namespaces (network + pid + mount isolation available),
    drop_to (the uid the child becomes, when we are root), prefix (the unshare command)."""
    root = os.geteuid() == 0
    prefix = ["unshare", "--net", "--pid", "--mount", "--fork", "--kill-child"] + ([] if root else ["--map-root-user"])
    namespaces = bool(shutil.which("unshare")) and _can_run(prefix + ["true"])
    drop = f"import os; os.setgroups([]); os.setgid({SANDBOX_UID}); os.setuid({SANDBOX_UID}); " if root else ""
    python = next((p for p in (sys.executable, shutil.which("python3", path="/usr/bin:/bin")) if p and
                   _can_run([p, "-c", drop + "import json, socket"])), sys.executable)
    return {"python": python, "namespaces": namespaces, "drop_to": SANDBOX_UID if root else None, "prefix": prefix}


def _kill(p):
    """Kill the sandbox: first pid 1 of its namespace (the kernel then kills everything in it, and unshare, still
    alive, reaps it: killing unshare first would leave that process a zombie nobody reaps, counted against
    RLIMIT_NPROC), then the whole process group (unshare itself, or everything when there are no namespaces)."""
    if p.poll() is None:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                if ppid == p.pid:
                    os.kill(int(pid), 9)
            except (OSError, ValueError, IndexError):
                pass
        try:
            p.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(p.pid, 9)
    except (ProcessLookupError, PermissionError):
        pass
    p.wait()


def run_python(code, *, timeout_s=5.0, memory_mb=512, file_mb=16, disk_mb=32, max_output=65536, pass_fds=()):
    """Run `code` as __main__ in a sandboxed fresh interpreter (see the section comment and the module footguns)."""
    info = sandbox_info()
    with tempfile.TemporaryDirectory(prefix="nm-sandbox-") as tmp, tempfile.TemporaryFile() as out, \
            tempfile.TemporaryFile() as err:
        work = "/tmp/work" if info["namespaces"] else os.path.join(tmp, "work")
        if not info["namespaces"]:
            os.chmod(tmp, 0o755)  # the unprivileged child must reach work/, which it then owns
            os.makedirs(work)
        limits = {"RLIMIT_CPU": math.ceil(timeout_s) + 1, "RLIMIT_AS": memory_mb << 20, "RLIMIT_FSIZE": file_mb << 20,
                  "RLIMIT_NOFILE": 64, "RLIMIT_NPROC": NPROC, "RLIMIT_CORE": 0}
        cfg = dict(mount=info["namespaces"], uid=info["drop_to"], disk_mb=disk_mb, work=work, limits=limits)
        boot = [info["python"], "-s", "-c", _BOOT, json.dumps(cfg)]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work, "PYTHONHASHSEED": "0",
               "PYTHONDONTWRITEBYTECODE": "1"}
        t0 = time.perf_counter()
        p = subprocess.Popen((info["prefix"] if info["namespaces"] else []) + boot, stdin=subprocess.PIPE,
                             stdout=out, stderr=err, env=env, cwd=tmp, start_new_session=True, pass_fds=pass_fds)
        try:
            p.communicate(code.encode(), timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill(p)
        seconds = time.perf_counter() - t0

        def read(f):
            f.seek(0)
            return f.read(max_output).decode(errors="replace")
        return SandboxResult(None if timed_out else p.returncode, read(out), read(err), timed_out, seconds)


_HARNESS = """

def __nm_report(line):
    import os
    os.write({fd}, (line + "\\n").encode())

for __nm_i, __nm_t in enumerate({tests!r}):
    try:
        exec(__nm_t, globals())
        __nm_report(str(__nm_i))
    except BaseException:
        pass
"""


def run_tests(code, tests, **sandbox):
    """Fraction of `tests` (Python statements, e.g. asserts) that pass after `code` runs, each in the program's
    globals, in one sandboxed process. A pass is reported on a private descriptor as it happens, so a timeout or a
    crash later keeps the earlier passes; code that does not even parse scores 0 without starting a process."""
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return 0.0
    with tempfile.TemporaryFile() as report:
        fd = report.fileno()
        run_python(code + _HARNESS.format(fd=fd, tests=list(tests)), pass_fds=(fd,), **sandbox)
        report.seek(0)
        passed = {int(x) for x in report.read(65536).split() if x.isdigit() and int(x) < len(tests)}
    return len(passed) / len(tests)


