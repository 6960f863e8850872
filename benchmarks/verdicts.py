"""The report's judgement: targets met or not, and what each lever did, from the measured figures.

Kept apart from the measuring modules so that the text that draws conclusions is in one place
and only ever states numbers that this run measured.
"""

from __future__ import annotations

import torch

from benchmarks.augmentation import SHARE_TARGET, SPEEDUP_TARGET, AugmentResult
from benchmarks.epoch import EpochResult, breakdown
from benchmarks.heap import MODES, ROWS
from benchmarks.levers import SMALL_MAP_SHAPES, small_map_key
from benchmarks.processes import ProcessesResult
from benchmarks.step import BOUND_TARGET, TARGETS, StepResult
from byol_core.runtime import (
    BF16_MIN_SPEEDUP,
    cpu_bf16_kind,
    cpu_bf16_speedup,
    cpu_has_fast_bf16,
)
from byol_core.small_map_conv import LIMITS


def _verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def summary(
    step: StepResult | None,
    aug: AugmentResult | None,
    processes: ProcessesResult | None = None,
) -> str:
    """The targets table. With ``processes`` the step's verdicts are the median over separate
    processes, and section 1's single process is quoted beside it."""
    rows = []
    if processes:
        for peer, target in TARGETS.items():
            got = processes.text(peer)
            if step:
                got += f"; section 1's process {step.ratio(peer):.2f}x"
            rows.append(
                (f"step: ours over {peer}", f">= {target}x", got, processes.ratio(peer) >= target)
            )
        bound = processes.bound_ratio()
        rows.append(
            (
                "step: ours over 4/3 supervised",
                f"<= {BOUND_TARGET}x",
                processes.text(),
                bound <= BOUND_TARGET,
            )
        )
    elif step:
        for peer, target in TARGETS.items():
            ratio = step.ratio(peer)
            rows.append(
                (f"step: ours over {peer}", f">= {target}x", step.ratio_text(peer), ratio >= target)
            )
        bound = step.seconds["ours"] / step.bound
        rows.append(
            (
                "step: ours over 4/3 supervised",
                f"<= {BOUND_TARGET}x",
                f"{bound:.2f}x",
                bound <= BOUND_TARGET,
            )
        )
    if aug:
        rows.append(
            (
                "augmentation: ours over torchvision DataLoader",
                f">= {SPEEDUP_TARGET:.0f}x",
                f"{aug.speedup:.1f}x",
                aug.speedup >= SPEEDUP_TARGET,
            )
        )
    if step and "augment" in step.seconds:
        share = step.seconds["augment"] / step.seconds["ours"]
        rows.append(
            (
                "augmentation: share of a step",
                f"<= {100 * SHARE_TARGET:.0f}%",
                f"{100 * share:.1f}%",
                share <= SHARE_TARGET,
            )
        )
    notes = []
    for peer, target in TARGETS.items():
        if processes and processes.straddles(peer, target):
            found = processes.ratios(peer)
            notes.append(
                f"- Over {peer} the separate processes fall on both sides of {target}x "
                f"({min(found):.2f}-{max(found):.2f}x): the verdict is their median, close to "
                "the target on this machine."
            )
    if step:
        for peer, target in TARGETS.items():
            if not processes and step.straddles(peer, target):
                lo, hi = step.ratio_range(peer)
                notes.append(
                    f"- Over {peer} the repeats of this run fall on both sides of {target}x "
                    f"({lo:.2f}-{hi:.2f}x): the verdict is this run's median, not settled; "
                    "compare runs in separate processes before calling it."
                )
            if (processes or step).ratio(peer) >= target:
                continue
            needed = step.seconds[peer] / target
            notes.append(
                f"- {target}x over {peer} needs a step of at most {needed * 1e3:.0f} ms: "
                f"{needed / step.bound:.2f}x our own bound ({step.bound * 1e3:.0f} ms, 4/3 of a "
                "supervised forward + backward of the same encoder in the same "
                f"{step.precision('ours')} + channels_last runtime), and ours is already "
                f"{step.seconds['ours'] / step.bound:.2f}x that bound. "
                + (
                    "Below the bound means less arithmetic than the method has or faster "
                    f"convolution kernels than this CPU's oneDNN {step.precision('ours')} ones "
                    f"({cpu_bf16_kind()}), "
                    "not a better step: not reachable here without changing what is compared."
                    if needed < step.bound
                    else "Within reach only by closing the remaining gap to the bound."
                )
                + _ceiling_note(step, peer, target)
            )
    table = "\n".join(
        f"| {what} | {target} | {got} | {_verdict(ok)} |" for what, target, got, ok in rows
    )
    return f"""## Targets

| target | wanted | measured | |
|---|---|---|---|
{table}

{chr(10).join(notes)}
"""


