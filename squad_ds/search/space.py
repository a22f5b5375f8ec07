"""The search space of `squad-ds search`: recipe keys (the spelling of `--set`) and their ranges, from a YAML file
or `--param`, checked against the recipe before any trial runs. Pure: no Optuna until `distributions`.

    train.lr: {low: 1.0e-5, high: 5.0e-4, log: true}      # --param train.lr=log:1e-5:5e-4
    train.warmup_proportion: {low: 0.0, high: 0.2}         # --param train.warmup_proportion=float:0:0.2
    train.epochs: {choices: [1, 2, 3]}                     # --param train.epochs=choice:1,2,3
    train.micro_batch_size: {low: 8, high: 32, int: true}  # --param train.micro_batch_size=int:8:32
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from squad_ds.config import ConfigError, load_recipe, parse_override

KINDS = ("float", "log", "int", "choice")
_FIELDS = {"low", "high", "log", "int", "step", "choices"}


@dataclass(frozen=True)
class Param:
    key: str  # section.key, as `--set` spells it
    kind: str  # one of KINDS
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.key} in {list(self.choices)}"
        return f"{self.key} {self.kind} [{self.low}, {self.high}]" + (f" step {self.step}" if self.step else "")


def _number(v: Any, where: str, integer: bool = False) -> float | int:
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or (isinstance(v, float) and not math.isfinite(v)):
        raise ConfigError(f"{where}: expected {'a whole number' if integer else 'a finite number'}, got {v!r}")
    return v


def make_param(key: str, spec: Any, where: str) -> Param:
    """One parameter from its YAML mapping (`where` names its source in errors)."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping such as {{low: 1.0e-5, high: 5.0e-4, log: true}} or "
                          f"{{choices: [1, 2, 3]}}, got {type(spec).__name__}")
    unknown = sorted(set(spec) - _FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(sorted(_FIELDS))})")
    if "choices" in spec:
        if set(spec) != {"choices"}:
            raise ConfigError(f"{where}: choices cannot be combined with {sorted(set(spec) - {'choices'})}")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: choices must be a non-empty list")
        bad = [c for c in choices if not (c is None or isinstance(c, (bool, int, float, str)))]
        if bad:
            raise ConfigError(f"{where}: choices must be numbers, strings, booleans or null, got {bad[0]!r}")
        if len(set(map(repr, choices))) != len(choices):
            raise ConfigError(f"{where}: choices repeat a value: {choices}")
        return Param(key, "choice", choices=tuple(choices))
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where}: give low and high (a range) or choices (a list)")
    for flag in ("log", "int"):
        if not isinstance(spec.get(flag, False), bool):
            raise ConfigError(f"{where}: {flag} must be true or false, got {spec[flag]!r}")
    integer, log = spec.get("int", False), spec.get("log", False)
    low, high = _number(spec["low"], f"{where}: low", integer), _number(spec["high"], f"{where}: high", integer)
    step = spec.get("step")
    if step is not None:
        step = _number(step, f"{where}: step", integer)
        if step <= 0:
            raise ConfigError(f"{where}: step {step} must be positive")
        if log:
            raise ConfigError(f"{where}: a log range takes no step")
    if not low < high:
        raise ConfigError(f"{where}: empty or reversed range: low {low} must be below high {high}")
    if log and low <= 0:
        raise ConfigError(f"{where}: a log range needs positive bounds, got low {low}")
    kind = "int" if integer else "log" if log else "float"
    return Param(key, kind, low, high, step if step is not None else (1 if integer and not log else None))


def parse_cli(text: str) -> Param:
    """`--param KEY=KIND:LOW:HIGH` (KIND float, log, int) or `--param KEY=choice:A,B,C` (values read as YAML)."""
    where = f"--param {text}"
    if "=" not in text:
        raise ConfigError(f"{where}: expected KEY=float:LOW:HIGH, log:LOW:HIGH, int:LOW:HIGH or choice:A,B,…")
    key, _, value = text.partition("=")
    kind, _, rest = value.partition(":")
    if kind not in KINDS or not rest:
        raise ConfigError(f"{where}: expected KEY=float:LOW:HIGH, log:LOW:HIGH, int:LOW:HIGH or choice:A,B,…")
    if kind == "choice":
        values = [parse_override(f"x={v}", "--param")[1] for v in rest.split(",")]
        return make_param(key.strip(), {"choices": values}, where)
    bounds = rest.split(":")
    if len(bounds) != 2:
        raise ConfigError(f"{where}: a range is {kind}:LOW:HIGH")
    low, high = (parse_override(f"x={b}", "--param")[1] for b in bounds)
    spec = {"low": low, "high": high, **({"log": True} if kind == "log" else {}), **({"int": True} if kind == "int"
                                                                                     else {})}
    return make_param(key.strip(), spec, where)


