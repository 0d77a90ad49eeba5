"""Read what an offline W&B run actually recorded, straight from its ``run-<id>.wandb`` file.

wandb >= 0.19 offline writes no ``wandb-summary.json``/``config.yaml``; the only record of a run is
the transaction log. Its layout (the same framing as a LevelDB log):

- a 7-byte file header: the magic ``:W&B``, a little-endian uint16 ``0xBEE1`` and a version byte;
- then 32 KiB blocks counted from the start of the file (the header sits in the first block);
  each chunk has a 7-byte header ``crc32 (uint32 LE), length (uint16 LE), type (uint8)`` with
  types FULL=1, FIRST=2, MIDDLE=3, LAST=4; a block tail shorter than 7 bytes is zero padding;
- each reassembled payload is one serialised ``wandb.proto.wandb_internal_pb2.Record``.

The crc is ``zlib.crc32(payload, zlib.crc32(bytes([type])))`` (what wandb's writer computes);
chunks that fail it are skipped and counted, so a run killed mid-write still reads up to the tear.

``python tests/wandb_records.py <run dir or .wandb file>`` prints the parsed run as JSON.
This module imports wandb's protobuf definitions only (no ``wandb.init``); ``tracking.py`` stays the
only module that talks to W&B itself.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MAGIC = b":W&B"
FILE_HEADER_LEN = 7  # magic (4) + 0xBEE1 (2) + version (1)
BLOCK_LEN = 32 * 1024
CHUNK_HEADER_LEN = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbFileError(ValueError):
    """The file is not a W&B transaction log (wrong magic) or no run file was found."""


def find_run_file(path: str | Path) -> Path:
    """Accept a ``.wandb`` file, a run folder (``offline-run-*``) or a folder holding exactly one run."""
    path = Path(path)
    if path.is_file():
        return path
    candidates = sorted(path.glob("run-*.wandb")) or sorted(path.glob("**/run-*.wandb"))
    if not candidates:
        raise WandbFileError(f"No run-<id>.wandb file under {path}. Is this a W&B run folder?")
    if len(candidates) > 1:
        names = ", ".join(str(c.relative_to(path)) for c in candidates[:5])
        raise WandbFileError(f"{len(candidates)} W&B runs under {path} ({names}...); pass one run folder.")
    return candidates[0]


def iter_payloads(data: bytes) -> Iterator[bytes]:
    """Reassembled record payloads of a W&B/LevelDB log; corrupt or torn chunks are skipped."""
    if data[:4] != MAGIC:
        raise WandbFileError(f"Not a W&B transaction log: the file starts with {data[:4]!r}, not {MAGIC!r}.")
    offset = FILE_HEADER_LEN
    pending: list[bytes] | None = None
    while offset + CHUNK_HEADER_LEN <= len(data):
        space_in_block = BLOCK_LEN - offset % BLOCK_LEN
        if space_in_block < CHUNK_HEADER_LEN:  # block trailer padding
            offset += space_in_block
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, offset)
        start = offset + CHUNK_HEADER_LEN
        chunk = data[start : start + length]
        offset = start + length
        if kind == 0 and length == 0:  # zero padding (pre-allocated or torn tail)
            continue
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            pending = None  # a torn record cannot be trusted; resynchronise on the next FULL/FIRST
            continue
        if kind == FULL:
            pending = None
            yield chunk
        elif kind == FIRST:
            pending = [chunk]
        elif kind == MIDDLE and pending is not None:
            pending.append(chunk)
        elif kind == LAST and pending is not None:
            pending.append(chunk)
            yield b"".join(pending)
            pending = None


def iter_records(path: str | Path) -> Iterator[Any]:
    """``wandb_internal_pb2.Record`` messages in file order."""
    from wandb.proto import wandb_internal_pb2 as pb  # protobuf definitions only, no W&B session

    for payload in iter_payloads(find_run_file(path).read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


def _item_path(item: Any) -> list[str]:
    # wandb-core writes a flat key such as "train/loss" as nested_key ["train/loss"] and a dict value
    # (an image, a table reference) as one item per leaf, e.g. ["eval/grid", "path"].
    return list(item.nested_key) if item.nested_key else [item.key]


def _json_value(text: str) -> Any:
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return text


def _set_path(target: dict[str, Any], path: list[str], value: Any) -> None:
    node = target
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[-1]] = value


def _pop_path(target: dict[str, Any], path: list[str]) -> None:
    node: Any = target
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(path[-1], None)


def _items_to_dict(items: Any, target: dict[str, Any] | None = None) -> dict[str, Any]:
    target = {} if target is None else target
    for item in items:
        _set_path(target, _item_path(item), _json_value(item.value_json))
    return target


def read_run(path: str | Path) -> dict[str, Any]:
    """Parse one offline run into plain data.

    Returns ``{"id", "run": {project, entity, group, job_type, name, tags}, "config": {key: value},
    "history": [{key: value, "_step": n}], "summary": {key: value}, "files": [paths],
    "media": [files under files/media], "exit_code", "corrupt_records"}``. Config values are unwrapped
    from W&B's ``{"value": ...}`` envelope; later updates win, as on the server.
    """
    run_file = find_run_file(path)
    out: dict[str, Any] = {
        "id": None,
        "run": {},
        "config": {},
        "history": [],
        "summary": {},
        "files": [],
        "media": [],
        "exit_code": None,
    }
    for record in iter_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out["id"] = run.run_id
            out["run"] = {
                "project": run.project,
                "entity": run.entity,
                "group": run.run_group,
                "job_type": run.job_type,
                "name": run.display_name,
                "tags": list(run.tags),
            }
            _items_to_dict(run.config.update, out["config"])
        elif kind == "config":
            _items_to_dict(record.config.update, out["config"])
            for item in record.config.remove:
                _pop_path(out["config"], _item_path(item))
        elif kind == "history":
            out["history"].append(_items_to_dict(record.history.item))
        elif kind == "summary":
            _items_to_dict(record.summary.update, out["summary"])
            for item in record.summary.remove:
                _pop_path(out["summary"], _item_path(item))
        elif kind == "files":
            out["files"].extend(f.path for f in record.files.files)
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    media_root = run_file.parent / "files"
    # W&B wraps every config value as {"value": v}; unwrap so callers see the config they logged.
    out["config"] = {k: _unwrap(v) for k, v in out["config"].items() if k != "_wandb"}
    out["media"] = sorted(
        str(p.relative_to(media_root)) for p in (media_root / "media").rglob("*") if p.is_file()
    )
    return out


def read_finished_run(path: str | Path, timeout: float = 30.0) -> dict[str, Any]:
    """``read_run`` once the run's exit record is on disk.

    ``run.finish()`` returns before wandb-core has written the file's last block, so a reader
    right after it can see a truncated run; this polls until the exit record arrives.
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            run = read_run(path)
        except WandbFileError:
            run = None
        if run is not None and run["exit_code"] is not None:
            return run
        if time.monotonic() > deadline:
            raise WandbFileError(f"The W&B run under {path} has no exit record after {timeout:.0f}s.")
        time.sleep(0.1)


