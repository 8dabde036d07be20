"""StopRequest: the first SIGTERM or Ctrl-C is a request, a second acts at once, and the SIGTERM
that a scheduler and torchrun both forward counts once."""

from __future__ import annotations

import os
import signal

import pytest

from captioner.preemption import StopRequest


def test_the_first_signal_is_a_request_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # the same notice, forwarded twice: still running
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_second_ctrl_c_acts_at_once():
    with pytest.raises(KeyboardInterrupt), StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.name == "SIGINT"
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("a second Ctrl-C must interrupt")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
