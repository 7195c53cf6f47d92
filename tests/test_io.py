"""Workdir files through jaxcf.utils.io: the same calls work on a local folder and on gs://.

``gs://`` is served by an in-memory fsspec filesystem registered under the ``gs`` protocol, with
etils' epath told that TensorFlow is absent (it then sends gs:// paths to fsspec, as on a TPU VM
with gcsfs and without TensorFlow): every write below goes through the bucket code path.
"""

import io as _io
import json
import os

import numpy as np
import pytest
from PIL import Image

from jaxcf.utils import io


class FakeGCS:
    """Created lazily: fsspec is imported only by these tests."""

    cls = None

    @classmethod
    def get(cls):
        if cls.cls is None:
            from fsspec.implementations.memory import MemoryFileSystem

            class _FakeGCS(MemoryFileSystem):
                protocol = ("gs", "gcs")
                store = {}  # not MemoryFileSystem's: memory:// stays separate
                pseudo_dirs = [""]

                @classmethod
                def _strip_protocol(cls, path):
                    path = str(path)
                    for prefix in ("gs://", "gcs://"):
                        if path.startswith(prefix):
                            path = path[len(prefix):]
                    return super()._strip_protocol(path)

            cls.cls = _FakeGCS
        return cls.cls


@pytest.fixture
def fake_gcs(monkeypatch):
    """A fresh in-memory gs:// for one test; returns its object store ({"/bucket/key": file})."""
    from etils.epath import backend, gpath
    from fsspec.registry import _registry

    fs = FakeGCS.get()
    fs.store.clear()
    fs.pseudo_dirs[:] = [""]
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # (cached) else gs:// goes to tf.io.gfile
    monkeypatch.setitem(_registry, "gs", fs)
    monkeypatch.setitem(_registry, "gcs", fs)
    get_fs = type(backend.fsspec_backend)._get_filesystem
    get_fs.cache_clear()
    yield fs.store
    get_fs.cache_clear()
    fs.store.clear()


@pytest.fixture(params=["local", "gs"])
def workdir(request, tmp_path):
    """The same workdir tests run on a local folder and on the fake bucket."""
    if request.param == "local":
        return str(tmp_path / "run")
    store = request.getfixturevalue("fake_gcs")
    request.node.store = store
    return "gs://bucket/run"


def on_bucket(workdir, request, name):
    """The file really landed in the bucket's object store (gs) or on disk (local)."""
    if workdir.startswith("gs://"):
        return "/bucket/run/" + name in request.node.store
    return os.path.isfile(os.path.join(workdir, name))


def test_join_keeps_the_scheme_and_is_remote():
    assert io.join("gs://b/run", "x.json") == "gs://b/run/x.json"
    assert io.join("gs://b/run/", "a", "b.png") == "gs://b/run/a/b.png"
    assert io.join("/tmp/run", "x.json") == "/tmp/run/x.json"
    assert io.is_remote("gs://b/run") and not io.is_remote("/tmp/run") and not io.is_remote("rel/run")


def test_read_write_round_trip(workdir, request):
    io.write_json(io.join(workdir, "a", "x.json"), {"a": [1, 2]})
    assert io.read_json(io.join(workdir, "a", "x.json")) == {"a": [1, 2]}
    io.write_bytes(io.join(workdir, "b.bin"), b"\x00\x01")
    assert io.read_bytes(io.join(workdir, "b.bin")) == b"\x00\x01"
    io.append_text(io.join(workdir, "log.txt"), "1\n")
    io.append_text(io.join(workdir, "log.txt"), "2\n")
    assert io.read_text(io.join(workdir, "log.txt")) == "1\n2\n"
    io.write_npz(io.join(workdir, "z.npz"), x=np.arange(3), y=np.ones((2, 2), np.float32))
    z = io.read_npz(io.join(workdir, "z.npz"))
    np.testing.assert_array_equal(z["x"], np.arange(3))
    np.testing.assert_array_equal(z["y"], np.ones((2, 2)))
    io.makedirs(io.join(workdir, "empty"))
    assert io.exists(io.join(workdir, "a", "x.json")) and not io.exists(io.join(workdir, "nope.json"))
    for name in ("a/x.json", "b.bin", "log.txt", "z.npz"):
        assert on_bucket(workdir, request, name), name


