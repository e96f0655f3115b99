"""Several models of one architecture run side by side, one decoder layer at a time, straight from their
safetensors shards: what lets ``connectivity`` and ``check`` measure an 8B or 70B model in the memory
of a layer.

A *stream* is one model the caller wants the loss of (a point θ(α) of the connectivity curve, m'_s,
m_t + Δ_s, ...). Its weights are a function of the *inputs* (the checkpoints on disk) computed tensor
by tensor: :func:`stream_losses` reads each input's tensors of one layer (only those: the reader's
``pread`` of each tensor), builds each stream's weights for that layer in turn, and runs the stream's
activations of the token sample through that layer. So only the current layer of every input, one
stream's weights for it, the activations of every stream and one chunk of logits are in memory.

Nothing here re-implements the model. The modules are transformers' own, built from config.json on
the meta device (no memory); a layer's weights are handed to its module with
``torch.func.functional_call``. The model's own forward makes the inputs of the layers: it runs once
per batch with every decoder layer replaced by a recorder, which keeps the first layer's input (the
token embeddings, scaled as the model scales them) and each layer's keyword arguments (masks, rotary
embeddings, positions), then stops the forward. Only the head is spelled out: the final norm (the
model's module), the output projection (the model's module) and the final logit soft-capping of the
Gemma 2/3 families, as their ``*ForCausalLM.forward`` does.

Streamed architectures are :data:`STREAMED` (each one is compared with the whole-model path in
``tests/test_layerwise.py``); :func:`why_not` names the reason for any other input, and the callers
then load whole models as before, saying so in their report.
"""

from __future__ import annotations

import logging
import math
import resource
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltaport._memory import pin_mmap_threshold, trim_heap
from deltaport.errors import NumericalError

LOG = logging.getLogger(__name__)

#: ``model_type`` values whose ``*ForCausalLM`` is embeddings → decoder layers → norm → lm_head (tested)
STREAMED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2", "phi3")

#: config keys that do not change a forward pass over token ids (ids of special tokens, bookkeeping)
_CONFIG_IGNORED = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures", "use_cache",
                   "bos_token_id", "eos_token_id", "pad_token_id", "_commit_hash", "tokenizer_class",
                   "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id"}

#: logits elements per slice of the head: 4 M (16 MB of float32); the whole-model path allows 128 M
LOGITS_CHUNK = 1 << 22
#: elements per slice when a stream's tensor is built from its inputs, or the embedding/head is read: 1 M
BUILD_CHUNK = 1 << 20


def peak_rss_mb() -> float:
    """The process's peak resident set size so far (``ru_maxrss``, Linux's VmHWM), in MiB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# ----------------------------------------------------------------------------------------------- skeleton


class _Stop(Exception):
    """Raised by the last recorder: the layers' inputs are known, the rest of the forward is not needed."""


class _Recorder(torch.nn.Module):
    """Stands in for decoder layer ``i`` during the model's own forward: keeps its arguments, passes the
    hidden states through unchanged (the first one keeps them too), and stops the forward after the last."""

    def __init__(self, layer: torch.nn.Module, index: int, last: bool, calls: list):
        super().__init__()
        for k, v in vars(layer).items():  # plain attributes the model's forward may read (attention_type, ...)
            if not k.startswith("_") and not isinstance(v, (torch.nn.Module, torch.Tensor)):
                self.__dict__[k] = v
        self.index, self.last, self.calls = index, last, calls

    def forward(self, hidden_states, *args, **kwargs):
        self.calls.append((self.index, hidden_states if self.index == 0 else None, args, kwargs))
        if self.last:
            raise _Stop
        return hidden_states


@dataclass
class Skeleton:
    """One architecture as transformers builds it, on the meta device, and its parameters by role."""

    model: torch.nn.Module
    config: Any
    embed: str  # checkpoint name of the input embedding
    layer_prefix: str  # "model.layers."
    layers: list[list[str]]  # per layer: parameter names relative to the layer module
    norm: str  # module path of the final norm
    norm_params: list[str]  # its parameter names relative to the module
    head: str  # checkpoint name of the output projection (the embedding when tied)
    head_params: list[str]  # the lm_head module's parameter names ("weight", maybe "bias")
    tied: bool
    params: dict[str, tuple[int, ...]] = field(default_factory=dict)  # every parameter once (tied: the embedding)

    def module(self, path: str) -> torch.nn.Module:
        return self.model.get_submodule(path)

    @property
    def num_parameters(self) -> int:
        n = 0
        for shape in self.params.values():
            k = 1
            for s in shape:
                k *= s
            n += k
        return n


