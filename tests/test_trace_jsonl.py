"""The JSONL reader: field names of published request files, time units, ignored fields, one-line errors."""

from __future__ import annotations

import json
import warnings

import pytest

from sim.cli import main
from sim.traces import TraceError, detect_format, load_trace


def write_lines(path, objects) -> str:
    path.write_text("".join(json.dumps(o) + "\n" for o in objects))
    return str(path)


@pytest.mark.parametrize(
    ("prompt_key", "output_key"),
    [("input_length", "output_length"), ("prompt_len", "output_len"), ("num_prompt_tokens", "max_tokens"),
     ("prompt_tokens", "completion_tokens"), ("input_tokens", "output_tokens"),
     ("num_prefill_tokens", "num_decode_tokens")],
)
def test_length_fields_under_published_names(tmp_path, prompt_key, output_key):
    path = write_lines(tmp_path / "t.jsonl", [{"arrival_s": 0.5, prompt_key: 12, output_key: 3},
                                              {"arrival_s": 1.5, prompt_key: 7, output_key: 2}])
    assert detect_format(path) == "jsonl"
    w = load_trace(path)
    assert [r.num_prompt_tokens for r in w.requests] == [12, 7]
    assert [r.max_tokens for r in w.requests] == [3, 2]
    assert [r.arrival_s for r in w.requests] == [0.5, 1.5]  # arrival_s is kept as written


@pytest.mark.parametrize(("key", "unit", "scale"), [("timestamp_ms", None, 1e-3), ("arrival_time_ns", None, 1e-9),
                                                   ("arrived_at", None, 1.0), ("timestamp", "ms", 1e-3),
                                                   ("timestamp", "ns", 1e-9), ("arrival_time", "s", 1.0)])
def test_time_fields_in_s_ms_ns_are_rebased_to_the_first_row(tmp_path, key, unit, scale):
    t0 = 1_700_000_000
    path = write_lines(tmp_path / "t.jsonl", [{key: t0 + 3000, "input_length": 4, "output_length": 2},
                                              {key: t0, "input_length": 5, "output_length": 2}])
    w = load_trace(path, time_unit=unit)
    assert [r.arrival_s for r in w.requests] == [0.0, pytest.approx(3000 * scale)]
    assert [r.num_prompt_tokens for r in w.requests] == [5, 4]


def test_a_time_without_a_unit_asks_for_time_unit(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [{"timestamp": 12, "input_length": 4, "output_length": 2}])
    with pytest.raises(TraceError, match=r"line 1, field 'timestamp'.*--time-unit s, ms or ns"):
        load_trace(path)
    with pytest.raises(ValueError, match="time_unit='min' must be one of s, ms, ns"):
        load_trace(path, time_unit="min")


def test_unknown_fields_are_ignored_with_one_warning_naming_them(tmp_path):
    from sim.traces import TraceWarning

    rows = [{"arrival_s": i, "num_prompt_tokens": 4, "max_tokens": 2, "model": "m", "session_id": i % 2}
            for i in range(5)]
    rows[0]["extra"] = True
    path = write_lines(tmp_path / "t.jsonl", rows)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w = load_trace(path)
    assert len(w.requests) == 5
    assert [type(c.message) for c in caught] == [TraceWarning]
    text = str(caught[0].message)
    assert "'model' (5 of 5 lines)" in text and "'session_id' (5 of 5 lines)" in text and "'extra' (1 of 5" in text
    assert "ignored fields extra, model, session_id" in w.description


def test_a_misspelt_required_field_is_named_in_the_missing_field_error(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [{"arrival_s": 0, "num_prompt_tokens": 3, "max_token": 3}])
    with pytest.raises(TraceError, match=r"field 'max_tokens': missing field.*does not read this line's field "
                                         r"'max_token'"):
        load_trace(path)


def test_two_names_for_one_length_must_agree(tmp_path):
    same = write_lines(tmp_path / "same.jsonl", [{"arrival_s": 0, "input_length": 4, "prompt_len": 4, "max_tokens": 1}])
    assert load_trace(same).requests[0].num_prompt_tokens == 4
    bad = write_lines(tmp_path / "bad.jsonl", [{"arrival_s": 0, "input_length": 4, "prompt_len": 5, "max_tokens": 1}])
    with pytest.raises(TraceError, match=r"field 'prompt_len': 5 disagrees with input_length=4"):
        load_trace(bad)


def test_json_lines_without_hash_ids_are_not_mooncake(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [{"timestamp": 0, "input_length": 4, "output_length": 2}])
    assert detect_format(path) == "jsonl"
    assert len(load_trace(path, time_unit="ms").requests) == 1


def test_a_truncated_line_reports_its_real_column(tmp_path):
    line = '{"arrival_s": 2, "max_tokens": 2, "num_prompt_tokens": 5'
    path = tmp_path / "t.jsonl"
    path.write_text('{"arrival_s": 1, "max_tokens": 2, "num_prompt_tokens": 5}\n' + line + "\n")
    with pytest.raises(TraceError) as info:
        load_trace(path)
    assert f"line 2: bad JSON (Expecting ',' delimiter at column {len(line) + 1}; the line ends there" in str(
        info.value)


def test_a_jsonl_file_read_as_csv_gets_a_one_line_error(tmp_path, capsys):
    path = write_lines(tmp_path / "t.jsonl", [{"arrival_s": 0, "prompt_token_ids": list(range(10, 4000)),
                                               "max_tokens": 2}])
    assert main(["simulate", "--trace", path, "--trace-format", "azure", "--no-plots",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 600
    assert "field 'TIMESTAMP': missing column" in err and "give --trace-format jsonl or mooncake" in err


def test_cli_time_unit_and_warning_on_stderr(tmp_path, capsys):
    path = write_lines(tmp_path / "t.jsonl", [{"timestamp": 1000 * i, "prompt_len": 8, "output_len": 2, "user": "u"}
                                              for i in range(3)])
    assert main(["simulate", "--trace", path, "--no-plots", "--out", str(tmp_path / "o")]) == 2
    assert "--time-unit s, ms or ns" in capsys.readouterr().err
    assert main(["simulate", "--trace", path, "--time-unit", "ms", "--no-plots", "--out", str(tmp_path / "o"),
                 "--json"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["runs"][0]["num_requests"] == 3 and "over 2.0 s" in doc["workload"]
    warning = [line for line in captured.err.splitlines() if "warning" in line and "'user'" in line]
    assert warning == [f"tokenstep: warning: {path}: ignored fields tokenstep does not read: 'user' (3 of 3 lines)"]


def test_time_unit_is_refused_for_a_format_that_fixes_its_own(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,4,2\n")
    with pytest.raises(ValueError, match="applies to JSONL traces; the azure format fixes its own time unit"):
        load_trace(path, time_unit="ms")
