"""Writers of upstream compressed checkpoints, exactly as the upstream code saves them.

Shared by the importer tests (tests/compress/test_importers.py) and the command-line tests
(tests/cli/test_import_upstream.py). Each function names the upstream file it follows.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

# --- DeepShift (github.com/mostafaelhoushi/DeepShift, pytorch/) --------------------------


class LinearShift(nn.Module):
    """deepshift.modules.LinearShift's parameters (shift, sign, bias)."""

    def __init__(self, lin: nn.Linear, g: torch.Generator):
        super().__init__()
        shape = lin.weight.shape
        self.shift = nn.Parameter(torch.empty(shape).uniform_(-14, 0, generator=g))
        self.sign = nn.Parameter(torch.empty(shape).uniform_(-1, 1, generator=g))
        self.bias = nn.Parameter(lin.bias.detach().clone())


class Conv2dShift(LinearShift):
    """deepshift.modules.Conv2dShift: ``reset_parameters`` draws shift from (-10, -1)."""

    def __init__(self, conv: nn.Conv2d, g: torch.Generator):
        super().__init__(conv, g)
        with torch.no_grad():
            self.shift.uniform_(-10, -1, generator=g)


def convert_to_shift(module: nn.Module, g: torch.Generator) -> nn.Module:
    """convert.py ``convert_to_shift(shift_type='PS')`` for our test classes."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, LinearShift(child, g))
        elif isinstance(child, nn.Conv2d):
            setattr(module, name, Conv2dShift(child, g))
        else:
            convert_to_shift(child, g)
    return module


class SmallCNN(nn.Module):
    """zoo.small_cnn's modules in a class that pickle can name (torch.save(model))."""

    def __init__(self, src: nn.Module):
        super().__init__()
        self.features, self.pool, self.head = src.features, src.pool, src.head


