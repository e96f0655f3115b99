"""Linear mode connectivity between two checkpoints of the same architecture.

The paper argues that fine-tuning transfer works when source and target are "linearly connected"
(paper App. A) but never measures it. :func:`connectivity` measures it: the mean token NLL along
θ(α) = (1−α)·A + α·B for evenly spaced α in [0, 1], and the loss barrier

    barrier = max_α [ L(θ(α)) − ((1−α)·L(A) + α·L(B)) ]

(≥ 0 by construction, since the endpoints are included and equal L(A), L(B) exactly).

Memory: checkpoints of an architecture in :data:`deltaport.layerwise.STREAMED` are read layer by layer
and every point of the curve is computed at once (:func:`deltaport.layerwise.stream_losses`): one layer of
A and B, one point's weights for it, the activations of every point. Otherwise (models passed in
memory, a ``task`` metric, another architecture) the two endpoint models plus one interpolated model,
built in place into the third model's parameters with ``torch.lerp``. Either way α = 0 and α = 1 are
plain copies, so the curve's endpoints are bit for bit the endpoint models.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from deltaport import causal_lm
from deltaport import layerwise as lw
from deltaport.errors import InputError
from deltaport.figures import pyplot, save_figure
from deltaport.io.tensors import parse_dtype
from deltaport.options import CONNECTIVITY, ConnectivityOptions, declared

LOG = logging.getLogger(__name__)


def alphas_for(points: int) -> list[float]:
    """``points`` evenly spaced values in [0, 1]; the ends are exactly 0.0 and 1.0."""
    if points < 2:
        raise InputError(f"--points must be at least 2 (got {points}): the curve needs both endpoints")
    return [0.0 if i == 0 else 1.0 if i == points - 1 else i / (points - 1) for i in range(points)]


@torch.no_grad()
def interpolate_into(dst: dict[str, torch.Tensor], pa: dict[str, torch.Tensor], pb: dict[str, torch.Tensor],
                     alpha: float) -> None:
    """Write (1−α)·a + α·b into the tensors of ``dst`` in place (α = 0 / 1: exact copies)."""
    for name, d in dst.items():
        a, b = pa[name], pb[name]
        if alpha == 0.0:
            d.copy_(a)
        elif alpha == 1.0:
            d.copy_(b)
        elif d.dtype in (torch.float32, torch.float64):
            torch.lerp(a.to(d.device), b.to(d.device), alpha, out=d)
        else:  # low-precision weights: interpolate in fp32, round once
            d.copy_(torch.lerp(a.float(), b.float(), alpha))


def barrier_of(alphas: Sequence[float], losses: Sequence[float], loss_a: float, loss_b: float) -> tuple[float, float]:
    """(barrier, α at which it occurs): max over α of loss minus the straight line between the endpoints."""
    gaps = [l - ((1 - a) * loss_a + a * loss_b) for a, l in zip(alphas, losses)]
    k = max(range(len(gaps)), key=lambda i: gaps[i])
    return max(gaps[k], 0.0), alphas[k]


def _data_label(data: Any) -> str:
    if isinstance(data, (str, Path)):
        return str(data)
    return f"<{len(data)} in-memory documents>"


def token_blocks(a_spec: Any, model_a: Any, data: Any, tokenizer: Any, *, max_tokens: int,
                 seed: int, block_len: int | None, vocab: int | None = None) -> list[torch.Tensor]:
    """The fixed token sample of ``data`` (texts tokenized with ``tokenizer``, default ``a_spec``'s), in blocks
    of ``block_len`` tokens (default: min(model max positions, 512)); refused if a token id exceeds the vocabulary.
    ``model_a`` is the loaded model, or its config with ``vocab`` its embedding's rows."""
    docs = causal_lm.load_texts(data)
    if any(isinstance(d, str) for d in docs):
        if tokenizer is None:
            tokenizer = causal_lm.load_tokenizer(a_spec)
        elif isinstance(tokenizer, (str, Path)):
            tokenizer = causal_lm.load_tokenizer(tokenizer)
    else:
        tokenizer = None
    config = model_a.config if isinstance(model_a, torch.nn.Module) else model_a
    if block_len is None:
        block_len = int(getattr(config, "max_position_embeddings", 512) or 512)
        block_len = max(2, min(block_len, 512))
    blocks = causal_lm.token_sample(docs, tokenizer, max_tokens=max_tokens, seed=seed, block_len=block_len)
    if vocab is None:
        vocab = model_a.get_input_embeddings().weight.shape[0]
    top = max(int(b.max()) for b in blocks)
    if top >= vocab:
        raise InputError(f"the data has token id {top} but the model's vocabulary has {vocab} rows; "
                         "the tokenizer does not belong to this model")
    return blocks


@declared(ConnectivityOptions)
def connectivity(a: Any, b: Any, data: Any, *, points: int = CONNECTIVITY.points,
                 max_tokens: int = CONNECTIVITY.max_tokens, seed: int = CONNECTIVITY.seed,
                 device: str = CONNECTIVITY.device, task: Callable[[torch.nn.Module], float] | None = None,
                 progress: bool = False, tokenizer: Any = None, dtype: str | torch.dtype = CONNECTIVITY.dtype,
                 block_len: int | None = None, allow_pickle: bool = CONNECTIVITY.allow_pickle,
                 layerwise: bool = True) -> dict:
    """Loss (mean token NLL) along the straight line from ``a`` to ``b``, and its barrier.

    Args:
        a, b: local HF directories / hub ids, or loaded ``nn.Module`` causal LMs of the same
            architecture (passed modules are only read, never modified).
        data: JSONL file with ``{"text": ...}`` per line, or a list of strings / lists of token ids.
        task: optional ``callable(model) -> float`` evaluated at every point (e.g. exact match).
        progress: draw progress bars.
        tokenizer: tokenizer or directory for text data (default: ``a``'s tokenizer).
        block_len: tokens per evaluated sequence (default: min(model max positions, 512)).
        layerwise: read the checkpoints layer by layer and compute every point at once (the default,
            where the inputs allow it; ``streamed`` and ``note`` in the report say which path ran);
            False loads the two models whole.

    Returns:
        ``{"alphas", "losses", "barrier", "barrier_alpha", "relative_barrier", "loss_a", "loss_b",
        "metrics", "metric_a", "metric_b", "n_tokens", "streamed", "peak_rss_mb", ...}``; losses in nats
        per predicted token, ``peak_rss_mb`` the process's peak resident memory at the end of the call.
    """
    t0 = time.perf_counter()
    alphas = alphas_for(points)
    torch_dtype = parse_dtype(dtype)
    for spec in (a, b):  # both refused before either is loaded
        causal_lm.preflight(spec, allow_pickle=allow_pickle)
    la, lb = causal_lm.model_label(a), causal_lm.model_label(b)
    prep: lw.Prepared | str = "layerwise=False"
    if not layerwise:
        pass
    elif task is not None:
        prep = "a task metric needs whole models"
    else:
        prep = lw.prepare([a, b], [la, lb], dtype=torch_dtype, allow_pickle=allow_pickle)
    if isinstance(prep, lw.Prepared):
        sk = prep.skeleton
        blocks = token_blocks(a, prep.configs[0], data, tokenizer, max_tokens=max_tokens, seed=seed,
                              block_len=block_len, vocab=prep.vocab)
        streams = [lw.lerp("a", "b", x, torch_dtype) for x in alphas]
        inputs = dict(zip("ab", prep.checkpoints))
        with causal_lm.progress_bar(progress, len(sk.layers) + 2, "connectivity") as bar:
            losses = lw.stream_losses(sk, inputs, streams, blocks, dtype=torch_dtype, device=device,
                                             batch_tokens=causal_lm.batch_tokens_for(prep.head_rows),
                                             advance=bar.advance)
        curve = curve_of(alphas, losses, losses[0], losses[-1])
        n_params, note = sk.num_parameters, None
        dev, dt = str(torch.device(device)), str(torch_dtype).replace("torch.", "")
    else:
        note = f"whole models loaded: {prep}"
        LOG.info("connectivity: %s", note)
        model_a = causal_lm.load_causal_lm(a, dtype=torch_dtype, device=device, allow_pickle=allow_pickle)
        model_b = causal_lm.load_causal_lm(b, dtype=torch_dtype, device=device, allow_pickle=allow_pickle)
        pa, pb = causal_lm.named_params(model_a), causal_lm.named_params(model_b)
        causal_lm.check_same_architecture(pa, pb, la, lb)
        blocks = token_blocks(a, model_a, data, tokenizer, max_tokens=max_tokens, seed=seed, block_len=block_len)
        curve = loss_curve(model_a, model_b, blocks, alphas, task=task, progress=progress)
        n_params = causal_lm.num_parameters(model_a)
        dev = str(next(model_a.parameters()).device)
        dt = str(next(model_a.parameters()).dtype).replace("torch.", "")
    n_tokens = sum(bl.numel() for bl in blocks)
    report = {
        "a": la,
        "b": lb,
        "data": _data_label(data),
        **curve,
        "n_tokens": n_tokens,
        "n_predicted": n_tokens - len(blocks),
        "block_len": max(bl.numel() for bl in blocks),
        "max_tokens": max_tokens,
        "seed": seed,
        "dtype": dt,
        "device": dev,
        "num_parameters": n_params,
        "streamed": note is None,
        "note": note,
        "seconds": round(time.perf_counter() - t0, 3),
        "peak_rss_mb": lw.peak_rss_mb(),
    }
    return report


def loss_curve(model_a: torch.nn.Module, model_b: torch.nn.Module, blocks: list[torch.Tensor], alphas: list[float],
               *, task: Callable[[torch.nn.Module], float] | None = None, progress: bool = False) -> dict:
    """The curve between two loaded models (the third, interpolated model lives only inside this call)."""
    pa, pb = causal_lm.named_params(model_a), causal_lm.named_params(model_b)
    with causal_lm.progress_bar(progress, len(alphas) + 2, "connectivity") as bar:
        loss_a = causal_lm.mean_nll(model_a, blocks)
        bar.advance()
        loss_b = causal_lm.mean_nll(model_b, blocks)
        bar.advance()
        metric_a = float(task(model_a)) if task else None
        metric_b = float(task(model_b)) if task else None
        mid = copy.deepcopy(model_a).eval()  # the one interpolated model
        pm = causal_lm.named_params(mid)
        losses, metrics = [], []
        try:
            for alpha in alphas:
                interpolate_into(pm, pa, pb, alpha)
                losses.append(causal_lm.mean_nll(mid, blocks))
                if task:
                    metrics.append(float(task(mid)))
                bar.advance()
        finally:
            del mid, pm
    out = curve_of(alphas, losses, loss_a, loss_b, metrics=metrics if task else None, metric_a=metric_a,
                   metric_b=metric_b)
    if not out["endpoints_exact"]:  # same weights, same sample: only a non-deterministic kernel can do this
        LOG.warning("curve endpoints differ from the endpoint models' losses (%r vs %r, %r vs %r): the forward "
                    "pass is not deterministic on this device", losses[0], loss_a, losses[-1], loss_b)
    return out


def curve_of(alphas: list[float], losses: list[float], loss_a: float, loss_b: float, *, metrics: list | None = None,
             metric_a: float | None = None, metric_b: float | None = None) -> dict:
    """The curve's part of the report: losses, the chord, the barrier and where it occurs."""
    barrier, at = barrier_of(alphas, losses, loss_a, loss_b)
    mean_end = (loss_a + loss_b) / 2
    return {
        "alphas": alphas,
        "losses": losses,
        "loss_a": loss_a,
        "loss_b": loss_b,
        "linear": [(1 - x) * loss_a + x * loss_b for x in alphas],
        "barrier": barrier,
        "barrier_alpha": at,
        "relative_barrier": barrier / mean_end if mean_end > 0 else float("inf"),
        "endpoints_exact": losses[0] == loss_a and losses[-1] == loss_b,
        "metrics": metrics,
        "metric_a": metric_a,
        "metric_b": metric_b,
    }


def plot_curve(report: dict, path: str | Path, *, overwrite: bool = True) -> Path:
    """Draw loss (and the task metric, if any) against α, with the straight line between the endpoints."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    al = report["alphas"]
    ax.plot(al, report["losses"], "o-", label="loss along θ(α)")
    ax.plot(al, report["linear"], "--", color="grey", label="linear between endpoints")
    ax.set_xlabel("α   (θ = (1−α)·A + α·B)")
    ax.set_ylabel("mean token NLL (nats)")
    ax.set_title(f"barrier {report['barrier']:.4f} nats at α = {report['barrier_alpha']:.2f}", fontsize=10)
    if report.get("metrics"):
        ax2 = ax.twinx()
        ax2.plot(al, report["metrics"], "s-", color="tab:green", label="task metric")
        ax2.set_ylabel("task metric")
        ax2.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    fig.text(0.01, -0.02, f"A: {report['a']}\nB: {report['b']}", fontsize=7, va="top")
    return save_figure(fig, path, overwrite=overwrite, record=True)
