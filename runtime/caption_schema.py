"""SkyCaptioner-V1's structured caption: typed fields, closed label sets, JSON parsing, prompt templates.

SkyCaptioner-V1 (a Qwen2.5-VL-7B-Instruct finetune) answers one fixed instruction with one JSON
object: `subjects[]` (appearance, action, expression, position, TYPES{type, sub_type},
is_main_subject), `shot_type`, `shot_angle`, `shot_position`, `camera_motion`, `environment`,
`lighting`. Three shot fields take closed label sets (below); the others are free text.

- `caption_instruction()` is the instruction the model was finetuned on, generated from the field
  descriptions below. The finetuned model expects it byte for byte (it goes in the user turn after
  the video; the chat template adds Qwen's default system turn); `INSTRUCTION_SHA256` pins it.
- `parse_caption(text)` turns model output into a `StructuredCaption`; output that is not JSON, or
  JSON without the schema, raises `CaptionParseError` carrying the raw text. Labels outside the
  closed sets are kept (`strict=False`, the default) and listed in `caption.issues`, or raise
  (`strict=True`).
- `to_t2v_prompt` / `to_i2v_prompt` turn a caption into a generation prompt with a fixed,
  documented template. The official pipeline instead rewrites the fields with a 32B LLM
  (Qwen2.5-32B-Instruct, with random field dropout); skyrt ships no such LLM, so its prompts are
  deterministic concatenations that follow the same field order and the same field rules.

Pure Python (json, dataclasses): the serving path imports it without numpy or torch.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

# Closed label sets of the shot fields (the instruction lists them as "Options: a/b/...").
SHOT_TYPES = ("long_shot", "full_shot", "medium_shot", "close_up", "extreme_close_up", "other")
SHOT_ANGLES = ("eye_level", "high_angle", "low_angle", "other")
SHOT_POSITIONS = ("front_view", "back_view", "side_view", "over_the_shoulder", "overhead_view", "point_of_view",
                  "aerial_view", "overlooking_view", "other")
CLOSED_FIELDS: dict[str, tuple[str, ...]] = {
    "shot_type": SHOT_TYPES,
    "shot_angle": SHOT_ANGLES,
    "shot_position": SHOT_POSITIONS,
}
# Subject categories that carry a facial expression (the official fusion clears the others').
EXPRESSIVE_TYPES = ("Human", "Animal")

# Generation settings of the official script (vLLM): temperature 0.05, at most 2048 new tokens.
OFFICIAL_TEMPERATURE = 0.05
MAX_NEW_TOKENS = 2048

# The instruction's example object: field -> requirement text, in the model's training order. The
# "Options" lists are spelled from the label sets above, so the two cannot drift apart.
def _subject_example(who: str, position: str, category: str, sub_category: str, expression_gap: str = " ") -> dict:
    """One subject of the instruction's example object; `who` is "Main subject" or "Non-main subject".
    (The official main-subject line has two spaces before its parenthesis: kept, the model was trained on it.)"""
    return {
        "appearance": f"{who} appearance description",
        "action": f"{who} action",
        "expression": f"{who} expression{expression_gap}(Only for human/animal categories, empty otherwise)",
        "position": position,
        "TYPES": {"type": f"Main category (e.g., {category})", "sub_type": f"Sub-category (e.g., {sub_category})"},
        "is_main_subject": who == "Main subject",
    }


_MAIN_SUBJECT = _subject_example(
    "Main subject", "Subject position in the video (Can be relative position to other objects or spatial description)",
    "Human", "Man", expression_gap="  ")
_OTHER_SUBJECT = _subject_example("Non-main subject", "Position of non-main subject 1", "Vehicles", "Ship")


def _options(labels: tuple[str, ...]) -> str:
    return "Options: " + "/".join(labels)


_EXAMPLE = {
    "subjects": [_MAIN_SUBJECT, _OTHER_SUBJECT],
    "shot_type": f"Shot type({_options(SHOT_TYPES)})",
    "shot_angle": f"Camera angle({_options(SHOT_ANGLES)})",
    "shot_position": f"Camera position({_options(SHOT_POSITIONS)})",
    "camera_motion": "Camera movement description",
    "environment": "Video background/environment description",
    "lighting": "Lighting information in the video",
}
_INSTRUCTION_HEAD = ("I need you to generate a structured and detailed caption for the provided video. The structured "
                     "output and the requirements for each field are as shown in the following JSON content: ")
# sha256 of the official instruction (SkyReels-V2 skycaptioner_v1/scripts/vllm_struct_caption.py):
# tests check that caption_instruction() reproduces it exactly.
INSTRUCTION_SHA256 = "dcbe6500a8aa00da27b0a2581d12ae8a9a54898237064965c5804152d9973fc2"


def caption_instruction() -> str:
    """The instruction SkyCaptioner-V1 was finetuned on (user turn, after the video)."""
    return _INSTRUCTION_HEAD + json.dumps(_EXAMPLE, ensure_ascii=False)


def instruction_sha256() -> str:
    return hashlib.sha256(caption_instruction().encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------
# Typed caption


@dataclass
class SubjectType:
    """TYPES of a subject: a main category (e.g. Human, Animal, Vehicles) and a sub-category."""

    type: str = ""
    sub_type: str = ""


@dataclass
class Subject:
    """One subject of the video; `expression` is empty except for humans and animals."""

    appearance: str = ""
    action: str = ""
    expression: str = ""
    position: str = ""
    types: SubjectType = field(default_factory=SubjectType)
    is_main_subject: bool = False


@dataclass
class StructuredCaption:
    """SkyCaptioner-V1's answer, typed. Shot fields hold a label of CLOSED_FIELDS (or "" when the
    model left them out); `issues` lists what validation found (missing fields, unknown labels);
    `raw` is the model's text as generated."""

    subjects: list[Subject] = field(default_factory=list)
    shot_type: str = ""
    shot_angle: str = ""
    shot_position: str = ""
    camera_motion: str = ""
    environment: str = ""
    lighting: str = ""
    issues: list[str] = field(default_factory=list)
    raw: str = ""

    @property
    def main_subjects(self) -> list[Subject]:
        return [s for s in self.subjects if s.is_main_subject]

    def to_json_dict(self) -> dict[str, Any]:
        """The caption in the model's own JSON layout (TYPES upper-case), without issues/raw."""
        subjects = []
        for s in self.subjects:
            d = asdict(s)
            d["TYPES"] = d.pop("types")
            subjects.append(d)
        return {"subjects": subjects, "shot_type": self.shot_type, "shot_angle": self.shot_angle,
                "shot_position": self.shot_position, "camera_motion": self.camera_motion,
                "environment": self.environment, "lighting": self.lighting}

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_json_dict(), indent=indent, ensure_ascii=False)


