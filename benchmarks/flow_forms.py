"""Eager CPU time of the two forms of each flow fast path, on the shipped flow heads (efficientnet_lite0, 256 px).

Each comparison times one flow head (features given, random weights: they do not change the work) in a *fast* form
and a *plain* form that differ in one detail only, called in turn every round (``harness.timing``: order reversed
every round, so a load burst on the shared machine hits both alike). Reported: the median time of each form, and
the median and 10–90 % spread of the per-round gain ``1 − fast/plain``. The rule (``docs/selection.md``): a fast
path stays in the package only if it clearly pays, a median gain above 10 %; otherwise the plain form is the one form.

The forms are written out here from the library's weights (``fiber_flow`` / ``conv_flow`` blocks and the prepared
CFLOW steps of ``fold_conditional_flow``), so the script keeps measuring both forms after the package keeps one.

    python benchmarks/flow_forms.py --repeats 41 --threads 1

Results: ``benchmarks/results/flow_forms.md``.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from harness.machine import machine_info
from harness.timing import interleaved_wall_times, median_ms
from torch.nn import functional as F

from flowad_plugins.backbones import FeatureExtractor
from flowad_plugins.flows import conv_flow, fiber_flow, fold_conditional_flow, positional_encoding_2d

RESULTS = Path(__file__).resolve().parent / "results"
IMAGE_SIZE = 256
# the shipped heads: configs/cflow_ad_efficientnet_lite0.yaml and configs/fastflow_efficientnet_lite0.yaml
CFLOW_LAYERS, CFLOW_BLOCKS, CFLOW_CONDITION, CFLOW_CLAMP = ("blocks.2", "blocks.4"), 8, 128, 1.9
FASTFLOW_LAYERS, FASTFLOW_STEPS, FASTFLOW_CLAMP = ("blocks.1", "blocks.2", "blocks.4"), 8, 2.0
GAIN_RULE = 0.10


def feature_shapes(layers: tuple[str, ...]) -> list[tuple[int, int, int]]:
    """``(C, h, w)`` of efficientnet_lite0's ``layers`` at 256 px."""
    extractor = FeatureExtractor("efficientnet_lite0", list(layers), pre_trained=False)
    return [(channels, IMAGE_SIZE // reduction, IMAGE_SIZE // reduction)
            for channels, reduction in zip(extractor.channels, extractor.reductions, strict=True)]


def randomise(module: torch.nn.Module) -> torch.nn.Module:
    """Random trainable weights (a trained flow is far from the identity it starts at); eval mode."""
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.requires_grad:
                parameter.copy_(0.05 * torch.randn_like(parameter))
    return module.eval()


def log_scale_of(raw: torch.Tensor, clamp: float, tanh: bool) -> torch.Tensor:
    """The coupling log-scale ``clamp·tanh(raw)``: ``Tanh`` itself, or the same function as ``2σ(2·raw) − 1``."""
    if tanh:
        return clamp * torch.tanh(raw)
    return torch.sigmoid(2.0 * raw) * (2.0 * clamp) - clamp


# ---- CFLOW-AD: prepared steps (positional condition projected once per position) on fibers or maps


def cflow_layer(steps: list, maps: torch.Tensor, fibers: bool, single_map: bool = False, in_place_relu: bool = False,
                tanh: bool = True) -> torch.Tensor:
    """Log-likelihood map ``B×h×w`` of one CFLOW decoder on ``B×C×h×w`` features.

    ``fibers``: the steps on ``(B·h·w)×C`` fibers (``F.linear``; condition term broadcast per map, or the bias of one
    ``addmm`` when ``single_map``); otherwise on the maps (1×1 convolutions, the condition term a per-position bias).
    """
    batch, channels, height, width = maps.shape
    x = maps.permute(0, 2, 3, 1).reshape(-1, channels) if fibers else maps
    log_det = None
    for step in steps:
        x1, x2 = torch.split(x, step.splits, dim=1)
        if fibers and single_map:
            hidden = torch.addmm(step.condition_term, x1, step.input_weight.t())
        elif fibers:
            hidden = F.linear(x1, step.input_weight)
            hidden.view(batch, height * width, -1).add_(step.condition_term)
        else:
            bias_map = step.condition_term.t().reshape(1, -1, height, width)
            hidden = F.conv2d(x1, step.input_weight[:, :, None, None]) + bias_map
        hidden = F.relu(hidden, inplace=in_place_relu)
        product = F.linear if fibers else (lambda v, w, b: F.conv2d(v, w[:, :, None, None], b))
        coefficients = product(hidden, step.output_weight, step.output_bias)
        passive = step.splits[1]
        log_scale = log_scale_of(coefficients[:, :passive], step.clamp, tanh)
        x2 = torch.addcmul(coefficients[:, passive:], x2, torch.exp(log_scale))
        x = product(torch.cat((x1, x2), dim=1), step.mixing_weight, step.mixing_bias)
        step_log_det = log_scale.sum(dim=1) + step.log_det_constant
        log_det = step_log_det if log_det is None else log_det + step_log_det
    log_likelihood = (log_det - 0.5 * x.pow(2).sum(dim=1)) / channels
    return log_likelihood.reshape(batch, height, width)


def cflow_comparisons(batches: tuple[int, ...]) -> list[tuple[str, Callable[[], object], Callable[[], object]]]:
    """``(name, fast call, plain call)`` for the CFLOW fast paths."""
    torch.manual_seed(0)
    heads = []
    for channels, height, width in feature_shapes(CFLOW_LAYERS):
        flow = randomise(fiber_flow(channels, CFLOW_BLOCKS, CFLOW_CLAMP, condition_dim=CFLOW_CONDITION))
        table = positional_encoding_2d(CFLOW_CONDITION, height, width).flatten(1).T.contiguous()
        with torch.no_grad():
            heads.append((fold_conditional_flow(flow, table), (channels, height, width)))

    def head(batch: int, **form: bool) -> Callable[[], object]:
        maps = [torch.randn(batch, *shape) for _, shape in heads]

        @torch.no_grad()
        def run() -> object:
            return [cflow_layer(steps, x, **form) for (steps, _), x in zip(heads, maps, strict=True)]

        return run

    comparisons = []
    for batch in batches:
        comparisons.append((f"CflowAD, fiber form vs map form, batch {batch}",
                            head(batch, fibers=True), head(batch, fibers=False)))
    comparisons.append(("CflowAD fibers, single map as one addmm vs broadcast add, batch 1",
                        head(1, fibers=True, single_map=True), head(1, fibers=True)))
    for batch in batches:  # in the eager form
        comparisons.append((f"CflowAD fibers, in-place ReLU vs ReLU, batch {batch}",
                            head(batch, fibers=True, in_place_relu=True), head(batch, fibers=True)))
        comparisons.append((f"CflowAD fibers, 2σ(2a)−1 vs tanh, batch {batch}",
                            head(batch, fibers=True, tanh=False), head(batch, fibers=True)))
    return comparisons


# ---- FastFlow: affine coupling blocks with conv subnets on maps


def fastflow_block(block: torch.nn.Module, x: torch.Tensor, gather: bool = False, in_place_relu: bool = False,
                   tanh: bool = True, folded_damping: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One coupling block on ``B×C×h×w``: ``(y, log-det B×h×w)``, each detail in the chosen form.

    ``gather``: the hard permutation as a channel gather + multiply-add, else one 1×1 convolution with the global
    affine folded in. ``folded_damping``: the 0.1 damping folded into the last subnet layer, else a product.
    """
    first, _, last = block.subnet
    x1, x2 = torch.split(x, block.splits, dim=1)
    hidden = F.relu(first(x1), inplace=in_place_relu)
    if folded_damping:
        coefficients = F.conv2d(hidden, 0.1 * last.weight, 0.1 * last.bias, padding=last.padding)
    else:
        coefficients = last(hidden) * 0.1
    passive = block.splits[1]
    log_scale = log_scale_of(coefficients[:, :passive], block.clamp, tanh)
    x2 = torch.addcmul(coefficients[:, passive:], x2, torch.exp(log_scale))
    joined = torch.cat((x1, x2), dim=1)
    scale = 0.1 * F.softplus(block.global_scale, beta=0.5)
    matrix = block.w_perm.reshape(block.channels, block.channels)
    if gather:
        order = matrix.argmax(dim=1)
        y = torch.addcmul(block.global_offset[:, order], joined.index_select(1, order), scale[:, order])
    else:
        y = F.conv2d(joined, (matrix * scale.reshape(1, -1))[:, :, None, None],
                     torch.matmul(matrix, block.global_offset.reshape(-1)))
    return y, log_scale.sum(dim=1) + torch.log(scale).sum()


def fastflow_comparisons(batches: tuple[int, ...], train_batch: int
                         ) -> list[tuple[str, Callable[[], object], Callable[[], object]]]:
    """``(name, fast call, plain call)`` for the FastFlow fast paths, eval (no grad) and one training step."""
    torch.manual_seed(0)
    shapes = feature_shapes(FASTFLOW_LAYERS)
    flows = [randomise(conv_flow(shape, FASTFLOW_STEPS, FASTFLOW_CLAMP, kernel_sizes=[3, 1], permute_soft=False))
             for shape in shapes]

    def head(batch: int, train: bool = False, **form: bool) -> Callable[[], object]:
        maps = [torch.randn(batch, *shape) for shape in shapes]

        def forward() -> torch.Tensor:
            total = torch.zeros(())
            for flow, x in zip(flows, maps, strict=True):
                log_det = None
                for block in flow.module_list:
                    x, step_log_det = fastflow_block(block, x, **form)
                    log_det = step_log_det if log_det is None else log_det + step_log_det
                total = total + (0.5 * x.pow(2).sum(dim=1) - log_det).mean()
            return total

        def run() -> object:
            if train:
                for flow in flows:
                    flow.zero_grad(set_to_none=True)
                forward().backward()
                return None
            with torch.no_grad():
                return forward()

        return run

    comparisons = []
    for batch in batches:
        comparisons += [
            (f"FastFlow, hard permutation as gather vs 1×1 conv, batch {batch}",
             head(batch, gather=True), head(batch)),
            (f"FastFlow, in-place ReLU vs ReLU, batch {batch}", head(batch, in_place_relu=True), head(batch)),
            (f"FastFlow, 2σ(2a)−1 vs tanh, batch {batch}", head(batch, tanh=False), head(batch)),
            (f"FastFlow, 0.1 folded into the last conv vs product, batch {batch}",
             head(batch, folded_damping=True), head(batch)),
        ]
    comparisons += [
        (f"FastFlow training step, hard permutation as gather vs 1×1 conv, batch {train_batch}",
         head(train_batch, train=True, gather=True), head(train_batch, train=True)),
        (f"FastFlow training step, in-place ReLU vs ReLU, batch {train_batch}",
         head(train_batch, train=True, in_place_relu=True), head(train_batch, train=True)),
        (f"FastFlow training step, 2σ(2a)−1 vs tanh, batch {train_batch}",
         head(train_batch, train=True, tanh=False), head(train_batch, train=True)),
    ]
    return comparisons


def measure(name: str, fast: Callable[[], object], plain: Callable[[], object], repeats: int) -> dict:
    """Interleaved timing of the two forms; per-round gain ``1 − fast/plain``."""
    fast_times, plain_times = interleaved_wall_times([fast, plain], warmup=3, repeats=repeats)
    gains = sorted(1.0 - f / p for f, p in zip(fast_times, plain_times, strict=True))
    decile = max(0, len(gains) // 10)
    return {"name": name, "fast_ms": median_ms(fast_times), "plain_ms": median_ms(plain_times),
            "gain": statistics.median(gains), "gain_p10": gains[decile], "gain_p90": gains[-1 - decile]}


def report(rows: list[dict], args: argparse.Namespace) -> str:
    """The results table as markdown."""
    machine = machine_info(args.threads)
    lines = [
        "# Flow fast paths: eager CPU time of both forms",
        "",
        f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs (shared; load average at the end "
        f"{machine['load_average_1_5_15min']}), {args.threads} torch thread(s), torch {machine['versions']['torch']}. "
        f"Command: `python benchmarks/flow_forms.py --repeats {args.repeats} --threads {args.threads}` "
        f"(median of {args.repeats} interleaved rounds after 3 warm-up rounds; flow heads only, features given, "
        "shipped efficientnet_lite0 settings at 256 px).",
        "",
        f"Gain = 1 − fast/plain per round (median, and 10–90 % of rounds). Rule: keep the fast path only if the "
        f"median gain exceeds {GAIN_RULE:.0%}.",
        "",
        "| comparison (fast vs plain) | fast ms | plain ms | gain | gain 10–90 % | pays |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(f"| {row['name']} | {row['fast_ms']:.2f} | {row['plain_ms']:.2f} | {row['gain']:+.1%} | "
                     f"{row['gain_p10']:+.1%} … {row['gain_p90']:+.1%} | "
                     f"{'yes' if row['gain'] > GAIN_RULE else 'no'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=41, help="timed rounds per comparison")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--output", type=Path, default=RESULTS / "flow_forms.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    comparisons = cflow_comparisons((1, 4)) + fastflow_comparisons((1, 4), train_batch=2)
    rows = []
    for name, fast, plain in comparisons:
        rows.append(measure(name, fast, plain, args.repeats))
        print(f"{name}: {rows[-1]['fast_ms']:.2f} vs {rows[-1]['plain_ms']:.2f} ms, gain {rows[-1]['gain']:+.1%}")
    args.output.write_text(report(rows, args))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