def _ceiling_note(step: StepResult, peer: str, target: float) -> str:
    """What the target asks of the CPU's arithmetic (section 1's roofline), if it was counted."""
    if not step.flops or not step.ceilings:
        return ""
    share = step.target_share(peer, target)
    ours = step.ceiling_share("ours")
    return (
        f" That step would run its arithmetic at {100 * share:.0f}% of this CPU's "
        f"{step.precision('ours')} peak rate, where ours runs at {100 * ours:.0f}% "
        f"and {peer} at {100 * step.ceiling_share(peer):.0f}% of its own precision's."
    )


def _vs(name: str, other_s: float, ours_s: float) -> str:
    """'NAME takes A ms against B ms for ours (x R)': the numbers, with no adjective that a
    noisy run could contradict."""
    return f"{name} {other_s * 1e3:.0f} ms against {ours_s * 1e3:.0f} ms ({other_s / ours_s:.2f}x)"


def _kept(ok: bool) -> str:
    return "kept" if ok else "**did not help in this run**"


def _compiled_augment(lever_ms: dict[str, float], aug: AugmentResult | None) -> str | None:
    """The augmentation-compile lever: per op, eager slices against the compiled batch, and
    what compiling every op that gains would make of section 2's ratio."""
    names = [k.split(": ", 1)[1] for k in lever_ms if k.startswith("augment eager: ")]
    if not names:
        return None
    parts, saved_ms, compile_s = [], 0.0, 0.0
    for name in names:
        eager, comp = lever_ms[f"augment eager: {name}"], lever_ms[f"augment compiled: {name}"]
        compile_s += lever_ms[f"augment compiled: {name} (compilation)"] / 1e3
        saved_ms += 2 * max(0.0, eager - comp)  # both views
        parts.append(f"{name} {eager:.1f} -> {comp:.1f} ms")
    text = (
        "- **torch.compile of the augmentation** (not kept), one view of section 2's batch, "
        f"eager in the pipeline's slices -> compiled whole batch: {', '.join(parts)}; "
        f"{compile_s:.0f} s of compilation in this run (inductor reuses its on-disk cache "
        "across runs, so a machine's first run compiles longer)."
    )
    if aug is not None:
        best = aug.ours_s - saved_ms / 1e3
        reach = "reaching" if aug.torchvision_s / best >= SPEEDUP_TARGET else "still short of"
        text += (
            f" Compiling every op that gains would save at most {saved_ms:.0f} ms of the pair's "
            f"{aug.ours_s * 1e3:.0f} ms: {aug.torchvision_s / best:.1f}x torchvision instead of "
            f"{aug.speedup:.1f}x, {reach} {SPEEDUP_TARGET:.0f}x, for a part that is a few "
            "per cent of a training step (section 2), at the price of a C++ compiler at run "
            "time and a recompilation for every new batch shape."
        )
    return text


def _levers(step: StepResult) -> str:
    """Our precision and layout levers as this run applied them."""
    return "bf16 autocast + channels_last" if step.runtime.bf16 else "channels_last (fp32 here)"


