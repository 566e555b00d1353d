"""How the stages use Ray Data: one set-up of its context, and the user's error out of Ray's wrappers.

* Our own bars show progress (fed by counters the workers keep); Ray Data's bars and execution
  banners would print a screenful per stage, so they are off and its logs go to the run's log file.
* Parquet is read on Ray Data's V1 path (see `configure`).
* A check inside a Ray Data task (a malformed record, a missing column) raises one of the project's
  errors; Ray delivers it wrapped (`RayTaskError(UserCodeException)`, with a remote traceback in its
  text). `user_error` finds the project's own error inside, so the CLI still prints one clear line.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from .errors import FtcotError


def configure() -> None:
    """Ray Data's context for this driver (call after `ray.init`)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.log_internal_stack_trace = False
    # Ray Data 2.60's DataSourceV2 Parquet read starts 32 footer-reading actors for every read: 7.3 s for a
    # 2,400-row table here, against 0.3 s on the V1 reader (measured on the 2-core machines). Shards of one
    # table are few and their footers small, so the V1 path is the faster one at every size we write.
    ctx.use_datasource_v2 = False


def user_error(e: BaseException) -> Optional[FtcotError]:
    """The project's error that a Ray (Data) failure carries, if any."""
    seen: set[int] = set()
    todo: list[Optional[BaseException]] = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, FtcotError) and not _is_ray_wrapper(x):
            return x
        todo += [getattr(x, "cause", None), x.__cause__, x.__context__]
    return None


def _is_ray_wrapper(x: BaseException) -> bool:
    return type(x).__module__.startswith("ray.")


@contextmanager
def user_errors() -> Iterator[None]:
    """Re-raise a project error found inside a Ray failure as itself (one line at the CLI)."""
    try:
        yield
    except FtcotError as e:
        found = user_error(e)
        if found is None or found is e:
            raise
        raise found from None
    except Exception as e:
        found = user_error(e)
        if found is None:
            raise
        raise found from None


def ordered(ds):
    """The dataset with Ray Data keeping its row order (blocks leave each operator in input order)."""
    ds.context.execution_options.preserve_order = True
    return ds


def _rows_batch(batch, fn: Callable, kwargs: dict):
    import pyarrow as pa
    import ray

    # Large arguments travel as object refs (put once by the driver): fetched here, zero-copy on this node.
    kwargs = {k: ray.get(v) if isinstance(v, ray.ObjectRef) else v for k, v in kwargs.items()}
    out = fn(batch.to_pylist(), **kwargs)
    return pa.Table.from_pylist(out) if out else pa.table({})


def map_rows(ds, fn: Callable[..., list[dict]], batch_size: Optional[int] = 4096, **kwargs: Any):
    """`ds.map_batches` for logic written on rows: `fn(rows, **kwargs)` gets a batch as a list of dicts
    and returns the rows it makes (any number). The plain functions stay testable without Ray."""
    return ds.map_batches(_rows_batch, fn_args=(fn, kwargs), batch_format="pyarrow", batch_size=batch_size)


def collect_rows(ds, fn: Callable[..., dict], batch_size: Optional[int] = 4096, **kwargs: Any) -> list[dict]:
    """`fn(rows, **kwargs) -> dict` over each batch, the small dicts gathered on the driver in table order
    (counters and partial sums: never the rows themselves)."""
    import json

    def one(rows: list[dict], **kw: Any) -> list[dict]:
        return [{"part": json.dumps(fn(rows, **kw), default=str)}]

    return [json.loads(r["part"]) for r in ordered(map_rows(ds, one, batch_size, **kwargs)).take_all()]
