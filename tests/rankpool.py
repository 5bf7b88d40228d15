"""Run one function on N gloo ranks, so that each multi-rank case is its own pytest test.

    from rankpool import on_ranks

    @on_ranks(2, 4)
    def test_large_capacity_equals_dropless():
        group = dist.group.WORLD  # runs on every rank, inside the default process group
        ...
        assert torch.equal(out_b, out_a)

`on_ranks(*world_sizes, timeout=...)` turns a module-level function into a
test parametrised over the world sizes (ids "2ranks", "4ranks") and marked
`dist`, so `-k` selects it and it reports its own failure. The function's own
parameters are pytest's (fixtures such as tmp_path, or arguments of a
`pytest.mark.parametrize` above it); their values are pickled to every rank.

The ranks are a pool of persistent processes per world size (the session
fixture `rank_pools`, conftest.py), forked from one zygote process that has
imported torch once: a pool starts in about a second, and a case then costs
only its own work. A test sends its module and function name to every rank;
each rank imports the module (with pytest's assertion rewriting, so a failed
`assert` shows its values), seeds torch's default generator with 0, runs the
function and answers "passed" or its traceback. The test fails with every failing
rank's traceback and what it printed, or after `timeout` seconds naming the
ranks that did not answer. A failure leaves ranks out of step in their
collectives, so after a failure or a timeout the pool is killed and the next
test starts a fresh one. At the end of the session every rank leaves through
ep.shutdown (gc, barrier, destroy the group) and exits 0.

Run as a script, this file is the zygote (`_zygote`); each rank runs `_serve`.
"""

from __future__ import annotations

import ast
import gc
import importlib.util
import inspect
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 120  # four ranks importing torch at once on a busy 2-core machine
GRACE_S = 3.0  # after one rank fails, how long the others get to answer before the pool is killed
GROUP_TIMEOUT_S = 60  # a collective whose peer is stuck raises after this


def on_ranks(*world_sizes: int, timeout: float = 180):
    """Decorator: run the function as a test on each of `world_sizes` ranks (see the module doc)."""
    import pytest

    def decorate(case):
        case_parameters = list(inspect.signature(case).parameters.values())

        def test(rank_pools, world_size, **kwargs):
            rank_pools.run(world_size, case.__module__, case.__name__, kwargs, timeout)

        test.__name__, test.__qualname__, test.__doc__ = case.__name__, case.__qualname__, case.__doc__
        test.__module__ = case.__module__
        keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD
        test.__signature__ = inspect.Signature(
            [inspect.Parameter("rank_pools", keyword), inspect.Parameter("world_size", keyword)]
            + [p.replace(kind=keyword) for p in case_parameters]
        )
        test.pytestmark = list(getattr(case, "pytestmark", []))
        test.case = case
        ids = [f"{n}ranks" for n in world_sizes]
        return pytest.mark.dist(pytest.mark.parametrize("world_size", world_sizes, ids=ids)(test))

    return decorate


class RankPools:
    """One pool of rank processes per world size, started on first use, all forked from one zygote."""

    def __init__(self, env: dict | None = None):
        self.env = env or {}
        self.zygote: Zygote | None = None
        self.pools: dict[int, RankPool] = {}

    def run(self, world_size: int, module: str, name: str, kwargs: dict, timeout: float) -> None:
        if self.zygote is None:
            self.zygote = Zygote(self.env)
        pool = self.pools.get(world_size)
        if pool is None or not pool.conns:
            pool = self.pools[world_size] = RankPool(world_size, self.zygote)
        pool.run(module, name, kwargs, timeout)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()
        if self.zygote is not None:
            self.zygote.close()
            self.zygote = None


