"""Feature extraction, evaluation and seeded loaders (issue 7, item 5).

``Learner.extract_features`` / ``Learner.predict`` run under ``torch.inference_mode`` with their own batch
size (``eval_batch_size``) and must give exactly what a plain ``no_grad`` loop over a DataLoader gives;
``make_loader``'s persistent workers must give the same images, order, augmentations and generator draws
as the non-persistent loaders used before. Tiny random ViTs on the CPU, no timing.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import models.base as base
from backbones import build_backbone
from models import build_learner
from models.base import TaskData
from utils.runtime import make_generator
from utils.loaders import _worker_init, default_prefetch_factor, make_loader

from conftest import TINY_VIT_KWARGS, TINY_VIT_NAME

CPU = torch.device("cpu")
SEED = 1993


class ImageDataset(Dataset):
    """In-memory items ``(index, image (3, 32, 32) float32, label int64)``; label = index % n_classes."""

    def __init__(self, n: int, n_classes: int = 3, first_class: int = 0, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, 32, 32, generator=g)
        self.labels = first_class + np.arange(n) % n_classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return i, self.images[i], np.int64(self.labels[i])


class RandomDrawDataset(Dataset):
    """Items ``(index, [index, torch draw, numpy draw, random draw] float64, worker pid)``: a random transform."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        draws = [float(i), torch.rand(()).item(), float(np.random.rand()), random.random()]
        return i, torch.tensor(draws, dtype=torch.float64), os.getpid()


def make_learner(make_config, tmp_path: Path, model_name: str = "ranpac", **overrides):
    cfg = make_config(tmp_path, model_name=model_name, **overrides)
    torch.manual_seed(0)
    backbone = build_backbone(TINY_VIT_NAME, False, None, 32, **TINY_VIT_KWARGS)
    return build_learner(cfg, CPU, SEED, backbone)


def reference_features(backbone, dataset: Dataset, batch_size: int, loader=None):
    """The plain loop: ``no_grad``, a DataLoader, features and labels concatenated."""
    loader = loader or DataLoader(dataset, batch_size=batch_size, shuffle=False)
    feats, labels, index = [], [], []
    with torch.no_grad():
        for i, x, y in loader:
            feats.append(backbone(x).float())
            labels.append(y)
            index.append(i)
    return torch.cat(feats), torch.cat(labels), torch.cat(index)


def gen_state(gen: torch.Generator) -> torch.Tensor:
    return gen.get_state().clone()


def batches(loader, epochs: int) -> list[list[list]]:
    """Every batch of ``epochs`` passes over one loader object, as nested lists."""
    return [[[t.tolist() for t in batch] for batch in loader] for _ in range(epochs)]


# ---------------------------------------------------------------------------------------------
# extraction and prediction equal the plain loop
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, batch_size, eval_batch_size", [
    (10, 4, None),  # 10 = 2 * 4 + 2: a short last batch
    (7, 1, None),  # batch size 1
    (13, 8, 5),  # an eval batch size of its own, smaller than the training batch, short last batch
    (5, 2, 16),  # one eval batch larger than the data set
])
def test_extract_features_equals_plain_no_grad_loop(make_config, tmp_path, n, batch_size, eval_batch_size):
    learner = make_learner(make_config, tmp_path, batch_size=batch_size, eval_batch_size=eval_batch_size)
    assert learner.eval_batch_size == (eval_batch_size or batch_size)
    data = ImageDataset(n)
    feats, labels = learner.extract_features(data)
    ref_feats, ref_labels, _ = reference_features(learner.backbone, data, learner.eval_batch_size)
    assert feats.dtype == torch.float32 and feats.shape == (n, learner.feature_dim)
    assert labels.dtype == torch.int64 and labels.device == learner.device
    assert torch.equal(feats, ref_feats)  # bit-identical on the CPU at the same batch size
    assert torch.equal(labels, ref_labels)
    assert feats.is_inference() and not feats.requires_grad


@pytest.mark.parametrize("model_name", ["ranpac", "simplecil"])
@pytest.mark.parametrize("n, eval_batch_size", [(11, None), (11, 1), (9, 4)])
def test_predict_equals_plain_topk_loop(make_config, tmp_path, model_name, n, eval_batch_size):
    learner = make_learner(make_config, tmp_path, model_name, eval_batch_size=eval_batch_size)
    train = ImageDataset(12, n_classes=6)
    learner.learn_task(TaskData(0, 0, 6, 6, train=train, train_eval=train, test=train))
    test = ImageDataset(n, n_classes=6, seed=1)
    y_topk, y_true = learner.predict(test)

    ref_feats, ref_labels, _ = reference_features(learner.backbone, test, learner.eval_batch_size)
    with torch.no_grad():
        ref_topk = torch.topk(learner.logits(ref_feats), k=5, dim=1, largest=True, sorted=True).indices
    assert isinstance(y_topk, np.ndarray) and y_topk.dtype == np.int64 and y_topk.shape == (n, 5)
    assert np.array_equal(y_topk, ref_topk.numpy())
    assert np.array_equal(y_true, ref_labels.numpy()) and y_true.dtype == np.int64


