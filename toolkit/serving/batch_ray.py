"""The batch job of `toolkit.serving.batch` on Ray Data (`rtk predict ... --output OUT --engine ray`), no torch.

Same listing, rows, columns, output folder and resume rule as the in-process engine; only the work moves:
- the driver streams the listing (`PartPlan`) into a plan of the pending rows (`OUT/.plan-*/`, Parquet:
  number, source and, for a Parquet manifest with image bytes, the bytes), one file per pending part, so
  the driver never holds the listing and Ray never lists millions of paths itself (ray issue 40686);
- a dataset of the plan files (one block each: `read_parquet` would merge small files into one read task,
  so one actor would get all the work), `map_batches` with an actor class (`ActorPoolStrategy`) that
  loads the Classifier once, reads a plan file and decodes each row itself (threads ahead of inference, as
  in-process) with the runtime's code, bounds and per-row errors (Ray's
  `read_images` would drop aspect ratio, EXIF and alpha, and abort on one bad file); onnxruntime gets as
  many threads as the actor reserves CPUs (it ignores the OMP_NUM_THREADS Ray sets);
- the rows come back to the driver in order (`preserve_order`) and the driver writes each part whole with
  the shared `OutputFolder.write`: Ray's own `write_parquet` names files by block, not by input range, and
  a killed write leaves partial files, so it could not give the resume rule.

Without `address` a local cluster is started on 127.0.0.1 and stopped at the end. With a cluster, every
node must read the bundle, the inputs and OUT at the same paths (a shared filesystem) or the inputs are
URIs. Ray's usage report is off.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from toolkit.core.hardware import usable_cpus
from toolkit.errors import RtkError, first_line
from toolkit.serving.batch import (
    BatchOptions,
    BatchResult,
    Item,
    OutputFolder,
    PartPlan,
    PartWriter,
    Progress,
    decoded_batches,
    predict_rows,
    prepare,
    rows_table,
)

LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
ACTOR_START_S = 300  # the longest wait for the actor pool (a cluster may add nodes first)
NODE_COLUMN = "_rtk_node"  # which node predicted a row: counted by the driver, never written


class Predictor:
    """The Ray actor: one Classifier per actor, each batch decoded on the actor's own threads."""

    def __init__(self, bundle: str, providers: list[str] | None, threads: int, options: BatchOptions) -> None:
        import ray

        from toolkit.serving.classifier import Classifier

        self.clf = Classifier.load(bundle, providers=providers, threads=threads)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="rtk-decode")
        self.options, self.threads = options, threads
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch):
        """`batch`: plan files (one per part); returns their rows, decoding ahead of inference as run_local does."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = []
        for plan_file in batch.column("plan").to_pylist():
            items = plan_items(pq.read_table(plan_file))
            rows = [row for part, decoded in decoded_batches(self.clf, items, self.pool, self.options.batch_size,
                                                             depth=2 + self.threads)
                    for row in predict_rows(self.clf, part, decoded, self.options)]
            tables.append(rows_table(rows, self.options.logits))
        table = pa.concat_tables(tables)
        return table.append_column(NODE_COLUMN, pa.array([self.node] * table.num_rows, pa.string()))


def plan_items(table) -> Iterator[Item]:
    """The items of a plan file (index, source, data, error)."""
    columns = [table.column(name).to_pylist() for name in ("index", "source", "data", "error")]
    for index, source, data, error in zip(*columns):
        yield Item(index, source, data, error)


def write_plan(plan: PartPlan, folder: Path) -> list[str]:
    """The pending items as Parquet files under `folder`, one per pending part (streamed, part by part)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("index", pa.int64()), ("source", pa.string()), ("data", pa.binary()), ("error", pa.string())])
    files: list[str] = []
    rows: list[Item] = []

    def flush() -> None:
        if rows:
            path = folder / f"plan-{rows[0].index // plan.part_rows:08d}.parquet"
            pq.write_table(pa.Table.from_pylist([it.__dict__ for it in rows], schema=schema), path)
            files.append(str(path))
            rows.clear()

    for item in plan.pending():
        if rows and item.index // plan.part_rows != rows[0].index // plan.part_rows:
            flush()
        rows.append(item)
    flush()
    return files


