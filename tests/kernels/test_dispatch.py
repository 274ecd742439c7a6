"""The kernel backend: set once from train.kernels, SLIMTUNE_KERNELS overrides it (validated), and a leftover
TRITON_INTERPRET=1 on a real run is warned about."""

import contextvars
import warnings

import pytest
import torch

from slimtune.errors import ConfigError
from slimtune.kernels import dispatch


@pytest.fixture(autouse=True)
def _restore(monkeypatch):
    monkeypatch.setattr(dispatch, "BACKEND", contextvars.ContextVar("slimtune_kernels", default=None))
    monkeypatch.delenv("SLIMTUNE_KERNELS", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernel tests' conftest sets it; these tests choose


def test_config_key_sets_the_backend_and_env_overrides(monkeypatch):
    assert dispatch.configure("reference") == "reference"
    assert not dispatch.use_triton(torch.zeros(2))
    monkeypatch.setenv("SLIMTUNE_KERNELS", "triton")
    assert dispatch.configure("reference") == "triton"
    monkeypatch.setenv("SLIMTUNE_KERNELS", "fast")
    with pytest.raises(ConfigError, match="SLIMTUNE_KERNELS='fast' is not one of: auto, reference, triton"):
        dispatch.configure("auto")


def test_backend_is_read_once_not_per_call(monkeypatch):
    dispatch.configure("reference")
    monkeypatch.setenv("SLIMTUNE_KERNELS", "triton")  # too late: configure() already ran
    assert dispatch.kernel_backend() == "reference"


def test_unconfigured_process_reads_the_environment(monkeypatch):
    monkeypatch.setenv("SLIMTUNE_KERNELS", "reference")
    assert dispatch.kernel_backend() == "reference"


def test_using_scopes_the_backend_to_a_block_and_a_run_to_its_own_context():
    import contextvars

    dispatch.configure("auto")
    with dispatch.using("reference"):
        assert dispatch.kernel_backend() == "reference"
        assert not dispatch.use_triton(torch.zeros(2))
    assert dispatch.kernel_backend() == "auto"
    contextvars.copy_context().run(dispatch.configure, "reference")  # what trainer.run does for its run
    assert dispatch.kernel_backend() == "auto"
    with pytest.raises(ConfigError, match="kernel backend 'fast' is not one of"):
        with dispatch.using("fast"):
            pass


def test_leftover_interpreter_is_warned_about(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.warns(UserWarning, match="TRITON_INTERPRET=1 is set"):
        dispatch.configure("auto", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dispatch.configure("auto", torch.device("cpu"))


def test_triton_on_cpu_without_interpreter_is_a_config_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    dispatch.configure("triton")
    with pytest.raises(ConfigError, match="train.kernels=triton on CPU tensors needs TRITON_INTERPRET=1"):
        dispatch.use_triton(torch.zeros(2))
