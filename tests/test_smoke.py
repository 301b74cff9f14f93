"""Every shipped config runs end to end (issue 26): ``utils.smoke`` runs each ``exps/*/*.json`` for two tasks on
stand-in data and a shrunken backbone of its family, changing only the size keys listed here; a config that cannot
run fails it, with the reason."""

from __future__ import annotations

import json
from pathlib import Path

from utils import smoke
from utils.ledger import shipped_configs

REPO = Path(__file__).resolve().parents[1]

#: what a smoke run may change: where the data is and how big the run is, never a learner's or a preset's key
EXPECTED_SIZE_KEYS = {"data_root", "download", "device", "num_workers", "progress", "seed", "input_size", "pretrained",
                      "backbone_kwargs", "M", "mi_epochs", "ablation_epochs", "warm_epochs", "epochs", "ca_epochs",
                      "prompt_epochs", "init_epochs", "later_epochs", "tuning_steps"}


def test_the_smoke_run_changes_only_the_listed_size_keys(tmp_path):
    assert set(smoke.SIZE_KEYS) == EXPECTED_SIZE_KEYS
    for rel in shipped_configs():
        raw = json.loads((REPO / rel).read_text())
        assert set(smoke.size_overrides(raw, tmp_path)) <= EXPECTED_SIZE_KEYS, rel


def test_every_shipped_config_runs_two_tasks(capsys):
    code = smoke.main(["--workers", "2"])
    out = capsys.readouterr().out
    assert code == 0, "\n".join(line for line in out.splitlines() if not line.startswith("ok"))
    assert f"{len(shipped_configs())} of {len(shipped_configs())} configs ran two tasks" in out


def test_a_config_that_would_crash_in_a_real_run_fails_the_smoke_run(tmp_path, capsys):
    """A copy of a shipped DualPrompt config with a prompt layer the ViT lacks (it would crash when the prefixes are
    attached), and an L2P copy whose pool is smaller than its top_k (it would crash at the first selection)."""
    copies = []
    for rel, change in (("exps/dualprompt_mist/cars.json", {"e_prompt_layers": [2, 3, 40]}),
                        ("exps/l2p/cub.json", {"pool_size": 3})):
        path = tmp_path / Path(rel).name
        path.write_text(json.dumps({**json.loads((REPO / rel).read_text()), **change}))
        copies.append(str(path))
    assert smoke.main([*copies, "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "layer(s) [40] do not exist" in out and "'pool_size' (3)" in out
    assert "0 of 2 configs ran two tasks" in out