def test_metric_writer_appends_across_restarts(workdir, request):
    from jaxcf.train import MetricWriter, read_metrics

    w = MetricWriter(workdir)
    w.write(1, {"loss": np.float32(2.0)})
    w.write(2, {"loss": 1.5, "v": np.arange(2)})
    MetricWriter(workdir).write(3, {"loss": 1.0})  # a resumed run appends to the same file
    rows = read_metrics(io.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[1]["v"] == [0, 1] and rows[0]["loss"] == 2.0
    assert on_bucket(workdir, request, "metrics.jsonl")


def test_save_grid_writes_a_png(workdir, request):
    from jaxcf.utils.images import save_grid

    rows = np.zeros((2, 3, 8, 8, 3), np.float32)
    save_grid(rows, io.join(workdir, "grid.png"), scale=2, pad=2)
    im = Image.open(_io.BytesIO(io.read_bytes(io.join(workdir, "grid.png"))))
    assert im.format == "PNG" and im.size == (2 * (3 * 10 + 2), 2 * (2 * 10 + 2))
    assert on_bucket(workdir, request, "grid.png")


def test_config_json_is_written_for_any_workdir(workdir, request):
    from jaxcf.pipelines import write_config
    from tests.test_main import DIFFUSION, load_config

    config = load_config(DIFFUSION, "test")
    write_config(config, workdir)
    assert io.read_json(io.join(workdir, "config.json"))["variant"] == "test"
    assert on_bucket(workdir, request, "config.json")


def test_foundation_export_import(workdir):
    from jaxcf.foundation.weights import export_params as _export, import_params as _import

    params = {"dense": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3), "bias": np.zeros(3, np.float32)}}
    template = {"dense": {"kernel": np.zeros((2, 3), np.float32), "bias": np.zeros(3, np.float32)}}
    path = io.join(workdir, "foundation", "clip")
    assert _import(path, template, {"w": 1}) is None  # nothing exported yet
    _export(path, params, {"w": 1})
    got = _import(path, template, {"w": 1})
    np.testing.assert_array_equal(got["dense"]["kernel"], params["dense"]["kernel"])
    assert _import(path, template, {"w": 2}) is None  # made with another config


def test_dicap_report_and_cached_counterfactuals(workdir, request):
    from jaxcf.dicap.report import write_report
    from jaxcf.dicap.runs import cached_counterfactuals, counterfactual_key
    from tests.test_main import ROOT, load_config

    config = load_config(os.path.join(ROOT, "configs", "dicap.py"), "test")
    keys = [f"{m}_{s}" for m in ("zeroshot", "coop", "dicap") for s in ("base", "novel", "hm", "conflict")]
    keys += ["cf_flip_rate", "cf_cld", "cf_l1", "cf_l1_object", "cf_l1_background"]
    results = {"variant": "test", "dataset": "shapes", "seeds": [0], "shots": 4, "bias": 0.9, "lam": 1.0,
               "counterfactual": config.counterfactual.to_dict(),
               "summary": {k: {"mean": 0.5, "std": 0.0} for k in keys}}
    x = np.zeros((4, 8, 8, 3), np.float32)
    y, y_cf = np.array([0, 1, 2, 3]), np.array([1, 2, 3, 0])
    write_report(results, (x, x, y, y_cf), ["circle", "square", "heart", "star"], workdir)
    for name in ("results.json", "results.md", "counterfactuals.png", "counterfactuals.txt"):
        assert on_bucket(workdir, request, name), name
    assert json.loads(io.read_text(io.join(workdir, "results.json")))["variant"] == "test"
    assert "circle -> square" in io.read_text(io.join(workdir, "counterfactuals.txt"))

    # a cached counterfactual set is found again in the workdir, without touching any model
    cf = config.counterfactual
    text_feats = np.ones((4, 3), np.float32)
    name = f"seed0_{cf.target}_s{cf.scale:g}_{counterfactual_key(config, 0, x, text_feats, 'f0')}.npz"
    io.write_npz(io.join(workdir, "counterfactuals", name), x=x, x_cf=x + 1, y_cf=y_cf)
    x_cf, got_y = cached_counterfactuals(None, x, y, text_feats, config, 0, workdir, mesh=None, foundation_digest="f0")
    np.testing.assert_array_equal(x_cf, x + 1)
    np.testing.assert_array_equal(got_y, y_cf)
