"""A run's workdir: a local directory, or a bucket (`gs://...`) seen through a local mirror.

Checkpoints always go to `<root>/checkpoints` through orbax, which writes to local disk and to
GCS alike (tensorstore), from every process. Every other file a mode writes — metrics.jsonl,
TensorBoard events, completions, eval reports — is written by process 0 with plain file I/O to
`local`:

- a local workdir is its own `local`;
- a remote workdir gets a mirror directory (`$DCJAX_LOCAL_DIR/<bucket>/<path>`, default
  `/tmp/dcjax`). `pull()` copies the remote's files down at start, but only those the mirror
  lacks, so a run resumed on a fresh VM after a preemption appends to the metrics it had
  pushed; `push()` copies the mirror up after each checkpoint, after each metrics write
  (`push_logs`, at most every $DCJAX_PUSH_LOGS_EVERY_S = 10 s) and at exit, so a preemption
  loses at most the log lines of one log interval.

Why a mirror and not direct writes: GCS objects cannot be appended to (metrics.jsonl is
appended to, and truncated on a resume), and tensorboardX's own gs:// writer needs
google-cloud-storage and re-uploads the whole event file on each flush, which is what a push
does anyway.

Remote paths go through `etils.epath` (installed with orbax), which reads and writes `gs://`
with `gcsfs` or TensorFlow installed (the `tpu` extra installs gcsfs).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import time
from typing import Callable

import jax
import numpy as np

CHECKPOINTS = "checkpoints"
# Metric writes push a mirrored workdir at most this often (seconds): see Workdir.push_logs.
PUSH_LOGS_EVERY_S = float(os.environ.get("DCJAX_PUSH_LOGS_EVERY_S", "10"))
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_remote(path: str) -> bool:
  """`gs://b/x`, `s3://...`: anything with a URL scheme; `file://` counts as local."""
  return bool(_SCHEME.match(path)) and not path.startswith("file://")


def join(root: str, *parts: str) -> str:
  """os.path.join that keeps a URL's `//` (and never makes a remote path absolute)."""
  return "/".join([root.rstrip("/"), *parts]) if is_remote(root) else os.path.join(root, *parts)


def abspath(path: str) -> str:
  """Absolute local path; remote paths unchanged."""
  if path.startswith("file://"):
    path = path[len("file://"):]
  return path if is_remote(path) else os.path.abspath(path)


def default_mirror(root: str) -> str:
  base = os.environ.get("DCJAX_LOCAL_DIR", os.path.join("/tmp", "dcjax"))
  return os.path.join(base, _SCHEME.sub("", root).strip("/").replace("..", "_"))


@dataclasses.dataclass(frozen=True)
class Workdir:
  """`root`: what the user named; `local`: where host files are written (see module doc).

  `mirrored` is True when `local` stands in for `root` and must be pushed; a test can make a
  local `root` mirrored to exercise the same path as a bucket.
  """
  root: str
  local: str
  mirrored: bool = False
  # (size, mtime) of each file as last pushed: push() skips files that have not changed.
  _pushed: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)
  # {"time": perf_counter of the last push}: push_logs() throttles on it.
  _clock: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

  @classmethod
  def create(cls, root: str, local: str | None = None) -> "Workdir":
    root = abspath(root)
    if not is_remote(root) and local is None:
      return cls(root=root, local=root)
    return cls(root=root, local=os.path.abspath(local or default_mirror(root)), mirrored=True)

  @property
  def checkpoints(self) -> str:
    return join(self.root, CHECKPOINTS)

  def path(self, *parts: str) -> str:
    """A host file's path (in `local`)."""
    return os.path.join(self.local, *parts)

  def shared_path(self, *parts: str) -> str:
    """A file every process reads from `root` (e.g. a tokenizer process 0 trained)."""
    return join(self.root, *parts)

  def shared_file(self, rel: str, create: Callable[[str], object]) -> str:
    """Local path of `rel`, made once by process 0 with `create(local_path)` and read by every
    process through `root`: a bucket, a shared filesystem, or (one host) the local workdir."""
    local = self.path(rel)
    if not os.path.exists(local) and self.mirrored:
      self._fetch(rel)
    everywhere = _all_processes(os.path.exists(local))
    if everywhere:
      return local
    if jax.process_index() == 0 and not os.path.exists(local):
      os.makedirs(os.path.dirname(local), exist_ok=True)
      create(local)
      if self.mirrored:
        _copy(local, self.shared_path(*rel.split("/")))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f"dcjax shared file {rel}")
      if not os.path.exists(local) and self.mirrored:
        self._fetch(rel)
    if not os.path.exists(local):
      raise FileNotFoundError(
          f"process {jax.process_index()} cannot see {local}, which process 0 wrote: the "
          f"workdir {self.root} is not shared between hosts. Use a gs:// workdir or a shared "
          f"filesystem, or give the file in the config")
    return local

  def _fetch(self, rel: str) -> bool:
    src = self.shared_path(*rel.split("/"))
    try:
      if not _epath(src).exists():
        return False
    except Exception as e:  # pylint: disable=broad-except
      raise OSError(_remote_hint(src, e)) from e
    _copy(src, self.path(rel))
    return True

  def pull(self) -> list[str]:
    """Copies down the remote files the mirror lacks (not checkpoints); their relative paths."""
    os.makedirs(self.local, exist_ok=True)
    if not self.mirrored:
      return []
    copied = []
    for rel in _list_files(self.root):
      dest = os.path.join(self.local, rel)
      if not os.path.exists(dest):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        _copy(join(self.root, *rel.split(os.sep)), dest)
        copied.append(rel)
    return copied

  def publish(self, rel: str) -> None:
    """Copies one host file (`path(rel)`) to `root` now (mirrored workdirs; process 0)."""
    if self.mirrored and jax.process_index() == 0:
      _copy(self.path(rel), self.shared_path(*rel.split("/")))

  def push_logs(self, min_interval_s: float | None = None) -> list[str]:
    """`push()` after a metrics write, unless the last push was under `min_interval_s` ago:
    a bucket then lags the run by at most one log interval (or `min_interval_s`, when log
    lines come faster), not by a checkpoint interval."""
    if not self.mirrored:
      return []
    if min_interval_s is None:
      min_interval_s = PUSH_LOGS_EVERY_S
    if time.perf_counter() - self._clock.get("time", -float("inf")) < min_interval_s:
      return []
    return self.push()

  def push(self) -> list[str]:
    """Process 0 copies the mirror's new or changed files up (overwriting); their paths."""
    if not self.mirrored or jax.process_index() != 0 or not os.path.isdir(self.local):
      return []
    self._clock["time"] = time.perf_counter()
    pushed = []
    for top, dirs, files in os.walk(self.local):
      dirs[:] = [d for d in dirs if not (top == self.local and d == CHECKPOINTS)]
      for name in files:
        path = os.path.join(top, name)
        rel = os.path.relpath(path, self.local)
        st = os.stat(path)
        if self._pushed.get(rel) == (st.st_size, st.st_mtime_ns):
          continue
        _copy(path, join(self.root, *rel.split(os.sep)))
        self._pushed[rel] = (st.st_size, st.st_mtime_ns)
        pushed.append(rel)
    return pushed


