"""Random-access record sources for grain: the Python stdlib, JSONL(.gz), ArrayRecord, tfds.

Every source yields dict records (e.g. {"text": ...} or {"messages": [...]}); the pipeline
picks fields by name. `make_source(config.data)` builds the one a config names.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import sysconfig
from typing import Any, Sequence

import grain

SOURCES = ("stdlib", "jsonl", "array_record", "tfds")


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


class StdlibSource(grain.sources.RandomAccessDataSource):
  """The embedded default corpus: one record {"text", "path"} per stdlib source file."""

  def __init__(self, root: str | None = None):
    self._root = root or sysconfig.get_paths()["stdlib"]
    self._files = stdlib_files(self._root)

  def __len__(self) -> int:
    return len(self._files)

  def __getitem__(self, index: int) -> dict[str, Any]:
    path = self._files[index]
    with open(path, encoding="utf-8", errors="replace") as f:
      return {"text": f.read(), "path": os.path.relpath(path, self._root)}

  def __repr__(self) -> str:
    return f"StdlibSource({self._root!r}, {len(self)} files)"


def expand_paths(paths: str | Sequence[str], field: str = "config.data.paths") -> list[str]:
  """Comma-separated globs (or a list of them) -> sorted existing files; errors name the field."""
  if isinstance(paths, str):
    paths = [p for p in paths.split(",") if p.strip()]
  files = []
  for pattern in paths:
    matched = sorted(glob.glob(os.path.expanduser(pattern.strip())))
    if not matched:
      raise FileNotFoundError(f"{field}: {pattern!r} matches no file")
    files.extend(matched)
  if not files:
    raise FileNotFoundError(f"{field} is empty: give one or more files or globs")
  return files


class JsonlSource(grain.sources.RandomAccessDataSource):
  """JSON-lines files (plain or .gz), one JSON object per line, held in memory as raw lines.

  Fine up to a few GB; convert larger corpora to ArrayRecord for random access from disk.
  """

  def __init__(self, paths: str | Sequence[str]):
    self._lines: list[bytes] = []
    self._where: list[tuple[str, int]] = []
    self._files = expand_paths(paths)
    for path in self._files:
      opener = gzip.open if path.endswith(".gz") else open
      with opener(path, "rb") as f:
        for number, line in enumerate(f, 1):
          if line.strip():
            self._lines.append(line)
            self._where.append((path, number))

  def __len__(self) -> int:
    return len(self._lines)

  def __getitem__(self, index: int) -> dict[str, Any]:
    try:
      record = json.loads(self._lines[index])
    except json.JSONDecodeError as e:
      path, number = self._where[index]
      raise ValueError(f"{path}:{number} is not valid JSON: {e}") from None
    if not isinstance(record, dict):
      path, number = self._where[index]
      raise ValueError(f"{path}:{number} holds a {type(record).__name__}, expected an object")
    return record

  def __repr__(self) -> str:
    return f"JsonlSource({len(self._files)} files, {len(self)} records)"


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


class ArrayRecordSource(grain.sources.RandomAccessDataSource):
  """ArrayRecord files whose records are JSON objects or raw UTF-8 text."""

  def __init__(self, paths: str | Sequence[str]):
    self._files = expand_paths(paths)
    self._source = grain.sources.ArrayRecordDataSource(self._files)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return decode_record(self._source[index])

  def __repr__(self) -> str:
    return f"ArrayRecordSource({len(self._files)} files, {len(self)} records)"


class TfdsSource(grain.sources.RandomAccessDataSource):
  """`tfds.data_source(name, split)` (ArrayRecord-backed); tensorflow-datasets is imported
  only when this source is used."""

  def __init__(self, name: str, split: str = "train", data_dir: str | None = None):
    try:
      import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError("config.data.source='tfds' needs tensorflow-datasets: "
                        "pip install tensorflow-datasets") from e
    self._source = tfds.data_source(name, split=split, data_dir=data_dir or None)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return decode_record(self._source[index])


def make_source(data_config) -> grain.sources.RandomAccessDataSource:
  """The source that `config.data.source` names."""
  kind = data_config.source
  if kind == "stdlib":
    return StdlibSource(data_config.get("stdlib_root") or None)
  if kind == "jsonl":
    return JsonlSource(data_config.paths)
  if kind == "array_record":
    return ArrayRecordSource(data_config.paths)
  if kind == "tfds":
    if not data_config.get("tfds_name"):
      raise ValueError("config.data.tfds_name is empty but config.data.source='tfds'")
    return TfdsSource(data_config.tfds_name, data_config.get("tfds_split", "train"),
                      data_config.get("tfds_data_dir") or None)
  raise ValueError(f"config.data.source={kind!r} is not one of {SOURCES}")
