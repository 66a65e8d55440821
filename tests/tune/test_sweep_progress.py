"""The sweep's progress logger must survive Tune pickling its callbacks after Ray Train has
swapped ``builtins.print`` (``raypeft sweep`` failed with a PicklingError when it held the builtin)."""

from __future__ import annotations

import builtins
import pickle
import types

import cloudpickle
import pytest

from raypeft.tune import sweep


def test_the_default_progress_log_pickles_after_print_is_swapped(monkeypatch: pytest.MonkeyPatch) -> None:
    bound_at_import = builtins.print
    monkeypatch.setattr(builtins, "print", lambda *args, **kwargs: None)
    if isinstance(bound_at_import, types.BuiltinFunctionType):
        # The failure this guards against; only reproducible while no earlier test in this
        # process has already let Ray Train swap print (then the name bound here is Ray's wrapper).
        with pytest.raises(pickle.PicklingError):
            cloudpickle.dumps(bound_at_import)
    assert sweep.run_sweep.__defaults__ == (sweep.say,)
    assert cloudpickle.loads(cloudpickle.dumps(sweep.say)) is sweep.say
