"""SkyCaptioner-V1 structured captions: instruction, JSON parsing/validation, prompt templates.

Pure Python; runs in well under a second: python -m pytest tests/test_captioner_schema.py -q
"""
from __future__ import annotations

import json

import pytest

from skyrt.runtime.caption_schema import (INSTRUCTION_SHA256, SHOT_ANGLES, SHOT_POSITIONS, SHOT_TYPES,
                                          CaptionParseError, caption_instruction, instruction_sha256,
                                          parse_caption, to_i2v_prompt, to_t2v_prompt)

GOOD = {
    "subjects": [
        {"TYPES": {"type": "Human", "sub_type": "Woman"}, "appearance": "Long black hair, a red coat.",
         "action": "She walks toward the camera and waves.", "expression": "smiling",
         "position": "Center of the frame.", "is_main_subject": True},
        {"TYPES": {"type": "Vehicles", "sub_type": "Car"}, "appearance": "A blue hatchback.", "action": "",
         "expression": "looks angry", "position": "Parked on the left.", "is_main_subject": False},
    ],
    "shot_type": "medium_shot", "shot_angle": "eye_level", "shot_position": "front_view",
    "camera_motion": "the camera pans right", "environment": "A snowy street at dusk.",
    "lighting": "Warm street lights",
}


def test_instruction_is_the_official_one():
    # The finetuned model expects its training instruction byte for byte; the hash pins it.
    assert instruction_sha256() == INSTRUCTION_SHA256
    text = caption_instruction()
    for labels in (SHOT_TYPES, SHOT_ANGLES, SHOT_POSITIONS):
        assert "Options: " + "/".join(labels) in text


def test_parse_good_caption():
    caption = parse_caption(json.dumps(GOOD))
    assert caption.issues == []
    assert [s.types.sub_type for s in caption.subjects] == ["Woman", "Car"]
    assert caption.main_subjects[0].action.startswith("She walks")
    assert (caption.shot_type, caption.shot_angle, caption.shot_position) == ("medium_shot", "eye_level", "front_view")
    assert json.loads(caption.to_json()) == GOOD | {"subjects": [
        {"appearance": s["appearance"], "action": s["action"], "expression": s["expression"],
         "position": s["position"], "TYPES": s["TYPES"], "is_main_subject": s["is_main_subject"]}
        for s in GOOD["subjects"]]}
    assert caption.raw == json.dumps(GOOD)


def test_parse_fenced_and_wrapped_json():
    body = json.dumps(GOOD)
    assert parse_caption(f"```json\n{body}\n```").shot_type == "medium_shot"
    assert parse_caption(f"Here is the caption: {body} Hope it helps.").lighting == "Warm street lights"


def test_partial_caption_keeps_what_is_there_and_lists_issues():
    partial = {"subjects": [{"action": "runs", "TYPES": {"type": "Animal"}, "is_main_subject": "true"}],
               "shot_type": "Close-Up", "shot_angle": "dutch_angle", "extra": 1}
    caption = parse_caption(json.dumps(partial))
    assert caption.shot_type == "close_up"  # normalised spelling
    assert caption.shot_angle == "dutch_angle"  # kept, but reported
    assert caption.subjects[0].is_main_subject is True and caption.subjects[0].types.sub_type == ""
    issues = " | ".join(caption.issues)
    for expected in ("missing shot_position, camera_motion, environment, lighting", "unknown fields extra",
                     "dutch_angle", "subjects[0]: missing appearance, expression, position",
                     "boolean given as a string"):
        assert expected in issues
    with pytest.raises(CaptionParseError) as err:
        parse_caption(json.dumps(partial), strict=True)
    assert err.value.issues == caption.issues and err.value.raw == json.dumps(partial)


@pytest.mark.parametrize("text", [
    "",
    "The video shows a dog.",
    '{"subjects": [{"action": "runs"}',          # truncated at max tokens
    "[1, 2, 3]",
    '{"foo": "bar"}',
    '{"subjects": "a dog", "shot_type": "long_shot"}',
    '{"subjects": ["a dog"], "shot_type": "long_shot"}',
])
def test_broken_output_raises_with_raw_text(text):
    with pytest.raises(CaptionParseError) as err:
        parse_caption(text)
    assert err.value.raw == text


def test_t2v_prompt_template():
    prompt = to_t2v_prompt(parse_caption(json.dumps(GOOD)))
    assert prompt == ("Medium shot, eye level, front view. "
                      "Woman: She walks toward the camera and waves. Long black hair, a red coat. Smiling. "
                      "Center of the frame. "
                      "Car: A blue hatchback. Parked on the left. "  # no expression for vehicles
                      "The camera pans right. A snowy street at dusk. Warm street lights.")


def test_i2v_prompt_template_keeps_motion_only():
    prompt = to_i2v_prompt(parse_caption(json.dumps(GOOD)))
    assert prompt == "Woman: She walks toward the camera and waves. Smiling. The camera pans right."
    empty = parse_caption(json.dumps({"subjects": [], "shot_type": "other", "camera_motion": ""}))
    assert to_i2v_prompt(empty) == "" and to_t2v_prompt(empty) == ""
