"""Test-time query refinement: move each query vector so its similarities agree with a teacher.

After IBM's task-aware-embedding-refinement: for every query take its top-k candidates under the
current vectors, let a teacher score them, and run Adam on the query vector so that
softmax(student similarity / T_s) over the candidates matches softmax(teacher score / T_t)
(KL(teacher || student)). Candidates come from a block-wise running top-k over the corpus, and
only their vectors are read. The search model then re-scores the whole corpus with the refined
vector, so documents the teacher never saw can move up too. Options beyond IBM (both off by
default, which reproduces it): a few random documents mixed into the candidate set, and a
squared-distance penalty that keeps the refined vector near the original.

All queries are refined together: one (n_queries, dim) parameter, one batched loss, one manual
Adam whose per-coordinate update equals running Adam on each query alone (the loss is a sum of
per-query terms). It runs on the encoder's device, so it is a GPU program unchanged.

The Adam guard: Adam divides the first moment by the root of the second, so a gradient of pure
float noise (teacher == student, or an already satisfied query) becomes a full-size step of
random sign and reorders near ties. A query whose KL, computed in float64, is at most `kl_tol`
is frozen for good (its loss depends on its own vector only, so nothing can wake it). Queries
whose teacher gives every candidate the same score (no preference, e.g. gold labels with no
relevant document among the candidates) or a non-finite score are left unchanged as well.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mteb_steer.blocks import TopRows, dense_tiles, mask_rows, plan_blocks
from mteb_steer.steps import CorpusIndex, QueryBatch

if TYPE_CHECKING:
    from mteb_steer.encoder import SteerEncoder
    from mteb_steer.steering.teachers import Teacher

logger = logging.getLogger(__name__)

_SUPPORTED_SIMILARITIES = ("cosine", "dot")


def similarity_name(encoder: SteerEncoder) -> str:
    """The encoder's scoring function as 'cosine' or 'dot' (the only ones refinement can differentiate).

    Follows mteb: the model meta's `similarity_fn_name` when set, else the SentenceTransformer's own.
    """
    fn = getattr(encoder.mteb_model_meta, "similarity_fn_name", None) or encoder.model.similarity_fn_name
    name = str(getattr(fn, "value", fn) or "cosine").lower()
    name = {"dot_product": "dot", "cos_sim": "cosine"}.get(name, name)
    if name not in _SUPPORTED_SIMILARITIES:
        raise ValueError(
            f"test-time refinement supports {', '.join(_SUPPORTED_SIMILARITIES)} similarity; "
            f"{encoder.base_meta.name} uses {name!r}"
        )
    return name


def candidate_similarity(queries: torch.Tensor, candidates: torch.Tensor, name: str) -> torch.Tensor:
    """Similarity of each query to its own candidates: (n, dim) x (n, k, dim) -> (n, k)."""
    if name == "cosine":
        queries = torch.nn.functional.normalize(queries, dim=-1)
        candidates = torch.nn.functional.normalize(candidates, dim=-1)
    return torch.einsum("nd,nkd->nk", queries, candidates)


def full_similarity(queries: torch.Tensor, docs: torch.Tensor, name: str) -> torch.Tensor:
    """Similarity of every query to every document of one block: (n, dim) x (m, dim) -> (n, m)."""
    if name == "cosine":
        queries = torch.nn.functional.normalize(queries, dim=-1)
        docs = torch.nn.functional.normalize(docs, dim=-1)
    return queries @ docs.T


def select_candidates(queries: torch.Tensor, docs: Any, name: str, top_k: int, n_random: int,
                      exclude_rows: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """Candidate rows per query (n, top_k + n_random): its top_k documents, best first, then random others.

    `docs` is any array of corpus rows (ndarray, memmap, tensor), scored block by block with a running
    top-k (`mteb_steer.blocks`), so the corpus never sits on the device whole. `exclude_rows` (n,) holds
    one row per query that may never be a candidate (the query's own passage when the task ignores
    identical ids), -1 for none. Random documents are drawn without replacement from the rest of the
    corpus, seeded by `generator` (CPU draws: the same on every device).
    """
    plan = plan_blocks(queries.shape[0], len(docs), what="refinement candidates")
    top = TopRows(queries.shape[0], top_k, queries.device, queries.dtype)
    for q_rows, d_rows, scores in dense_tiles(lambda a, b: full_similarity(a, b, name), queries, docs, plan,
                                              desc="refinement candidates"):
        top.push(q_rows, d_rows, mask_rows(scores, q_rows, d_rows, exclude_rows))
    if not n_random:
        return top.rows
    own = exclude_rows.cpu() if exclude_rows is not None else torch.full((queries.shape[0],), -1)
    taken = top.rows.cpu()
    extra = [_random_rows(len(docs), n_random, {*taken[i].tolist(), int(own[i])}, generator)
             for i in range(queries.shape[0])]
    return torch.cat([top.rows, torch.tensor(extra, dtype=torch.int64, device=queries.device)], dim=1)


def _random_rows(n_docs: int, n: int, taken: set[int], generator: torch.Generator) -> list[int]:
    """`n` distinct random rows of [0, n_docs) outside `taken`: draws with rejection, no corpus-sized work."""
    out: list[int] = []
    seen = set(taken)
    while len(out) < n:
        for row in torch.randint(n_docs, (2 * (n - len(out)) + 8,), generator=generator).tolist():
            if row not in seen:
                seen.add(row)
                out.append(row)
                if len(out) == n:
                    break
    return out


def kl_divergence(target_logp: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Row-wise KL(target || softmax(student_logits)), the target as log-probabilities (-inf = no mass)."""
    target = target_logp.exp()
    return (torch.special.xlogy(target, target) - target * torch.log_softmax(student_logits, dim=-1)).sum(-1)


