"""Loop-based float64 reference implementations of the package math, for allclose tests (one section per helper)."""

from __future__ import annotations

import math

import numpy as np

# -- fusion (mteb_steer/steering/fusion.py) ----------------------------------------------------------

def _unit(v: np.ndarray) -> np.ndarray:
    return v / math.sqrt(sum(x * x for x in v))


def ref_fuse(method: str, passages: list, queries: list[list], strength: float, weights: list[list] | None = None
             ) -> np.ndarray:
    """One passage at a time: weighted mean / sum / great-circle rotation with a chord bound."""
    out = []
    for i, p in enumerate(passages):
        p = np.asarray(p, dtype=np.float64)
        qs = [np.asarray(q, dtype=np.float64) for q in queries[i]]
        if not qs:
            out.append(p)
            continue
        ws = weights[i] if weights is not None else [1.0] * len(qs)
        total = np.zeros_like(p)
        for w, q in zip(ws, qs):
            total = total + w * q
        if method == "mean":
            out.append(_unit((1 - strength) * p + strength * total / len(qs)))
        elif method == "sum":
            out.append(_unit(p + strength * total))
        else:  # rotate: bisection on the slerp p -> c for the largest step whose chord^2 stays <= strength
            p = _unit(p)
            c = _unit(total)
            dot = max(-1.0, min(1.0, float(sum(a * b for a, b in zip(p, c)))))
            theta = math.acos(dot)
            if theta < 1e-12 or math.pi - theta < 1e-12:
                out.append(p)
                continue

            def slerp(t: float, p=p, c=c, theta=theta) -> np.ndarray:
                return (math.sin((1 - t) * theta) * p + math.sin(t * theta) * c) / math.sin(theta)

            def chord2(t: float, p=p) -> float:
                return float(sum((a - b) ** 2 for a, b in zip(slerp(t), p)))

            lo, hi = 0.0, 1.0
            if chord2(1.0) <= strength:
                lo = 1.0
            else:
                for _ in range(200):
                    mid = (lo + hi) / 2
                    lo, hi = (mid, hi) if chord2(mid) <= strength else (lo, mid)
            out.append(slerp(lo))
    return np.array(out)


def ref_softmax_weights(passage: list, queries: list[list], temperature: float) -> list[float]:
    """Softmax of cosine(q_i, p) / temperature over one passage's queries, scaled to average 1."""
    p = _unit(np.asarray(passage, dtype=np.float64))
    sims = [float(np.dot(_unit(np.asarray(q, dtype=np.float64)), p)) for q in queries]
    exps = [math.exp(s / temperature) for s in sims]
    return [e / sum(exps) * len(queries) for e in exps]


def ref_mrr_at_10(queries: list, targets: list[int], corpus: list) -> float:
    """Cosine retrieval of each query's target row; rank = docs strictly above it; 1/(rank+1) if rank < 10."""
    total = 0.0
    for q, t in zip(queries, targets):
        q = _unit(np.asarray(q, dtype=np.float64))
        sims = [float(np.dot(q, _unit(np.asarray(d, dtype=np.float64)))) for d in corpus]
        rank = sum(1 for s in sims if s > sims[t])
        total += 1.0 / (rank + 1) if rank < 10 else 0.0
    return total / len(queries)


# -- adapter (mteb_steer/steering/adapter.py) --------------------------------------------------------

def ref_adapter_loss(queries: list, candidates: list, excluded: list, loss: str, scale: float, margin: float
                     ) -> float:
    """One query at a time: candidate i is query i's positive, the other non-excluded candidates its negatives."""
    total = 0.0
    for i, q in enumerate(queries):
        q = np.asarray(q, dtype=np.float64)
        qn = q / math.sqrt(sum(x * x for x in q))
        sims = []
        for c in candidates:
            c = np.asarray(c, dtype=np.float64)
            sims.append(sum(a * b for a, b in zip(qn, c / math.sqrt(sum(x * x for x in c)))))
        negatives = [s for j, s in enumerate(sims) if j != i and not excluded[i][j]]
        if loss == "mnrl":
            kept = [sims[i]] + negatives
            top = max(kept)
            log_norm = top * scale + math.log(sum(math.exp(scale * (s - top)) for s in kept))
            total += log_norm - scale * sims[i]
        elif loss == "triplet":
            hinges = [max(0.0, margin - sims[i] + s) for s in negatives]
            total += sum(hinges) / max(len(negatives), 1)
        elif loss == "mse":
            total += (1 - sims[i]) ** 2 + sum(s * s for s in negatives) / max(len(negatives), 1)
    return total / len(queries)


