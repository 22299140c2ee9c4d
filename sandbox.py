"""
The sandbox for model-written code, and the test harness that scores it. This file is a security boundary: a
policy under RL searches for whatever raises its reward, so everything here treats the program as an adversary.

  run_python(code)            one program in a fresh, isolated interpreter -> SandboxResult
  run_tests(code, tests)      the fraction of unit tests that pass against `code`
  sandbox_info()              how programs run on this machine (namespaces, uids, interpreter, hidden directories)
  python sandbox.py --bench   programs scored per second (64 short honest programs, 4 at a time)

Used by eval.py (the verifiers of the code families, HumanEval) and sample.py (the `python` tool of --chat).
Model-written code never runs in the training process: only here, in a child process.

How a run is built (the section comments below give the details)
- One fresh interpreter per run (never a fork of the trainer), started through `unshare` in new network, pid,
  mount and IPC namespaces. Its first process is trusted code, the boot: it makes every host mount read-only and
  nosuid, hides /run, the project and the trainer's packages behind empty mounts, mounts a private size-capped
  tmpfs on /tmp (also seen at /var/tmp and /dev/shm) and a /proc of its own, sets the rlimits, drops to a uid
  that no other running sandbox has (so each sandbox has its own RLIMIT_NPROC budget), then forks the program.
- The boot stays, as the judge (pid 1 of the namespace). The tests go to it only after that fork, and never
  reach the program's process: the judge runs them itself, and each name a test takes from the program (its
  entry point, a helper) is a stub that sends the arguments to the program's process as plain data and gets the
  result back as plain data (None, bool, int, float, complex, str, bytes, and lists, tuples, dicts, sets of
  them). The judge alone writes the passes, on a descriptor the program never holds.

What it guarantees (against a program that is arbitrary Python, with ctypes)
- A test passes only when the trusted test code, run in a process the program cannot read, signal or trace
  (pid 1 of the namespace, non-dumpable), succeeds on the values the program returned. Shadowing or patching
  builtins, writing to descriptors, exiting, crashing or hanging change nothing else: after the program's
  process ends no later test counts. A result that is not plain data (an instance of a class the program
  defined, a builtin subclass that overrides comparison) makes the test fail; between plain values Python's ==
  stands (4 == 4.0). The tests are not in the program's memory, files, argv or environment.
- The program sees the host's files read-only; it can write only its scratch tmpfs (disk_mb), which vanishes with
  it. It sees only the sandbox's processes, has no network and no host sockets (no abstract ones in a new network
  namespace; /run and /tmp, where the host's usually are, are hidden), and is bound by CPU time, memory, file
  size, open files, processes (per sandbox) and output. Every descendant dies with the sandbox. When the machine
  runs out of memory the kernel kills sandbox processes first (oom_score_adj 1000), not the trainer.
- Throughput: the judge costs one fork and a pipe round trip per call. `python sandbox.py --bench` on the 2-core
  development machine: 36 programs/s; the harness before the judge (commit 1a0e77d) scored 34 in the same session.

What it does NOT protect against
- Kernel exploits (it is namespaces + rlimits + an unprivileged uid, not a VM or seccomp); CPU and memory
  bandwidth contention with the trainer and the other sandboxes. Reading world-readable host files outside the
  hidden directories (a data set's tests, if its files are world-readable elsewhere on the host). A world-writable
  Unix socket outside /run and /tmp would be reachable (there is none on the development machines).
- A test trusts every function it calls from the program: HumanEval's tests call the prompt's helpers (poly,
  encode_cyclic, encode_shift) from the program, which may redefine them (HumanEval is evaluation only, never an
  RL reward). Tests see the program's callables only (not its other globals), and calls pass copies: a test that
  checks an argument the program mutated, or uses a result that is not plain data (a generator), fails.
- When the trainer is not root: the boot is root of a user namespace only, and the program runs as uid 65534 of a
  nested one, with no capability over the sandbox; it shares the trainer's uid on the host, so it can read the
  trainer's own files (never write them: the mounts are read-only). Each sandbox still has its own process budget
  (Linux >= 5.14 counts RLIMIT_NPROC per user namespace).
- Memory in total: each process may map memory_mb and a sandbox may hold NPROC of them, so a machine running
  several sandboxes can run out (the sandboxes then die first, see above): a cgroup would bound the sum.
- Without `unshare` (not Linux, namespaces forbidden; sandbox_info()["namespaces"] is False and eval.evaluate()
  prints it) there is no network, pid, IPC or mount isolation: the program sees and can write whatever its uid
  may (as root: a pool uid that owns nothing, so only world-writable places; else the trainer's own uid and
  files), sees the host's processes, can kill the judge (scoring itself 0) and, when the trainer is not root, a
  grandchild that calls setsid() outlives the run. The tests still never reach the program's process.

Footguns
- The sandbox interpreter must be readable by the unprivileged user: a Python under /root (pyenv) is not, so the
  system python3 is used then (sandbox_info()["python"]); programs get its standard library only.
- Rewards are deterministic (fixed PYTHONHASHSEED in the sandbox) except for a program that runs close to its time
  limit, which can pass on one run and time out on another.
- Needs Linux >= 5.12 for the recursive read-only remount (mount_setattr); the boot refuses to run without it.
- Limits are set by the boot inside the child (no preexec_fn: eval.score_many forks from threads).
"""
import ast
import contextlib
import functools
import json
import math
import os
import shutil
import site
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

