"""TwoStageFinetuning's own checks (its training behaviour is tested end to end in tests/test_fidelity.py and
tests/test_resume.py)."""
from types import SimpleNamespace

import pytest

from finegrained.callbacks import TwoStageFinetuning


@pytest.mark.parametrize("settings, message", [({"route": "sideways"}, "stage1 route must be one of frozen, cached, got 'sideways'"),
                                               ({"batch_size": 0}, "batch_size must be >= 1"),
                                               ({"lr": -1.0}, "stage1 lr must be >= 0, got -1.0"),
                                               ({"epochs": -1}, "epochs must be >= 0")])
def test_settings_are_checked_when_built(settings, message):
    with pytest.raises(ValueError, match=message):
        TwoStageFinetuning(**settings)


def test_a_stage_1_as_long_as_the_fit_is_said(recwarn):
    trainer = SimpleNamespace(max_epochs=3, strategy=object())
    TwoStageFinetuning(epochs=3).setup(trainer, None, "fit")
    assert any("backbone is frozen for the whole fit" in str(w.message) for w in recwarn.list)
    recwarn.clear()
    TwoStageFinetuning(epochs=2).setup(trainer, None, "fit")
    TwoStageFinetuning(epochs=3, route="cached").setup(trainer, None, "fit")  # cached: every epoch is stage 2
    assert not [w for w in recwarn.list if "frozen for the whole fit" in str(w.message)]