def _unwrap(value: Any) -> Any:
    if isinstance(value, dict) and "value" in value and set(value) <= {"value", "desc"}:
        return value["value"]
    return value


def history_of(run: dict[str, Any], key: str) -> list[tuple[int, Any]]:
    """``[(step, value)]`` of one history key, in logging order."""
    return [(row.get("_step"), row[key]) for row in run["history"] if key in row]


def read_table(run_dir: str | Path, run: dict[str, Any], key: str) -> dict[str, Any]:
    """A logged ``wandb.Table`` ({"columns": [...], "data": [[...]]}) from the run's media files."""
    reference = run["summary"].get(key)
    if not isinstance(reference, dict) or reference.get("_type") != "table-file":
        raise KeyError(f"{key!r} is not a table in this run's summary")
    folder = Path(run_dir) if Path(run_dir).is_dir() else Path(run_dir).parent
    return json.loads((folder / "files" / reference["path"]).read_text())


def run_dirs(wandb_dir: str | Path) -> list[Path]:
    """Every run folder under a W&B ``dir`` (``<dir>/wandb/offline-run-*`` or ``<dir>/offline-run-*``)."""
    return sorted({p.parent for p in Path(wandb_dir).glob("**/run-*.wandb")})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Dump an offline W&B run (.wandb transaction log) as JSON.")
    parser.add_argument("run", help="a run folder (offline-run-...), a .wandb file, or a folder with one run")
    parser.add_argument("--key", help="print only this history key as step/value lines")
    args = parser.parse_args(argv)
    try:
        run = read_run(args.run)
    except WandbFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.key:
        for step, value in history_of(run, args.key):
            print(f"{step}\t{json.dumps(value)}")
    else:
        print(json.dumps(run, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
