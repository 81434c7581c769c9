#!/usr/bin/env python
"""Mutation testing of the nudging rule's code: does the test suite notice when the rule changes?

Each mutation below changes a line or two of the rule's code (the references nudgefast/reference.py
and crossvocab_reference.py, the word-start table in tokenizer.py, the gate and accept kernels'
torch references and Triton kernels, and the C++ gate step), runs the tests that claim to cover
that code, and counts the mutant KILLED when they fail. A SURVIVED mutant is a change of the rule
that no test sees. The source files are restored after every mutant (also on Ctrl-C).

    .venv/bin/python scripts/mutation_check.py            # all mutations
    .venv/bin/python scripts/mutation_check.py --list     # what they are
    .venv/bin/python scripts/mutation_check.py -k ref-    # those whose id contains "ref-"

Python mutants run with a fresh bytecode cache (PYTHONPYCACHEPREFIX), so a restored file is never
shadowed by a mutant's .pyc. C++ mutants are compiled into a separate copy of the extension under
build/mutation/ (the other sources are compiled once and reused) and loaded in place of
nudgefast._C by a pytest plugin; the installed extension is not touched. Tests run with -x: a
mutant stops at its first failing test. Exit status: 0 when every mutant is killed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "build" / "mutation"


@dataclass
class Mutation:
    id: str
    file: str
    edits: list[tuple[str, str]]  # (exact text occurring once, replacement)
    tests: list[str]  # pytest arguments
    what: str = ""
    issue_table: bool = False  # one of the mutations of issue 18's table
    extra: list = field(default_factory=list)


# the tests that cover each piece of the rule (fastest killers first: the run stops at the first failure)
T_REF = ["tests/test_rule_edges.py", "tests/test_nudging.py"]
T_CROSS = ["tests/test_rule_edges.py", "-k", "cross", "tests/test_crossvocab_edges.py", "tests/test_crossvocab.py"]
T_CROSS_ALL = ["tests/test_rule_edges.py", "tests/test_crossvocab_edges.py", "tests/test_crossvocab.py"]
T_TOK = ["tests/test_word_start.py", "tests/test_rule_edges.py", "tests/test_crossvocab_edges.py",
         "tests/test_crossvocab.py"]
T_GATE = ["tests/kernels/test_gate_edges.py", "tests/kernels/test_nudge_gate.py", "tests/kernels/test_spec_accept.py",
          "tests/kernels/test_vocab_split.py"]
# the Triton gate's comparison, in base_candidate (one program per row) and base_candidate_split
TRITON_CONFIDENT = "confident = tl.where(gate == _GATE_TOP_PROB, p_top >= threshold, entropy <= threshold)"
T_ACCEPT = ["tests/kernels/test_gate_edges.py", "tests/kernels/test_spec_accept.py"]
T_CPP = ["tests/kernels/test_gate_edges.py", "tests/test_native_ops.py", "tests/test_rule_edges.py",
         "tests/test_backends.py"]

T_LAZY = ["tests/test_lazy.py", "-m", "not slow", "tests/test_rule_edges.py"]
R, X, TK = "nudgefast/reference.py", "nudgefast/crossvocab_reference.py", "nudgefast/tokenizer.py"
LZ = "nudgefast/runner/lazy.py"
G, A, C = "kernels/nudge_gate.py", "kernels/spec_accept.py", "csrc/nudge_gate.cpp"

MUTATIONS = [
    # ---- reference.py ----------------------------------------------------------------------
    Mutation("ref-gate-gt", R, [("p_top >= threshold if", "p_top > threshold if")], T_REF,
             "top_prob gate: >= becomes >", True),
    Mutation("ref-gate-lt", R, [("else entropy <= threshold", "else entropy < threshold")], T_REF,
             "entropy gate: <= becomes <", True),
    Mutation("ref-no-stop-checks", R, [
        ("(b, False) if confident and b not in stop_ids else", "(b, False) if confident else"),
        ("            if confident and b not in stop_ids:\n", "            if confident:\n"),
        ("(confident or b == n) and b not in stop_ids:", "(confident or b == n):")], T_REF,
        "the three `b not in stop_ids` conditions removed", True),
    Mutation("ref-no-token-stop", R, [("(b, False) if confident and b not in stop_ids else",
                                       "(b, False) if confident else")], T_REF,
             "token level: b a stop id no longer hands over", True),
    Mutation("ref-no-base-stop", R, [("            if confident and b not in stop_ids:\n",
                                      "            if confident:\n")], T_REF,
             "BASE state: b a stop id no longer hands over", True),
    Mutation("ref-no-nudge-stop", R, [("(confident or b == n) and b not in stop_ids:", "(confident or b == n):")],
             T_REF, "NUDGE state: the hand-back ignores stop ids", True),
    Mutation("ref-never-stop", R, [("        if token in stop_ids:\n", "        if False:\n")], T_REF,
             "an emitted stop id does not end the answer", True),
    Mutation("ref-span-0", R, [("if span >= 1 and word_start(n)", "if span >= 0 and word_start(n)")], T_REF,
             "NUDGE may hand back before the nudger wrote a token"),
    Mutation("ref-no-word-start", R, [("if span >= 1 and word_start(n) and", "if span >= 1 and")], T_REF,
             "NUDGE hands back without a word boundary"),
    Mutation("ref-no-agree", R, [("and (confident or b == n) and", "and confident and")], T_REF,
             "NUDGE: b == n no longer hands back"),
    Mutation("ref-span-reset", R, [("mode, span = NUDGE, 1", "mode, span = NUDGE, 0")], T_REF,
             "BASE -> NUDGE starts the span at 0"),
    Mutation("ref-open-base", R, [("mode, span = NUDGE, 0  # the answer opens", "mode, span = BASE, 0  # the answer opens")],
             T_REF, "the answer opens with the base model"),
    Mutation("ref-streams", R, [("b = candidate(lb, seed, t, 0, T, top_p)", "b = candidate(lb, seed, t, 1, T, top_p)")],
             T_REF, "the base candidate drawn on the nudger's stream"),
    Mutation("ref-tempered-gate", R, [("p_top, entropy = base_statistics(lb)",
                                       "p_top, entropy = base_statistics(lb / max(T, 1e-3) if T else lb)")],
             T_REF, "gate statistics on the tempered distribution"),
    # ---- crossvocab_reference.py -----------------------------------------------------------
    Mutation("cross-no-base-stops", X, [
        ("if (confident or agree) and b not in base.stop_ids:", "if (confident or agree):"),
        ("boundary = base.codec.word_start(b) or b in base.stop_ids", "boundary = base.codec.word_start(b)"),
        ("if boundary and not (confident and b not in base.stop_ids):", "if boundary and not confident:")],
        T_CROSS, "the base's stop ids ignored on the cross-vocabulary path", True),
    Mutation("cross-no-nudge-base-stop", X, [("if (confident or agree) and b not in base.stop_ids:",
                                              "if (confident or agree):")], T_CROSS,
             "NUDGE: the base takes over on its own stop id"),
    Mutation("cross-no-base-state-stop", X, [("if boundary and not (confident and b not in base.stop_ids):",
                                              "if boundary and not confident:")], T_CROSS,
             "BASE: a confident base stop id is emitted"),
    Mutation("cross-never-stop", X, [("            if n in nudger.stop_ids:\n                out.finish_reason",
                                      "            if False:\n                out.finish_reason")], T_CROSS_ALL,
             "NUDGE: a nudger stop id does not end the answer"),
    Mutation("cross-mid-word", X, [("if boundary and not (confident", "if not (confident")], T_CROSS_ALL,
             "BASE hands over inside a word"),
    Mutation("cross-agree-empty", X, [("return bool(base_text) and nudger_text.startswith(base_text)",
                                       "return nudger_text.startswith(base_text)")], T_CROSS_ALL,
             "an empty base text agrees"),
    Mutation("cross-no-agree", X, [("if (confident or agree) and", "if confident and")], T_CROSS_ALL,
             "agreement no longer hands back"),
    Mutation("cross-span-0", X, [("if span >= 1 and nudger.codec.word_start(n):", "if span >= 0 and nudger.codec.word_start(n):")],
             T_CROSS_ALL, "NUDGE may hand back before the nudger wrote"),
    # ---- tokenizer.py ----------------------------------------------------------------------
    Mutation("tok-punctuation", TK, [('WORD_START_PREFIXES = ("\\u0120", "\\u2581", " ")',
                                      'WORD_START_PREFIXES = ("\\u0120", "\\u2581", " ", ".", ",", "!", "?", ":")')],
             T_TOK, ". , ! ? : counted as word starts", True),
    Mutation("tok-shift-up", TK, [("                table[i] = True", "                table[min(i + 1, size - 1)] = True")],
             T_TOK, "word-start table shifted by one id (up)", True),
    Mutation("tok-shift-down", TK, [("                table[i] = True", "                table[max(i - 1, 0)] = True")],
             T_TOK, "word-start table shifted by one id (down)", True),
    Mutation("tok-padding-rows", TK, [("        self._word_start[size] = table\n",
                                       "        table[self.vocab_size:] = True\n        self._word_start[size] = table\n")],
             T_TOK, "ids past the vocabulary counted as word starts"),
    Mutation("tok-no-space", TK, [('"\\u2581", " ")  #', '"\\u2581")  #')], T_TOK,
             "a plain leading space no longer starts a word"),
    Mutation("tok-no-end-of-turn", TK, [("        for t in END_OF_TURN_TOKENS:\n", "        for t in ():\n")],
             ["tests/test_rule_edges.py", "tests/test_crossvocab_edges.py", "tests/test_crossvocab.py"],
             "the end-of-turn token is never found"),
    # ---- the gate kernel's reference and Triton kernel ------------------------------------
    Mutation("gate-ref-gt", G, [("p_top >= state.threshold, entropy", "p_top > state.threshold, entropy")],
             T_GATE, "torch reference: top_prob >= becomes >", True),
    Mutation("gate-ref-lt", G, [("entropy <= state.threshold)", "entropy < state.threshold)")],
             T_GATE, "torch reference: entropy <= becomes <", True),
    Mutation("gate-ref-no-stops", G, [("    b_ok = ~in_set_ref(b, state.stop_ids)\n",
                                       "    b_ok = torch.ones_like(b, dtype=torch.bool)\n")], T_GATE,
             "torch reference: b's stop ids ignored"),
    Mutation("gate-ref-no-token-stop", G, [("torch.where(in_base, confident & b_ok, to_base), confident & b_ok)",
                                            "torch.where(in_base, confident & b_ok, to_base), confident)")],
             T_GATE, "torch reference: token level ignores b's stop ids"),
    Mutation("gate-ref-no-base-stop", G, [("torch.where(in_base, confident & b_ok, to_base)",
                                           "torch.where(in_base, confident, to_base)")], T_GATE,
             "torch reference: BASE ignores b's stop ids"),
    Mutation("gate-ref-no-nudge-stop", G, [("word_start_ref(n, state.word_start) & (confident | (b == n)) & b_ok",
                                            "word_start_ref(n, state.word_start) & (confident | (b == n))")], T_GATE,
             "torch reference: NUDGE hand-back ignores b's stop ids"),
    Mutation("gate-ref-never-stop", G, [("    stop = rows & in_set_ref(token, state.stop_ids)\n",
                                         "    stop = rows & torch.zeros_like(rows)\n")], T_GATE,
             "torch reference: an emitted stop id is written"),
    Mutation("gate-ref-past-table", G, [("    return inside & word_start[tokens.clamp",
                                         "    return word_start[tokens.clamp")], T_GATE,
             "torch reference: ids past the word table take the last flag"),
    Mutation("gate-ref-span-reset", G, [("torch.where(in_base, torch.ones_like(span), span + 1)",
                                         "torch.where(in_base, torch.zeros_like(span), span + 1)")], T_GATE,
             "torch reference: BASE -> NUDGE starts the span at 0"),
    Mutation("gate-ref-length", G, [("length = wrote & (state.n_out >= state.max_new)",
                                     "length = wrote & (state.n_out > state.max_new)")], T_GATE,
             "torch reference: one token past max_new_tokens"),
    Mutation("gate-triton-gt", G, [("MAX_SAMPLE, BLOCK)\n        " + TRITON_CONFIDENT,
                                    "MAX_SAMPLE, BLOCK)\n        " + TRITON_CONFIDENT.replace("p_top >=", "p_top >")),
                                   ("C_BLOCK)\n        " + TRITON_CONFIDENT,
                                    "C_BLOCK)\n        " + TRITON_CONFIDENT.replace("p_top >=", "p_top >"))], T_GATE,
             "Triton: top_prob >= becomes >"),
    Mutation("gate-triton-lt", G, [("MAX_SAMPLE, BLOCK)\n        " + TRITON_CONFIDENT,
                                    "MAX_SAMPLE, BLOCK)\n        " + TRITON_CONFIDENT.replace("entropy <=", "entropy <")),
                                   ("C_BLOCK)\n        " + TRITON_CONFIDENT,
                                    "C_BLOCK)\n        " + TRITON_CONFIDENT.replace("entropy <=", "entropy <"))], T_GATE,
             "Triton: entropy <= becomes <"),
    Mutation("gate-triton-no-nudge-stop", G, [("to_base = (span >= 1) & n_ws & (confident | (b == n)) & b_ok",
                                               "to_base = (span >= 1) & n_ws & (confident | (b == n))")], T_GATE,
             "Triton: NUDGE hand-back ignores b's stop ids"),
    # ---- the accept kernel's reference and Triton kernel ----------------------------------
    Mutation("accept-ref-bonus-stop", A, [("bonus = active & confident & ~in_set_ref(b, state.stop_ids)",
                                           "bonus = active & confident")], T_ACCEPT,
             "torch reference: a bonus on b's stop id"),
    Mutation("accept-ref-bonus-unconfident", A, [("bonus = active & confident & ~in_set_ref(b, state.stop_ids)",
                                                  "bonus = active & ~in_set_ref(b, state.stop_ids)")], T_ACCEPT,
             "torch reference: a bonus without confidence"),
    Mutation("accept-ref-bonus-nudge", A, [("bonus = bonus & ((state.word_level == 0) | (state.word_state == STATE_BASE))",
                                            "bonus = bonus")],
             T_ACCEPT, "torch reference: a bonus in state NUDGE"),
    Mutation("accept-ref-past-correction", A, [("active = wrote & (state.finished == FINISH_NONE) & (token == d)",
                                                "active = wrote & (state.finished == FINISH_NONE)")], T_ACCEPT,
             "torch reference: the round goes on after a correction"),
    Mutation("accept-triton-bonus-stop", A, [("bonus = confident & (in_set(b, stops, S, S_BLOCK) == 0)",
                                              "bonus = confident")], T_ACCEPT, "Triton: a bonus on b's stop id"),
    # ---- the C++ gate step -----------------------------------------------------------------
    Mutation("cpp-gate-gt", C, [("stats.p_top >= thresholds[r]", "stats.p_top > thresholds[r]")],
             T_CPP, "C++ step: top_prob >= becomes >", True),
    Mutation("cpp-gate-lt", C, [("stats.entropy <= thresholds[r]", "stats.entropy < thresholds[r]")], T_CPP,
             "C++ step: entropy <= becomes <", True),
    Mutation("cpp-no-stops", C, [("b_ok = !in_set(b, stops, n_stops);", "b_ok = true;")], T_CPP,
             "C++ step: b's stop ids ignored"),
    Mutation("cpp-no-nudge-stop", C, [("(confident || b == n) && b_ok;", "(confident || b == n);")], T_CPP,
             "C++ step: NUDGE hand-back ignores b's stop ids"),
    Mutation("cpp-never-stop", C, [("if (in_set(token, stops, n_stops)) {", "if (false) {")], T_CPP,
             "C++ step: an emitted stop id is written"),
    Mutation("cpp-span-0", C, [("sp[r] >= 1 && n_word_start", "sp[r] >= 0 && n_word_start")], T_CPP,
             "C++ step: NUDGE may hand back before the nudger wrote"),
    # ---- the lazy CPU schedule (runner/lazy.py) ------------------------------------------------
    Mutation("lazy-base-stop-ignored", LZ, [("            if confident and b_ok:\n", "            if confident:\n")],
             T_LAZY, "lazy: a confident base stop id is emitted instead of handing over"),
    Mutation("lazy-never-hand-back", LZ, [("        if r.span >= 1 and ws:", "        if False:")], T_LAZY,
             "lazy: NUDGE never asks the base at a word start"),
    Mutation("lazy-span-0", LZ, [("r.word_state, r.span = STATE_NUDGE, 1", "r.word_state, r.span = STATE_NUDGE, 0")],
             T_LAZY, "lazy: BASE -> NUDGE starts the span at 0"),
    Mutation("lazy-late-draw", LZ, [("steps = torch.tensor([r.n_out for r in rows]",
                                     "steps = torch.tensor([r.n_out + (m == NUDGER) for r in rows]")], T_LAZY,
             "lazy: the nudger's draw keyed one step late"),
    Mutation("lazy-no-catch-up", LZ, [("            start = r.cached[m]\n", "            start = len(r.ids[m]) - 1\n")],
             T_LAZY, "lazy: a lagging model skips its backlog's KV"),
]

PLUGIN = '''
"""pytest plugin (mutation_check.py): load a mutant build of the C++ extension as nudgefast._C."""
import importlib.machinery, importlib.util, os, sys
import torch  # noqa: F401  (loads libc10/libtorch, which the extension links against)
path = os.environ["NUDGEFAST_MUTANT_SO"]
loader = importlib.machinery.ExtensionFileLoader("nudgefast._C", path)
spec = importlib.util.spec_from_file_location("nudgefast._C", path, loader=loader)
module = importlib.util.module_from_spec(spec)
loader.exec_module(module)
sys.modules["nudgefast._C"] = module
'''


def apply(m: Mutation) -> str:
    """Apply m to its file; return the original text (raises when an edit does not match once)."""
    path = REPO / m.file
    original = path.read_text()
    text = original
    for old, new in m.edits:
        count = text.count(old)
        if count != 1:
            raise LookupError(f"{m.id}: {old!r} occurs {count} times in {m.file} (the code changed: update the list)")
        text = text.replace(old, new)
    path.write_text(text)
    return original


# ---- the C++ extension, built outside the installed package -------------------------------------

def _compile_flags() -> list[str]:
    import torch
    from torch.utils.cpp_extension import include_paths

    inc = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    return ["-O3", "-fopenmp", "-std=c++17", "-fPIC", "-DNDEBUG", "-DTORCH_EXTENSION_NAME=_C",
            "-DTORCH_API_INCLUDE_EXTENSION_H", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            *inc]


def _link(objects: list[Path], out: Path) -> None:
    from torch.utils.cpp_extension import library_paths

    libs = [f"-L{p}" for p in library_paths()] + [f"-Wl,-rpath,{p}" for p in library_paths()]
    cmd = ["g++", "-shared", *map(str, objects), *libs, "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python",
           "-fopenmp", "-o", str(out)]
    subprocess.run(cmd, check=True)


def build_extension(mutated: str | None, tag: str) -> Path:
    """Compile csrc/ into build/mutation/<tag>/_C.so; sources other than `mutated` are compiled once."""
    flags = _compile_flags()
    objects = []
    for src in sorted((REPO / "csrc").glob("*.cpp")):
        rel = f"csrc/{src.name}"
        if rel == mutated:
            obj = BUILD / tag / (src.stem + ".o")
        else:
            obj = BUILD / "clean" / (src.stem + ".o")
            if obj.is_file() and obj.stat().st_mtime >= max(p.stat().st_mtime for p in (REPO / "csrc").iterdir()):
                objects.append(obj)
                continue
        obj.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["g++", *flags, "-c", str(src), "-o", str(obj)], check=True, capture_output=True)
        objects.append(obj)
    out = BUILD / tag / "_C.so"
    out.parent.mkdir(parents=True, exist_ok=True)
    _link(objects, out)
    return out


def run_tests(args: list[str], timeout: float, so: Path | None) -> tuple[bool, str, float]:
    """(passed, last lines of the output, seconds)."""
    env = dict(os.environ)
    env["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(prefix="mutation-pyc-")
    env.pop("PYTEST_XDIST_WORKER", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly", *args]
    if so is not None:
        plugin_dir = BUILD / "plugin"
        plugin_dir.mkdir(parents=True, exist_ok=True)
        (plugin_dir / "mutant_ext.py").write_text(PLUGIN)
        env["PYTHONPATH"] = os.pathsep.join([str(plugin_dir), env.get("PYTHONPATH", "")])
        env["NUDGEFAST_MUTANT_SO"] = str(so)
        cmd[3:3] = ["-p", "mutant_ext"]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, "timed out", time.monotonic() - t0
    tail = [line for line in proc.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))][:1]
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    return proc.returncode == 0, (tail[0] if tail else summary), time.monotonic() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-k", dest="select", default="", help="run the mutations whose id contains this (comma-separated: any of these)")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per mutant's test run")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the check that the mutant-build machinery passes the C++ tests unmutated")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if any(k in m.id for k in args.select.split(","))]
    for m in chosen:  # every edit must match exactly once before anything runs
        text = (REPO / m.file).read_text()
        for old, _ in m.edits:
            if text.count(old) != 1:
                raise LookupError(f"{m.id}: {old!r} occurs {text.count(old)} times in {m.file} (update the list)")
    if args.list:
        for m in chosen:
            print(f"{m.id:32s} {m.file:36s} {'*' if m.issue_table else ' '} {m.what}")
        return 0
    results = []
    if any(m.file.startswith("csrc/") for m in chosen) and not args.no_baseline:
        so = build_extension(None, "baseline")
        ok, info, secs = run_tests(["tests/kernels/test_gate_edges.py", "-k", "native"], args.timeout, so)
        print(f"{'baseline (unmutated C++ build)':32s} {'PASSED' if ok else 'FAILED':8s} {secs:6.0f}s  {info}", flush=True)
        if not ok:
            print("the mutant-build machinery fails without a mutation: C++ results would mean nothing")
            return 2
    for m in chosen:
        original = apply(m)
        try:
            so = build_extension(m.file, m.id) if m.file.startswith("csrc/") else None
            ok, info, secs = run_tests(m.tests, args.timeout, so)
        except subprocess.CalledProcessError as e:
            ok, info, secs = False, f"build failed: {e}", 0.0
        finally:
            (REPO / m.file).write_text(original)
        verdict = "SURVIVED" if ok else "killed"
        results.append((m, verdict))
        print(f"{m.id:32s} {verdict:8s} {secs:6.0f}s  {info}", flush=True)
    killed = sum(v == "killed" for _, v in results)
    table = [(m, v) for m, v in results if m.issue_table]
    print(f"\nscore: {killed}/{len(results)} mutants killed"
          f" ({sum(v == 'killed' for _, v in table)}/{len(table)} of issue 18's table)")
    for m, v in results:
        if v == "SURVIVED":
            print(f"  survived: {m.id} ({m.file}): {m.what}")
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