def local_copy(path: str) -> str:
  """A local path for `path`: itself when local; a remote file or directory (an hf_dir on
  gs://, a tokenizer) is copied through etils.epath to `default_mirror(path)` first, each file
  skipped when a copy of the same size is there (a rerun, or a second process on the host),
  so safetensors can memory-map it as it does a local checkpoint."""
  if path.startswith("file://"):
    return path[len("file://"):]
  if not is_remote(path):
    return path
  dest = default_mirror(path)
  try:
    src = _epath(path)
    if not src.is_dir():
      _copy_if_changed(src, dest)
      return dest
    for top, _, files in src.walk():
      rel = top.relative_to(src).parts
      for name in files:
        _copy_if_changed(top / name, os.path.join(dest, *rel, name))
  except OSError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise OSError(_remote_hint(f"{path} -> {dest}", e)) from e
  return dest


def _copy_if_changed(src, dest: str) -> None:
  size = src.stat().length
  if os.path.exists(dest) and os.path.getsize(dest) == size:
    return
  os.makedirs(os.path.dirname(dest), exist_ok=True)
  tmp = f"{dest}.tmp{os.getpid()}"
  with src.open("rb") as fin, open(tmp, "wb") as fout:
    shutil.copyfileobj(fin, fout, 16 << 20)
  os.replace(tmp, dest)


def resolve(workdir: "str | Workdir") -> Workdir:
  """Modes accept a path (tests, notebooks) or the Workdir main.py made."""
  return workdir if isinstance(workdir, Workdir) else Workdir.create(workdir)


def _all_processes(flag: bool) -> bool:
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(np.all(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def _epath(path: str):
  from etils import epath  # pylint: disable=import-outside-toplevel
  return epath.Path(path)


def epath(path: str):
  """`etils.epath.Path(path)`: local paths and gs:// alike (gs:// needs gcsfs)."""
  return _epath(path)


def _list_files(root: str) -> list[str]:
  """Relative paths of the files under `root`, skipping `checkpoints/`."""
  try:
    base = _epath(root)
    if not base.exists():
      return []
    out = []
    for top, dirs, files in base.walk():
      rel_top = os.path.relpath(str(top), str(base)) if str(top) != str(base) else ""
      dirs[:] = [d for d in dirs if not (rel_top == "" and d == CHECKPOINTS)]
      out += [os.path.normpath(os.path.join(rel_top, f)) for f in files]
    return sorted(out)
  except Exception as e:  # pylint: disable=broad-except
    raise OSError(_remote_hint(root, e)) from e


def _copy(src: str, dst: str) -> None:
  try:
    if not is_remote(src) and not is_remote(dst):
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.copyfile(src, dst)
      return
    d = _epath(dst)
    d.parent.mkdir(parents=True, exist_ok=True)
    d.write_bytes(_epath(src).read_bytes())
  except Exception as e:  # pylint: disable=broad-except
    raise OSError(_remote_hint(f"{src} -> {dst}", e)) from e


def _remote_hint(what: str, e: Exception) -> str:
  hint = ""
  if "gs://" in what and isinstance(e, (ImportError, ModuleNotFoundError, NotImplementedError)):
    hint = " (gs:// needs gcsfs or tensorflow: pip install gcsfs, or install dcjax[tpu])"
  return f"cannot copy {what}: {type(e).__name__}: {e}{hint}"
