"""RanPAC: random projection + streaming ridge regression head (algorithms.md §6; McDonnell et al., NeurIPS 2023).

After the tuning phase of task 0 a random matrix W_rand ~ N(0, 1)^(D x M) is drawn once. Every task
adds its features to the Gram matrix G = sum H^T H and Q = sum H^T Y, with H = ReLU(F W_rand) and Y the
one-hot labels over all classes of the data set. The ridge lambda is chosen on an 80/20 split of the
*current* task's rows; then W_o = ((G + lambda I)^-1 Q)^T and logits = ReLU(f W_rand) W_o^T (sigma = 1).
With ``M <= 0`` the same ridge runs on the raw features (no projection). With ``use_RP`` false the official
code keeps none of this: its cosine ``fc`` head holds class-mean prototypes (see :class:`RanPAC`).

The ridge statistics, the lambda search and the two solvers (``ridge_solver``) are in ``models/ridge.py``.

Faithful quirk (algorithms.md §9.20): G and Q accumulate features of a backbone that keeps changing when the
tuning phase runs on every task; old-task features are never re-extracted.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, Optional

import torch
from torch import nn

from models.base import Learner, TaskData
from models.heads import PROJECTION_DIM, cosine_logits, grow_prototypes
from models.ridge import RIDGE_GRID, RidgeAccumulator, gram_trace, one_hot, rounding_ratio  # noqa: F401 (RIDGE_GRID re-exported)
from models.ridge_search import select_ridge
from utils.config import ConfigKeys, ExperimentConfig, config_keys, for_learners, key
from utils.data_manager import task_sizes
from utils.errors import ConfigError
from utils.registry import LEARNERS
from utils.runtime import make_generator

logger = logging.getLogger(__name__)


@config_keys("RanPAC (models/ranpac.py)", applies=for_learners("ranpac"))
class RanPACKeys(ConfigKeys):
    use_RP: bool = key(
        True, 'RanPAC random projection on/off (off: the official cosine-prototype classifier). Accepts true/false '
        'and the strings "True"/"False" (official key).',
    )
    M: int = key(
        10000, "RanPAC random-projection width; M <= 0 with use_RP true means no projection (ridge on raw features) "
        "(official key)."
    )
    ridge_device: Literal["cpu", "device"] = key("cpu", "Where RanPAC's G, Q and ridge solves live (official: cpu, "
                                                        "float32).")
    ridge_lambdas: Optional[list[float]] = key(
        None, "RanPAC: the ridge lambda of each task (one positive value per task, e.g. the tasks[i].head.ridge_lambda "
        "of an untuned run's results.json) instead of the official search on the task's 80/20 split, so that a tuning "
        "method's effect is not a lambda flip; null = the search.")
    ridge_lambdas_by_seed: Optional[dict[str, Any]] = key(
        None, "RanPAC: ridge_lambdas per seed, {\"<seed>\": [one positive value per task], ...}, for a config that "
        "runs several seeds (the comparison protocol fixes each seed's lambdas to its untuned run's); null = unused.")
    ridge_solver: Literal["fast", "official"] = key(
        "fast", "RanPAC ridge search and solve: fast (one shared factorisation, same lambda, W_o within 1e-4) or "
        "official (17 + 1 dense solves, bit-faithful).",
    )


@LEARNERS.register("ranpac", aliases=("ranpac_mist",))
class RanPAC(Learner):
    """RanPAC with an optional tuning phase before each head update (official ``ranpac_mist.Learner``).

    ``DEFAULTS["freeze_quantile"]`` = 0.9995 is the official RanPAC-MIST frozen-mask quantile (algorithms.md §4.7).
    Heads, as the official code (algorithms.md §6):
      - ``use_RP`` true, ``M > 0``: random projection + streaming ridge regression (``rpfc``, seen x M);
      - ``use_RP`` true, ``M <= 0``: the same ridge regression on the raw features (no projection, no ReLU;
        ``rpfc`` is seen x D);
      - ``use_RP`` false: no G, Q, ridge search or ``Optimal lambda`` line; the cosine ``fc`` head becomes a
        cosine-prototype classifier: each class's row is the mean of its raw features, from the task that
        brought the class (old rows are kept), and logits = cos(f, row_c) (sigma = 1).
    """

    TITLE, ORDER = "RanPAC", 10
    OFFICIAL_FILE = "RanPAC-MIST"
    #: RanPAC's official rand, l2, grad and cerun crash; they run here on SimpleCIL's pattern (algorithms.md §5)
    OFFICIAL_DISPATCH = frozenset({"mist", "rand", "l2", "grad", "cerun"})
    DEFAULTS = {"freeze_quantile": 1 - 0.0005}

    def __init__(self, cfg: ExperimentConfig, backbone: nn.Module, device: torch.device, seed: int) -> None:
        super().__init__(cfg, backbone, device, seed)
        self.use_RP = bool(cfg.use_RP)
        self.use_projection = self.use_RP and cfg.M > 0
        self.proj_dim = cfg.M if self.use_projection else self.feature_dim
        self.ridge_device = torch.device("cpu") if cfg.ridge_device == "cpu" else device
        self.W_rand: Optional[torch.Tensor] = None  # (D, M) float32, drawn after task 0's tuning phase
        self.W_o: Optional[torch.Tensor] = None  # (seen, M) float32 on device (use_RP true)
        self.prototypes: Optional[torch.Tensor] = None  # (seen, D) float32 on device: the fc rows (use_RP false)
        self.accumulator: Optional[RidgeAccumulator] = None

    def setup_random_projection(self, n_classes: int) -> None:
        """Draw W_rand ~ N(0,1)^(D x M) on the CPU and reset G, Q (official ``setup_RP``).

        The original draws from the global CPU generator; here it is the run's "projection" stream, so the
        same seed gives the same W_rand with or without a tuning phase (a fair MIST vs baseline comparison).
        """
        if self.use_projection:
            gen = make_generator(self.seed, stream="projection")
            self.W_rand = torch.randn(self.feature_dim, self.proj_dim, generator=gen).to(self.device)
        self.accumulator = RidgeAccumulator(self.proj_dim, n_classes, self.ridge_device)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """H = ReLU(f W_rand) (N, M) float32, on ``features``' device; identity without projection."""
        if self.W_rand is None:
            return features
        return torch.relu(features @ self.W_rand.to(features.device))

    def announce(self, task: TaskData) -> None:
        logger.info("Starting CIL Task %d", task.task_id + 1)
        logger.info("Learning on classes %d-%d", task.known, task.seen - 1)

    def update_head(self, task: TaskData) -> Optional[dict[str, Any]]:
        """The ridge head (``use_RP``) or the prototype head; returns the task's ridge lambda, whether it was fixed by
        ``ridge_lambdas`` and ``ridge_rho`` = eps_float32 * (trace(G) + lambda) / lambda, an upper bound of the
        solve's rounding sensitivity (``models/ridge.py``; dimensionless) (None without RP).

        Raises:
            ConfigError: ``ridge_lambdas`` has not one positive value per task.
        """
        head = self._update_ridge_head(task) if self.use_RP else self._update_prototype_head(task)
        total, trainable = self.count_parameters()  # show_num_params, after the head update (algorithms.md §6, §6.4)
        logger.info("%s total parameters.", f"{total:,}")
        logger.info("%s training parameters.", f"{trainable:,}")
        return head

    def fixed_ridge(self, task: TaskData) -> Optional[float]:
        """``ridge_lambdas[task]``, or None for the search. Raises ConfigError unless the list has one positive value
        per task (checked at task 0, before any head is built)."""
        values, by_seed = self.cfg.ridge_lambdas, self.cfg.ridge_lambdas_by_seed
        if by_seed is not None:
            if values is not None:
                raise ConfigError("keys 'ridge_lambdas' and 'ridge_lambdas_by_seed' are both set; set one of them.")
            if str(self.seed) not in by_seed:
                raise ConfigError(f"key 'ridge_lambdas_by_seed' has no entry for seed {self.seed} (it has "
                                  f"{sorted(by_seed)}); add one or set it to null for the search.")
            values = by_seed[str(self.seed)]
        if values is None:
            return None
        if not isinstance(values, list) or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
            raise ConfigError(f"key 'ridge_lambdas' (or ridge_lambdas_by_seed's entry for seed {self.seed}) has value "
                              f"{values!r}; expected a list of positive numbers, one per task.")
        n_tasks = len(task_sizes(task.n_classes, self.cfg.init_cls, self.cfg.increment))
        if len(values) != n_tasks or any(not v > 0 for v in values):
            raise ConfigError(f"key 'ridge_lambdas' has value {values!r}; expected {n_tasks} positive numbers, one "
                              f"per task of this run ({task.n_classes} classes, init_cls {self.cfg.init_cls}, "
                              f"increment {self.cfg.increment}), or null for the search.")
        return float(values[task.task_id])

    def _update_ridge_head(self, task: TaskData) -> dict[str, Any]:
        if task.task_id == 0:
            self.setup_random_projection(task.n_classes)
        # shuffled loader order, as the official "CPs" loader: it decides the 80/20 ridge split
        feats, labels = self.extract_features(task.train_eval, shuffle=True, desc="ridge features")
        H = self.project(feats.to(self.ridge_device))
        Y = one_hot(labels.to(self.ridge_device), task.n_classes)
        self.accumulator.update(H, Y)
        fixed = self.fixed_ridge(task)
        if fixed is None:
            ridge = select_ridge(H, Y, solver=self.cfg.ridge_solver)
            logger.info("Optimal lambda: %s", ridge)
        else:
            ridge = fixed
            logger.info("Fixed lambda: %s (ridge_lambdas)", ridge)
        self.W_o = self.accumulator.solve(ridge, solver=self.cfg.ridge_solver)[: task.seen].to(self.device)
        # an upper bound of how much rounding the solve can pick up (models/ridge.py): above ~1 the head can turn a
        # tiny change of the features into a large change of the predictions
        G = self.accumulator.G  # type: ignore[union-attr]  # set up at task 0 above
        rho = rounding_ratio(gram_trace(G, False), ridge, G.dtype)
        return {"ridge_lambda": float(ridge), "ridge_fixed": fixed is not None, "ridge_rho": float(rho)}

    def _update_prototype_head(self, task: TaskData) -> None:
        """``use_RP`` false (official ``replace_fc`` else-branch): ``fc.weight[c]`` = mean raw feature of class c
        for the current task's classes (the shuffled "CPs" loader, as with RP); old rows are kept."""
        feats, labels = self.extract_features(task.train_eval, shuffle=True, desc="prototypes")
        self.prototypes = grow_prototypes(self.prototypes, feats, labels, task.seen)

    def extra_parameter_count(self) -> int:
        """The official network is always built with the projection head ``simclr`` = Linear(D, 128)
        (algorithms.md §3.2), counted whether or not a tuning phase runs."""
        return self.feature_dim * PROJECTION_DIM + PROJECTION_DIM

    def head_parameter_count(self) -> int:
        """Official heads now (algorithms.md §3.2, §6): ``fc`` = CosineLinear(D, seen), seen * D + 1; with ``use_RP``,
        ``rpfc`` after ``replace_fc`` holds W_o[:seen], seen * M + 1 (seen * D + 1 when M <= 0). Both None (0)
        before the first task; without ``use_RP`` there is no ``rpfc``."""
        seen = self._n_seen()
        if seen == 0:
            return 0
        fc = seen * self.feature_dim + 1
        return fc + (seen * self.proj_dim + 1 if self.use_RP else 0)

    def _n_seen(self) -> int:
        head = self.W_o if self.use_RP else self.prototypes
        return 0 if head is None else int(head.shape[0])

    def head_state(self) -> dict:
        acc = self.accumulator
        return {"W_rand": self.W_rand, "W_o": self.W_o, "G": None if acc is None else acc.G,
                "Q": None if acc is None else acc.Q, "prototypes": self.prototypes}

    def load_head_state(self, state: dict) -> None:
        self.W_rand = None if state["W_rand"] is None else state["W_rand"].to(self.device)
        self.W_o = None if state["W_o"] is None else state["W_o"].to(self.device)
        protos = state.get("prototypes")  # absent in checkpoints written before use_RP false had its own head
        self.prototypes = None if protos is None else protos.to(self.device)
        self.accumulator = None
        if state["G"] is not None:
            self.accumulator = RidgeAccumulator(state["G"].shape[0], state["Q"].shape[1], self.ridge_device)
            self.accumulator.G.copy_(state["G"])
            self.accumulator.Q.copy_(state["Q"])

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        if not self.use_RP:  # the cosine fc head, sigma = 1
            return cosine_logits(features, self.prototypes)
        return self.project(features) @ self.W_o.T
