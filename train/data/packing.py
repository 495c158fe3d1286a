"""Sequence packing over a prepared split, as random access.

The split's documents (each ending in EOS) lie back to back; sequence k is the window
of T + 1 tokens starting at token k*T: inputs are its first T tokens, targets the last
T. Consecutive windows share one token, so over an epoch every token is an input
exactly once (the split's final EOS only a target) and nothing is duplicated; the last
window is padded (weight 0). With `mask_documents`, each token also carries its
document's segment id (1, 2, ... within the window; 0 for padding) and its position
within that document, so attention never crosses a document boundary, and a target
from another document than its input (the token after an EOS) gets weight 0.
"""

from __future__ import annotations

import numpy as np

from train.data.prepared import Split, open_split, read_meta


class PackedSequences:
    """len() sequences of seq_len; [k] -> dict of (T,) arrays: inputs, targets (int32),
    weights (float32) and, with mask_documents, segment_ids and positions (int32).
    Picklable: worker processes open the memory map themselves."""

    def __init__(self, path: str, split: str, seq_len: int, mask_documents: bool):
        self.path, self.split, self.seq_len, self.mask = path, split, seq_len, mask_documents
        self.num_tokens = read_meta(path)["splits"][split]["tokens"]
        self._data: Split | None = None

    def __len__(self) -> int:
        return max(0, -(-(self.num_tokens - 1) // self.seq_len))  # ceil((N - 1) / T)

    def __getstate__(self):
        return {**self.__dict__, "_data": None}

    @property
    def data(self) -> Split:
        if self._data is None:
            self._data = open_split(self.path, self.split)
        return self._data

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        T, start = self.seq_len, int(k) * self.seq_len
        window = self.data.tokens_N[start:start + T + 1]
        tokens_T1 = np.zeros(T + 1, np.int32)
        tokens_T1[:len(window)] = window
        valid_T1 = np.arange(T + 1) < len(window)
        out = {"inputs": tokens_T1[:-1], "targets": tokens_T1[1:],
               "weights": valid_T1[1:].astype(np.float32)}
        if self.mask:
            pos_T1 = start + np.arange(T + 1)
            offsets = self.data.offsets_D1
            doc_T1 = np.searchsorted(offsets, pos_T1, side="right") - 1
            seg_T1 = np.where(valid_T1, doc_T1 - doc_T1[0] + 1, 0)
            out["weights"] *= seg_T1[:-1] == seg_T1[1:]
            out["segment_ids"] = seg_T1[:-1].astype(np.int32)
            doc_start_T = np.maximum(offsets[np.minimum(doc_T1[:-1], len(offsets) - 1)], start)
            out["positions"] = (pos_T1[:-1] - doc_start_T).astype(np.int32)
        return out


class HostRows:
    """step -> this process's rows of global batch `step`: sequences[step * B + r] for r
    in `rows`, stacked into (b, T) arrays. `sequences` is any random-access dataset
    (shuffled and repeated by the caller)."""

    def __init__(self, sequences, global_batch: int, rows: range):
        self.sequences, self.global_batch, self.rows = sequences, global_batch, rows

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        items = [self.sequences[int(step) * self.global_batch + r] for r in self.rows]
        return {key: np.stack([item[key] for item in items]) for key in items[0]}
