"""Registries: one per concept (learners, tuning presets, importance estimators, ...), the way timm registers models.

A component registers itself where it is defined, with a decorator or a call::

    @LEARNERS.register("slca")
    class SLCA(Learner): ...

    ESTIMATORS.register("fisher", fisher_scores)

and everything that needs the list of names (config validation and help, the report's order and labels, the
comparison runner, README's tables) reads the registry. A name is validated where it is looked up: an
unknown name raises one :class:`ConfigError` that names the config key, lists the valid names and suggests the
closest one.

The registries live on the bottom floor (this module imports nothing of ours but the errors); the modules that
fill them are imported on the first lookup (:func:`load_components`), so reading a config never needs the
models until a name must be checked.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Any, Callable, Generic, Iterator, Optional, TypeVar

from utils.errors import ConfigError

T = TypeVar("T")

#: the modules whose import registers every built-in component (learners, presets and their parts, data sets)
COMPONENT_MODULES = ("models", "utils.datasets")
_loaded = False


def load_components() -> None:
    """Import the modules that register the built-in components (once; cheap afterwards)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    try:
        for module in COMPONENT_MODULES:
            importlib.import_module(module)
    except BaseException:
        _loaded = False
        raise


def import_submodules(package: Any) -> list[str]:
    """Import every module of ``package`` (sorted by name) so that each registers its components: adding a learner,
    a preset, an estimator or a scope is adding one file (``models/`` and ``models/sparse/`` call this).

    Returns:
        The module names, sorted.
    """
    names = sorted(info.name for info in pkgutil.iter_modules(package.__path__))
    for name in names:
        importlib.import_module(f"{package.__name__}.{name}")
    return names


class Registry(Generic[T]):
    """Names -> components of one concept, with aliases.

    Args:
        concept: what the entries are, in messages (e.g. "learner").
        key: the config key whose value is looked up here (e.g. "model_name"), in messages.
        extras: names the config key accepts besides the registered ones (e.g. "none" for ``spr``).
    """

    def __init__(self, concept: str, key: str, extras: tuple[str, ...] = ()) -> None:
        self.concept, self.key, self.extras = concept, key, extras
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, obj: Optional[T] = None, *, aliases: tuple[str, ...] = ()) -> Any:
        """Register ``obj`` under ``name`` (and ``aliases``); without ``obj``, a decorator that registers its target.

        Raises:
            ValueError: the name or an alias is taken.
        """
        def add(target: T) -> T:
            for key in (name, *aliases):
                if key in self._entries or key in self._aliases or key in self.extras:
                    raise ValueError(f"{self.concept} name {key!r} is registered twice")
            self._entries[name] = target
            for alias in aliases:
                self._aliases[alias] = name
            return target

        return add if obj is None else add(obj)

    def peek(self, name: str) -> Optional[T]:
        """The entry registered as ``name`` so far, or None, without importing the components (for registration
        code that builds on an earlier entry)."""
        return self._entries.get(self.canonical(name))

    def canonical(self, name: str) -> str:
        """``name`` with its alias resolved (an unknown name is returned as it is), among the entries registered so
        far (no import: see :meth:`resolve`)."""
        return self._aliases.get(name, name)

    def resolve(self, name: str) -> str:
        """The registered name that ``name`` (a name or an alias) stands for, the components imported first: the one
        way to ask which family a config value belongs to (``ranpac_mist`` -> ``ranpac``); an unknown name is returned
        as it is."""
        load_components()
        return self.canonical(name)

    def __contains__(self, name: object) -> bool:
        load_components()
        return isinstance(name, str) and (name in self._entries or name in self._aliases)

    def get(self, name: str, where: str = "") -> T:
        """The component registered as ``name`` (or an alias of it).

        Raises:
            ConfigError: unknown name: the message names ``where`` (a file or ``--set``), the config key, the
                valid names and the closest one.
        """
        load_components()
        if isinstance(name, str) and self.canonical(name) in self._entries:
            return self._entries[self.canonical(name)]
        raise self.error(name, where)

    def error(self, name: Any, where: str = "") -> ConfigError:
        """The config error for an unknown ``name`` (see :meth:`get`)."""
        valid = self.accepted()
        close = difflib.get_close_matches(str(name), valid, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        prefix = f"{where}: " if where else ""
        return ConfigError(f"{prefix}key '{self.key}' has value {name!r}; expected a registered {self.concept}, one "
                           f"of {', '.join(valid)}{hint}.")

    def accepted(self) -> list[str]:
        """Every value the config key accepts: registered names, aliases and extras."""
        load_components()
        return [*self._entries, *self._aliases, *self.extras]

    def names(self) -> list[str]:
        """Registered names (no aliases), in registration order."""
        load_components()
        return list(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        """(name, component) pairs in registration order."""
        load_components()
        return iter(list(self._entries.items()))

    def aliases(self, name: str) -> list[str]:
        """The aliases of ``name``."""
        load_components()
        return [alias for alias, target in self._aliases.items() if target == name]

    def __repr__(self) -> str:
        return f"Registry({self.concept!r}, {len(self._entries)} entries)"


#: learner classes (``model_name``; models/*.py)
LEARNERS: Registry[type] = Registry("learner", "model_name")
#: tuning presets, :class:`models.sparse.presets.Recipe` objects (``spr``; "none" runs no tuning phase)
PRESETS: Registry[Any] = Registry("tuning preset", "spr", extras=("none",))
#: importance estimators (``importance``; models/sparse/estimators.py)
ESTIMATORS: Registry[Any] = Registry("importance estimator", "importance")
#: selection scopes (``selection_scope``; models/sparse/scopes.py)
SCOPES: Registry[Callable[..., Any]] = Registry("selection scope", "selection_scope")
#: per-step mask rules of the official CE ablations (a preset's ``step_rule``; models/sparse/per_step.py)
STEP_RULES: Registry[Callable[..., Any]] = Registry("per-step mask rule", "step_rule")
#: losses of the tuning phase (``scoring_loss``; models/sparse/losses.py)
LOSSES: Registry[Any] = Registry("tuning loss", "scoring_loss")
#: optimizers of the tuning phase (``tuning_optimizer``; models/sparse/optim.py)
OPTIMIZERS: Registry[Callable[..., Any]] = Registry("tuning optimizer", "tuning_optimizer")
#: tuning phases other than score-select-train and per-step masks (a preset's ``phase``; e.g. models/sparse/acl.py)
PHASES: Registry[Any] = Registry("tuning phase", "phase")
#: data sets (``dataset``; utils/datasets.py)
DATASETS: Registry[Any] = Registry("data set", "dataset")

ALL = {"learner": LEARNERS, "preset": PRESETS, "estimator": ESTIMATORS, "scope": SCOPES, "step_rule": STEP_RULES,
       "loss": LOSSES, "optimizer": OPTIMIZERS, "phase": PHASES, "dataset": DATASETS}
