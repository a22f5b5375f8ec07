"""The study of `squad-ds search`: its storage (SQLite in the output folder by default, or any database URL Optuna
takes), the checks made before any trial (the same search space and settings as the study already stored), and one
worker's loop.

Killed workers are Optuna's business: every running trial beats a heartbeat into the storage; a trial whose heart
stopped (its worker killed, its host gone) is failed by the next worker that looks (`fail_stale_trials`) and queued
again with the same parameters (`RetryFailedTrialCallback`); the rerun is a new trial with its own folder, and the
failed one is not counted. n_trials is the study's total over every worker: a fresh trial takes one of its n places
by its number, so two workers asking at the same moment cannot both take the last one (the later is marked failed,
"surplus", and never run)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from squad_ds.config import ConfigError

STUDY_DB = "study.db"
RECIPE_TRIAL = "recipe_values"  # the user attribute of the trial that runs the recipe's own values
MAX_RETRY = 3  # reruns of one trial whose worker died each time; then it stays failed (and counts)


def need_optuna() -> None:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError("squad-ds search needs the search extra (Optuna): pip install \"squad-ds[search]\"") \
            from None


def storage_url(storage: str | None, out: Path) -> str:
    return storage or f"sqlite:///{(out / STUDY_DB).absolute()}"


def open_storage(url: str, heartbeat_s: int) -> Any:
    """Optuna's RDB storage with the heartbeat on; one line naming the URL when it cannot be opened."""
    import optuna
    from optuna.storages import RDBStorage

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):  # Optuna ≥ 4.9's name for it
        retry = {"heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(MAX_RETRY)}
    else:
        retry = {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=MAX_RETRY)}
    try:
        for attempt in range(5):
            try:
                return RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_s,
                                  grace_period=3 * heartbeat_s, **retry)
            except Exception as e:  # noqa: BLE001 - workers started together race to create the tables: again
                if attempt == 4 or not any(w in str(e) for w in ("UNIQUE constraint", "already exists", "locked")):
                    raise
                time.sleep(0.5 + attempt)
    except (ImportError, ValueError, optuna.exceptions.StorageInternalError) as e:
        raise ConfigError(f"--storage {url}: cannot open it ({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - SQLAlchemy's errors (no server, bad URL, no driver) name no user error
        if type(e).__module__.split(".")[0] != "sqlalchemy":
            raise
        raise ConfigError(f"--storage {url}: cannot open it ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def settings_doc(recipe: str | None, sets: list[str], metric: str, deepspeed_config: str | None,
                 distributions: dict[str, Any]) -> dict[str, Any]:
    """What every worker of one study must agree on, as stored with it."""
    from optuna.distributions import distribution_to_json

    return {"recipe": recipe, "sets": sets, "metric": metric, "deepspeed_config": deepspeed_config,
            "space": {k: json.loads(distribution_to_json(d)) for k, d in distributions.items()}}


def open_study(storage: Any, name: str, settings: dict[str, Any], distributions: dict[str, Any], resume: bool,
               sampler: Any, pruner: Any) -> tuple[Any, bool]:
    """Create the study, or join the one stored under `name` when it was made with the same settings (another
    worker's, or --resume's); anything else is one line before any trial runs. Returns (study, whether this call
    created it: of workers started together, exactly one did, as the storage's unique study name decides)."""
    import optuna
    from optuna.distributions import json_to_distribution

    exists = name in {s.study_name for s in optuna.get_all_study_summaries(storage)}
    if resume and not exists:
        raise ConfigError(f"--resume: no study {name!r} in {storage.url}: nothing to continue (leave out --resume "
                          "to start it)")
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize", sampler=sampler,
                                    pruner=pruner)
        study.set_user_attr("squad_ds_search", settings)
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    stored = study.user_attrs.get("squad_ds_search")
    if stored is not None:
        for key in ("recipe", "sets", "metric", "deepspeed_config"):
            if stored.get(key) != settings[key]:
                raise ConfigError(f"study {name!r} in {storage.url} was started with {key} {stored.get(key)!r}, not "
                                  f"{settings[key]!r}: give the same, or another --study-name")
        space = {k: json_to_distribution(json.dumps(v)) for k, v in stored.get("space", {}).items()}
    else:
        space = {}
    for t in study.get_trials(deepcopy=False):  # Optuna records each trial's distributions: they must agree too
        space.update(t.distributions)
    if space and space != distributions:
        differ = sorted(k for k in set(space) | set(distributions) if space.get(k) != distributions.get(k))
        raise ConfigError(f"study {name!r} in {storage.url} has another search space ({differ[0]}: stored "
                          f"{space.get(differ[0])}, given {distributions.get(differ[0])}): give the same space, or "
                          "another --study-name")
    return study, False


