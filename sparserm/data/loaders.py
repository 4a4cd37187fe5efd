"""Read preference pairs from local files or the hub into the one row schema (see ``schema``).

Every loader returns a ``LoadResult``: malformed records are skipped, counted and recorded as
rejects, never raised; only a file that cannot be read at all raises ``DataError``. For every
format ``len(rows) + len(rejects) == n_read``.

Formats (``LOADERS``):

- ``hh``: HH-RLHF JSONL(.gz), one object a line with ``chosen`` and ``rejected`` whole dialogues.
  prompt = the dialogue up to and including the last ``"\\n\\nAssistant:"``; chosen/rejected = the
  two final Assistant turns with leading whitespace stripped. Rejected: lines that are not UTF-8
  (``undecodable_bytes``) or not a JSON object (``invalid_json``), missing or non-string fields,
  a dialogue with no Assistant turn, dialogues that differ before their last Assistant turn
  (``prefix_mismatch``), an empty or whitespace-only final response (``empty_response``: an empty
  answer is not a valid preference, whichever side it is on) and identical final responses.
- ``jsonl``: JSONL(.gz) objects with string ``prompt``, ``chosen``, ``rejected``; the same
  field rules, plus ``empty_prompt``. Responses are kept verbatim.
- ``parquet``: the same columns, via pyarrow (a file with ``chosen``/``rejected`` but no ``prompt``
  column is read as HH dialogues).
- ``truthfulqa``: see ``truthfulqa.py``.
- ``hub``: ``datasets.load_dataset(id, split=split)``, mapped like parquet.

``max_pairs`` keeps the first N valid pairs in file order; reading stops there, so ``n_read`` and
the rejects then cover only the part of the file that was read.
"""
from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator

from sparserm.data.schema import DataError, LoadResult, make_row
from sparserm.data.truthfulqa import load_truthfulqa

ASSISTANT = "\n\nAssistant:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
_LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".csv", ".parquet", ".json", ".gz")


# ---------------------------------------------------------------- record -> row


def _text_fields(rec: dict, names: tuple[str, ...], result: LoadResult, row_id: str) -> dict | None:
    """The named fields as strings, or None after recording a missing_field / non_text_field reject."""
    out = {}
    for name in names:
        value = rec.get(name)
        if value is None:
            result.add_reject(row_id, "missing_field", f"field {name!r} is missing")
            return None
        if not isinstance(value, str):
            result.add_reject(row_id, "non_text_field", f"field {name!r} is {type(value).__name__}, not a string")
            return None
        out[name] = value
    return out


def _response_reason(chosen: str, rejected: str) -> str | None:
    if not chosen.strip() or not rejected.strip():
        return "empty_response"
    if chosen.strip() == rejected.strip():
        return "identical_responses"
    return None


def split_hh(dialogue: str) -> tuple[str, str] | None:
    """(prompt up to and including the last Assistant marker, final response lstripped), or None."""
    cut = dialogue.rfind(ASSISTANT)
    if cut < 0:
        return None
    cut += len(ASSISTANT)
    return dialogue[:cut], dialogue[cut:].lstrip()


def _add_hh(rec: dict, row_id: str, result: LoadResult) -> None:
    fields = _text_fields(rec, ("chosen", "rejected"), result, row_id)
    if fields is None:
        return
    chosen, rejected = split_hh(fields["chosen"]), split_hh(fields["rejected"])
    if chosen is None or rejected is None:
        side = "chosen" if chosen is None else "rejected"
        result.add_reject(row_id, "no_assistant_turn", f"{side} has no {ASSISTANT!r}")
        return
    if chosen[0] != rejected[0]:
        at = next((i for i, (a, b) in enumerate(zip(chosen[0], rejected[0])) if a != b),
                  min(len(chosen[0]), len(rejected[0])))
        result.add_reject(row_id, "prefix_mismatch", f"dialogues differ at character {at} before the last turn")
        return
    reason = _response_reason(chosen[1], rejected[1])
    if reason:
        result.add_reject(row_id, reason, "final Assistant responses")
        return
    result.rows.append(make_row(chosen[0], chosen[1], rejected[1], result.source, row_id))


def _add_pair(rec: dict, row_id: str, result: LoadResult) -> None:
    fields = _text_fields(rec, ("prompt", "chosen", "rejected"), result, row_id)
    if fields is None:
        return
    if not fields["prompt"].strip():
        result.add_reject(row_id, "empty_prompt", "prompt is empty")
        return
    reason = _response_reason(fields["chosen"], fields["rejected"])
    if reason:
        result.add_reject(row_id, reason, "chosen/rejected")
        return
    result.rows.append(make_row(fields["prompt"], fields["chosen"], fields["rejected"], result.source, row_id))


def _style(keys) -> Callable[[dict, str, LoadResult], None]:
    """Records with a prompt field are prompt/chosen/rejected; without, HH dialogues."""
    return _add_pair if "prompt" in keys else _add_hh


def _full(result: LoadResult, max_pairs: int | None) -> bool:
    return max_pairs is not None and len(result.rows) >= max_pairs


# ---------------------------------------------------------------- JSONL