SANDBOX_UIDS = range(1_000_000_000, 1_000_000_064)  # uids no account has; one per running sandbox (as root)
NPROC = 64  # processes (and threads) per sandbox, judge included
MAX_MESSAGE = 16 << 20  # bytes of one call or result between judge and program

#
# The boot: the trusted first process of the sandbox (pid 1 of its namespaces), given its config in argv and the
# program, then the tests, on stdin. It reads exactly the program's bytes, isolates the filesystem, sets the limits,
# drops its uid, and forks the program's process, which never holds stdin (the tests are still in the pipe) nor
# the report descriptor. Then the boot is the judge: with tests, it reads them, runs them in a namespace of its own
# where the program's callables are stubs (each call: one JSON line to the program, one back), and writes the index
# of each test that passed to the report descriptor; without, it waits for the program and exits with its status.
# Either way it then kills and reaps what is left of the program.
#
# Only plain data crosses, as JSON with tagged containers ({"t": [...]} a tuple, {"d": [[k, v], ...]} a dict, ...).
# `encode` runs on both sides; a value it cannot represent becomes {"o": type name}, which `decode`, in the judge,
# refuses. A subclass of a builtin type counts as its base only when it keeps the base's comparisons (or comes from
# the standard library: OrderedDict, Counter). Where encode runs in the program's process it is the program's to
# subvert, and that is fine: whatever it sends is plain data, which the judge compares with Python's own ==.

