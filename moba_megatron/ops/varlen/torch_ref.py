"""Pure PyTorch varlen attention: runs anywhere, used on CPU and for fp32.

Segments are processed one at a time as dense matmuls in fp32. The backward is written out
(rather than autograd through the forward) because it must take the output and LSE it is given.
"""

from __future__ import annotations

import torch

from .base import VarlenTiles


class TorchBackend(VarlenTiles):
    name = "torch"

    def is_available(self) -> bool:
        return True

    def check_inputs(self, q: torch.Tensor, k: torch.Tensor) -> None:
        return None

    @staticmethod
    def _segments(cu_q: torch.Tensor, cu_k: torch.Tensor):
        bounds_q = cu_q.tolist()
        bounds_k = cu_k.tolist()
        for i in range(len(bounds_q) - 1):
            q0, q1 = bounds_q[i], bounds_q[i + 1]
            k0, k1 = bounds_k[i], bounds_k[i + 1]
            if q1 > q0:
                yield q0, q1, k0, k1

    @staticmethod
    def _scores(qs, ks, causal: bool, scale: float):
        # qs [nq, Hq, D], ks [nk, Hkv, D] -> [Hkv, group, nq, nk] fp32
        nq, hq, d = qs.shape
        nk, hkv, _ = ks.shape
        qg = qs.float().reshape(nq, hkv, hq // hkv, d).permute(1, 2, 0, 3)
        s = torch.matmul(qg, ks.float().permute(1, 2, 0).unsqueeze(1)) * scale
        if causal:
            mask = torch.ones(nq, nk, dtype=torch.bool, device=qs.device).triu_(1)
            s = s.masked_fill(mask, float("-inf"))
        return s

    def forward(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        tq, hq, d = q.shape
        out = torch.zeros(tq, hq, d, dtype=q.dtype, device=q.device)
        lse = torch.full((hq, tq), float("-inf"), dtype=torch.float32, device=q.device)
        for q0, q1, k0, k1 in self._segments(cu_q, cu_k):
            if k1 == k0:
                continue
            s = self._scores(q[q0:q1], k[k0:k1], causal, scale)
            seg_lse = torch.logsumexp(s, dim=-1)  # [Hkv, g, nq]
            p = torch.exp(s - seg_lse.unsqueeze(-1))
            vs = v[k0:k1].float().permute(1, 0, 2).unsqueeze(1)  # [Hkv, 1, nk, D]
            o = torch.matmul(p, vs)  # [Hkv, g, nq, D]
            out[q0:q1] = o.reshape(hq, q1 - q0, d).permute(1, 0, 2).to(q.dtype)
            lse[:, q0:q1] = seg_lse.reshape(hq, q1 - q0)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
        tq, hq, d = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
        for q0, q1, k0, k1 in self._segments(cu_q, cu_k):
            if k1 == k0:
                continue
            nq = q1 - q0
            s = self._scores(q[q0:q1], k[k0:k1], causal, scale)
            seg_lse = lse[:, q0:q1].reshape(hkv, g, nq, 1)
            p = torch.exp(s - seg_lse)  # probabilities relative to the *given* LSE
            do = dout[q0:q1].float().reshape(nq, hkv, g, d).permute(1, 2, 0, 3)
            o = out[q0:q1].float().reshape(nq, hkv, g, d).permute(1, 2, 0, 3)
            vs = v[k0:k1].float().permute(1, 0, 2).unsqueeze(1)
            ks = k[k0:k1].float().permute(1, 0, 2).unsqueeze(1)
            qs = q[q0:q1].float().reshape(nq, hkv, g, d).permute(1, 2, 0, 3)
            dv_seg = torch.matmul(p.transpose(-1, -2), do).sum(1)  # [Hkv, nk, D]
            dp = torch.matmul(do, vs.transpose(-1, -2))
            delta = (do * o).sum(-1, keepdim=True)
            ds = p * (dp - delta) * scale
            dq_seg = torch.matmul(ds, ks)  # [Hkv, g, nq, D]
            dk_seg = torch.matmul(ds.transpose(-1, -2), qs).sum(1)
            dq[q0:q1] += dq_seg.permute(2, 0, 1, 3).reshape(nq, hq, d)
            dk[k0:k1] += dk_seg.permute(1, 0, 2)
            dv[k0:k1] += dv_seg.permute(1, 0, 2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
