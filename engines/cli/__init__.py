"""`python -m engines COMMAND`: the headless face of the playground.

Subcommands live in engines/cli/, one module each with `add_arguments(parser)` and
`run(args) -> int`, imported only when chosen so that `--help` and `list` stay fast.

Also here: `ProcessOwner`, which the app (app/__main__.py) and every command run inside, so that no
engine process outlives them (below).
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

from engines.protocol import EngineError

COMMANDS = {
    "list": ("engines.cli.list_engines", "list every variant, available or not, and why"),
    "generate": ("engines.cli.generate", "stream one prompt through one engine, then print its stats"),
    "bench": ("engines.cli.bench", "benchmark engines: speed, memory, roofline and quality tables and plots"),
    "load": ("engines.cli.load", "N simultaneous requests against one engine: aggregate tok/s, TTFT, peak KV"),
    "kv": ("engines.cli.kv", "KV-cache size per token and per context, and how many tokens fit in memory"),
    "survey": ("engines.cli.survey", "the survey's tables and conclusions for one model, beside its quoted figures"),
    "plan": ("engines.cli.plan", "device memory per engine, vLLM shares and whether a set fits, before loading"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engines", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not _is_entry_point():  # called as a library (the tests): the caller owns its processes
        return _run(args)
    with ProcessOwner() as owner:
        status = _run(args)
    return owner.exit_status or status


def _run(args: argparse.Namespace) -> int:
    try:
        return importlib.import_module(COMMANDS[args.command][0]).run(args)
    except EngineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return 130


def _is_entry_point() -> bool:
    """Whether this process was started as `python -m engines`."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == "engines.__main__"


# Engine processes end with the process that started them -----------------------------------------
# vLLM runs its engine core in a child process, which starts the workers. A Python process ended by
# SIGTERM runs no cleanup, so they lived on, reparented to init. Inside a ProcessOwner, SIGTERM and
# SIGINT unwind the main thread like Ctrl-C; the engines are unloaded (`unload`, and the commands' own
# `finally: engine.unload()`, given 2.5 s), then every descendant still there is terminated and, after
# 3 s, killed: 5-9 s after the signal on 2 busy cores, a second signal at once. A watchdog process
# does the same if this one is killed outright (SIGKILL, the out-of-memory killer): it notes this
# process's descendants twice a second and ends them when its parent is gone.
# prctl(PR_SET_PDEATHSIG) would need code in every child and fires when the *thread* that started the
# child ends; vLLM starts its engine core from whichever thread loads it (in the app, a pane's
# short-lived worker thread), so it would kill a working engine.
UNLOAD_BUDGET_S = 2.5
TERMINATE_WAIT_S = 3.0
KILL_WAIT_S = 1.0
EXIT_GRACE_S = 0.5
WATCH_INTERVAL_S = 0.5
# multiprocessing's resource tracker ignores SIGTERM and exits by itself once every process holding its
# pipe is gone, unlinking the shared memory they leaked; killing it first would leave that memory behind.
RESOURCE_TRACKER = "multiprocessing.resource_tracker"


