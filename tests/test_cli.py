"""The command line as a new user meets it (issue 16): every subcommand turns a user mistake into one
`nudgefast: error: ...` line and exit status 2, with no traceback, and checks its configuration
before any model is located, converted or loaded.

Each row runs the real console entry in a subprocess. Two tripwires show that nothing was loaded:
NUDGEFAST_CACHE points at a folder that does not exist (locating the demo pair or a packaged model
creates it), and TRAP is a model directory whose config.json is fine but whose weights are garbage
(loading it would fail with a different error, or a traceback).

serve (nudgefast/serve/, another branch): add its rows to ROWS; test_every_subcommand_has_rows
fails until a subcommand the parser knows has at least one.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from nudgefast import cli, errors
from nudgefast.paths import partial_tag, remove_stale_partials
from tiny_models import make_tiny

CUDA = torch.cuda.is_available()


@dataclass
class Row:
    cmd: str            # the subcommand the row exercises
    argv: list          # {tiny}, {trap}, {not_gguf}, {missing}, {out} are filled in
    expect: str         # a piece of the error line that names the problem
    config: bool = True  # a configuration error: must be reported before anything is loaded
    skip: str | None = None


ROWS = [
    Row("generate", ["generate", "--prompt", "hi", "--device", "cuda"], "CUDA",
        skip="a CUDA device is present" if CUDA else None),
    Row("generate", ["generate", "--prompt", "hi", "--device", "tpu"], "cpu or cuda"),
    Row("generate", ["generate", "--prompt", "hi", "--threshold", "1.5"], "threshold=1.5"),
    Row("generate", ["generate", "--max-new-tokens", "0"], "max_new_tokens=0"),
    Row("generate", ["generate", "--speculate", "4"], "speculate=4 needs a shared vocabulary"),
    Row("generate", ["generate", "--granularity", "token"], "granularity='token' needs a shared vocabulary"),
    Row("generate", ["generate", "--prompt", "   "], "prompt 0 is empty"),
    Row("generate", ["generate", "--threshold", "abc"], "invalid float value: 'abc'"),
    Row("generate", ["generate", "--base", "{trap}", "--nudger", "{trap}", "--threshold", "-1"], "threshold=-1"),
    Row("generate", ["generate", "--base", "{missing}", "--nudger", "{tiny}"], "does not exist"),
    Row("generate", ["generate", "--base", "{tiny}", "--mode", "nudging"], "needs --nudger"),
    Row("generate", ["generate", "--base", "{trap}", "--weights", "gguf", "--device", "cpu", "--dtype", "bfloat16"],
        "--weights gguf"),
    Row("convert", ["convert", "{not_gguf}", "{out}"], "is not a GGUF file"),
    Row("convert", ["convert", "{missing}", "{out}"], "no such GGUF file"),
    Row("convert", ["convert", "{not_gguf}", "{out}", "--dtype", "int4"], "invalid choice: 'int4'"),
    Row("bench", ["bench", "--preset", "no-such-preset"], "unknown preset 'no-such-preset'"),
    Row("bench", ["bench", "--packaged", "llama-2-7b"], "unknown packaged model 'llama-2-7b'"),
    Row("bench", ["bench", "--demo-pair", "--granularity", "token"], "two tokenizers"),
    Row("bench", ["bench", "--base", "{trap}", "--nudger", "{trap}", "--threshold", "1.5"], "threshold=1.5"),
    Row("bench", ["bench", "--base", "{trap}", "--nudger", "{trap}", "--repeats", "0"], "--repeats must be >= 1"),
    Row("bench", ["bench", "--preset", "olmo2-tiny+tiny", "--device", "cuda"], "CUDA",
        skip="a CUDA device is present" if CUDA else None),
    Row("bench", ["bench", "--preset", "olmo2-tiny+tiny", "--base", "{tiny}"], "exactly one model source"),
    Row("serve", ["serve", "--port", "70000"], "--port 70000 must be in [0, 65535]"),
    Row("serve", ["serve", "--max-running", "0"], "--max-running 0 must be >= 1"),
    Row("serve", ["serve", "--device", "tpu"], "cpu or cuda"),
    Row("serve", ["serve", "--base", "{missing}", "--nudger", "{tiny}"], "does not exist"),
    Row("serve", ["serve", "--tensor-parallel-size", "0"], "--tensor-parallel-size 0 must be >= 1"),
    Row("serve", ["serve", "--base", "{trap}", "--nudger", "{trap}", "--tensor-parallel-size", "3"],
        "num_heads=4 is not divisible by tensor_parallel_size=3"),
    Row("bench", ["bench", "--base", "{trap}", "--nudger", "{trap}", "--tensor-parallel-size", "0"],
        "--tensor-parallel-size must be >= 1"),
    Row("bench", ["bench", "--preset", "olmo2-tiny+tiny", "--tensor-parallel-size", "2"], "not a random-weight preset"),
    Row("(none)", [], "the following arguments are required"),
    Row("(none)", ["frobnicate"], "invalid choice: 'frobnicate'"),
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny = make_tiny("llama", root / "tiny")
    trap = root / "trap"
    shutil.copytree(tiny, trap)
    (trap / "model.safetensors").write_bytes(b"not safetensors: loading this model fails")
    not_gguf = root / "hostname"
    not_gguf.write_text("a-machine\n")
    return {"tiny": tiny, "trap": trap, "not_gguf": not_gguf, "missing": root / "no-such-thing"}


def nudgefast_command() -> list[str]:
    script = Path(sys.executable).with_name("nudgefast")
    return [str(script)] if script.is_file() else [sys.executable, "-c", "import sys; from nudgefast.cli import main; "
                                                                        "sys.exit(main())"]


def run_cli(argv, cache: Path, timeout=120):
    env = dict(os.environ, NUDGEFAST_CACHE=str(cache), PYTHONWARNINGS="ignore")
    env.pop("NUDGEFAST_TRACEBACK", None)
    t0 = time.perf_counter()
    proc = subprocess.run(nudgefast_command() + argv, capture_output=True, text=True, env=env, timeout=timeout)
    return proc, time.perf_counter() - t0


@pytest.fixture(scope="module")
def outcomes(paths, tmp_path_factory):
    """Every row's run, started together (each start is mostly Python importing torch: running
    them side by side keeps the table at a few seconds of wall time on two cores)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(i, row):
        root = tmp_path_factory.mktemp(f"row{i}")
        out, cache = root / "out", root / "cache-never-created"
        argv = [a.format(out=out, **paths) for a in row.argv]
        proc, seconds = run_cli(argv, cache)
        return {"argv": argv, "proc": proc, "seconds": seconds, "out": out, "cache": cache}

    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {i: pool.submit(one, i, row) for i, row in enumerate(ROWS) if not row.skip}
        return {i: f.result() for i, f in futures.items()}