def load_file(path: str | Path) -> list[Param]:
    """A YAML search-space file: a mapping of `section.key` to its range or choices."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--space {p}: no such file")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"--space {p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"--space {p}: must be a non-empty mapping of recipe keys (section.key) to ranges, got "
                          f"{type(raw).__name__ if raw is not None else 'an empty file'}")
    return [make_param(str(k), v, f"--space {p}: {k}") for k, v in raw.items()]


def build_space(space_file: str | None, cli: list[str]) -> list[Param]:
    params = (load_file(space_file) if space_file else []) + [parse_cli(t) for t in cli]
    if not params:
        raise ConfigError("no search space: give --space FILE.yaml or --param KEY=RANGE (e.g. "
                          "--param train.lr=log:1e-5:5e-4)")
    keys = [p.key for p in params]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ConfigError(f"search space: {twice[0]} is given twice")
    return params


def _probes(p: Param) -> list[Any]:
    return list(p.choices) if p.kind == "choice" else [p.low, p.high]


def override(key: str, value: Any) -> str:
    """`--set` text for a value, written so the recipe reads it back as the same value (YAML)."""
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


def check_against_recipe(params: list[Param], recipe: str | None, sets: list[str]) -> None:
    """Every key exists and every end of its range (every choice) is a value the recipe accepts: an unknown key or a
    value out of the key's range is found now, not in a trial."""
    load_recipe(recipe, sets)
    fixed = {".".join(parse_override(s)[0]) for s in sets}
    for p in params:
        if p.key in fixed:
            raise ConfigError(f"{p.key}: both searched and fixed with --set; give one")
        if p.key.count(".") != 1:
            raise ConfigError(f"search space: {p.key}: keys are section.key, as --set spells them")
        for value in _probes(p):
            try:
                load_recipe(recipe, [*sets, override(p.key, value)])
            except ConfigError as e:
                raise ConfigError(f"search space: {p.key}={value!r}: {e}") from None


def recipe_point(params: list[Param], recipe: str | None, sets: list[str]) -> tuple[dict[str, Any] | None, str]:
    """The recipe's own value of every searched key, when each lies in its range (or among its choices): the trial
    that shows whether the search beat what it started from. Otherwise (None, why)."""
    base = load_recipe(recipe, sets)
    point: dict[str, Any] = {}
    for p in params:
        section, key = p.key.split(".")
        value = getattr(getattr(base, section), key)
        if p.kind == "choice":  # the choice itself (epochs 1 for the recipe's 1.0); True is no choice of 1
            same = [c for c in p.choices if value == c and isinstance(value, bool) == isinstance(c, bool)]
            inside, value = bool(same), same[0] if same else value
        else:
            inside = isinstance(value, (int, float)) and not isinstance(value, bool) and p.low <= value <= p.high
            if inside and p.step:
                inside = math.isclose(((value - p.low) / p.step) % 1, 0, abs_tol=1e-9) or \
                    math.isclose(((value - p.low) / p.step) % 1, 1, abs_tol=1e-9)
        if not inside:
            return None, f"the recipe's {p.key} is {value!r}, outside the space ({p.describe()})"
        point[p.key] = value
    return point, ""


def distributions(params: list[Param]) -> dict[str, Any]:
    """Optuna's distributions, keyed by the recipe key."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for p in params:
        if p.kind == "choice":
            out[p.key] = CategoricalDistribution(p.choices)
        elif p.kind == "int":
            out[p.key] = IntDistribution(int(p.low), int(p.high), step=int(p.step or 1))
        else:
            out[p.key] = FloatDistribution(float(p.low), float(p.high), log=p.kind == "log",
                                           step=None if p.step is None else float(p.step))
    return out
