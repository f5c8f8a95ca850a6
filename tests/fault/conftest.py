"""Fixtures of the fault tests."""

from tests.fault.support import small_disk  # noqa: F401 - a small ext4 that really fills up
