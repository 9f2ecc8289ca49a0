"""MediRound token ids, reproduced with sentencepiece directly.

The training data was tokenized by transformers 4.36's slow (legacy) Llama
tokenizer: text is split on the special strings, every remaining piece is
encoded by sentencepiece on its own (so each gets its own leading "▁"), and BOS
comes only at the start. Current transformers tokenizers split spaces around
added tokens differently, so they are not used.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Sequence

from ..errors import ModelLoadError

SEG = "[SEG]"
BBOX = "[BBOXINPUT]"
CROP = "[CROPPEDIMAGE]"
ADDED_TOKENS = (SEG, BBOX, CROP)  # added in this order after the base vocabulary
IMAGE = "<image>"
IMAGE_TOKEN_ID = -200  # LLaVA's placeholder, expanded to the CLIP patch features


class MediRoundTokenizer:
    def __init__(self, model_file):
        import sentencepiece as spm

        model_file = Path(model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as exc:
            raise ModelLoadError(f"Cannot read the sentencepiece model {model_file}: {exc}") from exc
        n = self.sp.get_piece_size()
        self.base_vocab_size = n
        self.seg_id, self.bbox_id, self.crop_id = n, n + 1, n + 2
        self.vocab_size = n + len(ADDED_TOKENS)
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.unk_id = self.sp.unk_id()
        self.special: Dict[str, int] = {SEG: self.seg_id, BBOX: self.bbox_id, CROP: self.crop_id}
        for text, idx in (("<s>", self.bos_id), ("</s>", self.eos_id), ("<unk>", self.unk_id)):
            if idx >= 0:
                self.special[text] = idx
        self._special_by_id = {v: k for k, v in self.special.items()}
        self._split = re.compile("(" + "|".join(re.escape(s) for s in self.special) + ")")

    def encode(self, text: str, *, add_bos: bool = True) -> List[int]:
        """Token ids with IMAGE_TOKEN_ID where ``<image>`` stands."""
        ids: List[int] = [self.bos_id] if add_bos else []
        for i, chunk in enumerate(text.split(IMAGE)):
            if i:
                ids.append(IMAGE_TOKEN_ID)
            for piece in self._split.split(chunk):
                if not piece:
                    continue
                if piece in self.special:
                    ids.append(self.special[piece])
                else:
                    ids.extend(self.sp.encode(piece))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        out, run = [], []
        for idx in ids:
            idx = int(idx)
            if idx in self._special_by_id or idx == IMAGE_TOKEN_ID:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                out.append(IMAGE if idx == IMAGE_TOKEN_ID else self._special_by_id[idx])
            else:
                run.append(idx)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def piece(self, idx: int) -> str:
        idx = int(idx)
        if idx == IMAGE_TOKEN_ID:
            return IMAGE
        return self._special_by_id.get(idx) or self.sp.id_to_piece(idx)