class CaptionParseError(ValueError):
    """The model's output is not a structured caption. `raw` keeps the text as generated; `issues`
    lists what was wrong (for strict validation failures)."""

    def __init__(self, message: str, raw: str, issues: list[str] | None = None):
        super().__init__(message)
        self.raw = raw
        self.issues = list(issues or [])


# ----------------------------------------------------------------------------------------------
# Parsing and validation

_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)
_TOP_FIELDS = ("subjects", "shot_type", "shot_angle", "shot_position", "camera_motion", "environment", "lighting")
_SUBJECT_FIELDS = ("appearance", "action", "expression", "position", "TYPES", "is_main_subject")


def _extract_json_object(text: str) -> Any:
    """The JSON value in `text`: the whole text, else a ```json fence's body, else the span from the
    first '{' to the last '}' (chat models sometimes add a sentence around the object)."""
    candidates = [text]
    fence = _FENCE.match(text)
    if fence:
        candidates.append(fence.group(1))
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start:end + 1])
    error: Exception | None = None
    for candidate in candidates:
        try:
            return json.loads(candidate)
        except json.JSONDecodeError as err:
            error = error or err
    raise CaptionParseError(f"model output is not JSON ({error}); first 200 characters: {text[:200]!r}", raw=text)


def _text(value: Any, where: str, issues: list[str]) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    issues.append(f"{where}: expected a string, got {type(value).__name__}")
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else str(value)


