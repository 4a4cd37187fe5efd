"""The sweep's cross-validation folds (the sweep itself runs in tests/reward/test_stage.py)."""
import numpy as np
import pytest

from sparserm.reward.sweep import check_folds


def test_empty_folds_are_refused_by_name_before_any_head_is_fitted():
    fold = np.array([0, 1, 0, 1, 1])
    assert check_folds(fold, 2) is fold
    # 3 prompts over 5 folds (the default): some folds hold nothing (a head's empty val split raised later)
    with pytest.raises(ValueError, match=r"reward.sweep_folds=5: fold\(s\) \[2, 3, 4\] hold none of the 5"):
        check_folds(fold, 5)