def cpus_per_actor(total: float, workers: int, threads: int | None) -> int:
    """CPUs each actor reserves (and onnxruntime threads it runs): `threads`, else an equal share of all
    but one CPU. Refused when the actors would take every CPU: Ray's read tasks then never run and the
    job hangs without a word (ray issue 44687)."""
    if workers < 1:
        raise RtkError("--workers must be at least 1")
    cpus = threads or max(1, int((total - 1) // workers))
    if workers * cpus >= total:
        raise RtkError(f"{workers} actors x {cpus} CPUs need fewer than the cluster's {total:g} CPUs (Ray's read "
                       "tasks need a CPU too, else the job hangs): lower --workers or --threads")
    return cpus


def run_ray(clf, bundle: str | os.PathLike, inputs: Sequence[str | os.PathLike], output: str | os.PathLike,
            options: BatchOptions, address: str | None = None, workers: int = 1, threads: int | None = None,
            providers: Sequence[str] | None = None) -> BatchResult:
    """The batch job on Ray Data: `clf` (loaded by the caller) names the model and checks the bundle up front."""
    start = time.perf_counter()
    folder, plan = prepare(clf, inputs, output, options)
    result = BatchResult(Path(output))
    result.done_rows, result.done_failed = folder.done_counts()
    staging = Path(tempfile.mkdtemp(prefix=".plan-", dir=folder.root))
    try:
        files = write_plan(plan, staging)
        if files:
            with ray_session(address):
                writer = _predict_on_ray(folder, plan, files, str(Path(bundle).absolute()), options, workers,
                                         threads, providers, result)
            result.rows, result.failed = writer.count, writer.failed
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.seconds = time.perf_counter() - start
    return result


def _predict_on_ray(folder: OutputFolder, plan: PartPlan, files: list[str], bundle: str, options: BatchOptions,
                    workers: int, threads: int | None, providers: Sequence[str] | None,
                    result: BatchResult) -> PartWriter:
    import pyarrow.compute as pc
    import ray
    import ray.data
    import ray.exceptions
    from ray.data import ActorPoolStrategy

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-dataset INFO lines, not our output
    cpus = cpus_per_actor(float(ray.cluster_resources().get("CPU", 0)), workers, threads)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows come back in input order: parts close one by one
    context.enable_progress_bars = False
    # no block goes out before every actor is up: else the first actor ready takes the queue and the
    # others (another node's) may get nothing; a pool the cluster cannot place stops the job with a line
    context.wait_for_min_actors_s = ACTOR_START_S
    with warnings.catch_warnings():  # 2.60 names no parameter for the strategy yet (ray_remote_args until 2.64)
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        # one block per plan file (a part), read by the actor: read_parquet merges small files into one
        # read task, whose one block then feeds one actor however many are asked for
        plans = ray.data.from_items([{"plan": f} for f in files], override_num_blocks=len(files))
        dataset = plans.map_batches(
            Predictor, fn_constructor_kwargs={"bundle": bundle, "providers": list(providers) if providers else None,
                                              "threads": cpus, "options": options},
            compute=ActorPoolStrategy(size=workers), num_cpus=cpus, batch_size=1,
            batch_format="pyarrow", scheduling_strategy="SPREAD")  # one actor per node first, then more
    writer = PartWriter(folder, plan, options.logits, Progress())
    try:
        for table in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            for node, count in zip(*pc.value_counts(table.column(NODE_COLUMN)).flatten()):
                result.nodes[node.as_py()] = result.nodes.get(node.as_py(), 0) + count.as_py()
            writer.add(table.drop_columns([NODE_COLUMN]).to_pylist())
    except ray.exceptions.RayError as exc:  # an actor that died (memory, a lost node): the parts written stay
        raise RtkError(f"the Ray job stopped: {first_line(exc)}; run the same command again to resume") from None
    writer.finish()
    writer.progress.close()
    return writer


class ray_session:
    """Connected to the cluster at `address`, or to a local one started on 127.0.0.1 and stopped after."""

    def __init__(self, address: str | None) -> None:
        self.address = address

    def __enter__(self) -> ray_session:
        os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
        if self.address is None or self.address.split(":")[0] in LOOPBACK:
            # Ray rewrites 127.0.0.1 to this machine's network address (where a loopback cluster does not
            # listen) unless told this is no cluster node; read when ray is first imported
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        import ray

        kwargs = {"log_to_driver": False, "logging_level": logging.WARNING, "ignore_reinit_error": False}
        try:
            if self.address is None:
                ray.init(address="local", num_cpus=usable_cpus(), include_dashboard=False,
                         _node_ip_address="127.0.0.1", **kwargs)
            else:
                ray.init(address=self.address, **kwargs)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise RtkError(f"cannot start or reach the Ray cluster {self.address or '(local)'}: {first_line(exc)}") from None
        return self

    def __exit__(self, *exc) -> None:
        import ray

        ray.shutdown()