# -- lexical (mteb_steer/steering/lexical.py) --------------------------------------------------------

def ref_bm25(docs: list[list[str]], queries: list[list[str]], method: str, k1: float, b: float,
             delta: float = 0.5) -> np.ndarray:
    """BM25 one (query, passage, term) at a time, variants as in Kamphuis et al. (ECIR 2020) and bm25s.

    score(q, d) = sum over query tokens t (repeats count again) seen in the corpus of idf(t) * tf_part(t, d).
    bm25s's "lucene" tf part omits the constant (k1 + 1) factor; BM25L/BM25+ score absent terms too.
    """
    n = len(docs)
    avgdl = sum(len(d) for d in docs) / n
    df: dict[str, int] = {}
    for d in docs:
        for t in set(d):
            df[t] = df.get(t, 0) + 1

    def idf(t: str) -> float:
        f = df[t]
        if method == "lucene":
            return math.log(1 + (n - f + 0.5) / (f + 0.5))
        if method == "robertson":
            return math.log(max(1.0, (n - f + 0.5) / (f + 0.5)))
        if method == "atire":
            return math.log(n / f)
        if method == "bm25l":
            return math.log((n + 1) / (f + 0.5))
        return math.log((n + 1) / f)  # bm25+

    def tf_part(tf: int, dl: int) -> float:
        norm = 1 - b + b * dl / avgdl
        if method in ("lucene", "robertson"):
            return tf / (k1 * norm + tf)
        if method == "atire":
            return tf * (k1 + 1) / (tf + k1 * norm)
        if method == "bm25l":
            c = tf / norm
            return (k1 + 1) * (c + delta) / (k1 + c + delta)
        return (k1 + 1) * tf / (k1 * norm + tf) + delta  # bm25+

    out = np.zeros((len(queries), n))
    for i, q in enumerate(queries):
        for j, d in enumerate(docs):
            total = 0.0
            for t in q:
                if t not in df:
                    continue
                tf = d.count(t)
                if tf or method in ("bm25l", "bm25+"):
                    total += idf(t) * tf_part(tf, len(d))
            out[i, j] = total
    return out


# -- refine (mteb_steer/steering/refine.py) ----------------------------------------------------------

def _log_softmax(z: np.ndarray) -> np.ndarray:
    top = max(x for x in z if x > -math.inf)
    return z - (top + math.log(sum(math.exp(x - top) for x in z)))