def _bool(value: Any, where: str, issues: list[str]) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        issues.append(f"{where}: boolean given as a string {value!r}")
        return value.strip().lower() == "true"
    issues.append(f"{where}: expected true/false, got {value!r}")
    return bool(value)


def _label(value: Any, name: str, issues: list[str]) -> str:
    """A closed-set label, normalised the forgiving way ("Close-Up" -> "close_up"); unknown labels
    are kept as given and reported."""
    text = _text(value, name, issues)
    if not text:
        return ""
    labels = CLOSED_FIELDS[name]
    norm = re.sub(r"[\s\-]+", "_", text.strip().lower())
    if norm in labels:
        return norm
    issues.append(f"{name}: {text!r} is not one of {', '.join(labels)}")
    return text


def _subject(raw: Any, index: int, issues: list[str]) -> Subject:
    where = f"subjects[{index}]"
    if not isinstance(raw, dict):
        raise CaptionParseError(f"{where} is a {type(raw).__name__}, not an object", raw="")
    missing = [k for k in _SUBJECT_FIELDS if k not in raw]
    if missing:
        issues.append(f"{where}: missing {', '.join(missing)}")
    types_raw = raw.get("TYPES", raw.get("types", {}))
    if not isinstance(types_raw, dict):
        issues.append(f"{where}.TYPES: expected an object, got {type(types_raw).__name__}")
        types_raw = {}
    subject = Subject(
        appearance=_text(raw.get("appearance"), f"{where}.appearance", issues),
        action=_text(raw.get("action"), f"{where}.action", issues),
        expression=_text(raw.get("expression"), f"{where}.expression", issues),
        position=_text(raw.get("position"), f"{where}.position", issues),
        types=SubjectType(type=_text(types_raw.get("type"), f"{where}.TYPES.type", issues),
                          sub_type=_text(types_raw.get("sub_type"), f"{where}.TYPES.sub_type", issues)),
        is_main_subject=_bool(raw.get("is_main_subject", False), f"{where}.is_main_subject", issues),
    )
    return subject


def parse_caption(text: str, strict: bool = False) -> StructuredCaption:
    """Parse and validate SkyCaptioner output.

    Raises CaptionParseError (with `.raw`) when the text holds no JSON object or the object is not a
    caption (no known field at all, or `subjects` not a list). Missing fields become "" and unknown
    labels are kept; both are listed in `caption.issues`. strict=True raises on any issue instead.
    """
    value = _extract_json_object(text)
    if not isinstance(value, dict):
        raise CaptionParseError(f"model output is JSON {type(value).__name__}, not an object", raw=text)
    if not any(k in value for k in _TOP_FIELDS):
        raise CaptionParseError(f"model output has none of the caption fields {', '.join(_TOP_FIELDS)}; "
                                f"keys: {sorted(value)[:10]}", raw=text)
    issues: list[str] = []
    missing = [k for k in _TOP_FIELDS if k not in value]
    if missing:
        issues.append(f"missing {', '.join(missing)}")
    unknown = sorted(set(value) - set(_TOP_FIELDS))
    if unknown:
        issues.append(f"unknown fields {', '.join(unknown)}")
    subjects_raw = value.get("subjects", [])
    if not isinstance(subjects_raw, list):
        raise CaptionParseError(f"'subjects' is a {type(subjects_raw).__name__}, not a list", raw=text)
    try:
        subjects = [_subject(s, i, issues) for i, s in enumerate(subjects_raw)]
    except CaptionParseError as err:
        raise CaptionParseError(str(err), raw=text) from None
    caption = StructuredCaption(
        subjects=subjects,
        shot_type=_label(value.get("shot_type"), "shot_type", issues),
        shot_angle=_label(value.get("shot_angle"), "shot_angle", issues),
        shot_position=_label(value.get("shot_position"), "shot_position", issues),
        camera_motion=_text(value.get("camera_motion"), "camera_motion", issues),
        environment=_text(value.get("environment"), "environment", issues),
        lighting=_text(value.get("lighting"), "lighting", issues),
        issues=issues,
        raw=text,
    )
    if strict and issues:
        raise CaptionParseError("caption failed validation: " + "; ".join(issues), raw=text, issues=issues)
    return caption


