"""Name lists shared by the config (bottom floor) and the models (upper floor); imports nothing of ours.

The learner registry (``models/__init__.py``) and the tuning presets (``models/sparse/recipes.py``) check at
import that they define exactly these names, so validation here and construction there cannot drift apart.
"""

from __future__ import annotations

#: ``model_name`` values: our learners and the official file names as aliases
LEARNER_NAMES = ("ranpac", "ranpac_mist", "simplecil", "simplecil_mist")

#: ``spr`` values of the official code (SPEC 4, 5)
OFFICIAL_PRESETS = ("mist", "rand", "l2", "grad", "run", "cerun")
#: ``spr`` values of ours: dense CE fine-tuning, PIECE-F/S (SPEC 13), update-magnitude control (SPEC 14),
#: MIST with random scores (random selection at MIST's budget)
OUR_PRESETS = ("ce_finetune", "piece_f", "piece_s", "magnitude_gate", "mist_random")
#: every ``spr`` value; "none" (or null) runs no tuning phase
SPR_CHOICES = ("mist", "none", "rand", "l2", "grad", "run", "cerun") + OUR_PRESETS
#: presets with a task-level selection (a scoring pass, then a mask fixed for the task): the composition
#: keys (``importance``, ``selection_scope``, ...) apply to these only
SELECTIVE_PRESETS = ("mist", "mist_random", "piece_f", "piece_s", "magnitude_gate")

#: parts of the tuning phase (issue 6, item 1; models/sparse/recipes.py)
IMPORTANCE_ESTIMATORS = ("mi_fisher", "fisher", "second_order", "magnitude", "random")
SCORING_LOSSES = ("contrastive", "ce")
SELECTION_SCOPES = ("per_tensor", "global", "per_block")
TUNING_OPTIMIZERS = ("mist_sgd", "adam")
GATE_MEMORY_RULES = ("previous", "ema")
