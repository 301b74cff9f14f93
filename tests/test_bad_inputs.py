"""Every bad input and fault of issue 8 through the command line: exit status, one line, no traceback.

Each case builds its input in tmp_path (a tiny ViT config on PNG classes), runs ``main.main`` in-process and
checks the exit status and that stderr is one line naming what is wrong. ``python tests/test_bad_inputs.py``
prints the table (case, exit status, message) for the record.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))

import main  # noqa: E402
from conftest import TINY_VIT_KWARGS, TINY_VIT_NAME, terminal_lines, tiny_run_dict  # noqa: E402


def _images(root: Path, n_classes: int = 4, per_class: int = 2) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(n_classes):
            folder = root / "cub" / split / f"class_{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def _config(tmp: Path, **overrides) -> Path:
    raw = tiny_run_dict(_images(tmp / "data"), init_cls=2, increment=2, **overrides)
    path = tmp / "c.json"
    path.write_text(json.dumps(raw))
    return path


def _args(tmp: Path, config: Path, *sets: str) -> list[str]:
    return ["--config", str(config), "--output-dir", str(tmp / "runs"), *[a for s in sets for a in ("--set", s)]]


# each case: (name, builder(tmp) -> argv, expected exit status, fragments of the message)
def case_nan_in_config(tmp):
    path = tmp / "c.json"
    path.write_text('{"dataset": "cub", "select_rate": NaN}')
    return ["--config", str(path)]


def case_infinity_in_set(tmp):
    return _args(tmp, _config(tmp), "M=Infinity")


def case_float_in_int_key(tmp):
    path = tmp / "c.json"
    path.write_text('{"init_cls": 10.5}')
    return ["--config", str(path)]


def case_non_utf8(tmp):
    path = tmp / "c.json"
    path.write_bytes(b'{"prefix": "caf\xe9"}')
    return ["--config", str(path)]


def case_seed_out_of_range(tmp):
    return _args(tmp, _config(tmp), "seed=[4294967296]")


def case_duplicate_seeds(tmp):
    return _args(tmp, _config(tmp), "seed=[1993,1993]")


def case_duplicate_keys(tmp):
    path = tmp / "c.json"
    path.write_text('{"M": 1000, "M": 2000}')
    return ["--config", str(path)]


def case_bad_set_value(tmp):
    return _args(tmp, _config(tmp), "spr=bogus")


def case_bad_backbone_kwargs(tmp):
    return _args(tmp, _config(tmp), 'backbone_kwargs={"depht": 2}')


def case_bad_device(tmp):
    return _args(tmp, _config(tmp), "device=cuda:x")


def case_missing_gpu(tmp):
    return _args(tmp, _config(tmp), "device=0")


def case_weights_other_architecture(tmp):
    import timm

    other = timm.create_model("resnet18", pretrained=False, num_classes=0)
    path = tmp / "resnet18.pth"
    torch.save(other.state_dict(), path)
    return _args(tmp, _config(tmp), "pretrained=true", f"weights_path={path}")


def case_weights_path_a_folder(tmp):
    folder = tmp / "weights"
    folder.mkdir()
    return _args(tmp, _config(tmp), "pretrained=true", f"weights_path={folder}")


def case_weights_partial(tmp):
    import timm

    model = timm.create_model(TINY_VIT_NAME, pretrained=False, num_classes=0, **TINY_VIT_KWARGS)
    state = dict(list(model.state_dict().items())[::2])
    path = tmp / "half.pth"
    torch.save({f"convnet.{k}": v for k, v in state.items()}, path)
    return _args(tmp, _config(tmp), "pretrained=true", f"weights_path={path}")


def case_renamed_test_class(tmp):
    config = _config(tmp)
    (tmp / "data" / "cub" / "test" / "class_01").rename(tmp / "data" / "cub" / "test" / "class_01_renamed")
    return _args(tmp, config)


def case_corrupt_image(tmp):
    config = _config(tmp)
    png = tmp / "data" / "cub" / "train" / "class_00" / "0.png"
    png.write_bytes(png.read_bytes()[:40])
    return _args(tmp, config)


def case_corrupt_image_verified(tmp):
    return case_corrupt_image(tmp) + ["--set", "verify_images=true"]


def case_missing_data(tmp):
    return _args(tmp, _config(tmp), f"data_root={tmp / 'nowhere'}")


def case_resume_nothing(tmp):
    return ["--resume", str(tmp / "no_run")]


def case_resume_foreign_checkpoint(tmp):
    """(A truncated checkpoint restarts its seed with the partial results moved aside: tests/test_run_folder.py.)"""
    config = _config(tmp, stop_after_task=0)
    assert main.main(_args(tmp, config)) == 0  # stopped on purpose after task 0
    (ckpt,) = (tmp / "runs").glob("*/*/seed*/checkpoint.pt")
    torch.save({"weights": torch.zeros(3)}, ckpt)
    return ["--resume", str(ckpt.parent.parent)]


def case_resume_changes_results_key(tmp):
    config = _config(tmp, stop_after_task=0)
    assert main.main(_args(tmp, config)) == 0
    (run_dir,) = (tmp / "runs").glob("*/*")
    return ["--resume", str(run_dir), "--set", "M=128"]


def case_l2p_top_k_above_pool(tmp):
    return _args(tmp, _config(tmp, model_name="l2p", M=10000), "pool_size=3", "top_k=4")


def case_strict_keys_preset(tmp):
    return _args(tmp, _config(tmp, spr="mist", strict_keys=True), "top_ratio=0.01")


def case_strict_keys_learner(tmp):
    return _args(tmp, _config(tmp, strict_keys=True, ca_epochs=3))


def case_dualprompt_no_e_layers(tmp):
    return _args(tmp, _config(tmp, model_name="dualprompt", M=10000), "g_prompt_layers=[0]", "e_prompt_layers=[0]")


def case_dualprompt_layer_beyond_the_vit(tmp):
    return _args(tmp, _config(tmp, model_name="dualprompt", M=10000), "g_prompt_layers=[0]", "e_prompt_layers=[1, 7]")


CASES: list[tuple[str, Callable, int, tuple[str, ...]]] = [
    ("NaN in a config file", case_nan_in_config, 2, ("select_rate", "NaN", "line")),
    ("Infinity in --set", case_infinity_in_set, 2, ("--set M=Infinity",)),
    ("float in an integer key", case_float_in_int_key, 2, ("init_cls", "10.5", "integer")),
    ("config file not UTF-8", case_non_utf8, 2, ("UTF-8", "byte")),
    ("seed outside 0..2^32-1", case_seed_out_of_range, 2, ("seed", "4294967296")),
    ("duplicate seeds", case_duplicate_seeds, 2, ("seed", "1993", "more than once")),
    ("duplicate JSON keys", case_duplicate_keys, 2, ("'M'", "more than once")),
    ("bad --set value", case_bad_set_value, 2, ("--set spr=bogus", "spr")),
    ("bad backbone_kwargs", case_bad_backbone_kwargs, 2, ("backbone_kwargs", "depht")),
    ("bad device string", case_bad_device, 2, ("device", "cuda:x")),
    ("CUDA asked, no GPU", case_missing_gpu, 2, ("device", "cpu")),
    ("weights of another architecture", case_weights_other_architecture, 2, ("weights_path", "missing", "unexpected")),
    ("weights_path a folder", case_weights_path_a_folder, 2, ("weights_path", "is a folder", "weights file")),
    ("partial convnet.-prefixed weights", case_weights_partial, 2, ("weights_path", "missing", "convnet.")),
    ("renamed test class folder", case_renamed_test_class, 2, ("class_01", "class_01_renamed")),
    ("truncated image (found mid-run)", case_corrupt_image, 2, ("0.png",)),
    ("truncated image (verify_images)", case_corrupt_image_verified, 2, ("0.png", "cannot be read")),
    ("missing data set", case_missing_data, 2, ("cub", "nowhere")),
    ("--resume of a folder with no run", case_resume_nothing, 2, ("--resume", "no_run")),
    ("--resume with a foreign checkpoint", case_resume_foreign_checkpoint, 2, ("checkpoint.pt", "not a mist-cl")),
    ("--resume changing a results key", case_resume_changes_results_key, 2, ("M", "cannot change")),
    ("L2P top_k above pool_size", case_l2p_top_k_above_pool, 2, ("'top_k' (4)", "'pool_size' (3)")),
    ("DualPrompt without an E-prompt layer", case_dualprompt_no_e_layers, 2, ("e_prompt_layers", "no E-prompt")),
    ("DualPrompt layer beyond the ViT", case_dualprompt_layer_beyond_the_vit, 2, ("layer(s) [7]", "2 blocks")),
    ("strict_keys: another preset's key", case_strict_keys_preset, 2, ("--set top_ratio=0.01", "PIECE", "spr 'mist'")),
    ("strict_keys: another learner's key", case_strict_keys_learner, 2, ("'ca_epochs' = 3", "SLCA", "ranpac")),
]


WARNINGS = [  # (overrides of the tiny config, fragment of the warning on stderr); each run completes
    (dict(model_name="slca", epochs=2, milestones=[2], ca_epochs=0), "milestone(s) [2]"),
    (dict(model_name="l2p", M=10000, prompt_epochs=1, epochs=3), "Config key 'epochs' = 3 has no effect: it belongs to "
                                                                  "SLCA"),
    (dict(model_name="ease", M=10000, init_epochs=1, pool_size=5), "Config key 'pool_size' = 5 has no effect"),
    (dict(model_name="simplecil_mist", M=10000), "names the learner with MIST, but spr is 'none'"),
    (dict(spr="mist", mi_epochs=1, gps_k=3), "Config key 'gps_k' = 3 has no effect: it belongs to GPS preset "
                                            "(models/sparse/gps.py), and spr 'mist' does not read it (read by gps)"),
    (dict(select_rate=0.05), "Config key 'select_rate' = 0.05 has no effect: it belongs to MIST"),
]


@pytest.mark.parametrize("overrides,fragment", WARNINGS, ids=[w[1][:30] for w in WARNINGS])
def test_a_key_without_effect_is_warned_on_stderr(tmp_path, capsys, overrides, fragment):
    """Issue 26: keys of another host, a milestone SLCA never reaches and a *_mist learner without a tuning phase run,
    with a warning that reaches stderr (not only stdout and the log)."""
    capsys.readouterr()
    assert main.main(_args(tmp_path, _config(tmp_path, **overrides))) == 0
    out, err = capsys.readouterr()
    assert fragment in err and fragment not in out
    (log,) = (tmp_path / "runs").glob("*/*/seed*/*.log")
    assert fragment in log.read_text()


@pytest.mark.parametrize("name,build,code,fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_line(tmp_path, capsys, name, build, code, fragments):
    argv = build(tmp_path)
    capsys.readouterr()
    assert main.main(argv) == code
    err = capsys.readouterr().err.strip()
    # warnings logged before the error also reach stderr (issue 26), in the log format; the error is one line
    lines = terminal_lines(err)
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


if __name__ == "__main__":  # print the table of cases for the record
    import contextlib
    import io
    import logging
    import tempfile

    logging.disable(logging.CRITICAL)
    print("| bad input | exit | message |\n|---|---|---|")
    for name, build, _, _ in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            argv = build(Path(tmp))
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main.main(argv)
            message = err.getvalue().strip().replace(tmp, "<tmp>").replace("|", "\\|")
            print(f"| {name} | {code} | {message[:300]}{'...' if len(message) > 300 else ''} |")
