"""LoRA (Hu et al. 2021, arXiv 2106.09685) for model.py's decoder: the paper's 7-14B students
trained on one GPU. Not the method: an option of training, like litgpt's lora.py.

    model = apply_lora(load_model("qwen2.5-7b"), rank=8, alpha=16)   # frozen base, trainable A, B
    save_model(merge_lora(model), "out")                             # a plain HF checkpoint again
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import RewardModel

LORA_MODULES = {"qkv": "attn.qkv", "o": "attn.o", "gate": "mlp.gate", "up": "mlp.up",
                "down": "mlp.down"}

class LoRALinear(nn.Module):
    """y = W x + b + (alpha / r) B A x (LoRA, arXiv 2106.09685): the frozen nn.Linear (W, b) beside
    trainable fp32 A [r, in] (Kaiming-uniform, as nn.Linear's own init) and B [out, r] = 0: at the
    start y = W x + b exactly."""

    def __init__(self, linear, rank, alpha):
        super().__init__()
        device = linear.weight.device
        self.linear = linear
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, linear.in_features, device=device))
        self.lora_b = nn.Parameter(torch.zeros(linear.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_a, a=5 ** 0.5)

    def forward(self, x):
        """The adapter in fp32 (or autocast's dtype), added in the base's dtype (bf16 on CUDA)."""
        y = self.linear(x)
        update = F.linear(F.linear(x.to(self.lora_a.dtype), self.lora_a), self.lora_b)
        return y + (self.scale * update).to(y.dtype)

def apply_lora(model, rank, alpha, modules=tuple(LORA_MODULES)):
    """Freeze `model`, wrap the named modules of every block in LoRALinear; a RewardModel's head
    trains, in fp32. The fused q|k|v gets one A/B pair (as peft's on GPT-2's c_attn; litgpt's has one
    per q, k, v): a rank <= r update."""
    model.requires_grad_(False)
    for block in getattr(model, "body", model).h:
        for name in modules:
            owner_name, attr = LORA_MODULES[name].split(".")
            owner = getattr(block, owner_name)
            if getattr(owner, attr) is not None:  # GPT-2 and OPT have no gate
                setattr(owner, attr, LoRALinear(getattr(owner, attr), rank, alpha))
    if not any(".lora_" in name for name, _ in model.named_parameters()):  # GPT-2, OPT: no gate
        raise ValueError(f"--lora-modules {','.join(modules)}: a {model.config.model_type} model has "
                         "none of these modules")
    if isinstance(model, RewardModel):
        model.score.float().requires_grad_(True)
    return model

@torch.no_grad()
def merge_lora(model):
    """Fold each LoRALinear's (alpha / r) B A into its W (in fp32) and put the plain nn.Linear back,
    for save_model."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                merged = child.linear.weight.float() + child.scale * child.lora_b @ child.lora_a
                child.linear.weight.copy_(merged)
                setattr(module, name, child.linear)
    return model
