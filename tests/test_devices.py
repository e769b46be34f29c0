"""`MONOSCOPE_CPU_BF16`: the override of the CPU bf16 rule behind `auto` (the suite itself runs with 0)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from monoscope import devices
from monoscope.errors import MonoscopeError


@pytest.fixture(autouse=True)
def _fresh_rule() -> Iterator[None]:
    """The CPU rule is cached per process: read the environment anew, and leave no test's answer behind."""
    devices._cpu_has_native_bf16.cache_clear()
    yield
    devices._cpu_has_native_bf16.cache_clear()


@pytest.mark.parametrize(("value", "bf16"), [("0", False), ("1", True)])
def test_env_forces_the_cpu_rule(monkeypatch: pytest.MonkeyPatch, value: str, bf16: bool) -> None:
    monkeypatch.setenv(devices.CPU_BF16_ENV, value)
    assert devices.bf16_is_fast("cpu") is bf16


def test_bad_env_value_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(devices.CPU_BF16_ENV, "yes")
    with pytest.raises(MonoscopeError, match=r"^MONOSCOPE_CPU_BF16='yes': use 0 \(float32 on the CPU\), 1 \(bf16\) "
                                             r"or leave it unset \(bf16 where the CPU has AMX or AVX512-BF16\)$"):
        devices.bf16_is_fast("cpu")


def test_freed_cpu_memory_is_kept_on_glibc_unless_opted_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """The allocator setting applies on glibc (this suite's Linux), once per process, and `MONOSCOPE_CPU_MALLOC=0`
    leaves the allocator alone."""
    import platform

    devices.keep_freed_cpu_memory.cache_clear()
    monkeypatch.setenv(devices.CPU_MALLOC_ENV, "0")
    assert devices.keep_freed_cpu_memory() is False
    devices.keep_freed_cpu_memory.cache_clear()
    monkeypatch.delenv(devices.CPU_MALLOC_ENV)
    assert devices.keep_freed_cpu_memory() is (platform.libc_ver()[0] == "glibc")
