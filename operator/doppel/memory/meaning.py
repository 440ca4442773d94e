"""Is a question about what the person talks about? Relatedness by meaning, the second abstention measure.

The support (`doppel.memory.support`) looks at words: a question of another engineering team ("the staging
cluster: ship friday?") is made of words every engineer uses, so it has support. Relatedness looks at
meaning: the question's embedding against the embeddings of the person's messages (each with the message
it answered), the mean cosine similarity of the `TOP_K` closest.

The embedding model is WordLlama (`l2_supercat`, 256 dimensions): static token embeddings averaged, whose
weights and tokenizer ship inside the `wordllama` wheel. No torch, no download, about 30,000 messages a
second on one core, so the slim bot image can embed a question per reply.

A cosine of 0.35 means different things for different people (a person of one subject has closer
neighbours than one of many), so the threshold is the person's own: when the index is built, the questions
the person really answered (up to `CALIBRATION_QUESTIONS` of them) are scored against their other messages,
leaving out the same thread and anything within `CALIBRATION_GAP_S` of it (a new question has no answer
in the index yet). A question less related to what they write about than a share `min_relatedness` of the
questions colleagues really asked them is one their messages do not cover. With fewer than
`MIN_CALIBRATION` such questions there is no threshold, and only the support decides.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

TOP_K = 3
CALIBRATION_QUESTIONS = 400
CALIBRATION_GAP_S = 6 * 3600
MIN_CALIBRATION = 10
# The share of the person's real questions that would be abstained on. Measured on the real exports
# (docs/memory.md): at 0.1, 0-14% of the questions colleagues asked after the training cut, 47-77% of the
# demo workspace's and 60-100% of the other real export's.
DEFAULT_MIN_RELATEDNESS = 0.1
MODEL = "wordllama l2_supercat 256"
_BATCH = 4096


@lru_cache(maxsize=1)
def model() -> Any:
    """WordLlama from the files inside its wheel. Its own lookup searches `wordllama/tokenizer/`, but the
    wheel puts the tokenizer in `wordllama/tokenizers/`, the layout of its cache directory: pointing the
    cache at the package finds both files, and `disable_download` keeps it off the network."""
    import wordllama

    return wordllama.WordLlama.load(cache_dir=Path(wordllama.__file__).parent, disable_download=True)


def embed(texts: Sequence[str]) -> np.ndarray:
    """Unit-length embeddings of `texts`, float32, one row each."""
    if not texts:
        return np.zeros((0, 256), dtype=np.float32)
    rows = [model().embed(list(texts[i : i + _BATCH]), norm=True) for i in range(0, len(texts), _BATCH)]
    return np.ascontiguousarray(np.vstack(rows), dtype=np.float32)


def relatedness(question: np.ndarray, messages: np.ndarray, mask: np.ndarray | None = None) -> float | None:
    """The mean cosine of `question` to its `TOP_K` closest `messages` (only where `mask`); None when
    there are none."""
    scores = messages @ question
    if mask is not None:
        scores = scores[mask]
    if scores.size == 0:
        return None
    top = min(TOP_K, scores.size)
    return float(np.partition(scores, scores.size - top)[-top:].mean())


def calibrate(
    questions: Sequence[int], matrix: np.ndarray, asked: np.ndarray, threads: np.ndarray, ts: np.ndarray
) -> np.ndarray:
    """The relatedness of each question the person answered (entry indices `questions`, whose asked
    message is embedded in `asked`, in that order) to their messages outside its conversation, sorted."""
    scores = []
    for row, entry in enumerate(questions):
        mask = (threads != threads[entry]) & (np.abs(ts - ts[entry]) >= CALIBRATION_GAP_S)
        score = relatedness(asked[row], matrix, mask)
        if score is not None:
            scores.append(score)
    return np.sort(np.asarray(scores, dtype=np.float32))


def sample(candidates: Sequence[int], count: int = CALIBRATION_QUESTIONS) -> list[int]:
    """At most `count` of `candidates`, evenly spaced (deterministic: the same index every build)."""
    if len(candidates) <= count:
        return list(candidates)
    return [candidates[i * len(candidates) // count] for i in range(count)]


def threshold(calibration: np.ndarray | None, share: float) -> float | None:
    """The relatedness under which a question is abstained on; None without enough calibration."""
    if calibration is None or len(calibration) < MIN_CALIBRATION or share <= 0:
        return None
    return float(np.quantile(calibration, min(share, 1.0)))
