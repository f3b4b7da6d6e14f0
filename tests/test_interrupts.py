"""A stop signal never raises inside an import (:func:`pyro_storn.interrupts.raise_on_stop`): the
import ends whole, and the signal is raised right after it."""

from __future__ import annotations

import signal
import sys
import time

import pytest

from pyro_storn.interrupts import RESEND_S, Terminated, raise_on_stop

MODULE = '''
import os, time
os.kill(os.getpid(), {signum})
time.sleep(0.2)  # the handler runs here, inside the import
WHOLE = True
'''


@pytest.mark.parametrize("signum, raised", [(signal.SIGINT, KeyboardInterrupt),
                                            (signal.SIGTERM, Terminated)],
                         ids=["ctrl-c", "sigterm"])
def test_a_stop_inside_an_import_is_raised_after_it(tmp_path, monkeypatch, signum, raised):
    (tmp_path / "stopped_module.py").write_text(MODULE.format(signum=int(signum)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "stopped_module", raising=False)
    with pytest.raises(raised):
        with raise_on_stop():
            import stopped_module  # noqa: F401
            imported = time.monotonic()
            time.sleep(20 * RESEND_S)
    assert sys.modules["stopped_module"].WHOLE
    assert time.monotonic() - imported < 10 * RESEND_S  # sent again soon after
    monkeypatch.delitem(sys.modules, "stopped_module")


def test_a_stop_outside_imports_raises_at_once():
    with pytest.raises(KeyboardInterrupt):
        with raise_on_stop():
            signal.raise_signal(signal.SIGINT)
            time.sleep(10)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