@pytest.mark.parametrize("i", range(len(ROWS)), ids=[" ".join(r.argv[:3]) or "(no arguments)" for r in ROWS])
def test_user_mistake_is_one_error_line_and_status_2(i, outcomes):
    row = ROWS[i]
    if row.skip:
        pytest.skip(row.skip)
    o = outcomes[i]
    proc, argv = o["proc"], o["argv"]
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("nudgefast: error: "), proc.stderr
    assert row.expect in lines[0], lines[0]
    assert proc.stdout == ""
    if row.config:
        # nothing located or converted (the cache folder is created by the first look into it),
        # nothing written where a conversion would go, and no model loaded (the trap's weights
        # would have failed first); well under the time a load or conversion takes
        assert not o["cache"].exists(), f"{argv}: the model cache was touched"
        assert not o["out"].exists()
        assert o["seconds"] < 90


def test_every_subcommand_has_rows():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "cmd")
    assert set(sub.choices) <= {r.cmd for r in ROWS}, "a subcommand without bad-input rows"


def test_internal_errors_keep_their_traceback(monkeypatch, capsys):
    """Only user errors are shortened: anything else is a bug and propagates."""
    def broken(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "cmd_convert", broken)
    with pytest.raises(KeyError):
        cli.main(["convert", "a.gguf", "out"])