def ref_refine(q0: np.ndarray, candidates: np.ndarray, teacher: np.ndarray, *, similarity: str, steps: int,
               lr: float, student_temperature: float = 1.0, teacher_temperature: float = 1.0,
               proximity: float = 0.0, kl_tol: float = 1e-9, betas: tuple[float, float] = (0.9, 0.999),
               eps: float = 1e-8) -> np.ndarray:
    """One query at a time, float64, hand-written gradient and Adam: what the batched refinement must equal.

    Per query: target p = softmax(teacher / T_t); each step s_j = sim(q, d_j), r = softmax(s / T_s),
    stop once KL(p || r) <= kl_tol, else g = sum_j (r_j - p_j) / T_s * ds_j/dq + 2 proximity (q - q0)
    and one Adam step. A -inf teacher score gives its candidate no target mass; queries whose teacher
    scores are constant, NaN/+inf or all -inf are returned unchanged.
    """
    out = []
    for i in range(len(q0)):
        start = np.asarray(q0[i], dtype=np.float64)
        docs = np.asarray(candidates[i], dtype=np.float64)
        scores = np.asarray(teacher[i], dtype=np.float64)
        q = start.copy()
        finite = np.isfinite(scores)
        if (np.isnan(scores).any() or (scores == np.inf).any() or not finite.any()
                or (finite.all() and scores.max() == scores.min())):
            out.append(q)  # broken, or no preference (-inf marks a candidate with no teacher mass)
            continue
        log_p = _log_softmax(scores / teacher_temperature)
        p = np.exp(log_p)
        if similarity == "cosine":
            docs = np.array([d / math.sqrt(float(d @ d)) for d in docs])
        m = np.zeros_like(q)
        v = np.zeros_like(q)
        for t in range(1, steps + 1):
            norm = math.sqrt(float(q @ q))
            sims = np.array([float(d @ q) / norm if similarity == "cosine" else float(d @ q) for d in docs])
            log_r = _log_softmax(sims / student_temperature)
            kl = sum(pj * (lpj - lrj) for pj, lpj, lrj in zip(p, log_p, log_r) if pj > 0)
            if kl <= kl_tol:
                break
            r = np.exp(log_r)
            grad = 2 * proximity * (q - start)
            for j, d in enumerate(docs):
                coef = (r[j] - p[j]) / student_temperature
                if similarity == "cosine":
                    grad = grad + coef * (d / norm - sims[j] * q / norm**2)
                else:
                    grad = grad + coef * d
            m = betas[0] * m + (1 - betas[0]) * grad
            v = betas[1] * v + (1 - betas[1]) * grad * grad
            m_hat = m / (1 - betas[0] ** t)
            v_hat = v / (1 - betas[1] ** t)
            q = q - lr * m_hat / (np.sqrt(v_hat) + eps)
        out.append(q)
    return np.array(out)


def ref_hybrid(dense: np.ndarray, lexical: np.ndarray, mode: str, w: float, depth: int, rrf_k: int) -> np.ndarray:
    """(1 - w) * norm(dense) + w * norm(lexical), one query and one passage at a time.

    zscore: population mean/std over the row; minmax: over the row; a constant row normalises to 0.
    rrf: 1 / (rrf_k + rank) over the top-`depth` of each list (lexical list: passages with score > 0).
    """
    out = np.zeros(dense.shape)
    for q in range(dense.shape[0]):
        sides = []
        for side, row in enumerate((list(dense[q]), list(lexical[q]))):
            n = len(row)
            if mode == "zscore":
                mean = sum(row) / n
                std = math.sqrt(sum((x - mean) ** 2 for x in row) / n)
                sides.append([(x - mean) / std if std > 0 else 0.0 for x in row])
            elif mode == "minmax":
                lo, hi = min(row), max(row)
                sides.append([(x - lo) / (hi - lo) if hi > lo else 0.0 for x in row])
            else:
                pool = [j for j in range(n) if side == 0 or row[j] > 0]
                ranked = sorted(pool, key=lambda j, row=row: (-row[j], j))[:depth]
                contrib = [0.0] * n
                for rank, j in enumerate(ranked):
                    contrib[j] = 1.0 / (rrf_k + rank + 1)
                sides.append(contrib)
        for j in range(dense.shape[1]):
            out[q, j] = (1 - w) * sides[0][j] + w * sides[1][j]
    return out


# -- search (mteb_steer/search.py) -------------------------------------------------------------------

def ref_top_k_like_mteb(scores, doc_ids: list, query_ids: list, top_k: int, chunk_size: int = 50_000) -> dict:
    """The former full-matrix search: top-k per query from a whole (n_queries, n_docs) torch score matrix,
    exactly as mteb's `chunked_full_corpus_search` picks them (per chunk torch.topk(top_k + 1), then a
    (score, doc_id) min-heap of size top_k)."""
    import heapq

    import torch

    heaps: dict = {qid: [] for qid in query_ids}
    for start in range(0, scores.shape[1], chunk_size):
        block = scores[:, start:start + chunk_size]
        values, idx = torch.topk(block, min(top_k + 1, block.shape[1]), dim=1, largest=True)
        for q, qid in enumerate(query_ids):
            heap = heaps[qid]
            for i, score in zip(idx[q].tolist(), values[q].tolist(), strict=True):
                item = (score, doc_ids[start + i])
                if len(heap) < top_k:
                    heapq.heappush(heap, item)
                else:
                    heapq.heappushpop(heap, item)
    return {qid: {doc: score for score, doc in heap} for qid, heap in heaps.items()}


