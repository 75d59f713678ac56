"""Random-access record sources for grain: the Python stdlib, JSONL(.gz), ArrayRecord, tfds.

Every source yields dict records (e.g. {"text": ...} or {"messages": [...]}); the pipeline
picks fields by name. `make_source(config.data)` builds the one a config names, with a check
that each record holds the fields `config.data` names: a bad file or record raises DataError
naming the file and the line (JSONL) or record number.
"""

from __future__ import annotations

import functools
import glob
import gzip
import io
import json
import os
import sysconfig
from typing import Any, Callable, Iterator, Sequence

import grain
import numpy as np

from dcjax import workdir as workdir_lib
from dcjax.data import sft as sft_lib

SOURCES = ("stdlib", "jsonl", "array_record", "tfds")


class DataError(ValueError):
  """A data file or record is unusable; the message names the file and the line or record."""


def parse_json_line(line: bytes, where: str) -> dict[str, Any]:
  """One JSONL line -> a dict; DataError naming `where` for bad UTF-8, bad JSON or a non-object."""
  try:
    record = json.loads(line.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start} of the "
                    "line)") from None
  except json.JSONDecodeError as e:
    raise DataError(f"{where}: not valid JSON: {e}") from None
  if not isinstance(record, dict):
    raise DataError(f"{where}: holds a JSON {type(record).__name__}, expected an object")
  return record


