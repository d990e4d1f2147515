"""Where the data-parallel stages run: in this process, or as Ray Data pipelines on a cluster.

A *stage* is a class built once per worker (it loads what is expensive: a model, a client) and
called with a batch of rows, returning one JSON-serialisable result per row, in order. The local
engine builds it once and calls it on every row at once, exactly what the stage's caller did
before there was an engine; the Ray engine sends the rows through `map_batches` over a pool of
actors, each holding one instance of the stage (`runtime.ray.workers` actors with
`cpus_per_worker` / `gpus_per_worker` each), and puts the results back in row order. A worker
that dies (killed, out of memory) is restarted by Ray and its batch run again, at most
`runtime.ray.max_retries` times; rows are keyed by their position, so none is lost or doubled.

`ray.init(address=runtime.ray.address)` joins an existing cluster (every node needs MOSAIC
installed and the model and data paths readable); with no address a local cluster is started
on this machine once per process and shut down when it exits.
"""

from __future__ import annotations

import atexit
import json
import logging
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from mosaic.config import RuntimeConfig

log = logging.getLogger("mosaic.engine")

ORDER = "_mosaic_order"
RESULT = "_mosaic_result"


class Stage(Protocol):
    """A batch stage: built once per worker, then called on batches of rows."""

    def __call__(self, rows: list[dict[str, Any]]) -> list[Any]:
        ...


class RayUnavailableError(RuntimeError):
    """runtime.engine is 'ray' but ray is not installed."""


def import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise RayUnavailableError(
            f"runtime.engine is 'ray' but ray is not installed ({e}); install it with "
            "`pip install 'mosaic-curation[ray]'`, or set runtime.engine: local") from None
    return ray


def ensure_ray(runtime: "RuntimeConfig") -> Any:
    """Ray, connected: to `runtime.ray.address` when set, else a local cluster (started once per
    process, shut down at exit). A cluster the caller connected to already is used as it is."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    address = runtime.ray.address
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False,
                                  configure_logging=False)
    if address is None:
        # A local cluster on this machine's cores, reachable on 127.0.0.1 only.
        kwargs.update(num_cpus=runtime.ray.local_cpus)
    log.info("connecting to Ray at %s", address or "a new local cluster")
    ray.init(address=address, **kwargs)
    atexit.register(ray.shutdown)
    return ray


def _stage_actor_class() -> type:
    """The Ray Data callable class that holds one stage instance per actor (built lazily so
    this module imports without ray)."""
    import pyarrow as pa

    class StageActor:
        def __init__(self, factory: Callable[..., Stage], kwargs: dict[str, Any]) -> None:
            self.stage = factory(**kwargs)

        def __call__(self, batch: "pa.Table") -> "pa.Table":
            order = batch.column(ORDER)
            rows = batch.drop_columns([ORDER]).to_pylist()
            results = self.stage(rows)
            if len(results) != len(rows):
                raise RuntimeError(f"stage {type(self.stage).__name__} returned {len(results)} "
                                   f"results for {len(rows)} rows")
            return pa.table({ORDER: order,
                             RESULT: pa.array([json.dumps(r) for r in results], pa.string())})

    return StageActor


PartCallback = Callable[[list[int], list[Any]], None]


def map_rows(factory: Callable[..., Stage], rows: Sequence[dict[str, Any]], *,
             kwargs: dict[str, Any] | None = None, runtime: "RuntimeConfig",
             batch_rows: int, what: str = "stage", on_part: PartCallback | None = None,
             ) -> list[Any]:
    """Results of `factory(**kwargs)` over `rows`, in row order, on the configured engine.

    `rows` hold only JSON-like values (they travel as Arrow); results are JSON-serialisable.
    Local: one stage instance, one call over all rows. Ray: batches of `batch_rows` rows over
    `runtime.ray.workers` actors. `on_part(positions, results)` (optional) is called as each
    batch comes back, in completion order, each row exactly once (a batch rerun after its
    worker died is delivered once): progress, or committing results before the run ends. An
    exception it raises stops the pipeline and propagates.
    """
    kwargs = dict(kwargs or {})
    if runtime.engine == "local" or not rows:
        results = list(factory(**kwargs)(list(rows)))
        if on_part is not None and rows:
            on_part(list(range(len(rows))), results)
        return results
    return _map_rows_ray(factory, rows, kwargs=kwargs, runtime=runtime,
                         batch_rows=batch_rows, what=what, on_part=on_part)


def _map_rows_ray(factory: Callable[..., Stage], rows: Sequence[dict[str, Any]], *,
                  kwargs: dict[str, Any], runtime: "RuntimeConfig", batch_rows: int,
                  what: str, on_part: PartCallback | None) -> list[Any]:
    import pyarrow as pa

    ensure_ray(runtime)
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the caller reports progress (mosaic run's line)
    context.print_on_execution_start = False
    settings = runtime.ray
    table = pa.Table.from_pylist([{ORDER: i, **r} for i, r in enumerate(rows)])
    n_batches = -(-len(rows) // batch_rows)
    workers = max(1, min(settings.workers, n_batches))
    # One block per batch, so the workers share the rows from the first batch on. (A
    # `repartition` would need a CPU of its own while the actor pool holds them all.)
    ds = ray.data.from_arrow([table.slice(k * batch_rows, batch_rows) for k in range(n_batches)])
    with warnings.catch_warnings():
        # Ray Data restarts dead actors and reruns their tasks without end by default; a
        # bounded count needs `ray_remote_args`, deprecated for other uses (pinned below 2.64).
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated")
        ds = ds.map_batches(
            _stage_actor_class(), fn_constructor_kwargs={"factory": factory, "kwargs": kwargs},
            batch_size=batch_rows, batch_format="pyarrow",
            # Two batches per worker: one running, the next already queued on the actor. With
            # one, a worker idled between batches until the driver sent the next (each of 2
            # generation workers busy 85% of the time on 2 cores, bench/ray_bench.py).
            compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=2),
            num_cpus=settings.cpus_per_worker, num_gpus=settings.gpus_per_worker or None,
            max_restarts=settings.max_retries, max_task_retries=settings.max_retries)
    log.info("%s: %d rows in %d batches of %d over %d Ray workers", what, len(rows), n_batches,
             batch_rows, workers)
    results: list[Any] = [None] * len(rows)
    seen = [False] * len(rows)
    # Streamed block by block as the workers finish them (not gathered at the end), so a
    # caller can commit each batch's results while the rest are still running.
    parts = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0))
    try:
        for part in parts:
            positions = part.column(ORDER).to_pylist()
            values = [json.loads(r) for r in part.column(RESULT).to_pylist()]
            for i, r in zip(positions, values):
                if seen[i]:
                    raise RuntimeError(f"{what}: row {i} came back twice from the Ray pipeline")
                seen[i] = True
                results[i] = r
            if on_part is not None:
                on_part(positions, values)
    finally:
        # Stopped early (on_part raised): shut the pipeline and its actors down now, not when
        # the traceback holding the iterator is collected; the next pipeline needs the CPUs.
        close = getattr(parts, "close", None)
        if close is not None:
            close()
    missing = [i for i, s in enumerate(seen) if not s]
    if missing:
        raise RuntimeError(f"{what}: {len(missing)} of {len(rows)} rows did not come back from "
                           f"the Ray pipeline (first: row {missing[0]})")
    return results