def _raw_lines(path: str) -> Iterator[bytes]:
    """The file's lines as bytes, a UTF-8 byte-order mark (an editor's on Windows) off the first."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            for i, line in enumerate(fh):
                yield line[3:] if i == 0 and line.startswith(b"\xef\xbb\xbf") else line
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {exc}") from exc


def _json_records(path: str, result: LoadResult) -> Iterator[tuple[str, Any]]:
    """(row_id, parsed object) for each non-blank line; bad lines become rejects."""
    for lineno, raw in enumerate(_raw_lines(path)):
        if not raw.strip():
            continue
        row_id = f"{result.source}:{lineno}"
        result.n_read += 1
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            result.add_reject(row_id, "undecodable_bytes", str(exc))
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as exc:
            result.add_reject(row_id, "invalid_json", str(exc))
            continue
        if not isinstance(rec, dict):
            result.add_reject(row_id, "invalid_json", f"a JSON {type(rec).__name__}, not an object")
            continue
        yield row_id, rec


def _load_jsonl_as(path: str, fmt: str, add, max_pairs: int | None) -> LoadResult:
    result = LoadResult(format=fmt, source=Path(path).name)
    if not _full(result, max_pairs):
        for row_id, rec in _json_records(path, result):
            add(rec, row_id, result)
            if _full(result, max_pairs):
                break
    return result


def load_hh(path: str, *, max_pairs: int | None = None, split: str = "train") -> LoadResult:
    return _load_jsonl_as(path, "hh", _add_hh, max_pairs)


def load_jsonl(path: str, *, max_pairs: int | None = None, split: str = "train") -> LoadResult:
    return _load_jsonl_as(path, "jsonl", _add_pair, max_pairs)


def _peek_jsonl_format(path: str) -> str:
    """hh when the first JSON object has no prompt field, jsonl when it has one (or none parse)."""
    for raw in _raw_lines(path):
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(rec, dict):
            return "jsonl" if "prompt" in rec else "hh"
    return "jsonl"


# ---------------------------------------------------------------- Parquet and hub


def load_parquet(path: str, *, max_pairs: int | None = None, split: str = "train") -> LoadResult:
    import pyarrow.parquet as pq

    result = LoadResult(format="parquet", source=Path(path).name)
    try:
        pf = pq.ParquetFile(path)
        add = _style(pf.schema_arrow.names)
        n = 0
        for batch in pf.iter_batches(batch_size=1024):
            for rec in batch.to_pylist():
                if _full(result, max_pairs):
                    return result
                result.n_read += 1
                add(rec, f"{result.source}:{n}", result)
                n += 1
    except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        raise DataError(f"cannot read parquet file {path}: {exc}") from exc
    return result


def load_hub(path: str, *, max_pairs: int | None = None, split: str = "train") -> LoadResult:
    """A hub dataset by id; any import, network or hub failure is a DataError naming the id."""
    try:
        import datasets

        ds = datasets.load_dataset(path, split=split)
    except Exception as exc:  # noqa: BLE001 - network, auth, missing split, missing package...
        raise DataError(f"cannot load hub dataset {path!r} (split {split!r}): {type(exc).__name__}: {exc}") from exc
    result = LoadResult(format="hub", source=path)
    add = None
    for n, rec in enumerate(ds):
        if _full(result, max_pairs):
            break
        add = add or _style(rec)
        result.n_read += 1
        add(dict(rec), f"{path}:{split}:{n}", result)
    return result


# ---------------------------------------------------------------- registry and entry point

LOADERS: dict[str, Callable[..., LoadResult]] = {
    "hh": load_hh,
    "truthfulqa": load_truthfulqa,
    "jsonl": load_jsonl,
    "parquet": load_parquet,
    "hub": load_hub,
}


def resolve_format(path: str, format: str = "auto") -> str:
    """The concrete format for ``path``; DataError for an unknown format or a missing local file."""
    if format != "auto" and format not in LOADERS:
        raise DataError(f"unknown data format {format!r} for {path}: expected auto|{'|'.join(LOADERS)}")
    if format == "hub":
        return format
    p = Path(path)
    if p.is_dir():
        raise DataError(f"data path {path} is a directory, not a data file")
    if not p.is_file():
        if format == "auto" and _HUB_ID.match(path) and not path.lower().endswith(_LOCAL_SUFFIXES):
            return "hub"
        where = "" if p.is_absolute() else (f" (a relative path is read from the working directory, {Path.cwd()}: "
                                            "in a Ray job, the uploaded checkout; give a path every node sees)")
        raise DataError(f"data file {path} does not exist{where}")
    if format != "auto":
        return format
    name = p.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _peek_jsonl_format(path)
    if name.endswith(".csv"):
        return "truthfulqa"
    if name.endswith(".parquet"):
        return "parquet"
    raise DataError(f"cannot tell the format of {path} from its name (.jsonl, .jsonl.gz, .csv, .parquet); "
                    f"set format to one of {'|'.join(LOADERS)}")


def load_pairs(path: str, format: str = "auto", *, max_pairs: int | None = None, split: str = "train",
               max_per_prompt: int | None = None) -> LoadResult:
    """Preference rows from ``path`` (a local file or a hub id); see the module docstring.

    ``max_per_prompt`` keeps the first N valid pairs of each prompt (file order) before ``max_pairs``
    applies, so a capped subsample of a many-pairs-per-question file (TruthfulQA) spans more questions;
    the whole file is read then."""
    for name, value in (("max_pairs", max_pairs), ("max_per_prompt", max_per_prompt)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0 or None, got {value}")
    path = str(path)
    fmt = resolve_format(path, format)
    if max_per_prompt is None:
        return LOADERS[fmt](path, max_pairs=max_pairs, split=split)
    result = LOADERS[fmt](path, max_pairs=None, split=split)
    seen: dict[str, int] = {}
    kept = []
    for row in result.rows:
        seen[row["prompt"]] = seen.get(row["prompt"], 0) + 1
        if seen[row["prompt"]] <= max_per_prompt and (max_pairs is None or len(kept) < max_pairs):
            kept.append(row)
    result.rows = kept
    return result
