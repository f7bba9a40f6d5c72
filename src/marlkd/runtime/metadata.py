"""The export folder's ``metadata.json``: its format, checksum and file hashes.

An export folder holds the student's network file(s) and ``metadata.json``:

    format, version     "marlkd.export", EXPORT_VERSION
    network_format      "onnx" or "torchscript"
    student             kind, constructor config, parameter count
    quantize            null or "int8" (per-tensor weights, see marlkd.export)
    padded              obs_size (D_max) and num_actions (A_max) of a batch
    inputs, outputs     names, dtypes and shapes of the network's tensors
    network             how the network is built (for the numpy path)
    agents              in index order: name, obs_size, num_actions,
                        obs_slices {block: [start, stop]}, obs_scale, actions
                        (the green phase state strings), network (file name)
    scenario, env       the run's scenario and environment settings
    run                 the run folder the export came from
    files               per file: sha256 and bytes
    checksum            SHA-256 of this JSON without the checksum itself

``read_export`` reads every file once, checks it against its hash, and hands
back the bytes that were checked, so what is loaded is what was verified.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from marlkd.errors import UserError

FORMAT = "marlkd.export"
EXPORT_VERSION = 1
METADATA_FILE = "metadata.json"
NETWORK_FORMATS = ("onnx", "torchscript")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def metadata_checksum(metadata: dict) -> str:
    """SHA-256 of the metadata's canonical JSON, leaving out ``checksum``."""
    body = {k: v for k, v in metadata.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return sha256_bytes(text.encode("utf-8"))


def reexport_hint(metadata: dict | None) -> str:
    run = (metadata or {}).get("run") or "RUN_DIR"
    return f"re-export the student with `marlkd export {run}`"


def read_export(export_dir: str | Path) -> tuple[dict, dict[str, bytes]]:
    """The verified metadata and the bytes of every file it lists.

    Raises:
        UserError: the folder or ``metadata.json`` is missing or unreadable,
            its format or version is not this marlkd's, it was edited, or a
            listed file is missing or differs from its SHA-256.
    """
    export_dir = Path(export_dir)
    path = export_dir / METADATA_FILE
    if not path.is_file():
        raise UserError(
            f"{path} not found: {export_dir} is not a marlkd export; create one "
            "with `marlkd export RUN_DIR`"
        )
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(
            f"{path} is not valid JSON ({exc}): {reexport_hint(None)}"
        ) from exc
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise UserError(
            f"{path} is not the metadata of a marlkd export: {reexport_hint(None)}"
        )
    if metadata.get("version") != EXPORT_VERSION:
        raise UserError(
            f"{path} has export version {metadata.get('version')}; this marlkd "
            f"reads version {EXPORT_VERSION}: {reexport_hint(metadata)}"
        )
    if metadata.get("checksum") != metadata_checksum(metadata):
        raise UserError(
            f"{path} does not match its checksum (edited or damaged): "
            f"{reexport_hint(metadata)}"
        )

    contents = {}
    for name, entry in metadata["files"].items():
        file = export_dir / name
        if not file.is_file():
            raise UserError(
                f"{file} is missing from the export: {reexport_hint(metadata)}"
            )
        data = file.read_bytes()
        if sha256_bytes(data) != entry["sha256"]:
            raise UserError(
                f"{file} does not match its SHA-256 in {METADATA_FILE} (altered or "
                f"damaged): {reexport_hint(metadata)}"
            )
        contents[name] = data
    return metadata, contents