class TestTimeRefinement:
    """QueryStep: refine every query vector against a teacher over its candidates (see module doc).

    Args:
        teacher: scores (query, candidate) pairs; see `mteb_steer.steering.teachers`.
        top_k: candidates per query, taken by the current similarity (IBM: 20).
        steps: Adam steps (IBM: 100); 0 returns the vectors unchanged (and asks the teacher nothing).
        lr: Adam learning rate (IBM: 1e-4, for unnormalised vectors of norm about 1).
        student_temperature / teacher_temperature: T_s and T_t of the two softmaxes (IBM: 1 and 1).
        n_random: extra random documents per query, scored by the teacher too (0 = IBM).
        proximity: weight of ||q - q_original||^2 added to each query's loss (0 = IBM).
        kl_tol: queries whose float64 KL is at most this are frozen (the Adam guard).
        ignore_identical_ids: never use a document whose id equals the query id as a candidate, as
            mteb drops it from results (ArguAna); take it from the task's `ignore_identical_ids`.
        seed: seeds the random candidates.
        dtype: "float32" (default) or "float64" for the optimisation.
    """

    __test__ = False  # not a pytest class, despite the name

    def __init__(self, teacher: Teacher, *, top_k: int = 20, steps: int = 100, lr: float = 1e-4,
                 student_temperature: float = 1.0, teacher_temperature: float = 1.0, n_random: int = 0,
                 proximity: float = 0.0, kl_tol: float = 1e-9, ignore_identical_ids: bool = False,
                 seed: int = 42, dtype: str = "float32") -> None:
        checks = {
            "top_k": top_k >= 2, "steps": steps >= 0, "lr": lr > 0, "n_random": n_random >= 0,
            "student_temperature": student_temperature > 0, "teacher_temperature": teacher_temperature > 0,
            "proximity": proximity >= 0, "kl_tol": kl_tol >= 0, "dtype": dtype in ("float32", "float64"),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"invalid refinement option(s) {bad}: need top_k >= 2, steps >= 0, lr > 0, n_random >= 0, "
                f"temperatures > 0, proximity >= 0, kl_tol >= 0, dtype float32|float64 (got top_k={top_k}, "
                f"steps={steps}, lr={lr}, n_random={n_random}, T_s={student_temperature}, "
                f"T_t={teacher_temperature}, proximity={proximity}, kl_tol={kl_tol}, dtype={dtype!r})"
            )
        self.teacher = teacher
        self.top_k = top_k
        self.steps = steps
        self.lr = lr
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature
        self.n_random = n_random
        self.proximity = proximity
        self.kl_tol = kl_tol
        self.ignore_identical_ids = ignore_identical_ids
        self.seed = seed
        self.dtype = dtype
        self.tag = f"refine-{teacher.tag}-k{top_k}-s{steps}-lr{lr:g}"
        self.timings: dict[str, float] = {}
        self.stats: dict[str, int] = {}

    def describe(self) -> dict[str, Any]:
        return {
            "method": "test-time-refinement",
            "teacher": {"tag": self.teacher.tag, **self.teacher.describe()},
            "top_k": self.top_k, "steps": self.steps, "lr": self.lr,
            "student_temperature": self.student_temperature, "teacher_temperature": self.teacher_temperature,
            "n_random": self.n_random, "proximity": self.proximity, "kl_tol": self.kl_tol,
            "ignore_identical_ids": self.ignore_identical_ids, "seed": self.seed, "dtype": self.dtype,
            "optimizer": "adam(0.9,0.999,1e-8)",
        }

    @property
    def training_datasets(self) -> set[str]:
        return set(self.teacher.training_datasets)

    # -- QueryStep ----------------------------------------------------------------------------
    def steer_queries(self, queries: QueryBatch, index: CorpusIndex, encoder: SteerEncoder) -> np.ndarray:
        """Refined query vectors, float32 (n_queries, dim), same row order as `queries`."""
        n_q = len(queries.ids)
        if self.steps == 0 or n_q == 0:
            return queries.embeddings
        name = similarity_name(encoder)
        n_docs = len(index.ids)
        top_k = min(self.top_k, n_docs - int(self.ignore_identical_ids))
        n_random = min(self.n_random, n_docs - int(self.ignore_identical_ids) - top_k)
        if top_k < 2:
            raise ValueError(f"refinement needs at least 2 candidate documents; the corpus has {n_docs}")
        device = encoder.model.device
        dtype = torch.float64 if self.dtype == "float64" else torch.float32
        q0 = torch.as_tensor(np.asarray(queries.embeddings), dtype=dtype, device=device)
        exclude = None
        if self.ignore_identical_ids:
            exclude = torch.tensor([index.id_to_row.get(qid, -1) for qid in queries.ids], device=device)

        started = time.perf_counter()
        generator = torch.Generator().manual_seed(self.seed)
        rows = select_candidates(q0, index.embeddings, name, top_k, n_random, exclude, generator)
        rows_np = rows.cpu().numpy()
        self.timings["candidates_s"] = time.perf_counter() - started

        started = time.perf_counter()
        teacher_scores = np.asarray(self.teacher.score(queries.ids, queries.texts, rows_np, index), dtype=np.float64)
        if teacher_scores.shape != rows_np.shape:
            raise ValueError(f"teacher {self.teacher.tag} returned scores of shape {teacher_scores.shape}, "
                             f"expected {rows_np.shape} (queries x candidates)")
        self.timings["teacher_s"] = time.perf_counter() - started

        started = time.perf_counter()
        unique, inverse = np.unique(rows_np, return_inverse=True)  # only the candidates' vectors are read
        vectors = torch.as_tensor(np.asarray(index.embeddings[unique]), dtype=dtype, device=device)
        refined, stats = refine_vectors(
            q0, vectors[torch.as_tensor(inverse.reshape(rows_np.shape), device=device)], teacher_scores, similarity=name, steps=self.steps, lr=self.lr,
            student_temperature=self.student_temperature, teacher_temperature=self.teacher_temperature,
            proximity=self.proximity, kl_tol=self.kl_tol,
        )
        self.timings["optimise_s"] = time.perf_counter() - started
        self.stats = stats
        logger.info("refinement (%s): %s", self.tag, stats)
        return refined.cpu().numpy().astype(np.float32)


