"""The evaluation data of the Bayesian attention study (:mod:`nvformer_studies.uncertainty.study`).

* In domain: ``books`` test reviews; near out of distribution: the test reviews of the six other
  review domains (:data:`~nvformer_studies.common.data.REVIEW_DOMAINS`), ``n`` per domain drawn
  with seed 0 (labelled: accuracy and calibration are measured there too).
* Far out of distribution (:data:`FAR_OOD`, no labels, detection only): text that is not a
  review: paragraphs of WikiText-2 ``test`` and the English side of the ``test`` split of the
  koran, law, medical and it translation domains (``it`` mojibake repaired by the reader), each a
  seeded subset of ``n`` texts (:func:`far_ood_sets`).
* The books validation reviews (temperature scaling, the NV choice, the tau sweep) and the books
  training reviews of the NV empirical prior.
"""

from __future__ import annotations

from nvformer.tasks import TextBatches, classification_batches

from ..common.checkpoints import load_minilm
from ..common.data import REVIEW_DOMAINS, read_parallel, read_wikitext
from ..common.subsets import seeded_subset
from ..sentiment.data import domain_splits

__all__ = ["FAR_OOD", "SOURCE", "TARGETS", "evaluation_data", "far_ood_pool", "far_ood_sets", "validation_data"]

SOURCE = "books"
TARGETS = [d for d in REVIEW_DOMAINS if d != SOURCE]  # near OOD
FAR_OOD = ("wikitext", "koran", "law", "medical", "it")


def far_ood_pool(name: str, data_dir=None) -> list[str]:
    """The distinct non-empty texts (stripped, in order of first appearance) of a far-OOD source:
    ``"wikitext"`` (WikiText-2 test paragraphs) or a translation domain (its English test side)."""
    if name not in FAR_OOD:
        raise ValueError(f"far_ood_pool: unknown source {name!r}; sources are {FAR_OOD}")
    texts = read_wikitext("test", data_dir) if name == "wikitext" else read_parallel(name, "test", data_dir).en
    return list(dict.fromkeys(t.strip() for t in texts if t.strip()))


def far_ood_sets(n: int, seed: int = 0, data_dir=None, names: tuple[str, ...] = FAR_OOD) -> dict[str, list[str]]:
    """``{source: n texts}`` for every far-OOD source in ``names``, each drawn with ``seed`` from its
    pool (:func:`far_ood_pool`; in drawing order, :func:`~nvformer_studies.common.subsets.seeded_subset`).

    The sets are disjoint: a text already drawn for an earlier source is excluded from a later
    one's pool (its other texts keep their places in the permutation), and no set repeats a text.
    A pool with fewer than ``n`` texts is an error.
    """
    taken: set[str] = set()
    out = {}
    for name in names:
        pool = far_ood_pool(name, data_dir)
        avail = len(pool) - sum(t in taken for t in pool)
        if avail < n:
            raise ValueError(f"far_ood_sets: {name} has {avail} distinct unused texts, fewer than {n}")
        idx = seeded_subset(len(pool), n, seed, exclude=[i for i, t in enumerate(pool) if t in taken], sort=False)
        out[name] = [pool[i] for i in idx]
        taken.update(out[name])
    return out


def _reviews(tok, split: tuple[list[str], list[int]], n: int, max_length: int) -> TextBatches:
    """``n`` labelled reviews of a split drawn with seed 0, in drawing order (the splits are sorted by
    file position and the files are grouped by label, so a prefix would be one class)."""
    idx = seeded_subset(len(split[0]), n, 0, sort=False)
    return classification_batches(tok, [split[0][i] for i in idx], [split[1][i] for i in idx], batch_size=32, max_length=max_length)


def validation_data(max_length: int, n_val: int) -> TextBatches:
    """The ``n_val`` books validation reviews of the study (temperature scaling, the NV choice, the tau sweep)."""
    _, tok = load_minilm()
    return _reviews(tok, domain_splits(SOURCE, 0)["validation"], n_val, max_length)


def evaluation_data(max_length: int, n_eval: int, n_val: int) -> tuple[dict[str, TextBatches], TextBatches, list]:
    """``(sets, validation, prior batches)``: ``{name: TextBatches}`` of the seven review domains'
    test reviews (labelled) and the far-OOD texts (:func:`far_ood_sets`, unlabelled), ``n_eval``
    each; the ``n_val`` books validation reviews (:func:`validation_data`); the model inputs of the
    first 256 books training reviews (the NV prior). Texts are truncated to ``max_length`` tokens."""
    _, tok = load_minilm()
    splits = {d: domain_splits(d, 0) for d in REVIEW_DOMAINS}
    sets = {d: _reviews(tok, splits[d]["test"], n_eval, max_length) for d in REVIEW_DOMAINS}
    sets |= {name: classification_batches(tok, texts, batch_size=32, max_length=max_length) for name, texts in far_ood_sets(n_eval, 0).items()}
    val = _reviews(tok, splits[SOURCE]["validation"], n_val, max_length)
    prior_batches = classification_batches(tok, splits[SOURCE]["train"][0][:256], batch_size=32, max_length=max_length).batches
    return sets, val, prior_batches
