"""lm-evaluation-harness against `ham-mlx serve`: its `local-completions` model scores a tiny
multiple-choice task (loglikelihood: echo + logprobs) and a tiny generation task, written into
tmp_path, with the server's own tokenizer (/tokenize, /tokenizer_info: lm-eval's "remote"
backend, detected by itself). The per-choice log-likelihoods must equal the model's, computed here.

Slow (about 35 s, most of it lm-eval's start); needs `pip install "lm-eval[api]"`, no network.
"""

import ham_mlx  # noqa: F401  (first: it loads OpenBLAS before mlx.core)

# isort: split
import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from test_serve import MODEL_ID, Server, continuation, reference_ids

from ham_mlx.model_io import load

pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm-eval[api]

MC = [  # (context, choices): the first choice is the answer
    ("To be, or not to be, that is the", [" question", " banana", " seven", " window"]),
    ("O Romeo, Romeo, wherefore art thou", [" Romeo?", " seventeen", " cucumber", " laptop"]),
    ("Now is the winter of our", [" discontent", " spreadsheet", " algorithm", " database"]),
    ("Friends, Romans, countrymen, lend me your", [" ears", " car", " password", " tractor"]),
]
GEN = ["To be, or not to be, that is", "Now is the winter of our discontent"]

MC_TASK = """\
task: ham_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
doc_to_choice: "{{{{choices}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""
GEN_TASK = """\
task: ham_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 16
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.mark.slow
def test_lm_eval_local_completions_scores_a_task(tmp_path):
    local = load(None)
    model, tok = local
    # the generation task's targets: greedy continuations of the prompts (no BOS: lm-eval's
    # remote tokenizer encodes without special tokens), cut at the task's stop string
    gen = []
    for q in GEN:
        ids = tok.encode(q, add_bos=False)
        gen.append({"question": q, "answer": continuation(
            local, ids, reference_ids(local, ids, 16)).split("\n\n")[0]})  # fmt: skip
    (tmp_path / "mc.jsonl").write_text("".join(
        json.dumps({"question": q, "choices": c, "answer": 0}) + "\n" for q, c in MC
    ))  # fmt: skip
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps(g) + "\n" for g in gen))
    (tmp_path / "mc.yaml").write_text(MC_TASK.format(data=tmp_path / "mc.jsonl"))
    (tmp_path / "gen.yaml").write_text(GEN_TASK.format(data=tmp_path / "gen.jsonl"))

    server = Server(tmp_path / "server.log")
    try:
        env = os.environ | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                            "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
        args = f"base_url={server.url}/v1/completions,model={MODEL_ID},num_concurrent=4"
        run = subprocess.run(
            [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", args,
             "--tasks", "ham_tiny_mc,ham_tiny_gen", "--include_path", str(tmp_path),
             "--output_path", str(tmp_path / "out"), "--log_samples"],
            capture_output=True, text=True, env=env, timeout=600,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "Using remote tokenizer backend" in run.stderr + run.stdout
    finally:
        assert server.stop() == 0
    log = server.log.read_text()
    assert "cached)" in log  # the choices after one context reused it

    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert results["results"]["ham_tiny_mc"]["acc,none"] == 1.0
    assert results["results"]["ham_tiny_gen"]["exact_match,none"] == 1.0
    samples = [json.loads(x) for f in (tmp_path / "out").rglob("samples_ham_tiny_mc_*.jsonl")
               for x in f.read_text().splitlines()]  # fmt: skip
    assert len(samples) == len(MC)
    for s in samples:
        context, choices = MC[s["doc_id"]]
        for choice, resp in zip(choices, s["resps"]):
            ctx = tok.encode(context, add_bos=False)
            ids = tok.encode(context + choice, add_bos=False)
            logits = model(mx.array([ids]), model.make_cache())[0].astype(mx.float32)
            lp = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
            direct = lp[np.arange(len(ctx) - 1, len(ids) - 1), ids[len(ctx) :]].sum()
            np.testing.assert_allclose(float(resp[0][0]), direct, atol=0.1)
