"""Every test writes its generated data and classifiers to a fresh cache, never to the user's ~/.cache."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def isolated_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setattr(common, "CACHE_DIR", tmp_path_factory.mktemp("cache"))
    yield common.CACHE_DIR
    mp.undo()