_BOOT = r"""
import builtins, ctypes, json, os, resource, signal, sys

cfg = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND = 1, 2, 4, 8, 4096
PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS, CLONE_NEWUSER = 4, 36, 38, 0x10000000


def check(ret, what):
    if ret != 0:
        sys.exit(f"sandbox: {what} failed ({os.strerror(ctypes.get_errno())})")


def read_exactly(fd, n):  # os.read, not sys.stdin: no read-ahead may pull the tests into the program's memory
    data = b""
    while len(data) < n and (chunk := os.read(fd, n - len(data))):
        data += chunk
    return data


def mount(source, target, fstype, flags, options=None):
    check(libc.mount(source, target.encode(), fstype, flags, options), f"mounting {target}")


def isolate_filesystem():
    # every mount read-only and nosuid, recursively (mount_setattr, Linux >= 5.12); then the few writable places
    MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, AT_RECURSIVE, AT_FDCWD, SYS_MOUNT_SETATTR = 1, 2, 0x8000, -100, 442
    attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
    check(libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_long(AT_FDCWD), b"/", ctypes.c_long(AT_RECURSIVE),
                       attr, ctypes.c_long(ctypes.sizeof(attr))), "making / read-only")
    for d in cfg["hide"]:  # empty and read-only: host sockets and lock files, the project, the trainer's packages
        mount(b"tmpfs", d, b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, b"size=4k")
    mount(b"tmpfs", "/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, b"size=%dm,mode=1777" % cfg["disk_mb"])
    for d in ("/var/tmp", "/dev/shm"):  # the same scratch space, under the same cap
        if os.path.isdir(d):
            mount(b"/tmp", d, None, MS_BIND)
    mount(b"proc", "/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # this pid namespace's processes only


def limit_and_drop():
    for name, v in cfg["limits"].items():
        resource.setrlimit(getattr(resource, name), (v, v))
    with open("/proc/self/oom_score_adj", "w") as f:  # when memory runs out, the kernel kills sandboxes first
        f.write("1000")
    os.makedirs(cfg["work"], exist_ok=True)
    if cfg["uid"] is not None:  # root: become this sandbox's own unprivileged uid (RLIMIT_NPROC counts per uid)
        os.chown(cfg["work"], cfg["uid"], cfg["uid"])
        os.setgroups([]); os.setgid(cfg["uid"]); os.setuid(cfg["uid"])
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")  # no setuid binary gives privileges back
    check(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "dumpable")  # same uid, yet no ptrace, /proc/1/mem or /proc/1/fd
    check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "subreaper")  # without a pid namespace: orphans come here
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # pid 1 gets only the signals it handles: none


def leave_user_namespace_root():
    # not root on the host: the boot is root of a user namespace; a nested one, where the program is uid 65534,
    # leaves it no capability over the sandbox's mounts or the judge
    check(libc.unshare(CLONE_NEWUSER), "unshare(CLONE_NEWUSER)")
    for name, text in (("setgroups", "deny"), ("uid_map", "65534 0 1"), ("gid_map", "65534 0 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    os.setgid(65534); os.setuid(65534)


def close_all_but(*keep):
    lo = 0
    for fd in sorted(keep) + [1 << 20]:
        if lo < fd:  # os.closerange(n, n) closes everything from n on (close_range with last = -1)
            os.closerange(lo, fd)
        lo = fd + 1


PLAIN = {bool, int, float, complex, str, bytes, type(None), list, tuple, dict, set, frozenset}
COMPARISONS = ("__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__hash__")


def encode(x):
    t = type(x)
    if t in (bool, float, str, type(None)) or (t is int and abs(x) < 1 << 64):
        return x
    if t is int:
        return {"i": hex(x)}  # a big int in hex: no 4300-digit limit
    if t is list:
        return [encode(v) for v in x]
    if t in (tuple, set, frozenset):
        return {{tuple: "t", set: "s", frozenset: "f"}[t]: [encode(v) for v in x]}
    if t is dict:
        return {"d": [[encode(k), encode(v)] for k, v in x.items()]}
    if t is bytes:
        return {"b": x.hex()}
    if t is complex:
        return {"c": [x.real, x.imag]}
    base = next((b for b in t.__mro__ if b in PLAIN), None)
    stdlib = t.__module__.partition(".")[0] in sys.stdlib_module_names
    if base is not None and (stdlib or all(getattr(t, m) is getattr(base, m) for m in COMPARISONS)):
        return encode(base(x))
    return {"o": t.__qualname__}


def decode(x):
    if type(x) is list:
        return [decode(v) for v in x]
    if type(x) is not dict:
        return x  # None, bool, int, float, str: json.loads makes nothing else
    (tag, v), = x.items()
    containers = {"t": tuple, "s": set, "f": frozenset}
    if tag in containers:
        return containers[tag](decode(e) for e in v)
    if tag == "d":
        return {decode(k): decode(e) for k, e in v}
    if tag == "i":
        return int(v, 16)
    if tag == "b":
        return bytes.fromhex(v)
    if tag == "c":
        return complex(*v)
    raise TypeError(f"the program returned a {v!r} object, which is not plain data")


def send(fd, obj):
    data = (json.dumps(obj) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]


def serve(calls, replies):
    # the program's process, after the program ran: answer the judge's calls (untrusted from here on; the judge
    # trusts nothing it sends but plain data)
    g = sys.modules["__main__"].__dict__
    send(replies, ["ready", [k for k, v in g.items() if callable(v)]])
    for line in os.fdopen(calls, "rb"):
        try:
            name, args, kwargs = decode(json.loads(line))
            reply = ["ok", encode(g[name](*args, **kwargs))]
        except BaseException as e:  # the judge raises the first builtin exception class of e's type
            reply = ["raised", next(c.__name__ for c in type(e).__mro__ if c.__module__ == "builtins")]
        send(replies, reply)


def run_program(src, calls=None, replies=None):
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    close_all_but(0, 1, 2, *[fd for fd in (calls, replies) if fd is not None])
    if cfg["namespaces"] and cfg["uid"] is None:
        leave_user_namespace_root()
    os.chdir(cfg["work"])
    main = type(sys)("__main__")
    main.__file__ = "main.py"
    sys.modules["__main__"], sys.argv = main, ["main.py"]
    with open("main.py", "w") as f:
        f.write(src)
    try:
        exec(compile(src, "main.py", "exec"), main.__dict__)
    except SystemExit:
        raise
    except BaseException as e:  # the traceback a program run with `python main.py` prints
        sys.excepthook(type(e), e, e.with_traceback(e.__traceback__.tb_next).__traceback__)
        sys.exit(1)
    if calls is not None:
        serve(calls, replies)


class ProgramGone(BaseException):
    # the program's process ended or broke the protocol: no later test can count (BaseException: a test's
    # `except Exception` does not swallow it)
    pass


def judge(calls, replies, report):
    # trusted: the tests run here, in this process, never in the program's
    tests = json.loads(b"".join(iter(lambda: os.read(0, 1 << 20), b"")))
    sys.path[:] = [p for p in sys.path if p]  # a test's imports come from the standard library, not from the cwd
    os.chdir("/")
    replies = os.fdopen(replies, "rb")
    gone = []

    def receive():
        line = replies.readline(cfg["max_message"] + 1)
        if not line.endswith(b"\n"):
            gone.append(True)
            raise ProgramGone
        return json.loads(line)

    def stub(name):
        def call(*args, **kwargs):
            if gone:
                raise ProgramGone
            try:
                send(calls, encode([name, list(args), kwargs]))
            except OSError:
                gone.append(True)
                raise ProgramGone
            kind, value = receive()
            if kind == "ok":
                return decode(value)
            exc = getattr(builtins, str(value), None)
            raise (exc if isinstance(exc, type) and issubclass(exc, Exception) else RuntimeError)(
                f"raised in the program: {value}")
        call.__name__ = call.__qualname__ = name
        return call

    try:
        kind, names = receive()
    except (ProgramGone, ValueError, TypeError):
        return
    ns = {"__builtins__": builtins, "__name__": "__main__"}
    for name in names if kind == "ready" and type(names) is list else ():
        if type(name) is str and name.isidentifier() and not name.startswith("__") and name not in vars(builtins):
            ns[name] = stub(name)  # never a builtin's name: a test's `abs` or `exec` is Python's
    for i, test in enumerate(tests):
        try:
            exec(compile(test, f"<test {i}>", "exec"), ns)
            passed = True
        except BaseException:
            passed = False
        if gone:
            return
        if passed:
            os.write(report, b"%d\n" % i)


def finish(pid):
    # kill and reap what is left of the program: every process of the sandbox in a pid namespace, or without one as
    # root (its own uid; orphans were reparented here); else only its first process, if not reaped yet
    if cfg["namespaces"] or cfg["uid"] is not None:
        pid = -1
    elif pid is None:
        return
    while True:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            return


src = read_exactly(0, cfg["code_bytes"]).decode()
if cfg["namespaces"]:
    isolate_filesystem()
limit_and_drop()
if cfg["report"] is None:  # run_python: the program's exit status is the sandbox's
    pid = os.fork()
    if pid == 0:
        run_program(src)
        sys.exit(0)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    finish(None)
    os._exit(code if code >= 0 else 128 - code)
calls_r, calls_w = os.pipe()
replies_r, replies_w = os.pipe()
pid = os.fork()
if pid == 0:
    run_program(src, calls_r, replies_w)
    sys.exit(0)
os.close(calls_r); os.close(replies_w)  # so that the program's end reads as end of file here
judge(calls_w, replies_r, cfg["report"])
finish(pid)
os._exit(0)
"""