def _bf16_hardware_note() -> str:
    kind = cpu_bf16_kind()
    if kind == "no bf16 instructions":
        return "This CPU has no bf16 instructions: bf16 is emulated and not a default here."
    probe = (
        f" Its start-up probe (`runtime.cpu_bf16_speedup`, one convolution's forward + backward) "
        f"ran bf16 at {cpu_bf16_speedup():.2f}x fp32's speed, so `precision: auto` "
        f"{'chose bf16' if cpu_has_fast_bf16() else 'chose fp32'} "
        f"(bf16 from {BF16_MIN_SPEEDUP}x)."
    )
    if kind == "AMX":
        return "This CPU has AMX tiles, which oneDNN's bf16 convolutions use." + probe
    return (
        "This CPU has AVX512-BF16 but no AMX tiles, so bf16 convolutions gain far less "
        "than AMX would give, if anything." + probe
    )


def _small_maps(lever_ms: dict[str, float]) -> str | None:
    """The per-shape table behind ``SmallMapConv2d``'s thresholds."""
    if not any(k.startswith("small maps ") for k in lever_ms):
        return None
    rows = []
    for precision in ("bf16", "fp32"):
        for shape in SMALL_MAP_SHAPES:
            plain = lever_ms[small_map_key(precision, shape, "torch")]
            ours = lever_ms[small_map_key(precision, shape, "ours")]
            cin, cout, side, stride = shape
            out = (side - 1) // stride + 1
            rows.append(
                f"| {precision} | {cin} -> {cout}, {side}x{side}, stride {stride} | {out}x{out} "
                f"| {plain:.2f} | {ours:.2f} | {plain / ours:.2f}x |"
            )
    table = "\n".join(rows)
    bf16, fp32 = LIMITS[torch.bfloat16], LIMITS[torch.float32]
    return f"""
### Small feature maps

One 3x3 convolution, forward + backward (input and weight gradients), on 64 images in
channels_last: torch's `nn.Conv2d` against `SmallMapConv2d`, which computes each part as one
matrix product with the input unfolded in channels_last order when the output has at most so
many positions: the forward {bf16.forward}, the weight gradient {bf16.weight_grad} in bf16
and {fp32.weight_grad} in fp32, the input gradient {bf16.input_grad} (with a col2im scatter).
Median ms of interleaved repeats (`python -m benchmarks.levers`).

| precision | convolution | output | torch ms | ours ms | torch / ours |
|---|---|---|---:|---:|---:|
{table}
"""


def _keep_heap(lever_ms: dict[str, float]) -> str | None:
    """The malloc lever (``benchmarks.heap``), measured across fresh processes."""
    if f"keep_heap: ours, {MODES[1]}" not in lever_ms:
        return None
    rows = []
    for row in ROWS:
        plain, kept = (f"keep_heap: {row}, {mode}" for mode in MODES)
        rows.append(
            f"{row} {lever_ms[kept]:.0f} against {lever_ms[plain]:.0f} ms "
            f"({lever_ms[plain] / lever_ms[kept]:.2f}x; kernel time "
            f"{lever_ms[kept + ' kernel ms']:.0f} against {lever_ms[plain + ' kernel ms']:.0f} "
            f"ms, page faults {lever_ms[kept + ' page faults']:,.0f} against "
            f"{lever_ms[plain + ' page faults']:,.0f} a step)"
        )
    return (
        "- **malloc keeps its heap** (`runtime.keep_heap`, kept: the Trainer sets it in every "
        "CPU run), each step in fresh processes with and without, alternating: "
        + "; ".join(rows)
        + ". Without it glibc hands the freed activation blocks back to the system and every "
        "step faults them in again. It is a setting of the whole process, so section 1 runs "
        "every row, ours too, with malloc's defaults; the peers would gain from it as well."
    )


