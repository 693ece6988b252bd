"""Generate with a HAM model from Python and look at what each layer kept in its KV cache.

python examples/generate_and_inspect.py --model models/tiny
python examples/generate_and_inspect.py --model models/tiny --kv-budget 0.1
"""

import argparse

import ham_mlx  # first: on Linux it loads OpenBLAS before MLX

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
parser.add_argument("--model", required=True, help="model folder (e.g. from `ham-mlx init`)")
parser.add_argument("--prompt", default="Shall I compare thee to a summer's day?")
parser.add_argument("--kv-budget", type=float, default=None, help="target kept fraction")
args = parser.parse_args()

model, tokenizer = ham_mlx.load(args.model)
for piece in ham_mlx.stream_generate(
    model, tokenizer, args.prompt, max_tokens=64, temperature=0.7, seed=0, kv_budget=args.kv_budget
):
    print(piece.text, end="", flush=True)
print("\n" + piece.summary())

for i, layer in enumerate(piece.kv):
    if layer["type"] == "ham":
        kept = layer["admitted"][0]
        print(
            f"layer {i}: kept {kept} of {layer['seen']} tokens "
            f"({layer['kv_bytes']} of {layer['full_kv_bytes']} bytes a full cache would use)"
        )
