"""One /metrics for a fleet: every stream's Prometheus text with a `stream` label, families merged.

The text format wants each metric family once (one HELP, one TYPE, then all its samples), so the
streams' texts are parsed into families and written back family by family, each sample with
`stream="<id>"` as its first label. A histogram's `_bucket`/`_sum`/`_count` samples stay with
their family.
"""
from __future__ import annotations

import re

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(\s+\S+)?$")
_SUFFIXES = ("_bucket", "_sum", "_count")


def _family_of(sample_name: str, families: dict) -> str:
    if sample_name in families:
        return sample_name
    for suffix in _SUFFIXES:
        if sample_name.endswith(suffix) and sample_name[: -len(suffix)] in families:
            return sample_name[: -len(suffix)]
    return sample_name


def _with_label(labels: str | None, name: str, value: str) -> str:
    label = f'{name}="{escape_label(value)}"'
    if not labels or labels == "{}":
        return "{" + label + "}"
    return "{" + label + "," + labels[1:]


def escape_label(value: str) -> str:
    """A label value in the text format: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def merge_with_label(texts: dict[str, str], label: str = "stream") -> str:
    """Merge Prometheus texts keyed by a label value (the stream id) into one exposition."""
    families: dict[str, dict] = {}  # name -> {"help", "type", "samples": [...]}, in first-seen order
    for key, text in texts.items():
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = families.setdefault(parts[2], {"help": None, "type": None, "samples": []})
                    family["help" if parts[1] == "HELP" else "type"] = parts[3] if len(parts) > 3 else ""
                continue
            match = _SAMPLE.match(line)
            if match is None:
                continue  # not a sample line: dropped rather than breaking the whole exposition
            name, labels, value, timestamp = match.groups()
            family = families.setdefault(_family_of(name, families), {"help": None, "type": None, "samples": []})
            family["samples"].append(f"{name}{_with_label(labels, label, key)} {value}{timestamp or ''}")
    lines: list[str] = []
    for name, family in families.items():
        if family["help"] is not None:
            lines.append(f"# HELP {name} {family['help']}")
        if family["type"] is not None:
            lines.append(f"# TYPE {name} {family['type']}")
        lines.extend(family["samples"])
    return "\n".join(lines) + "\n" if lines else ""


def gauge(name: str, help_text: str, samples: list[tuple[dict, float]], kind: str = "gauge") -> str:
    """One family in text format from (labels, value) pairs."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        body = ",".join(f'{k}="{escape_label(str(v))}"' for k, v in labels.items())
        lines.append(f"{name}{{{body}}} {value:g}" if body else f"{name} {value:g}")
    return "\n".join(lines) + "\n"