def clampabs(w: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """deepshift/utils.py: clampabs."""
    w = w.clone()
    w[w > hi] = hi
    w[w < -hi] = -hi
    w[(w > 0) & (w < lo)] = lo
    w[(w < 0) & (w > -lo)] = -lo
    return w


def round_power_of_2(w: torch.Tensor) -> torch.Tensor:
    """deepshift/utils.py: round_power_of_2 (deterministic rounding)."""
    shift = (torch.log(w.abs()) / np.log(2)).round()
    return (2.0 ** shift) * torch.sign(w)


def round_to_fixed(x: torch.Tensor, integer_bits: int = 16, fraction_bits: int = 16):
    """deepshift/utils.py: round_to_fixed."""
    delta, bound = 2.0 ** -fraction_bits, 2.0 ** (integer_bits - 1)
    return torch.clamp(torch.floor(x / delta) * delta, -bound, bound - 1)


def train_step_and_save(model: nn.Module, path, g: torch.Generator) -> None:
    """cifar10.py: the optimizer's three parameter groups, a MultiStepLR, one step, then
    ``save_checkpoint({...})`` with the scheduler object and a numpy ``best_acc1``."""
    groups = {"other": [], "sign": [], "shift": []}
    for name, p in model.named_parameters():
        groups["sign" if name.endswith(".sign") else
               "shift" if name.endswith(".shift") else "other"].append(p)
    optimizer = torch.optim.SGD([{"params": groups["other"]},
                                 {"params": groups["sign"], "lr": 0.01, "weight_decay": 0},
                                 {"params": groups["shift"], "lr": 0.01, "weight_decay": 0}],
                                0.01, momentum=0.9, weight_decay=1e-4)
    lr_scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[80, 120, 160])
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    optimizer.step()
    lr_scheduler.step()
    best_acc1 = torch.tensor([37.5]).cpu().numpy()  # validate(): top1.avg.cpu().numpy()
    torch.save({"epoch": 1, "arch": "small_cnn", "state_dict": model.state_dict(),
                "best_acc1": best_acc1, "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler}, path)


def deepshift_q_weights(model: nn.Module, g: torch.Generator, weight_bits: int = 5):
    """weights.pth of a DeepShift-Q model: round_shift_weights on every layer
    (``shift_range = (-(2**(weight_bits-1) - 1), 0)``), the bias to 16.16 fixed point."""
    lo = 2.0 ** -(2 ** (weight_bits - 1) - 1)
    state = {}
    for name, t in model.state_dict().items():
        if name.endswith(".weight"):  # log-uniform over 2^-16 .. 2^0.4: every exponent hit
            mag = 2.0 ** torch.empty(t.shape).uniform_(-16.0, 0.4, generator=g)
            w = mag * (torch.randint(0, 2, t.shape, generator=g) * 2 - 1)
            state[name] = round_power_of_2(clampabs(w, lo, 1.0))
        else:
            state[name] = round_to_fixed(t)
    return state



# --- BitStack (github.com/xinghaow99/BitStack) ------------------------------------------


def pack_sign(w_sign: torch.Tensor) -> torch.Tensor:
    """bitstack/utils/pack_utils.py: pack_sign."""
    binary = ((w_sign + 1) // 2).view(-1)
    n_padding = (8 - binary.numel() % 8) % 8
    binary = torch.cat([binary, torch.zeros(n_padding, dtype=binary.dtype)]).view(-1, 8)
    packed = torch.zeros(binary.size(0), dtype=torch.uint8)
    for i in range(8):
        packed |= (binary[:, i] << (7 - i)).to(torch.uint8)
    return packed


def unpack_sign(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """bitstack/utils/pack_utils.py: unpack_sign."""
    masks = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    unpacked = ((packed.unsqueeze(-1) & masks) > 0).to(torch.int8).view(-1)
    return unpacked[: shape.numel()].view(shape) * 2 - 1


def bitstack_layer(state, key, shape, n, k, g):
    """BitStackLinear buffers for one layer; returns the dense weight it stands for."""
    w = torch.zeros(shape)
    for i in range(n):
        sign = torch.randint(0, 2, shape, generator=g).to(torch.int8) * 2 - 1
        u = (torch.rand(shape[0], k, generator=g) * 0.3).half()
        vt = (torch.rand(k, shape[1], generator=g) * 0.3).half()
        state[f"{key}.qweight_{i}"] = pack_sign(sign)
        state[f"{key}.u_{i}"], state[f"{key}.vt_{i}"] = u, vt
        packed = state[f"{key}.qweight_{i}"]
        w += unpack_sign(packed, torch.Size(shape)).float() * (u.float() @ vt.float())
    return w


def bitstack_memory_per_bit(state: dict[str, torch.Tensor], key: str) -> int:
    """BitStackLinear.memory_per_bit (fused_level 0): bytes of qweight_0, u_0 and vt_0."""
    return sum(state[f"{key}.{part}_0"].numel() * state[f"{key}.{part}_0"].element_size()
               for part in ("qweight", "u", "vt"))


def generate_configs(sorted_layer_bits: list[str], memory_per_bit: dict[str, int],
                     total_memory: int) -> list[dict]:
    """bitstack/utils/model_utils.py: generate_configs."""
    configs = []
    layers = {layer: 1 for layer in memory_per_bit}
    configs.append({"memory": total_memory, "layers": layers.copy()})
    for layer in sorted_layer_bits:
        total_memory += memory_per_bit[layer]
        layers[layer] += 1
        configs.append({"memory": total_memory, "layers": layers.copy()})
    return configs


def bitstack_llama_folder(folder, n_blocks: int = 3, k: int = 4, seed: int = 0,
                          files=("compression_config.json", "reduced_ppl_average.json")):
    """A folder as ``python -m bitstack.main --niter N --do_save --score_importance
    --generate_compression_configs`` leaves it, for a tiny LlamaForCausalLM: config.json,
    model.safetensors (``save_pretrained``; every decoder-block linear a BitStackLinear with
    ``n_blocks`` blocks, the rest fp16), ``reduced_ppl_average.json`` (one layer's perplexity
    NaN at bit 1, as a diverged run writes it) and ``compression_config.json``.

    Returns:
        ``(config, weights, expected)``: the dense weight each BitStack layer stands for
        (torch names of the LlamaForCausalLM), and the block order BitStack's files give in
        those names: every layer's block 0 in model order, then each level's layers by
        perplexity, lowest first (the NaN layer last: it gets the next bit's perplexity plus
        its own bit's largest).
    """
    import json

    import transformers
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=128, max_position_embeddings=64,
        architectures=["LlamaForCausalLM"])
    torch.manual_seed(seed)
    dense = transformers.LlamaForCausalLM(cfg).eval()
    state = {k: v.half() for k, v in dense.state_dict().items()}
    weights, upstream = {}, {}  # upstream name -> torch name
    for i, block in enumerate(dense.model.layers):
        for name, mod in block.named_modules():  # decompose.py: get_named_linears
            if isinstance(mod, nn.Linear):
                key = f"model.layers.{i}.{name}"
                del state[f"{key}.weight"]
                weights[key] = bitstack_layer(state, key, tuple(mod.weight.shape),
                                              n_blocks, k, g)
                upstream[f"layer.{i}.{name}"] = key
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    names = list(upstream)
    levels = []
    for bit in range(1, n_blocks):
        ppl = (torch.rand(len(names), generator=g) * 5 + 8).tolist()
        if bit == 1:
            ppl[3] = float("nan")
        levels.append({"bit": bit, "ppls": [{"layer": n, "ppl": p}
                                            for n, p in zip(names, ppl, strict=True)]})
    data = {"original_ppl": 7.5, "reduced_ppl": levels}
    sorted_layers = []
    for level in levels:
        ranked = sorted(level["ppls"], key=lambda e: (e["ppl"] != e["ppl"], e["ppl"]))
        sorted_layers += [e["layer"] for e in ranked]
    if "reduced_ppl_average.json" in files:
        (folder / "reduced_ppl_average.json").write_text(json.dumps(data, indent=4))
    if "compression_config.json" in files:
        memory = {n: bitstack_memory_per_bit(state, upstream[n]) for n in names}
        extra = sum(v.numel() * v.element_size() for key, v in state.items()
                    if not any(key.startswith(t + ".") for t in upstream.values()))
        configs = generate_configs(sorted_layers, memory, sum(memory.values()) + extra)
        (folder / "compression_config.json").write_text(json.dumps(configs, indent=4))
    expected = [(upstream[n], 0) for n in names]
    for b in range(1, n_blocks):
        expected += [(upstream[n], b) for n in sorted_layers[(b - 1) * len(names):
                                                             b * len(names)]]
    return cfg, weights, expected