def is_fresh(t: Any) -> bool:
    """A trial asked for anew, not a rerun queued for one whose worker died."""
    return "failed_trial" not in t.system_attrs


def counted(study: Any) -> list[Any]:
    """The trials that fill the study's places: every one but the failed ones that were queued again (their rerun
    counts instead) and the surplus ones."""
    import optuna

    trials = study.get_trials(deepcopy=False)
    rerun = {n for t in trials if not is_fresh(t) for n in t.system_attrs.get("retry_history", [])}
    return [t for t in trials if not t.user_attrs.get("surplus")
            and not (t.state == optuna.trial.TrialState.FAIL and t.number in rerun)]


def places_taken(study: Any, before: int | None = None) -> int:
    """Fresh trials (with a number below `before`): each takes one of the n places; a rerun takes its original's."""
    return sum(1 for t in study.get_trials(deepcopy=False)
               if is_fresh(t) and (before is None or t.number < before))


def work(study: Any, n_trials: int, objective: Callable[[Any], float], catch: tuple, wait_s: float,
         say=print) -> None:
    """Run trials until the study has its n: a queued rerun first, then fresh trials while places are left; then
    wait for trials still running elsewhere, which end or (their worker dead) are failed and queued again here."""
    import optuna
    from optuna.trial import TrialState

    current: list[int] = []

    def guarded(trial: Any) -> float:
        current[:] = [trial.number]
        me = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
        if is_fresh(me) and places_taken(study, before=trial.number) >= n_trials:
            from squad_ds.search.objective import Surplus

            trial.set_user_attr("surplus", True)
            raise Surplus(f"trial {trial.number}: the study already has its {n_trials} trials")
        return objective(trial)

    waiting_said = False
    while True:
        optuna.storages.fail_stale_trials(study)
        states = [t.state for t in study.get_trials(deepcopy=False)]
        if TrialState.WAITING in states or places_taken(study) < n_trials:
            try:
                study.optimize(guarded, n_trials=1, catch=catch)
            except KeyboardInterrupt:
                _requeue_interrupted(study, current)
                raise
            waiting_said = False
            continue
        if TrialState.RUNNING not in states:
            return
        if not waiting_said:
            say(f"all {n_trials} trials taken; waiting for {states.count(TrialState.RUNNING)} still running "
                "(a rerun starts here if their worker died)")
            waiting_said = True
        time.sleep(wait_s)


def _requeue_interrupted(study: Any, current: list[int]) -> None:
    """Ctrl-C: Optuna marks the trial failed at once (its heart was still beating, so no other worker would rerun
    it); queue it again as a stale one is, with the storage's own callback."""
    from optuna.trial import TrialState

    t = next((t for t in study.get_trials(deepcopy=False) if current and t.number == current[0]), None)
    requeue = getattr(study._storage, "get_heartbeat_stale_trial_callback", None) or getattr(
        study._storage, "get_failed_trial_callback", None)
    if t is not None and t.state == TrialState.FAIL and requeue is not None and requeue() is not None:
        requeue()(study, t)