class Zygote:
    """A process that has imported torch and expert_parallel once and forks rank processes on request.

    NOTE: a fork costs milliseconds where a new Python that imports torch costs
    seconds per rank (tens of seconds for 4 ranks on a busy 2-core machine).
    The zygote runs no torch operation and, with OMP_NUM_THREADS=1, has no
    thread but its main one, so its forks are safe.
    """

    def __init__(self, env: dict):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        zygote_env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            **env,
        )
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "zygote", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=zygote_env,
        )
        theirs.close()
        self.sock = ours

    def fork(self, rank_env: dict, conn_fd: int, log_fd: int) -> int:
        """Fork a rank with `rank_env` added to its environment, driven over conn_fd, printing to log_fd."""
        try:
            socket.send_fds(self.sock, [repr(rank_env).encode()], [conn_fd, log_fd])
            answer = self.sock.recv(64)
        except OSError:
            answer = b""
        if not answer:
            self.proc.wait()
            output = os.pread(self.log.fileno(), 1 << 16, 0).decode(errors="replace")
            raise RuntimeError(f"the rank zygote exited with code {self.proc.returncode}:\n{output}")
        return int(answer)

    def close(self) -> None:
        self.sock.close()  # the zygote exits at the end of its socket
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class RankPool:
    """`world_size` rank processes in one gloo group, each driven over its own socket pair."""

    def __init__(self, world_size: int, zygote: Zygote):
        self.world_size = world_size
        self.procs: list[int] = []  # pids (children of the zygote, which reaps them)
        self.conns: list[Connection] = []
        self.exited: set[int] = set()  # ranks whose socket reached end of file
        self.logs = []
        port = _free_port()
        try:
            for rank in range(world_size):
                rank_env = dict(
                    RANK=str(rank),
                    WORLD_SIZE=str(world_size),
                    LOCAL_RANK=str(rank),
                    LOCAL_WORLD_SIZE=str(world_size),
                    MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port),
                )
                ours, theirs = socket.socketpair()
                log = tempfile.TemporaryFile()
                self.logs.append(log)
                self.conns.append(Connection(ours.detach()))
                self.procs.append(zygote.fork(rank_env, theirs.fileno(), log.fileno()))
                theirs.close()
            marks = [0] * world_size
            answers = self._collect(START_TIMEOUT_S)
            started = [r for r, a in answers.items() if a == ("ready", r)]
            if len(started) < world_size:
                raise RuntimeError(
                    self._report(f"a pool of {world_size} ranks did not start", answers, marks)
                )
        except BaseException:
            self.close(kill=True)
            raise

    def run(self, module: str, name: str, kwargs: dict, timeout: float) -> None:
        marks = self._marks()
        for conn in self.conns:
            conn.send((module, name, kwargs))
        answers = self._collect(timeout)
        outputs = self._outputs(marks)
        passed = [r for r, a in answers.items() if a[0] == "passed"]
        if len(passed) == self.world_size:
            for rank, output in enumerate(outputs):
                if output.strip():
                    print(f"--- rank {rank} ---\n{output}", end="" if output.endswith("\n") else "\n")
            return
        self.close(kill=True)  # ranks out of step (or stuck in a collective): the next test starts afresh
        import pytest

        pytest.fail(
            self._report(f"{name} on {self.world_size} ranks", answers, marks, outputs), pytrace=False
        )

    def close(self, kill: bool = False) -> None:
        """Stop every rank (ep.shutdown, exit 0) and kill any still running after 30 s (at once with kill)."""
        running = [r for r in range(len(self.conns)) if r not in self.exited]
        if not kill:
            for rank in running:
                try:
                    self.conns[rank].send(None)
                except OSError:
                    pass
            running = self._wait_for_exit(running, 30)
        for rank in running:
            # NOTE: its socket is still open, so the process is still alive and the pid still its own.
            try:
                os.kill(self.procs[rank], signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._wait_for_exit(running, 10)
        for conn in self.conns:
            conn.close()
        for log in self.logs:
            log.close()
        self.procs, self.conns, self.logs = [], [], []

    def _wait_for_exit(self, ranks: list[int], timeout: float) -> list[int]:
        """Wait until these ranks' sockets reach end of file (the process exited); those still running."""
        deadline = time.monotonic() + timeout
        running = {self.conns[r]: r for r in ranks}
        while running and (left := deadline - time.monotonic()) > 0:
            for conn in wait(list(running), timeout=left):
                try:
                    conn.recv()
                except (EOFError, OSError):
                    self.exited.add(running.pop(conn))
        return sorted(running.values())

    def _collect(self, timeout: float) -> dict[int, tuple]:
        """Each rank's answer, as they come; on the first failure the others get GRACE_S more."""
        answers: dict[int, tuple] = {}
        waiting = dict(enumerate(self.conns))
        deadline = time.monotonic() + timeout
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for conn in wait(list(waiting.values()), timeout=left):
                rank = next(r for r, c in waiting.items() if c is conn)
                del waiting[rank]
                try:
                    answers[rank] = conn.recv()
                except (EOFError, OSError):
                    self.exited.add(rank)
                    answers[rank] = ("died", "the rank process exited")
                if answers[rank][0] not in ("passed", "ready"):
                    deadline = min(deadline, time.monotonic() + GRACE_S)
        return answers

    def _marks(self) -> list[int]:
        return [os.fstat(log.fileno()).st_size for log in self.logs]

    def _outputs(self, marks: list[int]) -> list[str]:
        # NOTE: pread, not seek + read: the rank writes through the same file offset.
        sizes = self._marks()
        return [
            os.pread(log.fileno(), size - mark, mark).decode(errors="replace")
            for log, mark, size in zip(self.logs, marks, sizes)
        ]

    def _report(self, where: str, answers: dict, marks: list[int], outputs: list[str] | None = None) -> str:
        outputs = outputs if outputs is not None else self._outputs(marks)
        silent = [r for r in range(self.world_size) if r not in answers]
        lines = []
        for rank in range(self.world_size):
            kind, detail = answers.get(rank, ("no answer", ""))
            if kind in ("passed", "ready") or (kind == "no answer" and not outputs[rank].strip()):
                continue
            lines.append(f"--- rank {rank}: {kind} ---")
            if detail:
                lines.append(str(detail).rstrip())
            if outputs[rank].strip():
                lines.append(f"--- rank {rank} printed ---\n{outputs[rank][-3000:].rstrip()}")
        failed = sorted(r for r, a in answers.items() if a[0] not in ("passed", "ready"))
        head = f"{where}: rank(s) {failed} failed" if failed else where
        if silent:
            head += f"; rank(s) {silent} did not answer"
            head += " (killed after the first failure)" if failed else " within the timeout (killed)"
        return "\n".join([head, *lines])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _import(name: str):
    """Import a test module as pytest would: with its asserts rewritten to show their values."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    try:
        from _pytest.assertion.rewrite import rewrite_asserts
    except ImportError:  # another pytest: plain asserts still fail, only less verbosely
        return importlib.import_module(name)
    source = Path(spec.origin).read_bytes()
    tree = ast.parse(source, filename=spec.origin)
    rewrite_asserts(tree, source, spec.origin)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        exec(compile(tree, spec.origin, "exec", dont_inherit=True), module.__dict__)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _serve(fd: int) -> int:
    """One rank of a pool: join the group, then run each case sent until told to stop (None)."""
    import torch
    import torch.distributed as dist

    import expert_parallel as ep

    conn = Connection(fd)
    ep.init_distributed(timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    try:
        conn.send(("ready", dist.get_rank()))
        while (message := conn.recv()) is not None:
            module, name, kwargs = message
            case = None
            try:
                torch.manual_seed(0)
                case = getattr(_import(module), name)
                getattr(case, "case", case)(**kwargs)
                answer = ("passed", "")
            except BaseException as err:
                frames = err.__traceback__.tb_next  # from the case down, not this loop
                answer = ("failed", "".join(traceback.format_exception(type(err), err, frames)))
            del case
            gc.collect()  # graphs of this case that still reference the group go now
            sys.stdout.flush()
            sys.stderr.flush()
            conn.send(answer)
    finally:
        ep.shutdown()
    return 0


def rank_device():
    """This rank's device: its GPU under NCCL (EXPERT_PARALLEL_BACKEND=nccl), else the CPU."""
    import torch

    if os.environ.get("EXPERT_PARALLEL_BACKEND") == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _zygote(fd: int) -> int:
    """Import what every rank needs, then fork one rank per request until the pool closes the socket."""
    import _pytest.assertion.rewrite  # noqa: F401
    import hypothesis  # noqa: F401
    import torch  # noqa: F401

    import expert_parallel  # noqa: F401

    sock = socket.socket(fileno=fd)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the ranks
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(sock, 1 << 16, 2)
        except OSError:
            return 0
        if not message:
            return 0
        rank_env = ast.literal_eval(message.decode())
        conn_fd, log_fd = fds
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                sock.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                os.environ.update(rank_env)
                os.dup2(log_fd, 1)
                os.dup2(log_fd, 2)
                os.close(log_fd)
                code = _serve(conn_fd)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(conn_fd)
        os.close(log_fd)
        sock.send(str(pid).encode())


if __name__ == "__main__":
    sys.exit(_zygote(int(sys.argv[2])))