def refine_vectors(q0: torch.Tensor, candidates: torch.Tensor, teacher_scores: np.ndarray, *, similarity: str,
                   steps: int, lr: float, student_temperature: float = 1.0, teacher_temperature: float = 1.0,
                   proximity: float = 0.0, kl_tol: float = 1e-9, betas: tuple[float, float] = (0.9, 0.999),
                   eps: float = 1e-8) -> tuple[torch.Tensor, dict[str, int]]:
    """The batched optimisation: Adam on all query vectors at once, with the guard.

    q0 (n, dim) and candidates (n, k, dim) share dtype and device; teacher_scores (n, k) floats, -inf
    meaning "no mass on this candidate" (rows with NaN/+inf, no finite score or no preference are not
    moved). Returns the refined (n, dim) vectors and counts: moved, satisfied_at_start (frozen by
    the guard before any step), converged_early (frozen by the guard later), no_teacher_preference,
    non_finite_teacher.
    """
    scores = torch.as_tensor(teacher_scores, dtype=torch.float64, device=q0.device)
    finite = torch.isfinite(scores)
    usable = (finite | (scores == -torch.inf)).all(1) & finite.any(1)  # -inf = "never this one"; NaN/+inf = broken
    high = torch.where(finite, scores, -torch.inf).amax(1)
    low = torch.where(finite, scores, torch.inf).amin(1)
    informative = usable & ((high > low) | ~finite.all(1))
    clean = torch.where(usable[:, None], scores, 0.0)
    target_logp = torch.log_softmax(clean / teacher_temperature, dim=-1)
    target_logp_work = target_logp.to(q0.dtype)

    if similarity == "cosine":  # normalise the fixed side once; the query side is normalised each step
        candidates = torch.nn.functional.normalize(candidates, dim=-1)
    q = q0.clone()
    m = torch.zeros_like(q)
    v = torch.zeros_like(q)
    active = informative.clone()
    satisfied_at_start = torch.zeros_like(active)
    for t in tqdm(range(1, steps + 1), desc="refine", leave=False, disable=steps < 50):
        q.requires_grad_(True)
        unit = torch.nn.functional.normalize(q, dim=-1) if similarity == "cosine" else q
        logits = torch.einsum("nd,nkd->nk", unit, candidates) / student_temperature
        with torch.no_grad():  # the guard looks at the KL in float64, where float32 noise is ~1e-13
            kl64 = kl_divergence(target_logp, logits.detach().to(torch.float64))
            satisfied = active & (kl64 <= kl_tol)
            if t == 1:
                satisfied_at_start = satisfied
            active &= ~satisfied
        if not bool(active.any()):
            q = q.detach()
            break
        loss_rows = kl_divergence(target_logp_work, logits)
        if proximity:
            loss_rows = loss_rows + proximity * ((q - q0) ** 2).sum(-1)
        (grad,) = torch.autograd.grad(loss_rows[active].sum(), q)
        q = q.detach()
        with torch.no_grad():
            mask = active[:, None]
            m = torch.where(mask, betas[0] * m + (1 - betas[0]) * grad, m)
            v = torch.where(mask, betas[1] * v + (1 - betas[1]) * grad * grad, v)
            step = lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
            q = torch.where(mask, q - step, q)
    stats = {
        "queries": int(q0.shape[0]),
        "moved": int((informative & ~satisfied_at_start).sum()),
        "satisfied_at_start": int(satisfied_at_start.sum()),
        "converged_early": int((informative & ~satisfied_at_start & ~active).sum()),
        "no_teacher_preference": int((usable & ~informative).sum()),
        "non_finite_teacher": int((~usable).sum()),
    }
    if stats["non_finite_teacher"]:
        logger.warning("refinement: %d queries had non-finite teacher scores and were left unchanged",
                       stats["non_finite_teacher"])
    return q.detach(), stats
