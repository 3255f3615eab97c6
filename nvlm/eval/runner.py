"""`run_benchmark`: generate answers for one benchmark (local model or OpenAI-compatible endpoint), then score them.

Notable:
- Resumable. Every finished answer is appended to `<out>/<benchmark>.predictions.jsonl` as one JSON line
  (`id`, `prediction`, `raw_prediction`, then the sample's reference fields), flushed and fsync'd at once. A rerun
  skips ids already there. A crash can only leave a partial *last* line (no trailing newline); it is cut off
  before appending, and that sample is generated again.
- Scoring always re-applies `postprocess(raw_prediction, protocol)` and the *current* reference fields, so one set
  of generations can be rescored under the other protocol without regenerating. Only the ids of the requested
  samples (after `limit`) are scored, in data order; extra lines from a bigger earlier run are kept but ignored.
  Outputs: `<benchmark>.score.json` (the aggregate, written atomically) and `<benchmark>.per_sample.jsonl`
  (every scored record with its `score`).
- Local generation is greedy and batched (`batch_size` samples at a time, grouped by `max_new_tokens` so each
  sample gets its own budget). Endpoint generation runs `concurrency` requests at once (endpoint.py).
- Sharding (Megatron-style data parallel). With `world_size > 1` (arguments, or torchrun's RANK/WORLD_SIZE), rank r
  answers `samples[r::world_size]` into `<benchmark>.predictions.rank{r}.jsonl`. Rank 0 then merges the main file
  and every shard (first occurrence of an id wins, as in Megatron's de-duplication), removes the shards and scores.
  If a torch.distributed process group is initialised, all ranks meet at a barrier first. Without one, rank 0
  merges only when every requested id is present; otherwise it reports what is missing, and rerunning the same
  command (with any world size) after the other ranks finish generates nothing and merges.
- Sample loading and answer post-processing come from `nvlm.eval.tasks` (`load_samples`, `postprocess`).
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from tqdm import tqdm

from nvlm.eval.metrics import check_protocol, get_scorer
from nvlm.eval.score import score_records, write_per_sample

RESERVED = ("id", "prediction", "raw_prediction")


# ---- the task contract (nvlm.eval.tasks), imported lazily ------------------------------------------------------

def load_samples(benchmark: str, data, *, limit: int | None = None) -> list:
    from nvlm.eval import tasks

    return tasks.load_samples(benchmark, data, limit=limit)


def postprocess(benchmark: str, text: str, protocol: str = "nvlm") -> str:
    from nvlm.eval import tasks

    return tasks.postprocess(benchmark, text, protocol)


# ---- predictions files -----------------------------------------------------------------------------------------

def predictions_path(out_dir: str | os.PathLike, benchmark: str, rank: int | None = None) -> Path:
    name = f"{benchmark}.predictions.jsonl" if rank is None else f"{benchmark}.predictions.rank{rank}.jsonl"
    return Path(out_dir) / name


def shard_paths(out_dir: str | os.PathLike, benchmark: str) -> list[Path]:
    """Every `<benchmark>.predictions.rank{r}.jsonl` in `out_dir`, by rank."""
    pattern = re.compile(rf"^{re.escape(benchmark)}\.predictions\.rank(\d+)\.jsonl$")
    found = [(int(m.group(1)), p) for p in Path(out_dir).glob(f"{benchmark}.predictions.rank*.jsonl")
             if (m := pattern.match(p.name))]
    return [p for _, p in sorted(found)]


def read_predictions(path: str | os.PathLike, *, repair: bool = False) -> list[dict]:
    """The records of a predictions file (missing file: none). A trailing fragment without a newline is what a
    crash mid-write leaves: it is ignored, and with `repair` cut off the file so appends start on a fresh line.
    A malformed *complete* line is not a crash artefact and raises ValueError with its line number."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    complete, _, partial = data.rpartition(b"\n")
    if partial and repair:
        with open(path, "r+b") as f:
            f.truncate(len(data) - len(partial))
            f.flush()
            os.fsync(f.fileno())
    records = []
    for lineno, line in enumerate(complete.split(b"\n") if complete else [], 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise ValueError(f"{path}, line {lineno}: malformed JSON; fix or delete the line to resume") from None
        if not isinstance(record, dict) or "id" not in record:
            raise ValueError(f"{path}, line {lineno}: expected a JSON object with an 'id'")
        records.append(record)
    return records


class PredictionWriter:
    """Appends one JSON line per record and makes it durable (flush + fsync) before returning."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._f = None

    def write(self, record: Mapping) -> None:
        if self._f is None:
            self._f = open(self.path, "a", encoding="utf-8")
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_record(sample, raw: str, prediction: str) -> dict:
    """`{"id", "prediction", "raw_prediction", **reference}`; the runner's own keys win over the reference's."""
    record = {"id": str(sample.id), "prediction": prediction, "raw_prediction": raw}
    record.update((k, v) for k, v in dict(sample.reference).items() if k not in RESERVED)
    return record


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read_all(out_dir: Path, benchmark: str) -> tuple[list[dict], list[Path]]:
    """Main file then shards by rank (so the first occurrence of an id is the oldest, lowest-rank answer)."""
    shards = shard_paths(out_dir, benchmark)
    records = read_predictions(predictions_path(out_dir, benchmark))
    for shard in shards:
        records += read_predictions(shard)
    return records, shards


def merge_predictions(out_dir: str | os.PathLike, benchmark: str) -> dict[str, dict]:
    """Fold every shard file into the main predictions file, de-duplicated by id (first occurrence wins), and
    delete the shards. Returns {id: record}. The main file is replaced atomically."""
    out_dir = Path(out_dir)
    records, shards = _read_all(out_dir, benchmark)
    merged: dict[str, dict] = {}
    for record in records:
        merged.setdefault(str(record["id"]), record)
    if shards or len(merged) < len(records):
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in merged.values())
        _write_atomic(predictions_path(out_dir, benchmark), lines)
        for shard in shards:
            shard.unlink()
    return merged


# ---- generation ------------------------------------------------------------------------------------------------

def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def generate_local(pipe, samples: Sequence, *, max_tiles: int | None = None,
                   batch_size: int = 8) -> Iterator[tuple[object, str]]:
    """(sample, raw text) for every sample: greedy, `batch_size` at a time; samples are grouped by their
    `max_new_tokens` so each gets its own budget (a batch shares one SamplingParams)."""
    from nvlm.generate import SamplingParams

    groups: dict[int, list] = {}
    for s in samples:
        groups.setdefault(int(s.max_new_tokens), []).append(s)
    for budget, group in groups.items():
        params = SamplingParams(max_new_tokens=budget, temperature=0.0)
        for batch in _chunks(group, max(1, batch_size)):
            prepared = []
            for s in batch:
                try:
                    prepared.append(pipe.prepare(s.prompt, list(s.images), system=s.system, max_tiles=max_tiles))
                except (ValueError, OSError) as exc:
                    raise ValueError(f"sample {s.id!r}: {exc}") from exc
            for s, completion in zip(batch, pipe.generate_prepared(prepared, params)):
                yield s, completion.text


def generate_endpoint(client, samples: Sequence, *, concurrency: int = 8) -> Iterator[tuple[object, str]]:
    """(sample, raw text) in completion order, at most `concurrency` requests in flight. The first failure stops
    the run: queued requests are cancelled and the error names the sample."""
    from nvlm.eval.endpoint import EndpointError

    def ask(s):
        try:
            return client.complete(s.prompt, list(s.images), system=s.system, max_tokens=s.max_new_tokens)
        except EndpointError as exc:
            raise EndpointError(f"sample {s.id!r}: {exc}") from exc
        except (ValueError, OSError) as exc:  # an unreadable image or a placeholder mismatch
            raise ValueError(f"sample {s.id!r}: {exc}") from exc

    pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="nvlm-eval")
    queue = iter(samples)
    running: dict = {}
    try:
        # Submit lazily: only `concurrency` payloads (base64 images) exist at any time.
        for s in queue:
            running[pool.submit(ask, s)] = s
            if len(running) >= max(1, concurrency):
                break
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                s = running.pop(fut)
                yield s, fut.result()
                nxt = next(queue, None)
                if nxt is not None:
                    running[pool.submit(ask, nxt)] = nxt
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# ---- the run ---------------------------------------------------------------------------------------------------

def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values, else the initialised process group, else torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    dist = _dist()
    if dist is not None:
        rank = dist.get_rank() if rank is None else rank
        world_size = dist.get_world_size() if world_size is None else world_size
    rank = int(os.environ.get("RANK", 0)) if rank is None else int(rank)
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    return rank, world_size


def _dist():
    """torch.distributed when a process group is initialised, else None."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


def _unique(samples: Iterable) -> list:
    seen: set[str] = set()
    out = []
    for s in samples:
        if str(s.id) not in seen:
            seen.add(str(s.id))
            out.append(s)
    return out


def _load_pipeline(model, dtype, device):
    if not isinstance(model, (str, os.PathLike)):
        return model  # already a Pipeline
    import torch

    from nvlm.pipeline import load

    if device is None and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return load(model, dtype=dtype, device=device)


def score_predictions(benchmark: str, samples: Sequence, predictions: Mapping[str, Mapping], *,
                      protocol: str = "nvlm", per_sample: str | os.PathLike | None = None) -> dict:
    """Score the requested samples from their stored raw answers: {"benchmark", "protocol", "n", "score", ...}."""
    records = []
    for s in samples:
        stored = predictions[str(s.id)]
        raw = stored.get("raw_prediction", stored.get("prediction"))
        raw = "" if raw is None else str(raw)
        records.append(make_record(s, raw, postprocess(benchmark, raw, protocol)))
    scores = score_records(benchmark, records, protocol)
    aggregate = dict(get_scorer(benchmark).aggregate(records, scores, protocol))
    result = {"benchmark": benchmark, "protocol": protocol, "n": aggregate.pop("n", len(records)),
              "score": aggregate.pop("score")}
    result.update(aggregate)
    if per_sample is not None:
        write_per_sample(str(per_sample), records, scores)
    return result


def run_benchmark(benchmark: str, data, *, model=None, endpoint=None, api_model: str | None = None,
                  out_dir: str | os.PathLike = "runs/eval", limit: int | None = None, max_tiles: int | None = None,
                  protocol: str = "nvlm", batch_size: int = 8, concurrency: int = 8, retries: int = 3,
                  api_key: str | None = None, rank: int | None = None, world_size: int | None = None,
                  progress: bool = True, dtype=None, device: str | None = None, timeout: float = 600.0) -> dict:
    """Generate the missing answers for `benchmark` and score all requested samples.

    `model` is a checkpoint directory or a loaded `Pipeline`; `endpoint` is a server URL (with `api_model`) or a
    ready `ChatClient`. Exactly one of the two. Returns the score dict also written to `<benchmark>.score.json`
    (plus `generated`: answers produced by this call), or, on a rank that does not score, a status dict with
    `"complete": False`.
    """
    check_protocol(protocol)
    get_scorer(benchmark)  # unknown benchmark: fail before any work
    if (model is None) == (endpoint is None):
        raise ValueError("give exactly one of a model (checkpoint or Pipeline) or an endpoint URL")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    rank, world_size = resolve_rank(rank, world_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    samples = _unique(load_samples(benchmark, data, limit=limit))
    if not samples:
        raise ValueError(f"{benchmark}: no samples to run (data {data}, limit {limit})")
    own_path = predictions_path(out, benchmark, None if world_size == 1 else rank)
    read_predictions(own_path, repair=True)  # cut a crash's partial line before appending
    stored, _ = _read_all(out, benchmark)
    done = {str(r["id"]) for r in stored}
    mine = samples[rank::world_size]
    todo = [s for s in mine if str(s.id) not in done]

    if todo:
        if endpoint is not None:
            from nvlm.eval.endpoint import ChatClient

            client = endpoint if isinstance(endpoint, ChatClient) else ChatClient(
                str(endpoint), api_model or "", api_key=api_key, retries=retries, timeout=timeout)
            answers = generate_endpoint(client, todo, concurrency=concurrency)
        else:
            pipe = _load_pipeline(model, dtype, device)
            answers = generate_local(pipe, todo, max_tiles=max_tiles, batch_size=batch_size)
        desc = benchmark if world_size == 1 else f"{benchmark} [rank {rank}/{world_size}]"
        with PredictionWriter(own_path) as writer, tqdm(total=len(mine), initial=len(mine) - len(todo), desc=desc,
                                                        unit="sample", disable=not progress,
                                                        file=sys.stderr) as bar:
            for sample, raw in answers:
                raw = raw or ""
                writer.write(make_record(sample, raw, postprocess(benchmark, raw, protocol)))
                bar.update(1)

    dist = _dist()
    if world_size > 1 and dist is not None:
        dist.barrier()
    if rank != 0:
        return {"benchmark": benchmark, "rank": rank, "world_size": world_size, "generated": len(todo),
                "complete": False}

    predictions = merge_predictions(out, benchmark)
    missing = [str(s.id) for s in samples if str(s.id) not in predictions]
    if missing:
        print(f"{benchmark}: {len(missing)} of {len(samples)} answers are still missing (other ranks not finished); "
              f"rerun the same command once they are to merge and score", file=sys.stderr)
        return {"benchmark": benchmark, "rank": rank, "world_size": world_size, "generated": len(todo),
                "complete": False, "missing": len(missing)}

    result = score_predictions(benchmark, samples, predictions, protocol=protocol,
                               per_sample=out / f"{benchmark}.per_sample.jsonl")
    result["model"] = _model_label(model, endpoint, api_model)
    _write_atomic(out / f"{benchmark}.score.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return {**result, "generated": len(todo)}


def _model_label(model, endpoint, api_model) -> str:
    if endpoint is not None:
        name = getattr(endpoint, "model", None) or api_model
        return str(name or endpoint)
    path = model if isinstance(model, (str, os.PathLike)) else getattr(model, "path", None)
    return Path(path).name if path is not None else type(model).__name__