def levers_section(
    step: StepResult | None,
    lever_ms: dict[str, float],
    epoch: EpochResult | None,
    aug: AugmentResult | None = None,
) -> str:
    lines = [
        "## Levers",
        "",
        "Each figure is a lever's row over ours (defaults) from section 1.",
        "",
    ]
    if step:
        s = step.seconds
        ours = s["ours"]
        fp32, no_cl = s["ours fp32"], s["ours no channels_last"]
        sync = _vs(
            "reading loss and diagnostics with `.item()` every step", s["ours + host sync"], ours
        )
        if step.runtime.bf16:
            bf16 = (
                f"- **bf16 autocast** ({_kept(fp32 > ours)}; default on GPUs with bf16 and on "
                f"CPUs where it measures fast): {_vs('fp32', fp32, ours)}. " + _bf16_hardware_note()
            )
        else:
            # Without fast bf16 the default is fp32, so the fp32 row repeats ours.
            bf16 = (
                "- **bf16 autocast** (default on GPUs with bf16 and on CPUs where it measures "
                "fast): "
                + _bf16_hardware_note()
                + f" The fp32 row is the default measured again: {_vs('fp32', fp32, ours)}, "
                "the run's noise between two identical configurations."
            )
        lines += [
            bf16 + " GPUs were not measured (none here).",
            f"- **channels_last** ({_kept(no_cl > ours)}; default): "
            f"{_vs('without it', no_cl, ours)}; both levers off, "
            f"{_vs('fp32 without channels_last', s['ours fp32 no channels_last'], ours)}.",
            f"- **no host synchronisation in the step** (kept): "
            f"{sync}."
            " On a CPU every op has finished when it returns, so a sync can cost nothing beyond "
            "noise here; on a GPU it stalls the queue every step, which is why the diagnostics "
            "stay on the device until the epoch ends.",
            f"- **both views in one pass** (per-view batch norm, `view_bn`): "
            f"{_vs('one pass', s['ours one pass'], ours)} for a pass per view. Training takes a "
            "pass per view on one process and one pass under global BN (half the collectives, "
            "docs/benchmark-distributed.md).",
        ]
        if "ours no small maps" in s:
            plain = s["ours no small maps"]
            without = _vs("torch's convolution on every map", plain, ours)
            lines.append(
                f"- **small feature maps as matrix products** (`SmallMapConv2d`, "
                f"{_kept(plain > ours)}; default on the CPU): "
                f"{without}. At 64 px the last two "
                "stages work on 2x2 maps of 512 channels and 4x4 maps of 256, where oneDNN's "
                "kernels (the weight gradient most) run at a fraction of the matrix-multiply "
                "rate; there the forward, the weight gradient and on 2x2 the input gradient are "
                "each one product with the input unfolded in channels_last order (section "
                '"Small feature maps" below). The supervised bound uses the same encoder, so it '
                "gains as much."
            )
        if "lightly bf16" in s:
            fast = _vs(f"lightly under the same {_levers(step)}", s["lightly bf16"], ours)
            rest = s["lightly bf16"] / ours
            why = (
                "so nearly all of our lead over lightly as shipped is these two levers: the rest "
                "of our step (foreach EMA and optimizer, no host syncs) costs what lightly's does "
                "once the convolutions are the same"
                if rest < 1.05
                else "the rest of the lead is the rest of our step (foreach EMA and optimizer, "
                "no host syncs, less Python per step)"
            )
            lines.append(
                "- How much of the lead over lightly is precision and layout: "
                f"{fast} (as shipped: {s['lightly'] / ours:.2f}x); {why}."
            )
    opt = {k: v for k, v in lever_ms.items() if k.startswith("optimizer")}
    if opt:
        ours_opt = opt["optimizer: ours (LARS class, SGD mode)"]
        others = ", ".join(f"{k.split(': ')[1]} {v:.1f} ms" for k, v in opt.items())
        foreach = opt.get("optimizer: ours, foreach instead of the fused kernel")
        share = f", {100 * ours_opt / 1e3 / step.seconds['ours']:.1f}% of a step" if step else ""
        lines.append(
            f"- **foreach / fused optimizer** ({_kept(foreach is None or foreach > ours_opt)}): "
            f"{others}. Ours computes LARS's trust ratios with foreach ops and then hands decay, "
            f"momentum and update to torch's fused SGD kernel ({ours_opt:.1f} ms{share}), each "
            "channels_last weight as a contiguous view of its memory: handed the channels_last "
            "tensors themselves, as torch's SGD hands them, the CPU kernel copies every weight, "
            "gradient and buffer to a contiguous one and back. The foreach version of the same "
            "update is the path on devices the kernel does not take."
        )
    heap = _keep_heap(lever_ms)
    if heap:
        lines.append(heap)
    ema = {k: v for k, v in lever_ms.items() if k.startswith("EMA")}
    if ema:
        lines.append(
            "- **EMA**: "
            + ", ".join(f"{k.split(': ')[1]} {v:.1f} ms" for k, v in ema.items())
            + " (kept: one foreach lerp)."
        )
    if "torch.compile: step" in lever_ms:
        eager, comp = lever_ms["eager: step"], lever_ms["torch.compile: step"]
        compile_s = lever_ms["torch.compile: first step (compilation)"] / 1e3
        gain = eager / comp
        lines.append(
            f"- **torch.compile** (default mode, online and target networks): {comp:.0f} ms "
            f"against {eager:.0f} ms eager ({gain:.2f}x) after {compile_s:.0f} s of compilation."
            + (
                " Slower than eager here: the convolutions, most of the step, stay oneDNN's "
                "under inductor, and the elementwise work it fuses is a small part; not a "
                "default, and it would also recompile whenever a shape changes (the last partial "
                "batch of evaluation, another view size)."
                if gain < 1.0
                else " Not a default: the compilation costs more than a short CPU run saves, and "
                "it recompiles whenever a shape changes (the last partial batch of evaluation, "
                "another view size)."
                if gain < 1.15
                else " It helps the step; not a default because of the compilation time on "
                "short runs and recompiles on new shapes; worth an opt-in for long runs."
            )
        )
    if aug and aug.op_by_op_s is not None:
        lines.append(
            "- **the augmentation's CPU slices on a thread per core** "
            f"({_kept(aug.op_by_op_s > aug.ours_s)}; default on the CPU), section 2's pair: "
            + _vs(
                "the slices one after another, op by op on torch's intra-op threads",
                aug.op_by_op_s,
                aug.ours_s,
            )
            + ". Each 2 MB slice is a chain of about a hundred elementwise ops, too short for "
            "an op split over two cores to gain much; whole slices on separate threads, one "
            "intra-op thread each, keep both cores on their own work. The same views bit for "
            "bit."
        )
    compiled_aug = _compiled_augment(lever_ms, aug)
    if compiled_aug:
        lines.append(compiled_aug)
    lines.append(
        "- **data held as uint8 on the device** (kept, the Trainer's design): a batch is an "
        "index lookup into one uint8 tensor (a quarter of float32's memory), augmented there; "
        "section 2 measures it against a DataLoader."
    )
    if epoch:
        parts = dict(breakdown(epoch))
        evaluation = sum(v for k, v in parts.items() if k.startswith("evaluation"))
        logging = sum(v for k, v in parts.items() if k.startswith("logging"))
        lines.append(
            f"- **overlapping evaluation and logging with training** (not done): in the epoch "
            f"of section 3 evaluation is {100 * evaluation / epoch.fit_s:.0f}% and logging "
            f"{100 * logging / epoch.fit_s:.1f}% of `fit()`. Logging is too small to hide. "
            "Evaluation is the largest part after the backward pass, most of it the "
            "scikit-learn probe on the host; beside the next epoch on these two cores it would "
            "compete with torch's threads for the same cores (two processes with a thread per "
            "core each oversubscribe them, and oneDNN's threads spin-wait on each other), so it "
            "was not moved to a background thread here. On a GPU machine, where the probe runs "
            "on the host while the device trains, overlapping it would pay; `eval.every` is "
            "the knob meanwhile."
        )
    small = _small_maps(lever_ms)
    return "\n".join(lines) + "\n" + (small or "")
