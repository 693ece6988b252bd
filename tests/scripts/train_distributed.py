"""Run by tests/test_train.py under `mlx.launch -n 2`: train a tiny MQAR model data-parallel and
save this rank's final weights to OUT/rank{r}.safetensors."""

import sys

import ham_mlx  # noqa: F401

# isort: split
import mlx.core as mx
from mlx.utils import tree_flatten

from ham_mlx.train import TrainConfig, Trainer

CONFIG = dict(
    model={"preset": "tiny", "ham_threshold": 0.5}, steps=6, batch_size=8, lr=3e-3, warmup=2,
    kv_target=0.3, eval_every=100, checkpoint_every=100, progress=False, compile=True,
    data={"kind": "mqar", "seq_len": 32, "mqar_vocab": 40, "mqar_pairs": 6},
)  # fmt: skip


def run(out: str) -> None:
    trainer = Trainer(TrainConfig.from_dict({**CONFIG, "out_dir": f"{out}/run"}))
    for _ in range(CONFIG["steps"]):
        trainer.train_step()
    weights = dict(tree_flatten(trainer.model.parameters()))
    mx.save_safetensors(f"{out}/rank{trainer.rank}.safetensors", weights)


if __name__ == "__main__":
    run(sys.argv[1])
