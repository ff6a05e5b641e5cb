"""Traces round-trip through JSON; a broken trace file gets a TraceFormatError, never a crash."""

import json

import pytest

from adaptive import GenerationResult, Runtime, TraceFormatError

from conftest import make_model, random_prompt


def test_json_round_trip():
    rt = Runtime.from_model(make_model("llama"))
    res = rt.generate(random_prompt(5), max_new_tokens=8, mode="early_exit", threshold=0.02)
    back = GenerationResult.from_json(res.to_json())
    assert back.token_ids == res.token_ids
    assert [t.to_dict() for t in back.traces] == [t.to_dict() for t in res.traces]
    assert back.stats == json.loads(json.dumps(res.stats))


def test_stream_yields_the_same_records():
    rt = Runtime.from_model(make_model("gpt2"))
    stream = rt.stream(random_prompt(5), max_new_tokens=8)
    seen = [t.token_id for t in stream]
    assert seen == stream.result.token_ids == rt.generate(random_prompt(5), max_new_tokens=8).token_ids


@pytest.mark.parametrize("payload, message", [
    ("{not json", "not a JSON file"),
    ("[]", "not an adaptive trace"),
    ('{"format": "adaptive-trace", "version": 99, "traces": []}', "unsupported trace version"),
    ('{"format": "adaptive-trace", "version": 1, "traces": {}}', "'traces' must be a list"),
    ('{"format": "adaptive-trace", "version": 1, "token_ids": [1], "traces": [{"token_id": -1, "position": 0, "exit_layer": 1}]}', "token_id"),
    ('{"format": "adaptive-trace", "version": 1, "token_ids": [1], "traces": [{"token_id": 1, "position": 0, "exit_layer": 1, "evil": 1}]}', "unknown fields"),
    ('{"format": "adaptive-trace", "version": 1, "token_ids": [2], "traces": [{"token_id": 1, "position": 0, "exit_layer": 1}]}', "token_ids"),
    ('{"format": "adaptive-trace", "version": 1, "token_ids": [1], "traces": [{"token_id": 1, "position": 0, "exit_layer": 1, "confidence": "high"}]}', "finite number"),
])
def test_bad_trace_files(payload, message):
    with pytest.raises(TraceFormatError, match=message):
        GenerationResult.from_json(payload)


def test_speculative_rounds_keep_the_predicted_gain_and_reject_a_bad_one():
    rt = Runtime.from_model(make_model("llama"))
    res = rt.generate(random_prompt(5), max_new_tokens=24, mode="speculative", stop_at_eos=False)
    gains = [r.predicted_gain for r in res.rounds]
    assert any(g is not None and g >= 0 for g in gains)  # the controller's verdict is recorded where it was made
    assert all(r.predicted_gain is None for r in res.rounds if r.stop_reason == "measure")  # timing steps: none
    back = GenerationResult.from_json(res.to_json())
    assert [r.predicted_gain for r in back.rounds] == gains
    payload = json.loads(res.to_json())
    payload["rounds"][0]["predicted_gain"] = "fast"
    with pytest.raises(TraceFormatError, match="predicted_gain"):
        GenerationResult.from_json(json.dumps(payload))


@pytest.mark.parametrize("fields, message", [
    ({"drafted_ahead": "yes"}, "drafted_ahead"),
    ({"next_drafted": -1}, "next_drafted"),
    ({"next_drafted": True}, "next_drafted"),
])
def test_a_round_with_bad_overlap_fields_is_refused(fields, message):
    rt = Runtime.from_model(make_model("llama"))
    res = rt.generate(random_prompt(5), max_new_tokens=6, mode="speculative", stop_at_eos=False)
    payload = json.loads(res.to_json())
    payload["rounds"][0].update(fields)
    with pytest.raises(TraceFormatError, match=message):
        GenerationResult.from_json(json.dumps(payload))
