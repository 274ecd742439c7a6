"""The offload engine's update thread (units stepped in submission order) and a patch handle."""

from __future__ import annotations

import contextvars
import queue
import threading


class Restore:
    """A handle putting a patched attribute back (like a hook handle's remove())."""

    def __init__(self, obj, attr: str, value):
        self.obj, self.attr, self.value = obj, attr, value

    def remove(self) -> None:
        if self.attr in vars(self.obj):
            delattr(self.obj, self.attr)  # the instance attribute goes; the class's method shows again


class Worker:
    """One thread running unit updates in submission order; `wait_for(unit)` blocks until that unit's queued
    update is done (a read of its new version must not start before). close() stops the thread."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue()
        # back-pressure: one unit's update at a time; backward may finish the next unit's gradients meanwhile,
        # but waits there (so at most two units' gradients exist at once)
        self.slot = threading.Semaphore(1)
        self.pending: dict[str, threading.Event] = {}
        self.error: BaseException | None = None
        self.stopping = False  # set by close(): queued updates are dropped
        # the updates run in the caller's context (its kernel backend: kernels/dispatch.py)
        self.thread = threading.Thread(
            target=contextvars.copy_context().run, args=(self._run,), daemon=True, name="slimtune-update"
        )
        self.thread.start()

    def submit(self, unit: str, fn, backpressure: bool = True) -> None:
        """Queue `fn` as `unit`'s update. backpressure: wait while another update runs (a backward's update
        holds that unit's gradients in memory); False for one that reads its gradients itself (clipping)."""
        self._raise()
        if backpressure:
            self.slot.acquire()
        done = threading.Event()
        self.pending[unit] = done
        self.q.put((unit, fn, done, backpressure))

    def _run(self) -> None:
        while True:
            task = self.q.get()
            if task is None:  # close()
                self.q.task_done()
                return
            self._do(*task)
            del task  # waiting for the next one must not keep this one's closure (streamer, buffers, model) alive

    def _do(self, unit: str, fn, done: threading.Event, slot: bool) -> None:
        try:
            if self.error is None and not self.stopping:
                fn()
        except BaseException as e:  # noqa: BLE001 - surfaced on the main thread at the next submit / wait
            self.error = e
        finally:
            done.set()
            if slot:
                self.slot.release()
            self.q.task_done()

    def close(self) -> None:
        """Stop the thread once the update running now (if any) is done; queued ones are dropped (as after a
        crash: the last checkpoint is what resumes), an error not yet raised is dropped too."""
        self.stopping = True
        if self.thread.is_alive():
            self.q.put(None)
            self.thread.join()
        self.error = None

    def is_pending(self, unit: str) -> bool:
        ev = self.pending.get(unit)
        return ev is not None and not ev.is_set()

    def wait_for(self, unit: str) -> None:
        ev = self.pending.get(unit)
        if ev is not None and threading.current_thread() is not self.thread:
            ev.wait()
        self._raise()

    def drain(self) -> None:
        self.q.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            e, self.error = self.error, None
            raise e