@dataclass
class SandboxResult:
    returncode: int | None   # None when killed on timeout; 128 + n when killed by signal n
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float


def _probe(cmd):
    try:
        p = subprocess.run(cmd, capture_output=True, timeout=30, cwd="/", text=True, check=False)
        return p.stdout if p.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


@functools.cache
def sandbox_info():
    """How programs run here: python (the interpreter), namespaces (network + pid + mount + IPC isolation),
    drop_to (the uids the child becomes, one per running sandbox, when we are root), prefix (the unshare command),
    hide (the host directories mounted over with an empty one)."""
    root = os.geteuid() == 0
    prefix = ["unshare", "--net", "--pid", "--mount", "--ipc", "--fork", "--kill-child"] + \
        ([] if root else ["--map-root-user"])
    namespaces = bool(shutil.which("unshare")) and _probe(prefix + ["true"]) is not None
    uid = SANDBOX_UIDS[0]
    drop = f"import os; os.setgroups([]); os.setgid({uid}); os.setuid({uid}); " if root else ""
    python, stdlib = sys.executable, os.path.dirname(os.__file__)
    for p in (sys.executable, shutil.which("python3", path="/usr/bin:/bin")):
        out = p and _probe([p, "-s", "-c", drop + "import ctypes, json, os, resource, signal; print(os.__file__)"])
        if out:
            python, stdlib = p, os.path.dirname(out.strip())
            break
    # hidden: where the host's sockets and lock files live, the project (its tests, data and checkpoints), the
    # trainer's packages (HumanEval's data file with its tests); never what the sandbox's interpreter needs
    candidates = ["/run", os.path.dirname(os.path.abspath(__file__)), *site.getsitepackages(),
                  site.getusersitepackages()]
    hide = [d for d in dict.fromkeys(map(os.path.realpath, candidates)) if os.path.isdir(d) and
            not (stdlib + "/").startswith(d + "/") and not d.startswith("/tmp/")]
    # a directory inside another hidden one is hidden with it (and cannot be mounted over once its parent is
    # empty): a virtual environment inside the project, as the README's commands make one
    hide = [d for d in hide if not any(d.startswith(h + "/") for h in hide)]
    drop_to = f"{SANDBOX_UIDS[0]}..{SANDBOX_UIDS[-1]}, one per sandbox" if root else None
    return {"python": python, "namespaces": namespaces, "drop_to": drop_to, "prefix": prefix, "hide": hide}


