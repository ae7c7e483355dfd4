"""``sortednet`` as a fresh process, without importing torch each time: the tests' CLI calls (conftest's
``cli``) go through a fork server.

Most of a tiny CLI call is importing torch (2-3 s of CPU on these machines), and the suite makes a few
hundred calls. Each pytest process starts one server (``python tests/forkrun.py SOCKET``) that imports
the heavy third-party modules once (:data:`PRELOAD`: never ``sortedcli``, which reads its environment
when imported, nor transformers / huggingface_hub, which read ``HF_*``) and then only forks. A call is
still a process of its own, with a new session, its own arguments, folder, environment, stdin
``/dev/null`` and the caller's pipes as stdout / stderr, running ``python -m sortedcli.cli`` as the
interpreter does (``runpy`` as ``__main__``; an uncaught exception prints its traceback and exits 1; a
``SystemExit`` message goes to stderr; atexit handlers run). The server forks a waiter, which forks
the call and reports its exit status (a signal as ``-N``, as ``subprocess`` does).

What a warm interpreter cannot reproduce runs as a plain subprocess instead: a call whose environment
differs from the server's in a variable read when those modules are imported (:data:`IMPORT_TIME`),
and every call when ``SORTEDNET_TEST_FORK=0``. What start-up itself does (what is imported before a
refusal, the console script) is tested with plain subprocesses (``test_startup.py``, ``test_install.py``).
"""

from __future__ import annotations

import atexit
import json
import locale
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

PRELOAD = ("torch", "torchvision", "numpy", "omegaconf", "hydra", "rich", "safetensors", "matplotlib", "yaml",
           "PIL")
#: prefixes of the environment variables that these modules (or the interpreter, or the C libraries they
#: load) read once, when they start
IMPORT_TIME = ("OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS", "CUDA", "TORCH", "PYTORCH", "PYTHON", "LD_", "MPL",
               "NUMEXPR", "NCCL", "CUBLAS", "HYDRA", "GLIBC", "MALLOC", "HOME", "XDG_", "TMPDIR", "TEMP", "TMP",
               "LANG", "LC_")


def _sensitive(env: dict) -> dict:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME)}


# --- the server ---------------------------------------------------------------------------------------


def serve(path: str) -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the waiters: reaped by the kernel
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(path + ".tmp")
    server.listen(64)
    os.rename(path + ".tmp", path)  # the client connects once the socket is there, and listening
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getppid()
    server.settimeout(2.0)
    while True:
        try:
            conn, _ = server.accept()
        except socket.timeout:
            if os.getppid() != parent:  # the pytest process is gone (killed, crashed): so is its server
                return
            continue
        conn.settimeout(None)
        try:
            msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 2)
        except OSError:
            conn.close()
            continue
        if not msg:  # a client that connected and went away without asking anything
            conn.close()
            continue
        if os.fork() == 0:
            server.close()
            _wait(conn, json.loads(msg), fds)
        conn.close()
        for fd in fds:
            os.close(fd)


def _wait(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """The waiter: forks the call, tells the client its pid, then its exit status."""
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        pid = os.fork()
        if pid == 0:
            conn.close()
            _call(request, fds)
        for fd in fds:
            os.close(fd)
        conn.send(json.dumps({"pid": pid}).encode())
        _, status = os.waitpid(pid, 0)
        conn.send(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode())
    finally:
        os._exit(0)


def _call(request: dict, fds: list[int]) -> None:
    """The call itself, as ``python -m sortedcli.cli ARGS`` would run it; never returns."""
    import runpy

    code = 1
    try:
        os.setsid()
        # the interpreter's own start-up: Ctrl-C raises KeyboardInterrupt, SIGPIPE and SIGXFSZ ignored, the rest
        # as the system has them
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_IGN)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        for fd in (null, *fds):
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["sortedcli.cli", *request["args"]]
        sys.path[0] = os.getcwd()  # ``python -m``: the working folder first
        try:
            runpy.run_module("sortedcli.cli", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except KeyboardInterrupt:
            sys.excepthook(*sys.exc_info())
            _finish()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)  # as the interpreter exits on an uncaught Ctrl-C
        except BaseException:
            sys.excepthook(*sys.exc_info())
            code = 1
        _finish()
    finally:
        os._exit(code & 0xFF)


def _finish() -> None:
    """What the interpreter does on the way out: wait for non-daemon threads, run atexit, flush."""
    try:
        threading._shutdown()
    except Exception:
        pass
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


# --- the client ---------------------------------------------------------------------------------------

_server: dict = {}
_lock = threading.Lock()


def _start(env: dict) -> str:
    """The socket path of this process's server, started on first use with ``env``."""
    with _lock:
        if "path" in _server:
            return _server["path"]
        folder = tempfile.mkdtemp(prefix="sortednet-fork-")
        path = os.path.join(folder, "sock")
        log = open(os.path.join(folder, "server.log"), "w")
        proc = subprocess.Popen([sys.executable, __file__, path], env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, start_new_session=True)
        deadline = time.monotonic() + 120
        while not os.path.exists(path):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"the CLI fork server did not start: see {log.name}")
            time.sleep(0.02)
        _server.update(path=path, sensitive=_sensitive(env), proc=proc)
        atexit.register(_stop)
        return path


def _stop() -> None:
    proc = _server.get("proc")
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


def run(args: list[str], cwd, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """``python -m sortedcli.cli ARGS`` in ``cwd`` with ``env``: its CompletedProcess (text output), or
    ``subprocess.TimeoutExpired`` after ``timeout`` seconds (the call's whole session killed)."""
    argv = [sys.executable, "-m", "sortedcli.cli", *map(str, args)]
    if os.environ.get("SORTEDNET_TEST_FORK", "1") == "0" or os.name != "posix":
        return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    path = _start(env)
    if _sensitive(env) != _server["sensitive"]:
        return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}

    def drain(fd):
        with os.fdopen(fd, "rb") as f:
            for block in iter(lambda: f.read1(1 << 16), b""):
                chunks[fd].append(block)

    readers = [threading.Thread(target=drain, args=(fd,), daemon=True) for fd in (out_r, err_r)]
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
        conn.connect(path)
        request = {"args": [str(a) for a in args], "cwd": os.path.abspath(cwd), "env": dict(env)}
        socket.send_fds(conn, [json.dumps(request).encode()], [out_w, err_w])
        os.close(out_w)
        os.close(err_w)
        for t in readers:
            t.start()
        conn.settimeout(timeout)
        pid = json.loads(conn.recv(1 << 16))["pid"]
        try:
            reply = conn.recv(1 << 16)
        except socket.timeout:
            os.killpg(pid, signal.SIGKILL)
            conn.settimeout(None)
            conn.recv(1 << 16)
            for t in readers:
                t.join()
            raise subprocess.TimeoutExpired(argv, timeout, b"".join(chunks[out_r]), b"".join(chunks[err_r]))
        returncode = json.loads(reply)["returncode"]
    for t in readers:
        t.join()
    # as subprocess's text mode reads them: the locale's encoding, universal newlines
    text = [b"".join(chunks[fd]).decode(locale.getpreferredencoding(False)).replace("\r\n", "\n").replace("\r", "\n")
            for fd in (out_r, err_r)]
    return subprocess.CompletedProcess(argv, returncode, text[0], text[1])


if __name__ == "__main__":
    serve(sys.argv[1])
