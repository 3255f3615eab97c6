"""HumanEval scoring: run prompt + completion + tests in a sandboxed subprocess; unbiased pass@k (EVAL.md §12).

Notable:
- The program is `prompt + completion + "\\n" + test + "\\n" + "check(<entry_point>)"`, as in openai/human-eval.
  A completion that is only the indented body continues the prompt's `def`; one that restates the whole function
  also works, because the restated `def` simply rebinds the name after the prompt's docstring-only version.
- Each program runs in a fresh `python -I` in its own temporary directory (removed afterwards), in a new session
  so a timeout kills everything it started, with stdin closed and its output discarded. The child caps its
  address space (RLIMIT_AS) and file size before the program starts, and stubs out sockets, process spawning,
  signalling and file deletion. This is a guard against accidents, not a security boundary.
- "passed" needs the program to run to the end: an exception, `sys.exit()`, a crash, a timeout or a syntax error
  all score 0. The child proves it finished by printing a per-run random token the program cannot see.
- Both protocols run the same way; the default timeout is the protocol's 3 s.
- pass@k = 1 - C(n-c, k) / C(n, k), computed as a product (no huge binomials); 1.0 whenever n - c < k.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from nvlm.eval.metrics import check_protocol

TIMEOUT_S = 3.0
MEMORY_LIMIT_BYTES = 2 * 1024**3
_FILE_SIZE_LIMIT_BYTES = 16 * 1024**2

# Runs in the child as `python -I -c _BOOTSTRAP <program path> <memory limit> <token>`. It keeps a private copy of
# the stdout pipe for its verdict, points fds 1 and 2 at /dev/null, applies the limits and stubs, then runs the
# program as __main__ in a fresh namespace.
_BOOTSTRAP = r"""
def _main():
    import builtins, os, resource, shutil, socket, subprocess, sys
    path, mem, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    del sys.argv[1:]
    verdict = os.fdopen(os.dup(1), "w")
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_FSIZE, (%(fsize)d, %(fsize)d))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with open(path) as f:
        source = f.read()

    def blocked(*args, **kwargs):
        raise PermissionError("disabled in the HumanEval sandbox")

    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            blocked()

    socket.socket = NoSocket
    for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
        setattr(socket, name, blocked)
    subprocess.Popen = blocked
    for name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "putenv", "unsetenv", "remove", "unlink",
                 "rmdir", "removedirs", "rename", "renames", "replace", "truncate", "chmod", "chown", "setuid",
                 "execv", "execve", "execvp", "execvpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
                 "posix_spawn", "posix_spawnp"):
        if hasattr(os, name):
            setattr(os, name, blocked)
    shutil.rmtree = shutil.move = blocked
    builtins.exit = builtins.quit = None

    # The token lives only in this frame, so the program cannot print it from globals.
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
    except BaseException as e:
        verdict.write("failed: %%s: %%s\n" %% (type(e).__name__, e))
    else:
        verdict.write(token + "\n")
    verdict.flush()
    os._exit(0)


_main()
""" % {"fsize": _FILE_SIZE_LIMIT_BYTES}


def _completion_of(record: Mapping) -> str | None:
    completion = record.get("completion")
    return record.get("prediction") if completion is None else completion


def program_of(record: Mapping) -> str:
    """The text human-eval executes for one record."""
    return (
        str(record.get("prompt", ""))
        + str(_completion_of(record))
        + "\n"
        + str(record.get("test", ""))
        + "\n"
        + f"check({record.get('entry_point', '')})"
    )


def run_program(program: str, *, timeout: float = TIMEOUT_S, memory_limit: int = MEMORY_LIMIT_BYTES) -> str:
    """Run `program` sandboxed; returns "passed", "timed out" or "failed: ..."."""
    token = secrets.token_hex(16)
    workdir = tempfile.mkdtemp(prefix="nvlm-humaneval-")
    try:
        path = os.path.join(workdir, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        env = {"PATH": os.environ.get("PATH", ""), "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _BOOTSTRAP, path, str(memory_limit), token],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return "timed out"
        finally:
            _kill_group(proc)  # whatever the program left behind in its session
        verdict = out.decode("utf-8", "replace").strip()
        if verdict == token:
            return "passed"
        if verdict.startswith("failed:"):
            return verdict
        return f"failed: exit status {proc.returncode}"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def check(record: Mapping, *, timeout: float = TIMEOUT_S, memory_limit: int = MEMORY_LIMIT_BYTES) -> str:
    """human-eval's result string for one record; a record with no completion fails without running."""
    if _completion_of(record) is None or not record.get("entry_point"):
        return "failed: no completion or entry point"
    return run_program(program_of(record), timeout=timeout, memory_limit=memory_limit)


def score(record: Mapping, protocol: str = "nvlm", *, timeout: float = TIMEOUT_S) -> float:
    check_protocol(protocol)
    return float(check(record, timeout=timeout) == "passed")


def score_batch(
    records: Sequence[Mapping], protocol: str = "nvlm", *, timeout: float = TIMEOUT_S, workers: int = 2
) -> list[float]:
    """Scores in input order; `workers` programs run at once."""
    check_protocol(protocol)
    if workers <= 1 or len(records) <= 1:
        return [score(r, protocol, timeout=timeout) for r in records]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda r: score(r, protocol, timeout=timeout), records))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one task with n samples of which c pass: 1 - prod_{i=n-c+1..n} (1 - k/i)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def aggregate(records: Sequence[Mapping], scores: Sequence[float], protocol: str = "nvlm") -> dict:
    """pass@k ×100 averaged over tasks, for k in (1, 10, 100) where every task has at least k samples.

    "score" is pass@1. Samples of one task share its `task_id`.
    """
    check_protocol(protocol)
    per_task: dict[str, list[int]] = {}
    for i, (r, s) in enumerate(zip(records, scores)):
        n_c = per_task.setdefault(str(r.get("task_id", i)), [0, 0])
        n_c[0] += 1
        n_c[1] += int(s >= 1.0)
    out: dict = {"score": 0.0, "n": len(scores), "tasks": len(per_task)}
    if not per_task:
        return out
    for k in (1, 10, 100):
        if all(n >= k for n, _ in per_task.values()):
            mean = sum(pass_at_k(n, c, k) for n, c in per_task.values()) / len(per_task)
            out[f"pass@{k}"] = 100.0 * mean
    out["score"] = out["pass@1"]
    return out
