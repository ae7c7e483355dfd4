"""The user's command line checked against the configs: unknown keys and group options, in one line.

Hydra already refuses ``trainer.max_step=5`` (a key the config lacks) and ``model=resnet_tin`` (an
option the group lacks), but in 8 to 23 lines; and it accepts ``+trainer.max_step=5`` (the hint it
prints itself), which then trains with the key ignored. Here:

- :func:`hydra_mistake` turns Hydra's composition errors into one sentence that names the key or the
  option and the nearest known one (``difflib``) or the choices;
- :func:`check_additions` refuses a ``+key=value`` / ``++key=value`` that adds a key the composed
  config did not have: it composes the config again without those additions and looks each one up.
  A key may be added only where the config leaves a value open: under a ``null`` (``+model.config=
  {...}`` where ``model.config: null``) or under :data:`OPEN` (``model.config``: the fields of the
  library's own config class, passed to its constructor as they are).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from .errors import UsageError

OPEN = ("model.config",)  # mappings whose keys are the library's (a transformers config's fields)


def _did_you_mean(word: str, choices, prefix: str = "") -> str:
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def unknown_key(key: str, parent, parent_path: str) -> str:
    """``unknown key trainer.max_step (did you mean trainer.max_steps?)``, or the keys there are."""
    leaf = key[len(parent_path) + 1:] if parent_path else key
    known = sorted(str(k) for k in parent.keys() if k != "hydra") if parent is not None else []
    prefix = f"{parent_path}." if parent_path else ""
    hint = _did_you_mean(leaf.split(".")[0], known, prefix)
    if not hint and known:
        hint = f": {parent_path or 'the config'} has {', '.join(known)}"
    return f"unknown key {key}{hint}"


def check_additions(cfg, overrides: list[str], config_name: str | None, conf_dir: Path) -> None:
    """Raise :class:`UsageError` if an ``+``/``++`` override added a key the config does not know."""
    if not any(o.lstrip().startswith("+") for o in overrides):
        return
    from hydra import compose
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import DictConfig

    parsed = OverridesParser.create().parse_overrides(overrides)
    added = [o for o in parsed if (o.is_add() or o.is_force_add()) and not (conf_dir / o.key_or_group).is_dir()]
    if not added:
        return
    base = compose(config_name=config_name, overrides=[o.input_line for o in parsed if o not in added])
    for o in added:
        key = o.key_or_group
        node, path = base, ""
        for part in key.split("."):
            if path in OPEN or not isinstance(node, DictConfig):
                break  # an open mapping, or a null (or a value) replaced by a mapping
            if part not in node:
                raise UsageError(unknown_key(key, node, path))
            node, path = node.get(part), f"{path}.{part}" if path else part


_COULD_NOT = re.compile(r"Could not (?:find|load) '([^']+)'")
_OVERRIDE = re.compile(r"Could not (?:override|append to config|delete)[^']*'([^']+)'")


def hydra_mistake(e: BaseException, conf_dir: Path) -> str | None:
    """One line for a Hydra composition error (the user's mistake), or None for anything else."""
    from hydra.errors import ConfigCompositionException, HydraException, OverrideParseException

    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    if isinstance(e, OverrideParseException):
        return (f"cannot read the override {e.override!r}: {first} (quote a value with spaces, brackets or "
                "commas, e.g. 'data.labels=[a,b]')")
    if not isinstance(e, (ConfigCompositionException, HydraException)):
        return None
    found = _COULD_NOT.search(text)
    if found:
        group, _, value = found.group(1).rpartition("/")
        folder = conf_dir / group
        options = getattr(e, "options", None) or sorted(p.stem for p in folder.glob("*.yaml"))
        if group and options:
            return (f"unknown {group} {value!r}{_did_you_mean(value, options)}: the {group} options are "
                    f"{', '.join(options)}")
    override = _OVERRIDE.search(first)
    cause = e.__cause__
    if override and "An item is already at" in text:
        key = override.group(1)
        return f"{key} is already in the config: set it with {key}=VALUE (no '+')"
    if override and cause is not None:
        key = override.group(1)
        parent = getattr(cause, "parent_node", None)
        parent_path = key.rpartition(".")[0]
        full = getattr(cause, "full_key", None)
        if full and full != key and key.startswith(f"{full}."):  # a section that is not there at all
            parent_path = full.rpartition(".")[0]
        return unknown_key(key, parent, parent_path if parent is not None else "")
    return first


#: eval.latency: key -> (what it must be, check); a nested section that build.SETTINGS does not reach
#: (``eval.latency.reps=0`` died in the middle of an eval: IndexError, the median of no timings)
LATENCY = {
    "batch_size": ("an integer >= 1 (inputs per timed call)", lambda v: _whole(v) and v >= 1),
    "warmup": ("an integer >= 0 (untimed calls first)", lambda v: _whole(v) and v >= 0),
    "reps": ("an integer >= 1 (timed calls; their median is the latency)", lambda v: _whole(v) and v >= 1),
}


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_latency(cfg) -> None:
    """Raise :class:`UsageError` for an ``eval.latency`` setting that cannot be timed."""
    eval_cfg = cfg.get("eval") if hasattr(cfg, "get") else None
    latency = eval_cfg.get("latency") if eval_cfg is not None and hasattr(eval_cfg, "get") else None
    if latency is None:
        return
    if not hasattr(latency, "get"):
        raise UsageError(f"eval.latency must hold batch_size, warmup and reps (e.g. eval.latency.reps=10), "
                         f"got {latency!r}")
    for key, (want, ok) in LATENCY.items():
        value = latency.get(key)
        if key in latency and not ok(value):
            raise UsageError(f"eval.latency.{key} must be {want}, got {value!r}")


def check_test_subset(cfg) -> None:
    """Raise :class:`UsageError` unless ``eval.test_subset`` is a positive integer or null."""
    eval_cfg = cfg.get("eval") if hasattr(cfg, "get") else None
    n = eval_cfg.get("test_subset") if eval_cfg is not None and hasattr(eval_cfg, "get") else None
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise UsageError(f"eval.test_subset must be a positive integer (the first N test examples) or null, got {n!r}")


#: keys that take more than their default's type, checked where they are read: ``data.augment`` is
#: false, true or a list of steps (``sortedcli.data.vision.augment_steps``)
OWN_CHECK = {("data", "augment")}


def check_group_types(cfg, group: str, choice: str | None, conf_dir: Path) -> None:
    """Raise :class:`UsageError` for a switch of ``cfg[group]`` that is not true or false where the same
    key's default in the group's own file is (``conf/data/digits.yaml``: ``download: false``): the
    schema of the switches, which are read for their truth (``data.download=flase`` was true, and
    ``data.raw=flase`` dropped the chat template). Numbers are checked with their ranges where they
    are read (``data.val_fraction must be a fraction in [0, 1) ...``); null values are not checked."""
    from omegaconf import OmegaConf

    path = conf_dir / group / f"{choice}.yaml"
    section = cfg.get(group) if choice else None
    if section is None or not path.is_file() or not hasattr(section, "items"):
        return
    try:
        defaults = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        given = OmegaConf.to_container(section, resolve=True, throw_on_missing=False)
    except Exception:  # noqa: BLE001 - an unreadable file or interpolation is reported where it is used
        return
    if not isinstance(defaults, dict):
        return
    for key, default in defaults.items():
        value = given.get(key)
        if value is None or (group, key) in OWN_CHECK or not isinstance(default, bool):
            continue
        if not isinstance(value, bool):
            raise UsageError(f"{group}.{key} must be true or false (as its default in {group}/{choice}.yaml), "
                             f"got {value!r}")


def check_dims(cfg) -> None:
    """Raise :class:`UsageError` for ``dims.NAME.levels`` that is not a list (nor ``all``):
    ``dims.width.levels=0.5`` died in the grid's builder with "'float' object is not iterable". The
    values themselves are checked against the model where the grid is built."""
    dims = cfg.get("dims") if hasattr(cfg, "get") else None
    if dims is None or not hasattr(dims, "items"):
        return
    from omegaconf import ListConfig

    for name, spec in dims.items():
        levels = spec.get("levels") if hasattr(spec, "get") else spec
        if isinstance(levels, (list, tuple, ListConfig)) or levels == "all" or levels is None:
            continue
        example = "[1,2]' (or all)" if name == "depth" else "[0.5,1.0]'"
        raise UsageError(f"dims.{name}.levels must be a list, e.g. 'dims.{name}.levels={example}, got {levels!r}")