def test_user_error_traceback_on_request(monkeypatch):
    monkeypatch.setenv("NUDGEFAST_TRACEBACK", "1")
    with pytest.raises(errors.BadValue, match="invalid choice"):
        cli.main(["frobnicate"])


def test_missing_optional_package_is_a_user_error(monkeypatch, capsys):
    """bench --plot without matplotlib (and --anchors without transformers) stop before any model
    is built, naming the pip command."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert cli.main(["bench", "--preset", "olmo2-tiny+tiny", "--plot", "x.png"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["nudgefast: error: nudgefast bench --plot needs matplotlib: pip install matplotlib "
                   "(scripts/install.sh installs it)"]


def test_user_errors_keep_their_builtin_types():
    """Library callers catch what they caught before."""
    from nudgefast.config import ConfigError
    from nudgefast.gguf import GGUFError

    for cls, base in [(ConfigError, ValueError), (GGUFError, ValueError), (errors.BadPath, FileNotFoundError),
                      (errors.PathExists, FileExistsError), (errors.MissingPackage, ModuleNotFoundError)]:
        assert issubclass(cls, errors.UserError) and issubclass(cls, base)
    assert str(errors.BadPath("no such GGUF file: x")) == "no such GGUF file: x"


# ---- stale partial conversions ---------------------------------------------------------------------
def test_stale_partials_are_removed_and_live_ones_kept(tmp_path):
    host = partial_tag().split(".")[0]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a process that has exited
    prefix = ".model.partial-"
    stale = tmp_path / f"{prefix}{host}.{dead}-abc"
    live = tmp_path / f"{prefix}{partial_tag()}-def"
    other_host_recent = tmp_path / f"{prefix}elsewhere.{dead}-ghi"
    other_host_old = tmp_path / f"{prefix}elsewhere.1-jkl"
    untagged_old = tmp_path / f"{prefix}xyz123"
    for d in (stale, live, other_host_recent, other_host_old, untagged_old):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    old = time.time() - 3 * 86400
    for d in (other_host_old, untagged_old):
        os.utime(d, (old, old))
    unrelated = tmp_path / "model"
    unrelated.mkdir()
    removed = remove_stale_partials(tmp_path, prefix)
    assert sorted(removed) == sorted([stale, other_host_old, untagged_old])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", live.name, other_host_recent.name])


def test_a_killed_conversion_leaves_no_partial_after_the_next_run(tmp_path):
    """A conversion killed half-way (SIGKILL: no cleanup runs) leaves its staging folder; the next
    conversion of the same target removes it."""
    gguf = pytest.importorskip("gguf")  # noqa: F841  (the converter reads GGUF files with it)
    pytest.importorskip("transformers")
    from test_gguf import TINY_TOKENS, write_tiny_gguf

    from nudgefast.gguf import convert_gguf

    spec = ("llama", 1, 32, 2, 1, 16, 64, len(TINY_TOKENS), True)
    write_tiny_gguf(tmp_path / "tiny.gguf", spec, tokenizer=True)
    script = ("import os, signal, sys\n"
              "import nudgefast.gguf as g\n"
              "def killed(*a, **k):\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n"
              "g.write_model_files = killed\n"
              "g.convert_gguf(sys.argv[1], sys.argv[2], progress=False)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "tiny.gguf"), str(tmp_path / "hf")],
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    left = [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert len(left) == 1, left  # the killed run's staging folder
    convert_gguf(tmp_path / "tiny.gguf", tmp_path / "hf", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "tiny.gguf"]