def load_config(d: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(d))


def skeleton(config: Any, dtype: torch.dtype) -> Skeleton:
    """The model of ``config`` on the meta device (parameters only; buffers such as rotary frequencies are
    real), in the attention implementation ``from_pretrained`` would choose."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # from_config ties them on a real device only
    model.eval()
    names = dict(model.named_parameters())  # tied parameters once (the embedding's name)
    dec = model.get_decoder()
    dec_path = next(p for p, m in model.named_modules() if m is dec)
    prefix = f"{dec_path}.layers."
    embed = f"{dec_path}.embed_tokens.weight"
    layers = [[n for n, _ in layer.named_parameters()] for layer in dec.layers]
    norm = f"{dec_path}.norm"
    head_mod = model.get_output_embeddings()
    head_params = [n for n, _ in head_mod.named_parameters(remove_duplicate=False)]
    tied = "lm_head.weight" not in names
    return Skeleton(model=model, config=config, embed=embed, layer_prefix=prefix, layers=layers, norm=norm,
                    norm_params=[n for n, _ in model.get_submodule(norm).named_parameters()],
                    head=embed if tied else "lm_head.weight", head_params=head_params, tied=tied,
                    params={n: tuple(p.shape) for n, p in names.items()})


def _config_dict(config: Any) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in _CONFIG_IGNORED}


def why_not(configs: Sequence[Any], labels: Sequence[str]) -> str | None:
    """None when models of these configs can be streamed together; otherwise the reason, in words."""
    mt = getattr(configs[0], "model_type", None)
    if mt not in STREAMED:
        return (f"architecture {mt!r} ({labels[0]}) is not one the layer-by-layer path is tested on "
                f"({', '.join(STREAMED)})")
    if getattr(configs[0], "auto_map", None):
        return f"{labels[0]} declares custom modeling code (auto_map)"
    ref = _config_dict(configs[0])
    for c, lab in zip(configs[1:], labels[1:]):
        other = _config_dict(c)
        diff = sorted(k for k in set(ref) | set(other) if ref.get(k) != other.get(k) and k != "vocab_size")
        if diff:
            return (f"config.json of {lab} differs from {labels[0]}'s in {', '.join(diff[:5])}"
                    f"{' ...' if len(diff) > 5 else ''}; each model is then run with its own config")
    return None


def check_skeleton(sk: Skeleton) -> str | None:
    """None when every parameter is the embedding, a layer's, the final norm's or the head's."""
    known = {sk.embed, sk.head} | {f"{sk.norm}.{n}" for n in sk.norm_params}
    known |= {f"{sk.layer_prefix}{i}.{n}" for i, names in enumerate(sk.layers) for n in names}
    extra = sorted(set(sk.params) - known)
    if extra:
        return f"parameters outside embedding, layers, norm and head: {', '.join(extra[:5])}"
    if sk.head_params != ["weight"]:
        return f"the output projection has parameters {sk.head_params} (only a weight is streamed)"
    return None


# ----------------------------------------------------------------------------------------------- streams


#: a stream: (parameter name, {input key: that input's tensor}) -> the stream's tensor in the compute dtype
Stream = Callable[[str, dict[str, torch.Tensor]], torch.Tensor]


def batches_of(blocks: list[torch.Tensor], batch_tokens: int) -> list[torch.Tensor]:
    """Consecutive blocks of equal length stacked up to ``batch_tokens`` tokens: the batches
    :func:`deltaport.causal_lm.mean_nll` forms, so both paths run the same matrix shapes."""
    out, i = [], 0
    while i < len(blocks):
        n = blocks[i].numel()
        j = i
        while j < len(blocks) and blocks[j].numel() == n and (j - i + 1) * n <= max(batch_tokens, n):
            j += 1
        out.append(torch.stack(blocks[i:j]))
        i = j
    return out


