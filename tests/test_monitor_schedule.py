import pytest

from redundancy_monitor.errors import InvalidConfigError
from redundancy_monitor.monitoring.schedule import ProbeSchedule


def test_periodic_plus_log_spaced_steps_below_the_period():
    s = ProbeSchedule(every_n_steps=10, log_spaced=True)
    assert [k for k in range(35) if s.is_due(k)] == [0, 1, 2, 4, 8, 10, 20, 30]


def test_log_spaced_alone_keeps_doubling():
    s = ProbeSchedule(every_n_steps=None, log_spaced=True)
    assert [k for k in range(70) if s.is_due(k)] == [0, 1, 2, 4, 8, 16, 32, 64]


def test_explicit_steps_only():
    s = ProbeSchedule.explicit([7, 3, 3])
    assert s.steps == (3, 7)
    assert [k for k in range(20) if s.is_due(k)] == [3, 7]


@pytest.mark.parametrize("bad", [0, -5, 2.5])
def test_bad_period_is_a_clear_error(bad):
    with pytest.raises(InvalidConfigError) as info:
        ProbeSchedule(every_n_steps=bad)
    assert str(info.value) == f"every_n_steps must be a positive int or None, got {bad!r}"
