import os
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tests compare floats; one thread keeps them bitwise stable
    yield


@pytest.fixture
def tiny_text():
    return "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40


@pytest.fixture
def tiny_dataset(tiny_text):
    from moe_tutorial.data import Dataset

    return Dataset.from_text(tiny_text)


@pytest.fixture
def shakespeare_file():
    """The real corpus, from the data cache or ../shared/data (tests never download)."""
    from moe_tutorial.data import SHAKESPEARE_FILENAME, data_dir

    for path in (data_dir() / SHAKESPEARE_FILENAME, SHARED_DATA / "tinyshakespeare.txt"):
        if path.exists():
            return path
    pytest.fail(
        f"tinyshakespeare.txt not found in {data_dir()} or {SHARED_DATA}; "
        f"copy it there (see data/README.md)"
    )


@pytest.fixture
def data_cache(tmp_path, monkeypatch):
    """An empty data cache directory for this test."""
    monkeypatch.setenv("MOE_TUTORIAL_DATA", str(tmp_path / "cache"))
    return tmp_path / "cache"


def copy_into(path, dest):
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, dest)
    return dest


os.environ.setdefault("MPLBACKEND", "Agg")
