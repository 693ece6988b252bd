"""Hugging Face tokenizer files (`tokenizer.json` + `tokenizer_config.json`) from a SentencePiece
BPE model, for runtimes that read only those (onnxruntime-genai, transformers, mlx-lm).

The `tokenizers` pipeline reproduces SentencePiece's: the dummy prefix `▁` and whitespace
escaping (Metaspace, split at each `▁` like `split_by_whitespace`), user-defined symbols such as
`"\\n"` kept whole, BPE with merges ranked by the merged piece's score, byte fallback
to `<0xXX>` pieces, and the reverse on decoding. `write_hf_tokenizer` checks the result against
the SentencePiece model on sample text before writing.

`tokenizer_config.json` carries `CHAT_TEMPLATE`, so that `apply_chat_template`, `mlx_lm.chat`
and the chat endpoints of servers work on every folder. It is a formatting convention, not chat
training: the models ham_mlx writes (the bundled one learned Shakespeare) never saw chats, the
template only lays messages out as plain text lines. After the tokenizer's BOS, each message is
one line, its role capitalized, and the reply is asked for with "Assistant:" (no trailing space,
since the reply's first piece carries its own):

    <s>System: You are terse.
    User: Hello
    Assistant: Hi there
    User: Bye
    Assistant:

There is no EOS inside the text (sentencepiece would read "</s>" there as five characters); a
reply ends at the EOS token, or earlier with "\nUser:" as a stop string. The text is that of the
built-in template of `ham-mlx serve`, after the BOS.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as spm_pb2

from ham_mlx.tokenizer import Tokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
CHECK_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "  Two  spaces,\ttabs, naïve café, 東京, emoji 🙂 and \\u00e9 é done.\n"
)


def _load_proto(path: str | os.PathLike[str]) -> spm_pb2.ModelProto:
    proto = spm_pb2.ModelProto()
    proto.ParseFromString(Path(path).read_bytes())
    return proto


def _merges(vocab: dict[str, int], pieces: list[tuple[str, float]]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece BPE vocabulary: every split of a piece into two
    pieces, ranked by the merged piece's score (higher first), then by the halves' ids."""
    score = dict(pieces)
    merges = []
    for piece in vocab:
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                merges.append((left, right, -score[piece], vocab[left], vocab[right]))
    merges.sort(key=lambda m: (m[2], m[3], m[4]))
    return [(m[0], m[1]) for m in merges]


def build_hf_tokenizer(tokenizer_model_path: str | os.PathLike[str]):
    """A `tokenizers.Tokenizer` equivalent to a SentencePiece BPE model."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    proto = _load_proto(tokenizer_model_path)
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != spm_pb2.TrainerSpec.BPE:
        raise ValueError(f"{tokenizer_model_path}: only SentencePiece BPE models are supported")
    if norm.name not in ("identity", "") or norm.precompiled_charsmap:
        raise ValueError(
            f"{tokenizer_model_path}: normalization {norm.name!r} is not supported (train with "
            "normalization_rule_name='identity', as ham_mlx.tokenizer does)"
        )
    pieces = [(p.piece, p.score) for p in proto.pieces]
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    bpe_pieces = [(p.piece, p.score) for p in proto.pieces if p.type in (NORMAL, USER_DEFINED)]
    mergeable = {p: vocab[p] for p, _ in bpe_pieces if p}
    unk = trainer.unk_piece if trainer.unk_id >= 0 else None
    tok = HFTokenizer(
        models.BPE(
            vocab=vocab,
            merges=_merges(mergeable, pieces),
            unk_token=unk,
            byte_fallback=trainer.byte_fallback,
            fuse_unk=True,
        )
    )
    steps = (
        [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
        if norm.remove_extra_whitespaces
        else []
    )
    if norm.add_dummy_prefix:  # once, before everything (also before a leading space or "\n")
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    # No pre-tokenizer: no piece holds "▁" after its first character or a user-defined symbol
    # beside other characters, so merges never cross those boundaries and BPE over the whole
    # text equals SentencePiece's segment-wise BPE (onnxruntime-extensions reads it this way too).
    steps = [decoders.Replace("▁", " ")]
    if trainer.byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if norm.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    special = [p.piece for p in proto.pieces if p.type in (CONTROL, UNKNOWN)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
    # a single-character user-defined symbol (like "\n") is a vocabulary character that no merge
    # touches; longer ones must be matched whole
    user = [p.piece for p in proto.pieces if p.type == USER_DEFINED and len(p.piece) > 1]
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in user])
    if trainer.bos_id >= 0:
        bos = trainer.bos_piece
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, trainer.bos_id)]
        )
    return tok


def tokenizer_config(tokenizer_model_path: str | os.PathLike[str]) -> dict:
    """The `tokenizer_config.json` fields for a SentencePiece model (with `CHAT_TEMPLATE`)."""
    t = _load_proto(tokenizer_model_path).trainer_spec
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": t.bos_id >= 0,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
        "chat_template": CHAT_TEMPLATE,
    }
    for key, piece, i in (
        ("bos_token", t.bos_piece, t.bos_id),
        ("eos_token", t.eos_piece, t.eos_id),
        ("unk_token", t.unk_piece, t.unk_id),
        ("pad_token", t.pad_piece, t.pad_id),
    ):
        if i >= 0:
            config[key] = piece
    return config


def check_round_trip(tokenizer_model_path: str | os.PathLike[str], hf_tokenizer, text: str) -> None:
    """Raise if the HF tokenizer disagrees with the SentencePiece model on `text`."""
    sp = Tokenizer.from_file(tokenizer_model_path)
    ids = sp.encode(text)
    hf_ids = hf_tokenizer.encode(text).ids
    if hf_ids != ids:
        at = next(
            (i for i, (a, b) in enumerate(zip(ids, hf_ids)) if a != b), min(len(ids), len(hf_ids))
        )
        raise ValueError(
            f"{tokenizer_model_path}: the HF tokenizer encodes differently from token {at} "
            f"(sentencepiece {ids[at : at + 5]}, tokenizers {hf_ids[at : at + 5]})"
        )
    if hf_tokenizer.decode(ids, skip_special_tokens=True) != sp.decode(ids):
        raise ValueError(f"{tokenizer_model_path}: the HF tokenizer decodes differently")


def write_hf_tokenizer(
    tokenizer_model_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    check_text: str = CHECK_TEXT,
) -> list[Path]:
    """Write `tokenizer.json` and `tokenizer_config.json` for a SentencePiece BPE model into
    out_dir (checked against the model on `check_text` first). Returns the paths written."""
    tok = build_hf_tokenizer(tokenizer_model_path)
    check_round_trip(tokenizer_model_path, tok, check_text)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "tokenizer.json", out / "tokenizer_config.json"]
    tok.save(str(paths[0]))
    config = tokenizer_config(tokenizer_model_path)
    paths[1].write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return paths
