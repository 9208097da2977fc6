"""What every trainer shares (the heads' HeadTrainer, the LoRA reward trainer): the seed of each step, and an
optimizer's state as flat tensors for a one-file safetensors checkpoint.

All randomness of step t of a run seeded s comes from ``step_seed(s, t)`` (epoch orders from
``step_seed(s, -1 - epoch)``), so (seed, step) is the whole RNG state and a resumed run replays exactly the
steps an uninterrupted one takes.
"""

from __future__ import annotations

__all__ = ["step_seed", "optimizer_tensors", "load_optimizer"]


def step_seed(seed: int, step: int) -> int:
    """The seed of step ``step`` (negative: an epoch's order) of a run seeded ``seed``."""
    return (int(seed) * 1_000_003 + int(step) * 7_919 + 17) % (2**63 - 1)


def optimizer_tensors(opt) -> tuple[dict, list]:
    """(``{"optim.<param id>.<key>": tensor}``, param_groups) of a torch optimizer's state: what a checkpoint
    stores (tensors in the safetensors file, param_groups as JSON in its metadata)."""
    import torch

    osd = opt.state_dict()
    tensors = {f"optim.{pid}.{key}": torch.as_tensor(val).detach().cpu().contiguous()
               for pid, pstate in osd["state"].items() for key, val in pstate.items()}
    return tensors, osd["param_groups"]


def load_optimizer(opt, tensors: dict, param_groups: list) -> None:
    """Restore ``opt`` from ``optimizer_tensors``' two halves (other keys of ``tensors`` are ignored)."""
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, key = k.split(".", 2)
            state.setdefault(int(pid), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": param_groups})