def test_predict_k_is_capped_by_the_classes_seen(make_config, tmp_path):
    learner = make_learner(make_config, tmp_path, "simplecil")
    train = ImageDataset(6, n_classes=3)
    learner.learn_task(TaskData(0, 0, 3, 6, train=train, train_eval=train, test=train))
    y_topk, y_true = learner.predict(train)
    assert y_topk.shape == (6, 3) and y_true.shape == (6,)


# ---------------------------------------------------------------------------------------------
# shuffled order and the loader generator
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_workers", [0, 2])
def test_shuffled_extraction_order_does_not_depend_on_the_eval_batch_size(make_config, tmp_path, num_workers):
    data = ImageDataset(13, n_classes=13)  # label = index: the labels give the visiting order
    runs = []
    for eval_batch_size in (3, 8, None):
        learner = make_learner(make_config, tmp_path, eval_batch_size=eval_batch_size, num_workers=num_workers)
        feats, labels = learner.extract_features(data, shuffle=True)
        runs.append((feats, labels, gen_state(learner.loader_generator)))
    (f0, l0, g0), *others = runs
    assert sorted(l0.tolist()) == list(range(13)) and l0.tolist() != list(range(13))  # a real shuffle
    for feats, labels, state in others:
        assert torch.equal(labels, l0)  # same order whatever the batch size
        torch.testing.assert_close(feats, f0)  # same rows (GEMM blocking may change the last bits)
        assert torch.equal(state, g0)  # same number of draws


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_generator_draws_are_those_of_the_old_loaders(make_config, tmp_path, num_workers):
    """A task's draws: tuning loader epochs, the shuffled extraction, the evaluation, as plain DataLoaders made them."""
    learner = make_learner(make_config, tmp_path, eval_batch_size=5, num_workers=num_workers)
    data = ImageDataset(13, n_classes=13)
    reference = make_generator(SEED, stream="loader")
    assert torch.equal(gen_state(learner.loader_generator), gen_state(reference))

    train_loader = learner.loader(data, shuffle=True)  # one object for several epochs, as the tuning phase
    old_train = DataLoader(data, batch_size=learner.batch_size, shuffle=True, generator=reference)
    for _ in range(3):
        assert batches(train_loader, 1) == batches(old_train, 1)
        assert torch.equal(gen_state(learner.loader_generator), gen_state(reference))
    del train_loader

    feats, labels = learner.extract_features(data, shuffle=True)
    old_feats, old_labels, _ = reference_features(
        learner.backbone, data, 0, DataLoader(data, batch_size=learner.batch_size, shuffle=True, generator=reference))
    assert torch.equal(labels, old_labels)  # the old extraction (training batch size) visited the same order
    torch.testing.assert_close(feats, old_feats)
    assert torch.equal(gen_state(learner.loader_generator), gen_state(reference))

    learner.learn_task(TaskData(0, 0, 13, 13, train=data, train_eval=data, test=data))
    for _ in DataLoader(data, batch_size=learner.batch_size, shuffle=True, generator=reference):
        pass  # the head update's shuffled extraction
    learner.predict(data)
    for _ in DataLoader(data, batch_size=learner.batch_size, shuffle=False, generator=reference):
        pass  # the evaluation loader draws its base seed too
    assert torch.equal(gen_state(learner.loader_generator), gen_state(reference))


def test_training_loader_keeps_the_batch_size_and_evaluation_uses_eval_batch_size(make_config, tmp_path,
                                                                                  monkeypatch):
    sizes = []
    real = base.make_loader

    def spy(dataset, batch_size, shuffle, *args, **kwargs):
        sizes.append((batch_size, shuffle))
        return real(dataset, batch_size, shuffle, *args, **kwargs)

    monkeypatch.setattr(base, "make_loader", spy)
    learner = make_learner(make_config, tmp_path, spr="mist", mi_epochs=1, batch_size=4, eval_batch_size=7)
    data = ImageDataset(8, n_classes=2)
    learner.learn_task(TaskData(0, 0, 2, 4, train=data, train_eval=data, test=data))
    learner.predict(data)
    assert sizes == [(4, True), (7, True), (7, False)]  # tuning, ridge features, evaluation


