"""Every command block of README.md runs here, on generated data, so the README cannot rot.

``README_BLOCKS`` maps each ```bash / ```python block (found by a piece of its text) to the substitutions that make
it tiny (1 epoch, small flows, small images) and to what it must produce. A block without an entry, an entry
without a block, or a substitution whose text is no longer in its block fails ``test_every_block_is_covered``.
Blocks run in subprocesses, two at a time (``CHAINS``), in a work folder laid out like a clone after the README's
install: ``.venv`` (a link to the environment running the tests), ``configs/`` (a link) and ``datasets/my_part``
(the README's layout, generated). Each bash block runs in a plain ``bash`` after the README's own setup line
(``source .venv/bin/activate``), each python block with ``.venv/bin/python``, as a user would; the environment
they inherit holds no trace of the test's venv (its ``bin`` is taken off ``PATH``, ``VIRTUAL_ENV`` is unset), so
a command the README would not find fails here too. The CLI training block writes the checkpoint that the test,
predict and export blocks use.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO

README = REPO / "README.md"
FENCE = re.compile(r"^```(bash|python)\n(.*?)^```", re.MULTILINE | re.DOTALL)
NOT_RUN = ("bash .ci/run",)  # CI's own command: running it here would reinstall and rerun the whole suite
SETUP = "source .venv/bin/activate"  # the README's install block activates the venv for every later command
TINY_CFLOW = "--model.coupling_blocks 2 --model.condition_dim 16 --model.fiber_batch_size 64"
FAST_TRAINER = "--trainer.max_epochs 1 --trainer.enable_progress_bar false"
FAST_FOLDER = "--data.num_workers 0 --data.train_batch_size 8 --data.eval_batch_size 8"
CHECKPOINT = "results/CflowAD/my_part/latest/weights/lightning/model.ckpt"
NOISE = ("No Adapter To Version", "Traceback", "Tip: For seamless", "in eval mode at the start of training",
         "will override existing callbacks", "Trying to infer the `batch_size`")
# anomalib 2.7's CLI warns twice while importing its own models, before any plugin is loaded (flowad_plugins.console)
ANOMALIB_IMPORT_WARNINGS = ("Importing from timm.models.layers is deprecated",
                            "The anomalib.models.components.dinov2 package is deprecated")
RICH_LOG_LINE = re.compile(r"^(\[[^\]]*\] +)? *(INFO|WARNING) {2,}", re.MULTILINE)  # anomalib's second handler


@dataclass(frozen=True)
class Block:
    """How one README block runs here: text that identifies it, substitutions, and what it must produce."""

    name: str
    match: str
    replace: tuple[tuple[str, str], ...] = ()
    output: tuple[str, ...] = ()  # substrings of stdout + stderr
    files: tuple[str, ...] = ()  # glob patterns under the work folder
    needs_checkpoint: bool = False


README_BLOCKS = (
    Block("install", "pip install -e '.[int8]'"),  # checked against pyproject.toml, not re-installed
    Block("demo", "&& flowad-demo",  # the work folder's .venv is installed already: create and install skipped
          replace=(("python3 -m venv .venv && ", ""), ("pip install -q -e . && ", ""),
                   ("flowad-demo", "flowad-demo --models CflowAD --epochs 1 --image-size 64 --output demo")),
          output=("test metrics", "AUPRO"), files=("demo/CflowAD_maps.png", "demo/metrics.json")),
    Block("train_cli", "--data.seed 0 \\\n  --default_root_dir results\n",
          replace=(("--default_root_dir results", f"--default_root_dir results {TINY_CFLOW} {FAST_TRAINER} "
                                                  f"{FAST_FOLDER}"),),
          output=("pixel_AUPRO",), files=(CHECKPOINT,)),
    Block("train_python", "from anomalib.data import Folder",
          replace=(('layers=["blocks.2", "blocks.4"])',
                    'layers=["blocks.2", "blocks.4"], coupling_blocks=2, condition_dim=16, fiber_batch_size=64)'),
                   ("max_epochs=10", "max_epochs=1, enable_progress_bar=False"),
                   ("seed=0)", "seed=0, num_workers=0, train_batch_size=8, eval_batch_size=8)")),
          output=("pixel_AUPRO",), files=("results_python/CflowAD/my_part/latest/weights/lightning/model.ckpt",)),
    Block("image_size", "--model.input_size",
          replace=(("320, 320", "128, 128"),
                   ('--data.val_split_ratio 0.2"', f'--data.val_split_ratio 0.2 {FAST_FOLDER} {FAST_TRAINER}"'),
                   ("fastflow_efficientnet_lite0.yaml --model.input_size '[128, 128]'",
                    "fastflow_efficientnet_lite0.yaml --model.input_size '[128, 128]' --model.flow_steps 2")),
          files=("results_320/FastFlow/my_part/latest/weights/lightning/model.ckpt",)),
    Block("test_predict", "anomalib test --config",
          replace=(("--config configs/cflow_ad_efficientnet_lite0.yaml",
                    f"--config configs/cflow_ad_efficientnet_lite0.yaml {TINY_CFLOW}"),
                   ("--data.seed 0", f"--data.seed 0 {FAST_FOLDER}"),
                   ("--default_root_dir predictions", "--default_root_dir predictions --trainer.enable_progress_bar "
                                                      "false")),
          output=("pixel_AUPRO",), files=("predictions/**/*.png",), needs_checkpoint=True),
    Block("export", "anomalib export --config",
          replace=(("--config configs/cflow_ad_efficientnet_lite0.yaml",
                    f"--config configs/cflow_ad_efficientnet_lite0.yaml {TINY_CFLOW}"),
                   ("[256, 256]", "[128, 128]")),
          files=("exported/weights/openvino/model.xml", "exported/weights/openvino/model.bin"), needs_checkpoint=True),
    Block("edge_predict", "flowad-predict exported/weights/openvino/model.xml",
          output=("images scored",),
          files=("results/results.csv", "results/results.json", "results/overlays/*_overlay.png"),
          needs_checkpoint=True),
    Block("thresholds_cli", "--model.post_processor.image_fpr 0.01",
          replace=(("image_fpr 0.01", "image_fpr 0.1"),  # 16 normal validation images here: 10 % is the finest
                   ("from_train --data.val_split_ratio 0.2", "from_train --data.val_split_ratio 0.5"),
                   ("--default_root_dir results_fpr", f"--default_root_dir results_fpr {TINY_CFLOW} {FAST_TRAINER} "
                                                      f"{FAST_FOLDER}")),
          output=("false-alarm rate 10.000% (requested)", "pixel_AUPRO")),
)


def readme_blocks() -> list[tuple[str, str]]:
    """(language, text) of every ```bash and ```python block of the README."""
    return FENCE.findall(README.read_text())


def block_text(entry: Block) -> str:
    """The README block ``entry`` matches, with its substitutions applied (each must apply)."""
    matches = [text for _, text in readme_blocks() if entry.match in text]
    assert len(matches) == 1, f"{entry.name}: {len(matches)} README blocks contain {entry.match!r}"
    text = matches[0]
    for old, new in entry.replace:
        assert old in text, f"{entry.name}: {old!r} is no longer in its README block"
        text = text.replace(old, new)
    return text


def test_every_block_is_covered() -> None:
    """Each README command block has exactly one entry (or is CI's command), and each entry still applies."""
    install = block_text(next(entry for entry in README_BLOCKS if entry.name == "install"))
    assert SETUP in install.splitlines(), f"the README's install block no longer activates the venv ({SETUP!r})"
    for language, text in readme_blocks():
        entries = [entry.name for entry in README_BLOCKS if entry.match in text]
        if text.strip() in NOT_RUN:
            continue
        assert len(entries) == 1, f"README {language} block not covered exactly once ({entries}):\n{text}"
    for entry in README_BLOCKS:
        block_text(entry)


def test_install_extras_exist() -> None:
    """Every extra the install block names is defined in pyproject.toml (installing is what CI itself does)."""
    text = block_text(next(entry for entry in README_BLOCKS if entry.name == "install"))
    extras = set(re.findall(r"\.\[([a-z0-9_-]+)\]", text))
    defined = tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get("optional-dependencies", {})
    assert extras and extras <= set(defined), f"README installs extras {sorted(extras)}; defined: {sorted(defined)}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``datasets/my_part`` in the README's layout (40 normal, 4 defective 64-px images + masks) and ``configs``."""
    import shutil

    from flowad_plugins.data import SyntheticSpec, generate_dataset

    root = tmp_path_factory.mktemp("readme")
    generated = generate_dataset(root / "generated", SyntheticSpec(category="surface", image_size=64, num_train=40,
                                                                   num_test_good=1, num_test_per_defect=4))
    part = root / "datasets" / "my_part"
    shutil.copytree(generated / "train" / "good", part / "good")
    shutil.copytree(generated / "test" / "scratch", part / "defect")
    shutil.copytree(generated / "ground_truth" / "scratch", part / "mask")
    (root / "configs").symlink_to(REPO / "configs", target_is_directory=True)
    if not (Path(sys.prefix) / "bin" / "activate").is_file():
        pytest.skip(f"the tests do not run in a venv ({sys.prefix}); the README's blocks activate .venv")
    (root / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    return root


# Two chains run side by side (imports dominate each run); the first chain's training feeds its followers.
CHAINS = (("train_cli", "test_predict", "export", "edge_predict"),
          ("demo", "image_size", "thresholds_cli", "train_python"))


def readme_environment() -> dict[str, str]:
    """This process's environment without the test's venv: its ``bin`` off ``PATH``, ``VIRTUAL_ENV`` unset."""
    venv_bin = (Path(sys.prefix) / "bin").resolve()
    path = [entry for entry in os.environ.get("PATH", "").split(os.pathsep)
            if entry and Path(entry).resolve() != venv_bin and Path(entry).resolve() != Path(sys.executable).parent]
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, "PATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}


def run_block(entry: Block, workdir: Path, timeout: float = 400) -> tuple[int, str]:
    """Run ``entry``'s block in ``workdir`` as a user would after the README's install (module docstring), with one
    torch thread (two blocks share the CPU); (exit code, output)."""
    language = next(language for language, text in readme_blocks() if entry.match in text)
    text = block_text(entry)
    env = readme_environment()
    command = ([str(workdir / ".venv" / "bin" / "python"), "-c", text] if language == "python"
               else ["bash", "-euo", "pipefail", "-c", f"{SETUP}\n{text}"])
    try:
        result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout,
                                check=False)
    except subprocess.TimeoutExpired as error:
        return -1, f"timed out after {timeout} s:\n{error.stdout or ''}{error.stderr or ''}"
    return result.returncode, result.stdout + result.stderr


@pytest.fixture(scope="module")
def block_runs(workdir: Path) -> dict[str, tuple[int, str]]:
    """Every runnable README block, run once: (exit code, output) by block name."""
    from concurrent.futures import ThreadPoolExecutor

    entries = {entry.name: entry for entry in README_BLOCKS}
    runs: dict[str, tuple[int, str]] = {}

    def run_chain(names: tuple[str, ...]) -> None:
        for name in names:
            if entries[name].needs_checkpoint and runs.get("train_cli", (1,))[0] != 0:
                runs[name] = (1, "not run: the training block failed")
                continue
            runs[name] = run_block(entries[name], workdir)

    with ThreadPoolExecutor(max_workers=len(CHAINS)) as pool:
        list(pool.map(run_chain, CHAINS))
    return runs


RUNNABLE = [entry for entry in README_BLOCKS if entry.name != "install"]


def test_every_runnable_block_is_in_a_chain() -> None:
    assert sorted(name for chain in CHAINS for name in chain) == sorted(entry.name for entry in RUNNABLE)


@pytest.mark.parametrize("entry", RUNNABLE, ids=[entry.name for entry in RUNNABLE])
def test_readme_block_runs(entry: Block, workdir: Path, block_runs: dict[str, tuple[int, str]]) -> None:
    """The block runs as written (made tiny), produces what the README says and prints no known library noise."""
    returncode, output = block_runs[entry.name]
    assert returncode == 0, f"{entry.name} failed:\n{block_text(entry)}\n{output[-5000:]}"
    for expected in entry.output:
        assert expected in output, f"{entry.name}: {expected!r} not printed:\n{output[-3000:]}"
    for pattern in entry.files:
        assert list(workdir.glob(pattern)), f"{entry.name}: nothing matches {pattern} under {workdir}"
    noise = [message for message in NOISE if message in output]
    assert not noise, f"{entry.name} printed known library noise {noise}"
    deprecations = [line for line in output.splitlines() if re.search(r"(Future|Deprecation)Warning: ", line)
                    and not any(known in line for known in ANOMALIB_IMPORT_WARNINGS)]
    assert not deprecations, f"{entry.name} printed deprecation warnings {deprecations}"
    assert not RICH_LOG_LINE.search(output), f"{entry.name} printed log lines twice:\n{output[-3000:]}"
    if entry.name == "demo":
        metrics = json.loads((workdir / "demo" / "metrics.json").read_text())["CflowAD"]
        assert {"image_AUROC", "pixel_AUROC", "pixel_AUPRO"} <= set(metrics)
    if entry.name == "image_size":
        config = (workdir / "results_320" / "FastFlow" / "my_part" / "latest" / "config.yaml").read_text()
        assert re.search(r"size:\s*\n\s*- 128\s*\n\s*- 128", config), "FastFlow not trained at 128 px"


def edge_table_rows(result_file: Path) -> list[str]:
    """README edge-speed rows of an ``edge_pairs.py`` result: per pair and batch, ms per call ours vs anomalib at the
    default precision and with the f32 hint, the speed-ups, and ours ÷ its backbone alone at the default."""
    result = json.loads(result_file.read_text())
    names = {"cflow": "CflowAD", "fastflow": "FastFlow", "csflow": "CSFlow (Csflow on its trunk)",
             "csflow-stock": "CSFlow (stock Csflow)"}

    def ms(value: float | None) -> str:
        return "–" if value is None else f"{value:.1f}"

    def times(value: float | None) -> str:
        return "–" if value is None else f"{value:.2f}×"

    rows = []
    for pair in result["pairs"]:
        for batch in result["batch_sizes"]:
            m, r = pair[f"b{batch}"], pair["ratios"][f"b{batch}"]
            rows.append(f"| {names[pair['pair']]} | {pair['image_size']} | {batch} | {ms(m['ours/default'])} | "
                        f"{ms(m['anomalib/default'])} | {times(r['default']['speedup'])} | {ms(m['ours/f32'])} | "
                        f"{ms(m['anomalib/f32'])} | {times(r['f32']['speedup'])} | "
                        f"{times(r['default']['ours_vs_backbone'])} |")
    return rows


def test_edge_table_is_copied_from_the_results_file() -> None:
    """The README's edge-speed table equals what the results file named in its marker holds."""
    text = README.read_text()
    match = re.search(r"<!-- edge table: (\S+) -->\n\|[^\n]*\n\|[^\n]*\n(.*?)<!-- end edge table -->", text, re.DOTALL)
    assert match, "edge table markers missing from README.md"
    assert match.group(2).strip().splitlines() == edge_table_rows(REPO / match.group(1))


def test_accuracy_table_is_copied_from_the_results_files() -> None:
    """The README's accuracy table (bottle, tire, generated) equals the result files of ``accuracy_table.py``."""
    if str(REPO / "benchmarks") not in sys.path:
        sys.path.append(str(REPO / "benchmarks"))
    from accuracy_table import readme_rows

    text = README.read_text()
    match = re.search(r"<!-- accuracy table -->\n\|[^\n]*\n\|[^\n]*\n(.*?)<!-- end accuracy table -->", text, re.DOTALL)
    assert match, "accuracy table markers missing from README.md"
    assert match.group(1).strip().splitlines() == readme_rows()
