"""The CPU allocator settings are accepted by glibc (the CI and GPU machines run glibc)."""

import platform

import pytest

from lmfleet.worker.model.cpu_allocator import keep_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_glibc_accepts_the_settings_and_applying_them_twice_is_harmless():
    assert keep_freed_memory()
    assert keep_freed_memory()
