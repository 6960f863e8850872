"""The speed report's verdicts on the step targets (medians with the spread of paired repeats)
and the figure of the runs compared.

No timing here: the figures are made up, and what is checked is what the report concludes
from them.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

import pytest

from benchmarks import distributed, processes
from benchmarks.plot_runs import _tick, plot_runs, read_table
from benchmarks.step import StepResult, markdown, step_spec
from benchmarks.verdicts import levers_section, summary
from byol_core.runtime import resolve_runtime


def result(samples: dict[str, list[float]]) -> StepResult:
    r = StepResult(len(samples["ours"]), resolve_runtime(step_spec().runtime), samples=samples)
    r.seconds = {name: statistics.median(v) for name, v in samples.items()}
    return r


def test_ratios_are_paired_per_repeat() -> None:
    # Repeat 2 ran slow for every row alike: paired, its ratios stay 3x and 2.5x.
    r = result(
        {
            "ours": [0.1, 0.2, 0.1],
            "byol-pytorch": [0.3, 0.6, 0.3],
            "lightly": [0.25, 0.5, 0.25],
            "supervised": [0.08, 0.16, 0.08],
        }
    )
    assert r.ratio_range("byol-pytorch") == pytest.approx((3.0, 3.0))
    assert r.ratio_range("lightly") == pytest.approx((2.5, 2.5))
    assert not r.straddles("byol-pytorch", 2.9)
    assert "3.00x (repeats 3.00-3.00x)" in summary(r, None)


def test_a_target_inside_the_spread_is_called_unsettled() -> None:
    r = result(
        {
            "ours": [0.1, 0.1, 0.1],
            "byol-pytorch": [0.28, 0.31, 0.33],
            "lightly": [0.25, 0.26, 0.24],
            "supervised": [0.08, 0.08, 0.08],
        }
    )
    assert r.straddles("byol-pytorch", 3.0)
    assert not r.straddles("lightly", 2.0)
    text = summary(r, None)
    assert "fall on both sides of 3.0x (2.80-3.30x)" in text
    assert "both sides of 2.0x" not in text
    assert "the repeats straddle it" in markdown(r)


def test_separate_processes_judge_the_step_by_their_median() -> None:
    # One process (section 1) gives 2.2x over lightly; three fresh processes give 1.9, 1.95 and
    # 2.1x: the table must call the target by their median, not section 1's process.
    one = result(
        {
            "ours": [0.1, 0.1, 0.1],
            "byol-pytorch": [0.31, 0.31, 0.31],
            "lightly": [0.22, 0.22, 0.22],
            "supervised": [0.08, 0.08, 0.08],
        }
    )
    runs = [
        {"ours": 0.1, "lightly": 0.19, "byol-pytorch": 0.28, "supervised": 0.08},
        {"ours": 0.2, "lightly": 0.39, "byol-pytorch": 0.5, "supervised": 0.15},
        {"ours": 0.1, "lightly": 0.21, "byol-pytorch": 0.29, "supervised": 0.09},
    ]
    r = processes.ProcessesResult(runs, repeats=3)
    assert r.ratios("lightly") == pytest.approx([1.9, 1.95, 2.1])
    assert r.text("lightly") == "1.95x (median of 3 processes, 1.90-2.10x)"
    assert r.bound_ratio() == pytest.approx(0.1 / (4 / 3 * 0.08))  # of 0.94, 1.0 and 0.83
    assert r.straddles("lightly", 2.0) and not r.straddles("byol-pytorch", 3.0)
    text = summary(one, None, r)
    assert "| step: ours over lightly | >= 2.0x | 1.95x (median of 3 processes" in text
    assert "section 1's process 2.20x | **not met** |" in text
    assert "the separate processes fall on both sides of 2.0x (1.90-2.10x)" in text
    assert "3.0x over byol-pytorch needs a step" in text
    assert "3.0x over byol-pytorch needs a step" not in summary(one, None)
    table = processes.markdown(r)
    assert "| 2 | 200.0 | 390.0 | 500.0 | 150.0 | 1.95x | 2.50x | 1.00x |" in table
    assert "the processes straddle it" in table


RUNS_TABLE = """Some prose.

| figure | 2026-11-23, 1 thread | 2026-12-06 18:21, AMX |
|---|---:|---:|
| ours over lightly | 2.06x | 2.57x (2.54-2.70x in five more runs) |
| distributed: global over local BN, as trained | +21.3% | not run |