def read_rows(ck: Any, name: str, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0:r1`` of tensor ``name`` (its first dimension) of a checkpoint: only those bytes are read."""
    mem = ck.memory_tensor(name)
    if mem is not None:  # a pickled checkpoint, already in memory
        return mem[r0:r1]
    from deltaport.io.reader import FilePool, pread_into

    spec = ck.spec(name)
    row = spec.nbytes // spec.shape[0] if spec.shape[0] else 0
    buf = torch.empty((r1 - r0) * row, dtype=torch.uint8)
    if buf.numel():
        with FilePool() as pool:
            pread_into(pool.fd(spec.file), buf, spec.start + r0 * row, buf.numel(), f"{spec.file}:{name}")
    return buf.view(spec.dtype).reshape(r1 - r0, *spec.shape[1:])


def build(make: Stream, name: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """``make(name, tensors)``, in slices of rows when the tensor is large: every stream is elementwise,
    so the result is the same, and its float64 or float32 temporaries stay within :data:`BUILD_CHUNK`."""
    first = next(iter(tensors.values()))
    if first.numel() <= BUILD_CHUNK or first.dim() == 0:
        return make(name, tensors)
    step = max(1, BUILD_CHUNK // max(1, first[0].numel()))
    parts = [make(name, {k: v[r:r + step] for k, v in tensors.items()}) for r in range(0, first.shape[0], step)]
    out = torch.cat(parts)
    del parts
    return out


@torch.no_grad()
def stream_losses(sk: Skeleton, inputs: dict[str, Any], streams: Sequence[Stream], blocks: list[torch.Tensor], *,
                  dtype: torch.dtype, device: str = "cpu", batch_tokens: int,
                  on_tensor: Callable[[str, dict[str, torch.Tensor]], None] | None = None,
                  advance: Callable[[], None] | None = None) -> list[float]:
    """Mean next-token NLL (nats/token) of every stream over ``blocks``, one layer at a time.

    ``inputs``: key → :class:`deltaport.io.checkpoint.Checkpoint`, each tensor read once (a tied embedding
    twice: as the input embedding, then as the head); the embedding and the head are read in slices of
    rows. ``on_tensor(name, tensors)`` sees every parameter's input tensors once (tied ones once; the
    embedding and head in slices of rows), in the order of ``named_parameters``. ``advance`` is called
    after the embedding, each layer and the head."""
    from torch.func import functional_call

    pin_mmap_threshold()
    dev = torch.device(device)
    batches = batches_of(blocks, batch_tokens)
    for mod in sk.model.modules():  # the real buffers (rotary frequencies, embedding scales) go to the device
        for k, buf in mod._buffers.items():
            if buf is not None and buf.device.type != "meta" and buf.device != dev:
                mod._buffers[k] = buf.to(dev)

    def read(name: str) -> dict[str, torch.Tensor]:
        return {k: ck.tensor(name) for k, ck in inputs.items()}

    def row_slices(name: str):
        """(r0, r1, {key: rows}) over the whole tensor, about :data:`BUILD_CHUNK` elements at a time."""
        shape = sk.params[name]
        step = max(1, BUILD_CHUNK // max(1, math.prod(shape[1:])))
        for r0 in range(0, shape[0], step):
            r1 = min(shape[0], r0 + step)
            yield r0, r1, {k: read_rows(ck, name, r0, r1) for k, ck in inputs.items()}
            trim_heap()

    # 1. the layers' inputs: the model's own embedding and forward, up to the first decoder layer
    ids = torch.cat([b.reshape(-1) for b in batches]).unique()  # sorted
    picked: dict[str, list[torch.Tensor]] = {k: [] for k in inputs}
    for r0, r1, part in row_slices(sk.embed):
        if on_tensor:
            on_tensor(sk.embed, part)
        sel = ids[(ids >= r0) & (ids < r1)] - r0
        for k, t in part.items():
            picked[k].append(t[sel].clone())
    rows = {k: torch.cat(v) for k, v in picked.items()}
    del picked
    dec = sk.model.get_decoder()
    emb_mod = dec.embed_tokens
    real_layers = dec.layers
    calls: list = []
    dec.layers = torch.nn.ModuleList([_Recorder(m, i, i == len(real_layers) - 1, calls)
                                      for i, m in enumerate(real_layers)])
    saved = emb_mod.weight, emb_mod.padding_idx
    hidden: list[list[torch.Tensor]] = []  # per stream, per batch
    layer_args: list[list[tuple]] = [[] for _ in real_layers]  # per layer, per batch: (args, kwargs)
    try:
        emb_mod.padding_idx = None  # the rows are a subset (padding_idx only matters for gradients)
        for s, make in enumerate(streams):
            emb_mod.weight = torch.nn.Parameter(make(sk.embed, rows).to(dev), requires_grad=False)
            hs = []
            for b in batches:
                calls.clear()
                try:
                    dec(input_ids=torch.searchsorted(ids, b).to(dev), use_cache=False)
                except _Stop:
                    pass
                hs.append(calls[0][1])
                if s == 0:
                    for i, _, args, kwargs in calls:
                        layer_args[i].append((args, kwargs))
            hidden.append(hs)
    finally:
        dec.layers = real_layers
        emb_mod.weight, emb_mod.padding_idx = saved
    del rows
    trim_heap()
    if advance:
        advance()

    # 2. the decoder layers, one at a time: every input's tensors of the layer, then each stream's weights
    for i, rel in enumerate(sk.layers):
        names = [f"{sk.layer_prefix}{i}.{n}" for n in rel]
        tensors = {n: read(n) for n in names}
        if on_tensor:
            for n in names:
                on_tensor(n, tensors[n])
        layer = real_layers[i]
        for s, make in enumerate(streams):
            weights = {r: build(make, n, tensors[n]).to(dev) for r, n in zip(rel, names)}
            for b, (args, kwargs) in enumerate(layer_args[i]):
                out = functional_call(layer, weights, (hidden[s][b], *args), kwargs, strict=False)
                hidden[s][b] = out[0] if isinstance(out, tuple) else out
            del weights
        del tensors
        trim_heap()
        if advance:
            advance()

    # 3. the head: the final norm, then the output projection in slices of vocabulary rows (each input's
    #    rows read once for every stream), soft-capping, and a running log-sum-exp per token
    norm_names = [f"{sk.norm}.{n}" for n in sk.norm_params]
    norm_t = {n: read(n) for n in norm_names}
    if on_tensor:
        for n in norm_names:
            on_tensor(n, norm_t[n])
    norm_mod, head_mod = sk.module(sk.norm), sk.model.get_output_embeddings()
    target = torch.cat([b[:, 1:].reshape(-1) for b in batches]).to(dev)
    xs = []
    for s, make in enumerate(streams):
        wn = {r: make(n, norm_t[n]).to(dev) for r, n in zip(sk.norm_params, norm_names)}
        xs.append(torch.cat([functional_call(norm_mod, wn, (h,), strict=False)[:, :-1].reshape(-1, h.shape[-1])
                             for h in hidden[s]]))
        hidden[s] = []
    del hidden
    trim_heap()
    n_pred = target.numel()
    cap = getattr(sk.config, "final_logit_softcapping", None)
    run_max = [torch.full((n_pred,), -math.inf, dtype=torch.float64, device=dev) for _ in streams]
    run_sum = [torch.zeros(n_pred, dtype=torch.float64, device=dev) for _ in streams]
    picked_logit = [torch.zeros(n_pred, dtype=torch.float64, device=dev) for _ in streams]
    vocab = sk.params[sk.head][0]
    step = max(1, min(LOGITS_CHUNK // max(1, n_pred), BUILD_CHUNK // max(1, math.prod(sk.params[sk.head][1:]))))
    for v0 in range(0, vocab, step):
        v1 = min(vocab, v0 + step)
        part = {k: read_rows(ck, sk.head, v0, v1) for k, ck in inputs.items()}
        if on_tensor and not sk.tied:
            on_tensor(sk.head, part)
        mine = (target >= v0) & (target < v1)
        where = mine.nonzero().squeeze(1)
        for s, make in enumerate(streams):
            logits = functional_call(head_mod, {"weight": make(sk.head, part).to(dev)}, (xs[s],), strict=False)
            if cap is not None:
                logits.div_(cap).tanh_().mul_(cap)
            logits = logits.float()
            picked_logit[s][where] = logits[where, target[where] - v0].double()
            new_max = torch.maximum(run_max[s], logits.max(dim=1).values.double())
            run_sum[s].mul_(torch.exp(run_max[s] - new_max))
            run_sum[s].add_(logits.sub_(new_max[:, None].to(logits.dtype)).exp_().sum(dim=1, dtype=torch.float64))
            run_max[s] = new_max
            del logits
        del part
        trim_heap()
    losses = []
    for s in range(len(streams)):
        nll = (run_max[s] + run_sum[s].log() - picked_logit[s]).sum().cpu()
        loss = float(nll / n_pred)
        if loss != loss or loss in (float("inf"), float("-inf")):
            raise NumericalError("the loss is NaN/Inf on the text sample: the model's logits are not finite")
        losses.append(loss)
    if advance:
        advance()
    return losses


# ----------------------------------------------------------------------------------------------- inputs


@dataclass
class Prepared:
    """Inputs that can be streamed together: their checkpoints (headers read), configs and one skeleton."""

    checkpoints: list[Any]
    configs: list[Any]
    skeleton: Skeleton

    @property
    def vocab(self) -> int:
        return self.skeleton.params[self.skeleton.embed][0]

    @property
    def head_rows(self) -> int:
        return self.skeleton.params[self.skeleton.head][0]


def prepare(specs: Sequence[Any], labels: Sequence[str], *, dtype: torch.dtype, allow_pickle: bool = False
            ) -> Prepared | str:
    """The inputs opened for :func:`stream_losses`, or the reason (in words) they are evaluated as whole
    models. Models of different architectures or shapes are refused here as on the whole-model path
    (:func:`deltaport.causal_lm.check_same_architecture`, exit 2), and a checkpoint that lacks a parameter
    of its config is refused (exit 2) instead of being filled at random."""
    from deltaport import causal_lm
    from deltaport.errors import CheckpointError
    from deltaport.io.checkpoint import open_checkpoint, resolve_dir

    if any(isinstance(s, torch.nn.Module) for s in specs):
        return "models passed in memory are evaluated whole"
    dirs = []
    for s in specs:
        d = causal_lm.preflight(s, allow_pickle=allow_pickle)
        if d is None:  # a hub id: downloaded (or found in the cache) as from_pretrained would
            d, _ = resolve_dir(s)
            causal_lm.preflight(d, allow_pickle=allow_pickle)
        dirs.append(d)
    configs = [load_config(d) for d in dirs]
    reason = why_not(configs, labels)
    if reason:
        return reason
    skels = [skeleton(c, dtype) for c in configs]
    meta = [{n: torch.empty(shape, device="meta") for n, shape in sk.params.items()} for sk in skels]
    for m, lab in zip(meta[1:], labels[1:]):
        causal_lm.check_same_architecture(meta[0], m, labels[0], lab)
    reason = check_skeleton(skels[0])
    if reason:
        return reason
    cks = [open_checkpoint(d, allow_pickle=allow_pickle) for d in dirs]
    for ck, sk, lab in zip(cks, skels, labels):
        bad = [n for n, shape in sk.params.items() if n not in ck.tensors or tuple(ck.spec(n).shape) != shape]
        if bad:
            raise CheckpointError(
                f"{lab}: {len(bad)} parameter(s) missing from the checkpoint or with another shape than config.json "
                f"says ({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}); transformers would initialise them "
                "at random. Check that the weights are complete and match config.json.")
    return Prepared(checkpoints=cks, configs=configs, skeleton=skels[0])


def cast(key: str, dtype: torch.dtype) -> Stream:
    """The stream of input ``key`` as ``from_pretrained(dtype=...)`` loads it."""
    return lambda name, t: t[key].to(dtype)


def lerp(key_a: str, key_b: str, alpha: float, dtype: torch.dtype) -> Stream:
    """θ(α) = (1−α)·a + α·b exactly as :func:`deltaport.connectivity.interpolate_into` makes it from models
    loaded in ``dtype``: copies at α = 0 and 1, ``torch.lerp`` in float32/64, else in float32 rounded once."""

    def make(name: str, t: dict[str, torch.Tensor]) -> torch.Tensor:
        a, b = t[key_a].to(dtype), t[key_b].to(dtype)
        if alpha == 0.0:
            return a
        if alpha == 1.0:
            return b
        if dtype in (torch.float32, torch.float64):
            return torch.lerp(a, b, alpha)
        return torch.lerp(a.float(), b.float(), alpha).to(dtype)

    return make
