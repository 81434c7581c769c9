"""`nudgefast bench`: decode benchmarks of nudgefast against the transformers anchors.

    nudgefast bench --packaged smollm2-135m-instruct --mode base_only,nudging --granularity token,word \
        --anchors --prompt-len 128 --new-tokens 128 --repeats 5 --out benchmarks/results/cpu-x.json
    nudgefast bench --suite gpu-olmo2 --out benchmarks/results/h100-olmo2.json --plot h100-olmo2.png

A *case* is one configuration (mode, granularity, speculate K, batch, prompt and output lengths,
dtype). Each case runs nudgefast on the dense weights, with --weights gguf also on the GGUF blocks
(engine "nudgefast-gguf", so every GGUF figure has the dense one from the same run beside it), and,
at batch 1 with --anchors, the transformers anchors of benchmarks/anchors/ on the dense weights and
the same prompts. Runs are interleaved (ours, anchor, ours, anchor, ...) so a busy machine slows
every engine alike; figures are medians over the repeats.

"Same tokens": every run (each engine's warm-up and every timed repeat) is checked, row by row,
against nudgefast's dense warm-up (tokens, provenance, finish reason). A row that differs in any run
is marked, gets no speed-up, and the command exits 1 unless --allow-mismatch
(--test-force-mismatch ENGINE corrupts that engine's last repeat: the hook the tests use).

Models: real directories (--base/--nudger, or --packaged NAME for one packaged model as both base
and nudger), or a shape preset with random weights built on the device (--preset, e.g.
olmo2-7b+1b): nothing is written to disk. The random weights are "planted": Gaussian layers whose
residual contribution is small, and an output head that maps each token to a fixed next token with
a per-token margin, so greedy outputs are stable across implementations in bf16 (the anchor check
can pass) and the base model is confident on a chosen fraction of tokens (the gate mixes sources).
The memory traffic per step, which is what decode speed depends on, is that of the real shapes.

Per case and engine: the weights it read, tokens/s (aggregate and per sequence), ms/token
p50/p90/p99, time to first token, host synchronizations per token, nudged fraction, speculative
acceptance, the bytes that engine reads per emitted token (its own weight format, the forwards it
runs per token: counted for the anchors, its KV cache) and, against the measured read bandwidth at
the thread count used, its bound and the fraction of it reached. Against each anchor: one speed-up
per nudgefast engine, with every way the two rows differ stated (weights, speculation, one model in
both roles), or none when the tokens differ. The JSON records Python / torch / transformers / triton
versions, the CPU (model, family/model/stepping, flags), the instruction set of each native kernel,
the GGUF quantization types, the commit and whether the tree was clean, and models by name and
content hash (no absolute paths).

Files: presets.py (shape presets, planted weights, engines), runners.py (prompts, step clock,
nudgefast and anchor runners), cases.py (one case end to end, bytes per step), report.py (git,
device, software, table, plot), cli.py (suites, options, the checks before loading, the JSON
result and the exit status).
"""
from .cases import (Case, bytes_per_token, case_runners, compare_rows, hf_weight_bytes, measure_read_bandwidth, run_case,
                    weight_bytes)
from .cli import DTYPES, EXIT_TOKENS_DIFFER, SCHEMA, SUITES, bench_command, build_models, main, parse_args
from .presets import (PRESETS, SHAPES, Models, SyntheticTokenizer, describe_weights, dir_models, engine_from_models,
                      model_identity, planted_next_map, planted_weights, preset_models)
from .report import cpu_info, device_info, environment_info, format_table, git_info, native_kernel_isa, write_plot
from .runners import AnchorRunner, NudgefastRunner, RunRecord, TokenCheck, compare_outputs, load_anchors, make_prompts

__all__ = ["AnchorRunner", "Case", "DTYPES", "EXIT_TOKENS_DIFFER", "Models", "NudgefastRunner", "PRESETS", "RunRecord",
           "SCHEMA", "SHAPES", "SUITES", "SyntheticTokenizer", "TokenCheck", "bench_command", "build_models",
           "bytes_per_token", "case_runners", "compare_outputs", "compare_rows", "cpu_info", "describe_weights",
           "device_info", "dir_models", "engine_from_models", "environment_info", "format_table", "git_info",
           "hf_weight_bytes", "load_anchors", "main", "make_prompts", "measure_read_bandwidth", "model_identity",
           "native_kernel_isa", "parse_args", "planted_next_map", "planted_weights", "preset_models", "run_case",
           "weight_bytes", "write_plot"]