# ----------------------------------------------------------------------------------------------
# Prompt templates (deterministic stand-ins for the official LLM fusion)


def _sentence(text: str) -> str:
    """Capitalised, ending in one period."""
    text = text.strip().rstrip(".").strip()
    return (text[:1].upper() + text[1:] + ".") if text else ""


def _label_words(label: str) -> str:
    return label.replace("_", " ")


def _subject_name(subject: Subject) -> str:
    return subject.types.sub_type or subject.types.type or "subject"


def _expression(subject: Subject) -> str:
    # Following the official fusion: only humans and animals have an expression.
    return subject.expression if subject.types.type in EXPRESSIVE_TYPES else ""


def to_t2v_prompt(caption: StructuredCaption) -> str:
    """A text-to-video prompt, in the official fusion's order:

        "<Shot type> shot, <shot angle>, <shot position>."        (labels "other"/"" are skipped)
        per subject, main subjects first: "<Name>: <action> <appearance> <expression> <position>"
        "<Camera motion>."  "<Environment>."  "<Lighting>."

    Every part is one sentence; empty fields are left out. Deterministic (no random dropout).
    """
    parts = []
    shot = [f"{_label_words(caption.shot_type)} shot".replace("shot shot", "shot")
            if caption.shot_type not in ("", "other") else "",
            f"{_label_words(caption.shot_angle)}" if caption.shot_angle not in ("", "other") else "",
            f"{_label_words(caption.shot_position)}" if caption.shot_position not in ("", "other") else ""]
    shot = [s for s in shot if s]
    if shot:
        parts.append(_sentence(", ".join(shot)))
    ordered = caption.main_subjects + [s for s in caption.subjects if not s.is_main_subject]
    for subject in ordered:
        body = " ".join(p for p in (_sentence(subject.action), _sentence(subject.appearance),
                                    _sentence(_expression(subject)), _sentence(subject.position)) if p)
        if body:
            parts.append(f"{_subject_name(subject)}: {body}")
    parts += [_sentence(caption.camera_motion), _sentence(caption.environment), _sentence(caption.lighting)]
    return " ".join(p for p in parts if p)


def to_i2v_prompt(caption: StructuredCaption) -> str:
    """An image-to-video prompt: what moves, as the official fusion keeps for I2V. The first frame
    already shows appearance, position, environment, lighting and framing, so only each subject's
    action and expression remain (subjects with neither are dropped), then the camera motion:

        "<Name>: <action> <expression>" ... "<Camera motion>."
    """
    parts = []
    ordered = caption.main_subjects + [s for s in caption.subjects if not s.is_main_subject]
    for subject in ordered:
        body = " ".join(p for p in (_sentence(subject.action), _sentence(_expression(subject))) if p)
        if body:
            parts.append(f"{_subject_name(subject)}: {body}")
    parts.append(_sentence(caption.camera_motion))
    return " ".join(p for p in parts if p)


__all__ = ["CLOSED_FIELDS", "CaptionParseError", "INSTRUCTION_SHA256", "MAX_NEW_TOKENS", "OFFICIAL_TEMPERATURE",
           "SHOT_ANGLES", "SHOT_POSITIONS", "SHOT_TYPES", "StructuredCaption", "Subject", "SubjectType",
           "caption_instruction", "instruction_sha256", "parse_caption", "to_i2v_prompt", "to_t2v_prompt"]
