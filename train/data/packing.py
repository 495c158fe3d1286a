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


def pack_whole(lengths_E: np.ndarray, seq_len: int, overlong: str
               ) -> tuple[np.ndarray, np.ndarray]:
    """(kept example indices, where each sequence's examples begin in them (S + 1,)):
    examples in order, each placed whole in the current sequence or, when it does not
    fit, a new one. An example longer than seq_len is cut to it (`truncate`) or left
    out (`drop`)."""
    kept = np.flatnonzero(lengths_E <= seq_len) if overlong == "drop" else \
        np.arange(len(lengths_E))
    starts, used = [0], 0
    for i, n in enumerate(np.minimum(lengths_E[kept], seq_len)):
        if used + n > seq_len:
            starts.append(i)
            used = 0
        used += n
    if len(kept):
        starts.append(len(kept))
    return kept, np.asarray(starts, np.int64)


class PackedExamples:
    """Chat examples (a prepared directory of kind chat: tokens, a 0/1 loss weight per
    token, offsets per example) packed whole into sequences of seq_len (pack_whole),
    the rest of each sequence padded with weight 0. [k] -> inputs, targets, weights (the
    target's loss weight: 1 on the assistant's tokens), segment_ids (1, 2, ... per
    example, 0 for padding) and positions (from 0 in each example): examples never
    attend to each other, and an example's last token, having no target in it, is not
    trained on. Picklable: worker processes open the memory maps themselves.

    With `pairs` (preference data: examples 2i and 2i+1 are a pair's chosen and rejected
    answers) a pair is packed whole as one unit, so a sequence's segments 2j+1 and 2j+2
    are pair j's chosen and rejected (train/dpo.py reads them so). A pair longer than
    seq_len is left out (`drop`) or has each answer cut to seq_len // 2 (`truncate`)."""

    def __init__(self, path: str, split: str, seq_len: int, overlong: str = "truncate",
                 pairs: bool = False):
        self.path, self.split, self.seq_len = path, split, seq_len
        self.offsets_E1 = np.load(f"{path}/{split}.offsets.npy")
        lengths_E = np.diff(self.offsets_E1)
        g = 2 if pairs else 1
        lengths_U = lengths_E.reshape(-1, g).sum(1)  # units: examples, or pairs
        cut_U = lengths_U > seq_len
        self.used_E = np.minimum(lengths_E, seq_len // g)  # each answer of a cut pair
        self.used_E = np.where(np.repeat(cut_U, g), self.used_E, lengths_E)
        kept_U, starts = pack_whole(
            np.where(cut_U & (overlong == "truncate"), self.used_E.reshape(-1, g).sum(1),
                     lengths_U), seq_len, overlong)
        self.kept_K = (kept_U[:, None] * g + np.arange(g)).reshape(-1)
        self.starts_S1 = starts * g
        self.overlong = int(np.sum(cut_U))
        self.used_tokens = int(self.used_E[self.kept_K].sum())
        self._data = None
        # cut examples whose trained tokens all lie past the cut: nothing left to learn
        cut = [e for e in self.kept_K if self.used_E[e] < lengths_E[e]]
        a_E = self.offsets_E1
        self.lost = sum(not self.data[1][a_E[e] + 1:a_E[e] + self.used_E[e]].any()
                        for e in cut)

    def __len__(self) -> int:
        return len(self.starts_S1) - 1

    def __getstate__(self):
        return {**self.__dict__, "_data": None}

    @property
    def data(self) -> tuple[np.ndarray, np.ndarray]:
        if self._data is None:
            split = open_split(self.path, self.split)
            weights = np.memmap(f"{self.path}/{self.split}.weights", dtype=np.uint8, mode="r") \
                if split.tokens_N.size else np.zeros((0,), np.uint8)
            self._data = split.tokens_N, weights
        return self._data

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        T = self.seq_len
        tokens_N, weights_N = self.data
        out = {"inputs": np.zeros(T, np.int32), "targets": np.zeros(T, np.int32),
               "weights": np.zeros(T, np.float32), "segment_ids": np.zeros(T, np.int32),
               "positions": np.zeros(T, np.int32)}
        p = 0
        for segment, e in enumerate(self.kept_K[self.starts_S1[k]:self.starts_S1[k + 1]], 1):
            a, n = int(self.offsets_E1[e]), int(self.used_E[e])
            out["inputs"][p:p + n] = tokens_N[a:a + n]
            out["targets"][p:p + n - 1] = tokens_N[a + 1:a + n]
            out["weights"][p:p + n - 1] = weights_N[a + 1:a + n]
            out["segment_ids"][p:p + n] = segment
            out["positions"][p:p + n] = np.arange(n)
            p += n
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
