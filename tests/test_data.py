import pytest
import requests
import torch
from local_server import LocalServer, closed_port_url

from moe_tutorial import data, downloads
from moe_tutorial.data import Dataset, get_batch, load_shakespeare
from moe_tutorial.downloads import download
from moe_tutorial.tokenizers import CharTokenizer


def test_tokenizer_round_trip(tiny_text):
    tok = CharTokenizer.from_text(tiny_text)
    assert tok.decode(tok.encode(tiny_text)) == tiny_text
    assert tok.vocab_size == len(set(tiny_text))
    assert tok.decode(torch.tensor(tok.encode("speak"))) == "speak"


def test_tokenizer_names_unknown_characters():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"'z'"):
        tok.encode("abz")
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([0, 7])


def test_split_and_batches(tiny_dataset):
    n = len(tiny_dataset.train) + len(tiny_dataset.val)
    assert len(tiny_dataset.train) == int(n * 0.9)
    g = torch.Generator().manual_seed(0)
    x, y = get_batch(tiny_dataset.train, 4, 16, g)
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    with pytest.raises(ValueError, match="block_size"):
        get_batch(tiny_dataset.val[:10], 2, 16)
    with pytest.raises(ValueError, match="val_fraction"):
        Dataset.from_text("abc", val_fraction=1.5)


def test_real_corpus_checksum(shakespeare_file):
    assert shakespeare_file.stat().st_size == data.SHAKESPEARE_BYTES
    assert downloads.sha256_of(shakespeare_file) == data.SHAKESPEARE_SHA256


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_download_success(tmp_path, shakespeare_file, data_cache):
    served = tmp_path / "served"
    served.mkdir()
    (served / "input.txt").write_bytes(shakespeare_file.read_bytes())
    with LocalServer(served) as server:
        path = download(f"{server.url}/input.txt", data_cache / "t.txt", data.SHAKESPEARE_SHA256, progress=False)
    assert path.read_bytes() == shakespeare_file.read_bytes()
    assert _leftovers(data_cache) == ["t.txt"]  # no temp file left behind


def test_download_checksum_mismatch_leaves_nothing(tmp_path, data_cache):
    served = tmp_path / "served"
    served.mkdir()
    (served / "input.txt").write_text("not shakespeare")
    with LocalServer(served) as server, pytest.raises(ValueError, match="Checksum mismatch"):
        download(f"{server.url}/input.txt", data_cache / "t.txt", data.SHAKESPEARE_SHA256, progress=False)
    assert _leftovers(data_cache) == []


def test_download_server_down_names_url_and_path(data_cache):
    url = closed_port_url("input.txt")
    with pytest.raises(FileNotFoundError) as err:
        download(url, data_cache / "t.txt", data.SHAKESPEARE_SHA256, timeout=5, progress=False)
    assert url in str(err.value) and str(data_cache / "t.txt") in str(err.value)
    assert _leftovers(data_cache) == []


def test_download_dropped_mid_stream_leaves_nothing(tmp_path, shakespeare_file, data_cache):
    served = tmp_path / "served"
    served.mkdir()
    (served / "input.txt").write_bytes(shakespeare_file.read_bytes())
    with LocalServer(served, drop_after=100_000) as server:
        with pytest.raises((FileNotFoundError, ValueError)):
            download(f"{server.url}/input.txt", data_cache / "t.txt", data.SHAKESPEARE_SHA256,
                     timeout=5, progress=False)
    assert _leftovers(data_cache) == []


def test_load_shakespeare_offline_error(data_cache, monkeypatch):
    def offline(*args, **kwargs):
        raise requests.ConnectionError("no network")

    monkeypatch.setattr(downloads.requests, "get", offline)
    with pytest.raises(FileNotFoundError) as err:
        load_shakespeare(progress=False)
    assert data.SHAKESPEARE_URL in str(err.value)
    assert str(data_cache / data.SHAKESPEARE_FILENAME) in str(err.value)


def test_corrupt_cached_file_is_reported(data_cache):
    data_cache.mkdir(parents=True)
    (data_cache / data.SHAKESPEARE_FILENAME).write_text("truncated")
    with pytest.raises(ValueError, match="corrupt"):
        load_shakespeare(progress=False)


def test_load_shakespeare_from_cache(data_cache, shakespeare_file):
    from conftest import copy_into

    copy_into(shakespeare_file, data_cache / data.SHAKESPEARE_FILENAME)
    text = load_shakespeare(progress=False)
    assert len(text) == 1_115_394 and text.startswith("First Citizen")