def _is_gone(process) -> bool:
    import psutil
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _wait_gone(processes: list, wait_s: float) -> list:
    deadline = time.monotonic() + wait_s
    while True:
        for process in processes:  # reaps this process's own children (psutil waits on them with waitpid)
            try:
                process.wait(timeout=0)
            except Exception:  # not ended yet, not our child, or already reaped
                pass
        alive = [process for process in processes if not _is_gone(process)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def end_processes(processes: list, wait_s: float = TERMINATE_WAIT_S) -> list[int]:
    """Terminate the psutil processes (resource trackers excepted, see RESOURCE_TRACKER), wait up to
    wait_s until they are gone (a zombie counts), kill what is left; the pids that needed the kill."""
    import psutil
    processes = [process for process in processes if not _is_resource_tracker(process)]
    for process in processes:
        try:
            process.terminate()
        except psutil.Error:
            pass
    alive = _wait_gone(processes, wait_s)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    _wait_gone(alive, KILL_WAIT_S)
    return [process.pid for process in alive]


def _is_resource_tracker(process) -> bool:
    try:
        return any(RESOURCE_TRACKER in part for part in process.cmdline())
    except Exception:
        return False


def descendants() -> list:
    import psutil
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def watch_parent(parent_pid: int) -> None:
    """The watchdog's loop (a process of its own, started by ProcessOwner): note the parent's descendants
    every WATCH_INTERVAL_S; once the parent is gone, end those still running and what they started since."""
    import psutil
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the parent's to handle
    try:
        parent = psutil.Process(parent_pid)
    except psutil.NoSuchProcess:
        return
    known: list = []
    while os.getppid() == parent_pid:
        try:
            known = [child for child in parent.children(recursive=True) if child.pid != os.getpid()]
        except psutil.Error:
            pass
        time.sleep(WATCH_INTERVAL_S)
    found = {}
    for process in known:  # is_running() compares start times, so a reused pid is left alone
        try:
            if process.is_running():
                found[process.pid] = process
                found.update((child.pid, child) for child in process.children(recursive=True))
        except psutil.Error:
            pass
    end_processes(list(found.values()))


def _flush_and_exit(status: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


class ProcessOwner:
    """`with ProcessOwner(unload) as owner:` around a process's whole work (the app, a command), in the
    process's entry point only: leaving the block ends every descendant of the process. `unload`
    (settable later, once the engines exist) frees the engines; `exit_status` is 128 + the signal that
    ended the work, or 0. After a signal the process ends when the block is left (os._exit, once the
    engines are unloaded and their processes ended). Signal handlers are installed only from the main
    thread."""

    def __init__(self, unload: Callable[[], object] | None = None):
        self.unload = unload
        self.signal_number: int | None = None
        self._lock = threading.Lock()
        self._is_unloaded = False
        self._is_swept = threading.Event()
        self._main_done = threading.Event()
        self._previous_handlers: dict = {}
        self._watchdog: subprocess.Popen | None = None

    @property
    def exit_status(self) -> int:
        return 128 + self.signal_number if self.signal_number else 0

    def __enter__(self) -> "ProcessOwner":
        # Its own session, so a signal sent to this process group does not end it before its work.
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", f"from engines.cli import watch_parent; watch_parent({os.getpid()})"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc_info) -> bool:
        self._main_done.set()
        if self.signal_number is None:
            self._unload(time.monotonic() + UNLOAD_BUDGET_S)
            self._sweep()
        else:  # the shutdown thread unloads and sweeps; it is bounded
            self._is_swept.wait(UNLOAD_BUDGET_S + TERMINATE_WAIT_S + 2)
            # Nothing is left to save, and the interpreter's own teardown of torch and vLLM can take seconds
            # more (7 s after a vLLM run on 2 cores), so the process ends here.
            _flush_and_exit(self.exit_status)
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        return False

    def _on_signal(self, signum, frame) -> None:
        if self._main_done.is_set():  # already cleaning up, within its bounds
            return
        if self.signal_number is not None:  # a second signal: no more waiting
            end_processes(descendants(), wait_s=0)
            _flush_and_exit(128 + signum)
        self.signal_number = signum
        # No printing here: a handler that writes while the main thread is writing can raise instead.
        threading.Thread(target=self._after_signal, name="shutdown", daemon=True).start()
        raise KeyboardInterrupt

    def _after_signal(self) -> None:
        started = time.monotonic()
        print(f"\n{signal.Signals(self.signal_number).name}: unloading the engines and ending their processes",
              file=sys.stderr)
        deadline = started + UNLOAD_BUDGET_S
        self._unload(deadline)
        self._main_done.wait(max(0.0, deadline - time.monotonic()))  # e.g. a command's finally: unload()
        self._sweep()
        print(f"shutdown: engines unloaded and child processes ended {time.monotonic() - started:.1f} s after the "
              f"signal", file=sys.stderr)
        time.sleep(EXIT_GRACE_S)  # the main thread normally gets here first (__exit__)
        _flush_and_exit(self.exit_status)

    def _unload(self, deadline: float) -> None:
        with self._lock:
            if self._is_unloaded or self.unload is None:
                return
            self._is_unloaded = True
        worker = threading.Thread(target=self._unload_quietly, name="shutdown-unload", daemon=True)
        worker.start()
        worker.join(max(0.0, deadline - time.monotonic()))

    def _unload_quietly(self) -> None:
        try:
            self.unload()
        except Exception as error:  # shutting down regardless; the sweep ends what is left
            print(f"unload at shutdown failed: {type(error).__name__}: {error}", file=sys.stderr)

    def _sweep(self) -> None:
        with self._lock:
            if self._is_swept.is_set():
                return
            processes = descendants()
            killed = end_processes(processes)
            if killed:
                print(f"shutdown: {len(killed)} of {len(processes)} child processes needed SIGKILL", file=sys.stderr)
            self._is_swept.set()
