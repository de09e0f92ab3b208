import os
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def _package_data_dir():
    from moe_tutorial.downloads import data_dir

    return data_dir()


# The data folder the package itself uses (data/ or $MOE_TUTORIAL_DATA), read once before any test
# points MOE_TUTORIAL_DATA at a temporary cache.
PACKAGE_DATA = _package_data_dir()


def course_data_file(name):
    """A file of the course's data (tests never download): from the package's data folder, else
    ../shared/data; otherwise the test fails with one line naming the file and where to put it."""
    for folder in (PACKAGE_DATA, SHARED_DATA):
        if (folder / name).exists():
            return folder / name
    pytest.fail(f"{name} is not in {PACKAGE_DATA} (nor {SHARED_DATA}): put a copy there (see data/README.md "
                f"for its URL and sha256), or set MOE_TUTORIAL_DATA to a folder that holds it", pytrace=False)


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
    """The real corpus, from the package's data folder or ../shared/data (tests never download)."""
    return course_data_file("tinyshakespeare.txt")


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
