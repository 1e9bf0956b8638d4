"""The demo model's tokenizer: every world word is one piece."""
from __future__ import annotations

import json
import string
from pathlib import Path

from .. import world as W


def make_world_tokenizer(out_dir: str | Path) -> Path:
    """A T5-style Unigram tokenizer whose pieces are the world's words (one piece each) plus single
    characters as a fallback, so any English prompt still tokenizes. Built from a fixed list, no
    training: the same folder every time. Loads with `load_tokenizer` / AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]  # T5's ids 0, 1, 2
    words = W.vocabulary()
    pieces = [(s, 0.0) for s in specials]
    # Whole words score far above any split into characters, so Viterbi always keeps them whole.
    pieces += [(w if w in string.punctuation else "\u2581" + w, -2.0) for w in words]
    seen = {p for p, _ in pieces}
    fallback = ["\u2581"] + list(string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation)
    pieces += [(c, -10.0) for c in fallback if c not in seen]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512, padding_side="right")
    out_dir = Path(out_dir)
    fast.save_pretrained(str(out_dir))
    cfg_path = out_dir / "tokenizer_config.json"  # resolvable by transformers 4.x and 5.x alike
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return out_dir