@contextlib.contextmanager
def _own_uid():
    """A uid of SANDBOX_UIDS that no other running sandbox has, in any process: holding it is holding the abstract
    Unix socket named after it (the kernel frees the name when the socket closes, even if this process dies)."""
    if sandbox_info()["drop_to"] is None:
        yield None
        return
    while True:
        for uid in SANDBOX_UIDS:
            lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                lock.bind(f"\0nanomellum-sandbox-uid-{uid}")
            except OSError:
                lock.close()
                continue
            with lock:
                yield uid
            return
        time.sleep(0.01)


def _kill(p, uid):
    """Kill the sandbox: first pid 1 of its namespace (the kernel then kills everything in it, and unshare, still
    alive, reaps it), then the whole process group (unshare itself, or everything when there are no namespaces);
    without namespaces, as root, every process of the sandbox's uid (a grandchild that called setsid())."""
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
    if uid is not None and not sandbox_info()["namespaces"]:
        kill_all = (f"import os\nos.setgroups([]); os.setgid({uid}); os.setuid({uid})\nfor _ in range(100):\n"
                    "    try:\n        os.kill(-1, 9)\n    except ProcessLookupError:\n        break\n")
        subprocess.run([sandbox_info()["python"], "-c", kill_all], cwd="/", check=False)