def ref_hybrid_full(hybrid, queries, dense, index):
    """The former full-matrix `LexicalHybrid.fuse` (full regime, before block-wise scoring): the whole
    (n_queries, n_docs) BM25 matrix from one sparse product, statistics over whole rows."""
    import torch

    lexical = hybrid.lexical
    query_matrix = lexical.query_matrix(queries.texts)[0]
    matched = (query_matrix @ lexical.term_docs).tocsr()
    constant = lexical.constant(query_matrix)
    w = hybrid.weight
    if w == 0.0:
        return dense
    if w == 1.0:
        return torch.from_numpy(matched.toarray() + constant[:, None])
    if hybrid.fusion == "rrf":
        fused = torch.zeros_like(dense)
        depth = min(hybrid.candidates, dense.shape[1])
        ranks = torch.arange(depth, dtype=torch.float32).expand(dense.shape[0], depth)
        fused.scatter_(1, torch.topk(dense, depth, dim=1).indices, (1 - w) / (hybrid.rrf_k + 1 + ranks))
        rows = np.repeat(np.arange(matched.shape[0]), np.diff(matched.indptr))
        keep = matched.data > 0
        rows, cols, data = rows[keep], matched.indices[keep], matched.data[keep]
        order = np.lexsort((cols, -data, rows))
        rows, cols = rows[order], cols[order]
        counts = np.bincount(rows, minlength=matched.shape[0])
        rank = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
        top = rank < depth
        fused[torch.from_numpy(rows[top]), torch.from_numpy(cols[top])] += torch.from_numpy(
            (w / (hybrid.rrf_k + 1 + rank[top])).astype(np.float32))
        return fused

    def center_scale(mean, var, low, high):
        center, scale = (mean, np.sqrt(np.maximum(var, 0.0))) if hybrid.fusion == "zscore" else (low, high - low)
        return (torch.as_tensor(center, dtype=torch.float32).reshape(-1, 1),
                torch.as_tensor(scale, dtype=torch.float32).reshape(-1, 1))

    def normalise(values, center, scale):
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        return torch.where(scale > 0, (values - center) / safe, torch.zeros_like(values))

    d64 = dense.double()
    d_stats = center_scale(d64.mean(1).numpy(), d64.var(1, unbiased=False).numpy(), d64.amin(1).numpy(),
                           d64.amax(1).numpy())
    m64 = matched.astype(np.float64)
    n_docs = matched.shape[1]
    mean = np.asarray(m64.sum(axis=1)).ravel() / n_docs
    var = np.asarray(m64.multiply(m64).sum(axis=1)).ravel() / n_docs - mean ** 2
    l_stats = center_scale(mean + constant, var, m64.min(axis=1).toarray().ravel() + constant,
                           m64.max(axis=1).toarray().ravel() + constant)
    lex = torch.from_numpy(matched.toarray() + constant[:, None])
    return (1 - w) * normalise(dense, *d_stats) + w * normalise(lex, *l_stats)


def ref_full_scores(model, queries, index):
    """The former full (n_queries, n_docs) score matrix of `SteerSearch.score`: the encoder's similarity,
    then the hybrid's full-matrix fusion."""
    import torch

    dense = torch.as_tensor(model.encoder.similarity(queries.embeddings, index.embeddings)).float()
    if model.score_fusion is None:
        return dense
    return ref_hybrid_full(model.score_fusion, queries, dense, index)


def ref_bm25_matrix(index, query_texts):
    """The whole (n_queries, n_docs) BM25 matrix of a LexicalIndex (small corpora only)."""
    query_matrix = index.query_matrix(query_texts)[0]
    return index.matched_block(query_matrix, slice(0, index.n_docs)) + index.constant(query_matrix)[:, None]


def fuse_whole(step, queries, dense, index):
    """A ScoreFusion applied to a whole small (n_queries, n_docs) dense matrix given as one tile."""
    whole = slice(0, dense.shape[0]), slice(0, dense.shape[1])
    return step.fuser(queries, index, lambda: iter([(*whole, dense)]))(*whole, dense)