After the table.
"""


def test_the_runs_table_is_read_with_quoted_ranges_and_gaps() -> None:
    runs, rows, ranges = read_table(RUNS_TABLE)
    assert runs == ["2026-11-23, 1 thread", "2026-12-06 18:21, AMX"]
    assert rows["ours over lightly"] == [2.06, 2.57]
    assert ranges["ours over lightly"] == [None, (2.54, 2.70)]
    assert rows["distributed: global over local BN, as trained"] == [21.3, None]
    with pytest.raises(ValueError, match="has 2 cells for 3 runs"):
        read_table(RUNS_TABLE.replace("| figure |", "| figure | extra |"))


def test_the_runs_figure_is_drawn_from_the_documents_table(tmp_path: Path) -> None:
    doc = Path(__file__).parents[1] / "docs" / "benchmarks.md"
    runs, rows, ranges = read_table(doc.read_text())
    assert len(runs) >= 2 and all(len(v) == len(runs) for v in rows.values())
    out = plot_runs(runs, rows, ranges, tmp_path / "runs.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_ticks_put_date_time_and_machine_on_lines_of_their_own() -> None:
    assert _tick(10, "2026-12-06 20:59, EPYC Zen 4, 2 threads") == (
        "10: 2026-12-06\n20:59\nEPYC Zen 4\n2 threads"
    )
    assert _tick(3, "05:20, 2 threads") == "3: 05:20\n2 threads"


def test_the_malloc_lever_reads_both_rows_from_fresh_process_figures() -> None:
    lever_ms = {}
    for row, plain, kept in (("ours", 510.0, 480.0), ("lightly", 1040.0, 1010.0)):
        for mode, ms, kernel, faults in (
            ("malloc's defaults", plain, 34.0, 15000.0),
            ("keep_heap", kept, 3.0, 100.0),
        ):
            key = f"keep_heap: {row}, {mode}"
            lever_ms.update({key: ms, f"{key} kernel ms": kernel, f"{key} page faults": faults})
    text = levers_section(None, lever_ms, None)
    assert "ours 480 against 510 ms (1.06x; kernel time 3 against 34 ms" in text
    assert "lightly 1010 against 1040 ms (1.03x" in text
    assert "page faults 100 against 15,000 a step" in text
    assert "malloc keeps its heap" not in levers_section(None, {}, None)


def test_the_distributed_report_is_its_median_runs() -> None:
    local, glob = list(distributed.CONFIGS)[:2]

    def run(local_s: float, global_s: float) -> distributed.Run:
        return [0.0, 0.0], {local: local_s, glob: global_s}, {}, {}

    runs = [run(0.6, 0.70), run(0.6, 0.65), run(0.5, 0.54)]  # +16.7 %, +8.3 %, +8.0 %
    assert distributed.median_run(runs) is runs[1]
    assert distributed.median_run(runs[:2]) is runs[1]  # the lower of the middle two
    assert distributed._as_trained(runs[0]) == pytest.approx(100 / 6)


@pytest.mark.parametrize("bf16", [True, False])
def test_the_report_names_the_precision_the_step_ran_in(bf16: bool) -> None:
    """Where the CPU has no fast bf16 the runtime is fp32: the report must not call the fp32
    row a lever off, nor the bound a bf16 runtime (as it did on the AVX2-only EPYC)."""
    samples = {
        "ours": [0.1, 0.1],
        "lightly": [0.15, 0.15],
        "byol-pytorch": [0.15, 0.15],
        "supervised": [0.08, 0.08],
        "ours fp32": [0.1, 0.1],
        "ours no channels_last": [0.12, 0.12],
        "ours fp32 no channels_last": [0.13, 0.13],
        "ours + host sync": [0.1, 0.1],
        "ours one pass": [0.1, 0.1],
        "lightly bf16": [0.12, 0.12],
    }
    r = result(samples)
    r.runtime = dataclasses.replace(r.runtime, bf16=bf16)
    step_text, levers = markdown(r), levers_section(r, {}, None)
    notes = summary(r, None)
    if bf16:
        assert "| lever off: ours in fp32 (no autocast) |" in step_text
        assert "in the same bf16 + channels_last runtime" in notes
        assert "lightly under the same bf16 autocast + channels_last" in levers
    else:
        assert "| ours in fp32 again (the default here" in step_text
        assert "bf16 autocast + channels_last" not in step_text + levers
        assert "in the same fp32 + channels_last runtime" in notes
        assert "oneDNN fp32 ones" in notes
        assert "The fp32 row is the default measured again" in levers
        assert "lightly under the same channels_last (fp32 here)" in levers
