"""A tiny model with an SAE whose features are planted by hand, and a feature database written for it.

The SAE reads resid_pre.0 (the token embedding itself), so a feature whose encoder row is one token's
embedding, with a bias that cuts off every other token, fires on that token and nowhere else:
- FOX fires 1.0 exactly on " fox" (database max_act 1.0: relative 1.0), density 1e-3;
- DOG fires 1.0 on " dog" (database max_act 2.0: relative 0.5), density 2e-3;
- DENSE fires 5.0 on every token (database max_act 10.0: relative 0.5) and has density 1.0;
- every other feature never fires (bias -100).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from monoscope.features.build import _neighbours
from monoscope.features.db import FeatureDB
from monoscope.sae import SAEConfig, build_sae
from monoscope.sae.io import save_sae, weights_sha256
from tests.conftest import TRAIN_TEXT, make_llama

F = 12
FOX, DOG, DENSE = 3, 5, 0
LABELS = {
    1: ("'import' | ' from' → ' numpy'", "python import statements at the top of a module"),
    2: ("' le' | ' la'", "French articles before a noun"),
    6: ("' def'", "function definitions in Python code"),
    FOX: ("' fox'", "the animal fox"),
    DOG: ("' dog'", None),
}


EXTRA_TEXT = [
    "the lazy dog and the cat", "a dog runs after a cat", "the fox and the dog", "hot days of summer",
    "python import statements", "my dog barks at one cat", "the cat sleeps",
] * 20


def make_search_tokenizer():  # type: ignore[no-untyped-def]
    """Like tests.conftest.make_tokenizer with a vocabulary large enough for whole words (' fox', ' dog')."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<bos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TRAIN_TEXT + EXTRA_TEXT, trainer)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<|endoftext|>",
                                   unk_token="<unk>")


@dataclass
class Planted:
    root: Path
    model: Path
    sae: Path
    db: Path
    fox_id: int
    dog_id: int
    W_dec: torch.Tensor


def _token(tokenizer, text: str) -> int:  # type: ignore[no-untyped-def]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (text, ids)
    return int(ids[0])


def _planted_sae(E: torch.Tensor, fox: int, dog: int, seed: int = 0):  # type: ignore[no-untyped-def]
    cfg = SAEConfig(arch="relu-l1", d_in=E.shape[1], d_sae=F, hook="resid_pre.0", compute_dtype="float32")
    sae = build_sae(cfg, seed=seed)
    with torch.no_grad():
        sae.W_enc.normal_(generator=torch.Generator().manual_seed(seed))
        sae.b_enc.fill_(-100.0)
        sae.W_enc[DENSE] = 0.0
        sae.b_enc[DENSE] = 5.0
        for fid, tok in ((FOX, fox), (DOG, dog)):
            e = E[tok]
            s = 1.0 / (0.2 * e.norm())  # act = s·(e·e_tok/|e_tok| − 0.8|e_tok|) = 1 on the token itself
            sae.W_enc[fid] = e / e.norm() * s
            sae.b_enc[fid] = -0.8 * e.norm() * s
    return sae


def write_db(path: Path, sae_dir: Path, sae, model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    path.parent.mkdir(parents=True, exist_ok=True)
    db = FeatureDB.create(path, {
        "sae": {"path": str(sae_dir), "weights_sha256": weights_sha256(sae_dir), "arch": "relu-l1", "d_sae": F},
        "model": str(model_dir), "hook": "resid_pre.0", "ctx_len": 64,
        "row_policy": {"exclude_bos": True, "outlier_factor": 0.0, "median_norm": 0.0}})
    ni, nc = _neighbours(sae, top=4)
    rows = []
    for f in range(F):
        density, max_act = {DENSE: (1.0, 10.0), FOX: (1e-3, 1.0), DOG: (2e-3, 2.0)}.get(f, (0.0, 0.0))
        label = LABELS.get(f, ("", None))[0]
        rows.append({"id": f, "density": density, "max_act": max_act, "label": label,
                     "neighbours": [[int(i), float(c)] for i, c in zip(ni[f], nc[f], strict=True)]})
    with db.transaction():
        db.put_features(rows)
        db.index_labels([(f, lab) for f, (lab, _) in LABELS.items()])
        for f, (_, expl) in LABELS.items():
            if expl:
                db.conn.execute("INSERT INTO explanations VALUES (?, 'test', '1', 'x', ?, 'test')", (f, expl))
        db.index_labels([(f, e) for f, (_, e) in LABELS.items() if e])
    db.close()


@pytest.fixture(scope="session")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Planted:
    tokenizer = make_search_tokenizer()
    root = tmp_path_factory.mktemp("search")
    model_dir = root / "model"
    model = make_llama(len(tokenizer), layers=2, seed=3)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    E = model.get_input_embeddings().weight.detach().float()
    fox, dog = _token(tokenizer, " fox"), _token(tokenizer, " dog")
    sae = _planted_sae(E, fox, dog)
    acts = sae.encode(E)  # every token of the vocabulary
    assert torch.equal((acts[:, FOX] > 0).nonzero().flatten(), torch.tensor([fox]))  # the plant holds
    assert torch.equal((acts[:, DOG] > 0).nonzero().flatten(), torch.tensor([dog]))
    sae_dir = root / "sae"
    save_sae(sae, sae_dir)
    db = root / "features" / "features.db"
    write_db(db, sae_dir, sae, model_dir)
    return Planted(root, model_dir, sae_dir, db, fox, dog, sae.W_dec.detach().clone())
