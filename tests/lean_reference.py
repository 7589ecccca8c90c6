"""The step before issue 15's lean step, restated as the reference the lean step must equal bit for bit: BlockAdam's
AdamW and consensus fold one tensor at a time, and a finite check with one host sync per tensor."""

import torch

from deca_ds.optim import BlockAdam, adamw_step_

__all__ = ["PerTensorBlockAdam", "per_tensor_all_finite"]


def per_tensor_all_finite(tensors) -> bool:
    """The previous ``deca_ds.step.all_finite``."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class PerTensorBlockAdam(BlockAdam):
    """BlockAdam's step and consensus fold as they were before the lean step: one tensor at a time."""

    @torch.no_grad()
    def step(self, closure=None):
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        skip, self.skip_next_step = self.skip_next_step, False
        for p in group["params"]:
            if p.grad is None:
                continue
            if not skip:
                st = self._state_for(p)
                x = st.get("master", p.data)
                grad = p.grad if p.grad.dtype == torch.float32 else p.grad.float()
                st["step"] += 1
                adamw_step_(x, grad, st["exp_avg"], st["exp_avg_sq"], int(st["step"].item()), group["lr"], beta1,
                            beta2, group["eps"], group["weight_decay"], self.local_moments)
                if "master" in st:
                    p.data.copy_(x)
            p.grad = None
        self._global_step += 1
        if self.auto_switch:
            self.switch_if_due()

    @torch.no_grad()
    def apply_consensus_(self, signals, betas=(0.9, 0.999)):
        b1, b2 = betas
        for p, h in zip(self.active_params(), signals):
            st = self._state_for(p)
            h = h.float()
            st["exp_avg"].mul_(b1).add_(h, alpha=1 - b1)
            st["exp_avg_sq"].mul_(b2).addcmul_(h, h, value=1 - b2)