def _open_lines(path: str):
  """A binary line iterator over a local or remote (gs://, read whole through etils.epath)
  file, gunzipped when it ends in .gz; use as a context manager."""
  if workdir_lib.is_remote(path):
    data = workdir_lib.epath(path).read_bytes()
    return gzip.GzipFile(fileobj=io.BytesIO(data)) if path.endswith(".gz") else io.BytesIO(data)
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_jsonl(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
  """("path:line", record) for each non-blank line of a JSONL file (plain or .gz; local or
  gs://)."""
  with _open_lines(path) as f:
    for number, line in enumerate(f, 1):
      if line.strip():
        where = f"{path}:{number}"
        yield where, parse_json_line(line, where)


def record_text(record: dict[str, Any], text_field: str = "text") -> str:
  """A pretraining record's text; ValueError naming the field when it is missing or not text."""
  if text_field not in record:
    raise ValueError(f"record has no field {text_field!r} (config.data.text_field); "
                     f"keys: {sorted(record)}")
  text = record[text_field]
  if not isinstance(text, str):
    raise ValueError(f"field {text_field!r} (config.data.text_field) holds a "
                     f"{type(text).__name__}, expected a string")
  return text


def _sft_text(record: dict[str, Any], **fields: str) -> str:
  return sft_lib.split_record(record, **fields)[1]


def text_getter(data_config) -> Callable[[dict[str, Any]], str]:
  """record -> the text `config.data` trains on (pretraining: the text field; SFT: the
  response), raising ValueError naming the field a record lacks. Picklable."""
  if data_config.get("kind", "pretrain") == "sft":
    return functools.partial(_sft_text, messages_field=data_config.messages_field,
                             prompt_field=data_config.prompt_field,
                             response_field=data_config.response_field)
  return functools.partial(record_text, text_field=data_config.get("text_field", "text"))


class _CheckedSource(grain.sources.RandomAccessDataSource):
  """A source whose records pass `check` (e.g. `text_getter`); errors name `where(index)`."""

  _check: Callable[[dict[str, Any]], Any] | None = None

  def where(self, index: int) -> str:
    raise NotImplementedError

  def _checked(self, record: dict[str, Any], index: int) -> dict[str, Any]:
    if self._check is not None:
      try:
        self._check(record)
      except ValueError as e:
        raise DataError(f"{self.where(index)}: {e}") from None
    return record


def stdlib_files(root: str | None = None) -> list[str]:
  """Sorted .py files of the running interpreter's standard library (no site-packages)."""
  root = root or sysconfig.get_paths()["stdlib"]
  files = []
  for path in glob.glob(os.path.join(root, "**", "*.py"), recursive=True):
    rel = os.path.relpath(path, root)
    if "site-packages" in rel or "dist-packages" in rel:
      continue
    files.append(path)
  if not files:
    raise FileNotFoundError(f"no .py files under the stdlib directory {root!r}")
  return sorted(files)


class StdlibSource(_CheckedSource):
  """The embedded default corpus: one record {"text", "path"} per stdlib source file."""

  def __init__(self, root: str | None = None, check=None):
    self._root = root or sysconfig.get_paths()["stdlib"]
    self._files = stdlib_files(self._root)
    self._check = check

  def __len__(self) -> int:
    return len(self._files)

  def __getitem__(self, index: int) -> dict[str, Any]:
    path = self._files[index]
    with open(path, encoding="utf-8", errors="replace") as f:
      record = {"text": f.read(), "path": os.path.relpath(path, self._root)}
    return self._checked(record, index)

  def where(self, index: int) -> str:
    return self._files[index]

  def __repr__(self) -> str:
    return f"StdlibSource({self._root!r}, {len(self)} files)"


_GLOB_CHARS = "*?["


def _glob_remote(pattern: str) -> list[str]:
  """`gs://bucket/dir/*.array_record` -> the matching URLs (through etils.epath)."""
  parts = pattern.split("/")  # ["gs:", "", "bucket", ...]
  wild = [i for i, part in enumerate(parts) if i >= 3 and any(c in part for c in _GLOB_CHARS)]
  try:
    if not wild:
      return [pattern] if workdir_lib.epath(pattern).exists() else []
    base = "/".join(parts[:wild[0]])
    root = workdir_lib.epath(base)
    if not root.exists():
      return []
    return sorted(workdir_lib.join(base, *p.relative_to(root).parts)
                  for p in root.glob("/".join(parts[wild[0]:])))
  except (ImportError, NotImplementedError) as e:
    raise OSError(f"cannot list {pattern}: {type(e).__name__}: {e} (gs:// needs gcsfs: "
                  "pip install -e '.[gcs]')") from e


def glob_paths(pattern: str) -> list[str]:
  """Sorted matches of one glob: local (with ~), or remote (gs://...) through etils.epath."""
  if workdir_lib.is_remote(pattern):
    return _glob_remote(pattern)
  if pattern.startswith("file://"):
    pattern = pattern[len("file://"):]
  return sorted(glob.glob(os.path.expanduser(pattern)))


def expand_paths(paths: str | Sequence[str], field: str = "config.data.paths") -> list[str]:
  """Comma-separated globs (or a list of them) -> sorted existing files; errors name the field.
  gs:// globs (`*`, `?`, `[...]`; not `**`) are listed through etils.epath and stay URLs
  (ArrayRecord and JSONL read them)."""
  if isinstance(paths, str):
    paths = [p for p in paths.split(",") if p.strip()]
  files = []
  for pattern in paths:
    if workdir_lib.is_remote(pattern.strip()) and "**" in pattern:
      raise ValueError(f"{field}: {pattern.strip()!r}: '**' is not supported in gs:// globs "
                       "(etils.epath refuses it: one listing per directory); use '*' per level")
    matched = glob_paths(pattern.strip())
    if not matched:
      raise FileNotFoundError(f"{field}: {pattern!r} matches no file")
    files.extend(matched)
  if not files:
    raise FileNotFoundError(f"{field} is empty: give one or more files or globs")
  return files


class JsonlSource(_CheckedSource):
  """JSON-lines files (plain or .gz), one JSON object per line, held in memory as raw lines.

  Fine up to a few GB; convert larger corpora to ArrayRecord for random access from disk.
  """

  def __init__(self, paths: str | Sequence[str], check=None):
    self._lines: list[bytes] = []
    self._where: list[tuple[str, int]] = []
    self._paths, self._files, self._check = paths, expand_paths(paths), check
    for path in self._files:
      with _open_lines(path) as f:
        for number, line in enumerate(f, 1):
          if line.strip():
            self._lines.append(line)
            self._where.append((path, number))

  def __len__(self) -> int:
    return len(self._lines)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._checked(parse_json_line(self._lines[index], self.where(index)), index)

  def where(self, index: int) -> str:
    path, number = self._where[index]
    return f"{path}:{number}"

  def __repr__(self) -> str:
    return f"JsonlSource({self._paths!r}: {len(self._files)} files, {len(self)} records)"


def decode_record(raw: bytes | str | dict) -> dict[str, Any]:
  """ArrayRecord / tfds payloads: a JSON object, or plain UTF-8 text as {"text": ...}."""
  if isinstance(raw, dict):
    return {k: v.decode("utf-8", "replace") if isinstance(v, bytes) else v
            for k, v in raw.items()}
  text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
  if text.lstrip().startswith("{"):
    try:
      record = json.loads(text)
      if isinstance(record, dict):
        return record
    except json.JSONDecodeError:
      pass
  return {"text": text}


class ArrayRecordSource(_CheckedSource):
  """ArrayRecord files whose records are JSON objects or raw UTF-8 text."""

  def __init__(self, paths: str | Sequence[str], check=None):
    self._paths, self._files, self._check = paths, expand_paths(paths), check
    self._source = grain.sources.ArrayRecordDataSource(self._files)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._checked(decode_record(self._source[index]), index)

  def where(self, index: int) -> str:
    """"file record k" (counted from 0 within the file); only called for an error."""
    for path in self._files:
      count = len(grain.sources.ArrayRecordDataSource([path]))
      if index < count:
        return f"{path} record {index}"
      index -= count
    return f"record {index} past the end of {self._paths!r}"

  def __repr__(self) -> str:
    return f"ArrayRecordSource({self._paths!r}: {len(self._files)} files, {len(self)} records)"


class TfdsSource(_CheckedSource):
  """`tfds.data_source(name, split)` (ArrayRecord-backed); tensorflow-datasets is imported
  only when this source is used."""

  def __init__(self, name: str, split: str = "train", data_dir: str | None = None, check=None):
    self._name, self._split, self._check = name, split, check
    try:
      import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError("config.data.source='tfds' needs tensorflow-datasets: "
                        "pip install tensorflow-datasets") from e
    self._source = tfds.data_source(name, split=split, data_dir=data_dir or None)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._checked(decode_record(self._source[index]), index)

  def where(self, index: int) -> str:
    return f"tfds {self._name}/{self._split} record {index}"


def make_source(data_config) -> grain.sources.RandomAccessDataSource:
  """The source that `config.data.source` names; its records are checked by `text_getter`."""
  kind, check = data_config.source, text_getter(data_config)
  if kind == "stdlib":
    return StdlibSource(data_config.get("stdlib_root") or None, check=check)
  if kind == "jsonl":
    return JsonlSource(data_config.paths, check=check)
  if kind == "array_record":
    return ArrayRecordSource(data_config.paths, check=check)
  if kind == "tfds":
    if not data_config.get("tfds_name"):
      raise ValueError("config.data.tfds_name is empty but config.data.source='tfds'")
    return TfdsSource(data_config.tfds_name, data_config.get("tfds_split", "train"),
                      data_config.get("tfds_data_dir") or None, check=check)
  raise ValueError(f"config.data.source={kind!r} is not one of {SOURCES}")


def require_text(docs, data_config, what: str, source=None, sample: int = 256) -> None:
  """DataError unless some record of `docs` holds non-blank text to train on.

  Looks at up to `sample` records spread evenly over `docs` (stopping at the first with
  text), so a corpus of empty texts stops here instead of training on end-of-text tokens.
  `what` names the records ("training", "held-out"); `source` is shown in the message.
  """
  text_of = text_getter(data_config)
  indices = np.unique(np.linspace(0, len(docs) - 1, min(len(docs), sample)).astype(int))
  for index in indices:
    if text_of(docs[int(index)]).strip():
      return
  field = ("the response (config.data.messages_field / response_field)"
           if data_config.get("kind") == "sft"
           else f"field {data_config.get('text_field', 'text')!r} (config.data.text_field)")
  raise DataError(f"{source if source is not None else 'config.data'}: none of the "
                  f"{len(indices)} {what} records checked (of {len(docs)}) has any text in "
                  f"{field}: nothing to train or evaluate on")