def _run(code, tests, timeout_s, memory_mb, file_mb, disk_mb, max_output):
    """(SandboxResult, indices of the tests that passed); tests=None runs the program alone."""
    info = sandbox_info()
    src = code.encode()
    with _own_uid() as uid, tempfile.TemporaryDirectory(prefix="nm-sandbox-") as tmp, \
            tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, tempfile.TemporaryFile() as report:
        work = "/tmp/work" if info["namespaces"] else os.path.join(tmp, "work")
        if not info["namespaces"]:
            os.chmod(tmp, 0o755)  # the unprivileged child must reach work/, which it then owns
            os.makedirs(work)
        limits = {"RLIMIT_CPU": math.ceil(timeout_s) + 1, "RLIMIT_AS": memory_mb << 20, "RLIMIT_FSIZE": file_mb << 20,
                  "RLIMIT_NOFILE": 64, "RLIMIT_NPROC": NPROC, "RLIMIT_CORE": 0}
        cfg = dict(namespaces=info["namespaces"], uid=uid, disk_mb=disk_mb, work=work, limits=limits,
                   hide=info["hide"], code_bytes=len(src), max_message=MAX_MESSAGE,
                   report=None if tests is None else report.fileno())
        boot = [info["python"], "-s", "-c", _BOOT, json.dumps(cfg)]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work, "PYTHONHASHSEED": "0",
               "PYTHONDONTWRITEBYTECODE": "1"}
        t0 = time.perf_counter()
        p = subprocess.Popen((info["prefix"] if info["namespaces"] else []) + boot, stdin=subprocess.PIPE,
                             stdout=out, stderr=err, env=env, cwd=tmp, start_new_session=True,
                             pass_fds=() if tests is None else (report.fileno(),))
        try:
            p.communicate(src + (b"" if tests is None else json.dumps(list(tests)).encode()), timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill(p, uid)
        seconds = time.perf_counter() - t0

        def read(f):
            f.seek(0)
            return f.read(max_output).decode(errors="replace")
        report.seek(0)
        passed = {int(x) for x in report.read(65536).split() if x.isdigit()}
        return SandboxResult(None if timed_out else p.returncode, read(out), read(err), timed_out, seconds), passed


def run_python(code, *, timeout_s=5.0, memory_mb=512, file_mb=16, disk_mb=32, max_output=65536):
    """Run `code` as __main__ in a sandboxed fresh interpreter (see the module docstring)."""
    return _run(code, None, timeout_s, memory_mb, file_mb, disk_mb, max_output)[0]


def run_tests(code, tests, *, timeout_s=5.0, memory_mb=512, file_mb=16, disk_mb=32, max_output=65536):
    """Fraction of `tests` (Python statements, e.g. asserts, that call the program's functions) that pass after
    `code` runs, judged outside the program's process (see the module docstring). A test that passed before the
    program hung or died still counts; code that does not even parse scores 0 without starting a process."""
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return 0.0
    tests = list(tests)
    passed = _run(code, tests, timeout_s, memory_mb, file_mb, disk_mb, max_output)[1]
    return len(passed & set(range(len(tests)))) / len(tests)


def bench(harness=run_tests, n=64, workers=4):
    """Programs scored per second: n short honest programs with 4 tests each (like the python family), scored
    `workers` at a time like eval.score_many in an RL step; `harness` may be another run_tests, to compare."""
    from concurrent.futures import ThreadPoolExecutor
    programs = [(f"def add_k(x):\n    return x + {i % 7 + 2}\n", [f"assert add_k({x}) == {x + i % 7 + 2}"
                                                                     for x in (-3, 0, 5, 17)]) for i in range(n)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        scores = list(pool.map(lambda p: harness(*p), programs))
    assert scores == [1.0] * n, scores
    return n / (time.perf_counter() - t0)


if __name__ == "__main__":
    if sys.argv[1:] != ["--bench"]:
        sys.exit("usage: python sandbox.py --bench")
    print(sandbox_info())
    print(f"{bench():.1f} programs/s (64 programs, 4 tests each, 4 workers)")
