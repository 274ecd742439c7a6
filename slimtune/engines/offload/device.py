"""The accelerator side of the offload engine: compute copies of the loaded units on the GPU.

The store, the buffer pool and the optimizer step stay on the host (ZeRO-Infinity's split): a unit is read
from disk into a pinned host slab (the fp32 master weights / frozen weights), copied to a device buffer of the
same size class on a separate copy stream, and the compute stream waits for that copy only (an event), not
the host. Gradients go the other way on the copy stream into pinned host buffers; the update thread waits for
their event, steps on the host copy and writes it to the store. Device buffers are allocated once per size
class (as the host pool) and reused; a buffer given back is reused only after the compute that read it
(an event recorded at release, waited for on the copy stream, so the host never blocks on it).

On a CPU-only machine the same mirror can run "staged": device buffers are separate host buffers and the
copies are synchronous. The engine then computes on copies distinct from the master weights, exactly as on
a GPU, which is how the tests check this path without one.
"""

from __future__ import annotations

import threading

import torch

from slimtune.engines.offload.store import ALIGN


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class DeviceMirror:
    def __init__(self, device: torch.device, classes: dict[str, tuple[int, int]]):
        """classes: size class -> (bytes per buffer, number of buffers), as the host pool's layer classes."""
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._free = {
            c: [(torch.empty(size, dtype=torch.uint8, device=device), None) for _ in range(count)]
            for c, (size, count) in classes.items()
        }
        self.nbytes = sum(size * count for size, count in classes.values())
        self._cond = threading.Condition()

    def _event(self):
        return torch.cuda.Event() if self.cuda else None

    def _acquire(self, cls: str):
        with self._cond:
            while not self._free[cls]:
                self._cond.wait()
            return self._free[cls].pop()

    def upload(self, cls: str, host: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor], object]:
        """Copy `host` tensors into one device buffer of class `cls`: (buffer, name -> device view, event the
        compute stream must wait for)."""
        buf, released = self._acquire(cls)
        views, offset = {}, 0
        for name, t in host.items():
            n = t.numel() * t.element_size()
            views[name] = buf[offset : offset + n].view(t.dtype).view(t.shape)
            offset += _align(n)
        if not self.cuda:
            for name, t in host.items():
                views[name].copy_(t)
            return buf, views, None
        with torch.cuda.stream(self.stream):
            if released is not None:
                self.stream.wait_event(released)  # the compute that last read this buffer is done
            for name, t in host.items():
                views[name].copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return buf, views, done

    def wait(self, event) -> None:
        """The compute stream waits for `event` (no host block)."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def release(self, cls: str, buf: torch.Tensor) -> None:
        """Give a buffer back; on CUDA it is reused only after the compute enqueued so far (which may read it)."""
        ev = None
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
        with self._cond:
            self._free[cls].append((buf, ev))
            self._cond.notify_all()

    def download(self, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], object]:
        """Device tensors -> pinned host copies on the copy stream, after the compute that produced them:
        (name -> host tensor, event to synchronize on before reading them on the host)."""
        if not self.cuda:
            return {n: t.detach().clone() for n, t in tensors.items()}, None
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))
        out = {}
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            for n, t in tensors.items():
                out[n] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                out[n].copy_(t, non_blocking=True)
                t.record_stream(self.stream)  # the device tensor lives until this copy is done
            done = torch.cuda.Event()
            done.record(self.stream)
        return out, done

    def to_device(self, host: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
        """A synchronous copy to the device (setup, resume, the resident unit after its update)."""
        if into is None:
            return host.to(self.device, copy=True)
        into.copy_(host)
        return into


def synchronize(event) -> None:
    if event is not None:
        event.synchronize()


def pin(slab_data: torch.Tensor):
    """Page-lock a host slab in place (cudaHostRegister keeps its page alignment, which O_DIRECT needs); returns
    the call that unregisters it (BufferPool.close, before the slab's memory is unmapped)."""
    cudart, ptr = torch.cuda.cudart(), slab_data.data_ptr()
    err = cudart.cudaHostRegister(ptr, slab_data.numel(), 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister failed ({err}) for a {slab_data.numel()}-byte slab")
    return lambda: cudart.cudaHostUnregister(ptr)
