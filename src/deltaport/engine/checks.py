"""Checks on a computed chunk: where NaN/Inf came from (an input, or an overflow of the arithmetic), and for
``diff`` that base + the stored Δ gives the fine-tuned value back (keeping the exact residual where the
stored Δ cannot, :mod:`deltaport.io.residual`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from deltaport.engine.pipeline import torch_view
from deltaport.errors import InputError, NumericalError
from deltaport.io.tensors import FLOAT_DTYPE_NAMES
from deltaport.plan import TensorOp

if TYPE_CHECKING:
    import torch

LOG = logging.getLogger("deltaport.engine")


class ChecksMixin:
    """:class:`~deltaport.engine.core.Engine`'s checks of a computed chunk."""

    def _diagnose(self, op: TensorOp, e0: int, e1: int, row_elems: int) -> None:
        import torch

        bad_inputs = []
        for key, term in (("diag_c", op.base), ("diag_a", op.plus), ("diag_b", op.minus)):
            if term is not None and term.spec.dtype_name in FLOAT_DTYPE_NAMES:
                v = self._fill(key, term, e0, e1, row_elems)
                if not torch.isfinite(v).all():
                    bad_inputs.append(f"{term.ck.source}")
        if bad_inputs:
            msg = f"tensor {op.name}: NaN/Inf in input(s) {', '.join(bad_inputs)}"
            if self.strict:
                raise InputError(msg + "; --strict refuses non-finite inputs. Fix or exclude the tensor (--exclude).")
            if op.name not in self.stats.nonfinite_inputs:
                LOG.warning("%s; the output carries them (use --strict to fail instead)", msg)
                self.stats.nonfinite_inputs.append(op.name)
            return
        raise NumericalError(
            f"tensor {op.name}: the arithmetic produced NaN/Inf from finite inputs (scale {op.scale:g}, output dtype "
            f"{op.out_dtype_name}): the result overflows the output dtype. Use a smaller --scale, "
            "a wider --out-dtype, or exclude the tensor. No output was written."
        )

    def _keep_residual(self, op: TensorOp, out: torch.Tensor, s: torch.Tensor, b: torch.Tensor, e0: int, e1: int,
                       row_elems: int) -> None:
        """diff, exact encoding: keep r = (f − b) − Δ where the stored Δ (``out``) is not the exact difference
        (``s``: fl64(f − b), ``b``: the base values, both float64; :mod:`deltaport.io.residual`)."""
        import torch

        from deltaport.io.residual import residual_of

        n = e1 - e0
        spec, raw = op.plus.spec, self._raw.get("plus")
        f = self.bufs.get("residual:f", n, torch.float64)
        if (op.plus.rowmap is None and spec.numel >= e1 and raw is not None and len(raw) >= n * spec.dtype.itemsize
                and op.plus.ck.memory_tensor(spec.name) is None):
            # this chunk's bytes, read by _fill just now
            f.copy_(torch_view(raw[: n * spec.dtype.itemsize], spec.dtype))
        else:
            f.copy_(self._fill("residual", op.plus, e0, e1, row_elems))
        # screen: Δ + b == f and f − Δ == b in float64 wherever r = 0; where r != 0 one of them fails (r is a
        # multiple of the last bit of the smaller of f, b: far above float64's rounding of either)
        h = self.bufs.get("residual:h", n, torch.float64)
        t = self.bufs.get("residual:t", n, torch.float64)
        h.copy_(out)
        unsure = torch.add(h, b, out=t) != f
        unsure |= torch.sub(f, h, out=t) != b
        if not bool(unsure.any()):
            return
        idx = torch.nonzero(unsure).flatten()
        r, ok = residual_of(f[idx], b[idx], s[idx], h[idx])
        keep = (r != 0) & torch.isfinite(r) & ok
        if bool(keep.any()):
            self.stats.residuals.setdefault(op.name, []).append((idx[keep] + e0, r[keep]))
        bad = int((~ok).sum())
        if bad:
            self.stats.inexact_delta[op.name] = self.stats.inexact_delta.get(op.name, 0) + bad

    def _verify_roundtrip(self, op: TensorOp, out: torch.Tensor, e0: int, e1: int, row_elems: int) -> None:
        """diff: check that base + stored Δ rounds back to the finetuned value, element by element (an exact
        encoding, ``op.residual``, was checked by :meth:`_keep_residual` instead)."""
        if op.residual:
            return
        import torch

        n = e1 - e0
        if op.lora is not None:
            self._verify_lora(op, out, e0, e1, row_elems)
            return
        a, b = op.plus.spec, op.minus.spec
        if (op.plus.rowmap is not None or a.numel != op.numel or b.numel != op.numel
                or op.plus.ck.memory_tensor(a.name) is not None or op.out_dtype == torch.float64):
            return
        bvals = self.bufs.get("minus:f", n, self.compute_dtype)
        tmp = self.bufs.get("verify", n, self.compute_dtype)
        tmp.copy_(out)
        tmp.add_(bvals)
        rt = self.bufs.get("verify2", n, a.dtype)
        self._round(rt, tmp, n)
        araw = torch_view(self._raw["plus"][: n * a.dtype.itemsize], a.dtype)
        bad = int((rt != araw).sum()) - int((rt.isnan() & araw.isnan()).sum())
        if bad:
            self.stats.inexact_delta[op.name] = self.stats.inexact_delta.get(op.name, 0) + bad

    def _verify_lora(self, op: TensorOp, out: torch.Tensor, e0: int, e1: int, row_elems: int) -> None:
        """diff of a LoRA adapter stored narrower than computed: base + stored Δ must round to what base +
        the computed Δ rounds to (the merged model), element by element."""
        if op.check is None:
            return
        import torch

        n = e1 - e0
        exact = self._lora(op, e0, e1, row_elems, key="verify:x")
        b = self._fill("check", op.check, e0, e1, row_elems)
        dt = op.check.spec.dtype
        tmp = self.bufs.get("verify", n, self.compute_dtype)
        want = self.bufs.get("verify:w", n, dt)
        got = self.bufs.get("verify2", n, dt)
        torch.add(b, exact, out=tmp)
        self._round(want, tmp, n)
        tmp.copy_(out)
        tmp.add_(b)
        self._round(got, tmp, n)
        bad = int((got != want).sum()) - int((got.isnan() & want.isnan()).sum())
        if bad:
            self.stats.inexact_delta[op.name] = self.stats.inexact_delta.get(op.name, 0) + bad