# ---------------------------------------------------------------------------------------------
# inference tensors downstream
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name, overrides", [
    ("ranpac", {}),
    ("ranpac", {"M": 0}),  # H is the extracted feature tensor itself
    ("ranpac", {"use_RP": False}),  # cosine prototypes from the extracted features
    ("ranpac", {"ridge_device": "device"}),
    ("simplecil", {}),
])
def test_heads_built_from_inference_features_are_ordinary_tensors(make_config, tmp_path, model_name, overrides):
    """Two tasks with a MIST tuning phase each: the second phase back-propagates through the backbone after
    the first head update ran under inference mode, and the heads can be updated in place afterwards."""
    learner = make_learner(make_config, tmp_path, model_name, spr="mist", mi_epochs=1, **overrides)
    tasks = [TaskData(t, 2 * t, 2 * t + 2, 4, train=ImageDataset(6, 2, 2 * t, seed=t),
                      train_eval=ImageDataset(6, 2, 2 * t, seed=t), test=ImageDataset(6, 2, 0, seed=9))
             for t in range(2)]
    for task in tasks:
        learner.learn_task(task)
        y_topk, _ = learner.predict(task.test)
        assert y_topk.shape == (6, task.seen)
    if model_name == "simplecil" or not learner.use_RP:
        heads = [learner.prototypes]
    else:
        heads = [learner.W_o, learner.accumulator.G, learner.accumulator.Q]
    for head in heads:
        assert not head.is_inference()
        head.add_(0.0)  # in place outside inference mode: fine for ordinary tensors
    assert not any(p.is_inference() for p in learner.backbone.parameters())


# ---------------------------------------------------------------------------------------------
# make_loader: persistent workers, same images and random streams
# ---------------------------------------------------------------------------------------------
def old_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, generator: torch.Generator):
    """The loader make_loader built before persistent workers."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, generator=generator,
                      worker_init_fn=_worker_init if num_workers > 0 else None, persistent_workers=False)


@pytest.mark.parametrize("shuffle", [True, False])
def test_persistent_workers_reproduce_fresh_workers_random_streams(shuffle):
    """Random train transforms draw from the worker's torch/numpy/random generators: same draws every epoch."""
    data = RandomDrawDataset(11)
    gen_new, gen_old = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    new = make_loader(data, 3, shuffle, 2, gen_new)
    old = old_loader(data, 3, shuffle, 2, gen_old)
    assert new.persistent_workers and not old.persistent_workers
    pids_new, pids_old = set(), set()
    for _ in range(3):
        got, want = batches(new, 1)[0], batches(old, 1)[0]
        assert [b[:2] for b in got] == [b[:2] for b in want]  # indices and every draw
        assert torch.equal(gen_state(gen_new), gen_state(gen_old))
        pids_new.update(pid for b in got for pid in b[2])
        pids_old.update(pid for b in want for pid in b[2])
    assert len(set(pids_new)) == 2  # the same two workers served all three epochs
    assert len(set(pids_old)) == 6  # fresh workers every epoch


def test_plain_persistent_workers_would_change_the_streams():
    """Why make_loader does not just pass persistent_workers=True: torch's persistent iterator draws no new base
    seed after the first epoch (later shuffles move) and its workers carry their random state over."""
    data = RandomDrawDataset(8)
    gen_plain, gen_old = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    plain = DataLoader(data, batch_size=4, shuffle=True, num_workers=2, generator=gen_plain,
                       worker_init_fn=_worker_init, persistent_workers=True)
    old = old_loader(data, 4, True, 2, gen_old)
    assert [b[:2] for b in batches(plain, 1)[0]] == [b[:2] for b in batches(old, 1)[0]]  # epoch 1 agrees
    epoch2_plain, epoch2_old = batches(plain, 1)[0], batches(old, 1)[0]
    assert [b[1] for b in epoch2_plain] != [b[1] for b in epoch2_old]  # epoch 2 does not
    assert not torch.equal(gen_state(gen_plain), gen_state(gen_old))


@pytest.mark.parametrize("shuffle", [True, False])
def test_workers_give_the_images_and_order_of_the_main_process(shuffle):
    data = ImageDataset(10, n_classes=4)
    gen2, gen0 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    with_workers = make_loader(data, 4, shuffle, 2, gen2)
    main_process = make_loader(data, 4, shuffle, 0, gen0)
    for _ in range(3):
        got, want = list(with_workers), list(main_process)
        assert len(got) == len(want) == 3
        for (i, x, y), (i0, x0, y0) in zip(got, want):
            assert torch.equal(i, i0) and torch.equal(x, x0) and torch.equal(y, y0)
        assert torch.equal(gen_state(gen2), gen_state(gen0))


def test_an_abandoned_epoch_does_not_shift_the_next_one():
    """Breaking out of an epoch (persistent iterator reset mid-way) gives the next epoch of fresh workers."""
    data = RandomDrawDataset(12)
    gen_new, gen_old = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    new = make_loader(data, 2, True, 2, gen_new)
    old = old_loader(data, 2, True, 2, gen_old)
    next(iter(new)), next(iter(old))  # one batch of the first epoch only
    assert [b[:2] for b in batches(new, 1)[0]] == [b[:2] for b in batches(old, 1)[0]]
    assert torch.equal(gen_state(gen_new), gen_state(gen_old))


def test_default_prefetch_factor():
    assert default_prefetch_factor(0) is None
    assert default_prefetch_factor(1) == 4 and default_prefetch_factor(2) == 2 and default_prefetch_factor(8) == 2
    loader = make_loader(ImageDataset(4), 2, False, 1, torch.Generator())
    assert loader.prefetch_factor == 4 and loader.persistent_workers
    assert make_loader(ImageDataset(4), 2, False, 0, torch.Generator()).prefetch_factor is None
