"""RouteLLM's routing metrics (evals/benchmarks.py + evals/evaluate.py), re-implemented with numpy.

curve(): thresholds = the 11 edges of 10 equal-count bins of the scores (pandas.qcut == linear
quantiles at 0, .1, ..., 1); at threshold i route to strong when score >= t_i (score > t_i at the
last one); point = (% strong calls, quality). quality = mean over items of the routed model's
outcome (accuracy for MMLU/GSM8K, mean judge score over both turns for MT-Bench).
cpt(): % strong calls at which quality = weak + x * (strong - weak), by np.interp over the curve
sorted by % strong calls (as RouteLLM does). apgr(): (AUC - weak*span)/(strong*span - weak*span),
AUC by the trapezoid rule over % strong / 100.
"""
import numpy as np


def thresholds(scores, num_results=10):
    return np.quantile(np.asarray(scores, dtype=np.float64), np.linspace(0, 1, num_results + 1))


def curve(scores, weak, strong, num_results=10):
    """scores, weak outcome, strong outcome per item -> (pct_strong[], quality[]) in threshold order."""
    s = np.asarray(scores, dtype=np.float64)
    weak = np.asarray(weak, dtype=np.float64)
    strong = np.asarray(strong, dtype=np.float64)
    th = thresholds(s, num_results)
    pct, qual = [], []
    for i, t in enumerate(th):
        sel = s >= t if i != len(th) - 1 else s > t
        pct.append(sel.mean() * 100.0)
        qual.append(np.where(sel, strong, weak).mean())
    return np.array(pct), np.array(qual)


def metrics(scores, weak, strong, num_results=10):
    """-> dict(cpt50, cpt80, apgr, auc); quality in the outcome's unit (accuracy as 0..1 or score)."""
    pct, qual = curve(scores, weak, strong, num_results)
    order = np.argsort(pct, kind="stable")
    pct, qual = pct[order], qual[order]
    w, s = float(np.mean(weak)), float(np.mean(strong))
    cpt = {x: float(np.interp(w + x * (s - w), qual, pct)) for x in (0.5, 0.8)}
    x = pct / 100.0
    auc = float(np.trapezoid(qual, x))
    span = float(x[-1] - x[0])
    apgr = (auc - w * span) / (s * span - w * span)
    return {"cpt50": cpt[0.5], "cpt80": cpt[0.8], "apgr": apgr, "auc": auc}


def random_metrics(n, weak, strong, seeds=range(10)):
    """Mean metrics of uniform random scores over `seeds`."""
    ms = [metrics(np.random.default_rng(seed).random(n), weak, strong) for seed in seeds]
    return {k: float(np.mean([m[k] for m in ms])) for k in ms[0]}


def bootstrap_apgr(score_sets, weak, strong, n_boot=2000, seed=0):
    """Paired bootstrap over items (resampled with replacement, same resample for every router).
    score_sets: list of score arrays. -> list of (lo, hi) percentile 95% CIs of APGR per router, and
    (lo, hi, P(diff <= 0)) of APGR(router 0) - APGR(router 1) when two are given."""
    rng = np.random.default_rng(seed)
    score_sets = [np.asarray(s, dtype=np.float64) for s in score_sets]
    weak, strong = np.asarray(weak, dtype=np.float64), np.asarray(strong, dtype=np.float64)
    n = len(weak)
    vals = []
    for _ in range(n_boot):
        i = rng.integers(0, n, n)
        if np.mean(strong[i]) == np.mean(weak[i]):
            continue
        vals.append([metrics(s[i], weak[i], strong[i])["apgr"] for s in score_sets])
    vals = np.array(vals)
    cis = [(float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for v in vals.T]
    diff = None
    if len(score_sets) >= 2:
        d = vals[:, 0] - vals[:, 1]
        diff = (float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5)), float(np.mean(d <= 0)))
    return cis, diff
