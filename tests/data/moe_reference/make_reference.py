"""Regenerates the ERNIE 4.5 MoE reference data in this folder from Hugging Face transformers.

Runs ONLY in a separate venv (torch is not a dependency of fdkit), from the repository root:

    python3.11 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 transformers==5.24.0 safetensors==0.8.0 numpy==2.4.6
    /tmp/refvenv/bin/python tests/data/moe_reference/make_reference.py

It needs fdkit's tokenizer files: by default it runs `.venv/bin/python -m fdkit.tiny` (the repo's own
venv) into a temporary folder; `--tiny-dir DIR` uses an existing `fdkit.tiny --preset tiny --layout pt`
output instead. No network: the model is built from a config with random weights.

Writes (into this folder unless `--out`):
  tiny_moe_pt/      a -PT layout checkpoint (transformers' save_pretrained, fp32 safetensors, per-expert
                    tensor names) plus the fdkit tiny tokenizer files
  reference.npz     prompt_{i} [L] int64, logits_{i} [L, V] fp32 (full forward of the prompt),
                    greedy_{i} [32] int64 (plain greedy with cache, no EOS stop),
                    greedy_logits_{i} [32, V] fp32 (the logits each greedy token was taken from),
                    route_idx_{i}_layer{N} [L, k] int64 / route_w_{i}_layer{N} [L, k] fp32 (the
                    prompt's expert choice and normalised weights in MoE layer N, transformers' order)
  reference.json    versions, config, seed, init scaling, routing checks
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
import transformers
from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
SEED = 0
PROMPT_LENGTHS = (5, 17, 33, 64)
NEW_TOKENS = 32
BIAS_STD = 0.1

# The tiny-moe shape, in transformers' own keys (the config class turns rope_theta into rope_parameters).
TINY_MOE = dict(
    vocab_size=1024,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    moe_num_experts=8,
    moe_k=2,
    moe_intermediate_size=32,
    moe_num_shared_experts=1,
    moe_layer_start_index=1,
    moe_layer_end_index=2,
    moe_layer_interval=1,
    moe_norm_min=1e-12,
    use_bias=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
)


def tiny_checkpoint(args, tmp: Path) -> Path:
    if args.tiny_dir:
        return Path(args.tiny_dir)
    out = tmp / "tiny_pt"
    cmd = [args.fdkit_python, "-m", "fdkit.tiny", str(out), "--preset", "tiny", "--layout", "pt"]
    subprocess.run(cmd, check=True, cwd=REPO)
    return out


def check_special_tokens(tiny: Path) -> None:
    cfg = json.loads((tiny / "config.json").read_text())
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert cfg[key] == TINY_MOE[key], (key, cfg[key], TINY_MOE[key])


def build_model() -> Ernie4_5_MoeForCausalLM:
    """transformers' own init (std 0.02, seed 0), then scaled like fdkit.tiny's random weights so the
    layers outweigh the embedding (no echo of the last token) and logits are well apart; norms get
    1 + 0.1 N(0, 1) instead of ones, so a loader that drops a norm weight is caught."""
    config = Ernie4_5_MoeConfig(**TINY_MOE)
    torch.manual_seed(SEED)
    model = Ernie4_5_MoeForCausalLM._from_config(
        config, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32
    )
    init_std = config.initializer_range
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                p.copy_(BIAS_STD * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:  # RMSNorm weight (transformers: ones)
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("embed_tokens.weight"):
                p.mul_(0.2 / init_std)
            elif name.endswith("mlp.gate.weight"):  # router [E, H]: logits of order 1
                p.mul_((1.0 / p.shape[1] ** 0.5) / init_std)
            else:
                fan_in = p.shape[-1]  # nn.Linear [out, in]; experts gate_up [E, 2I, H], down [E, H, I]
                outputs = ("o_proj.weight", "down_proj.weight", "experts.down_proj")
                scale = 4.0 if name.endswith(outputs) else 1.0
                p.mul_((scale / fan_in**0.5) / init_std)
    model.eval()
    return model


def moe_layers(model) -> list[int]:
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def write_checkpoint(model, tiny: Path, ckpt: Path) -> bool:
    """save_pretrained + fdkit's tokenizer files; True if this script had to add "architectures"."""
    if ckpt.exists():
        shutil.rmtree(ckpt)
    model.save_pretrained(ckpt, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tiny / name).exists():
            shutil.copy2(tiny / name, ckpt / name)
    for f in ckpt.iterdir():
        f.chmod(0o644)  # save_pretrained leaves the safetensors file 0600
    cfg_path = ckpt / "config.json"
    cfg = json.loads(cfg_path.read_text())
    added = "architectures" not in cfg
    if added:
        cfg["architectures"] = ["Ernie4_5_MoeForCausalLM"]
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    print("config.json keys:", sorted(cfg), "| architectures added by this script:", added)
    return added


def read_saved(ckpt: Path) -> dict[str, torch.Tensor]:
    saved = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safetensors.safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                saved[k] = fh.get_tensor(k)
    for k in sorted(saved):
        print(f"  {k} {list(saved[k].shape)} {saved[k].dtype}")
    return saved


def check_pt_layout(model, saved: dict[str, torch.Tensor]) -> None:
    """The saved tensors are the published -PT layout: per-expert names, moe_statics [1, E], all fp32."""
    c = model.config
    n_exp, hid, inter = c.moe_num_experts, c.hidden_size, c.moe_intermediate_size
    shared = inter * c.moe_num_shared_experts
    fused = [k for k in saved if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert not fused, f"save_pretrained wrote fused experts: {fused}"
    for n in moe_layers(model):
        p = f"model.layers.{n}.mlp."
        want = {
            p + "gate.weight": [n_exp, hid],
            p + "moe_statics.e_score_correction_bias": [1, n_exp],
            p + "shared_experts.gate_proj.weight": [shared, hid],
            p + "shared_experts.up_proj.weight": [shared, hid],
            p + "shared_experts.down_proj.weight": [hid, shared],
        }
        for e in range(n_exp):
            want[p + f"experts.{e}.gate_proj.weight"] = [inter, hid]
            want[p + f"experts.{e}.up_proj.weight"] = [inter, hid]
            want[p + f"experts.{e}.down_proj.weight"] = [hid, inter]
        for k, shape in want.items():
            assert k in saved and list(saved[k].shape) == shape, (k, shape, saved.get(k))
        assert saved[p + "moe_statics.e_score_correction_bias"].abs().min() > 0
    assert all(t.dtype == torch.float32 for t in saved.values())


def check_reload(model, ckpt: Path) -> None:
    """The folder loads back into the same model through transformers' own loader."""
    reloaded = Ernie4_5_MoeForCausalLM.from_pretrained(
        ckpt, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32
    )
    sd, sd2 = model.state_dict(), reloaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k


def silu_mlp(x, gate_w, up_w, down_w):
    return (torch.nn.functional.silu(x @ gate_w.T) * (x @ up_w.T)) @ down_w.T


def moe_block_from_facts(x: torch.Tensor, saved: dict[str, torch.Tensor], n: int, c):
    """The MoE block recomputed from the saved per-expert tensors, as the facts file states it:
    softmax(fp32) -> top-k on p + bias -> weights gathered from p / clamp(sum, norm_min) -> weighted
    experts + the shared expert unweighted. Returns (output, idx, weights, idx without bias, k-th gap)."""
    p = f"model.layers.{n}.mlp."
    probs = torch.softmax(x.float() @ saved[p + "gate.weight"].float().T, dim=-1)
    scores = probs + saved[p + "moe_statics.e_score_correction_bias"][0]
    idx = torch.topk(scores, c.moe_k, dim=-1).indices
    w = probs.gather(-1, idx)
    w = w / w.sum(-1, keepdim=True).clamp(min=c.moe_norm_min)
    out = silu_mlp(x, *(saved[p + f"shared_experts.{m}_proj.weight"] for m in ("gate", "up", "down")))
    for t in range(x.shape[0]):
        for j in range(c.moe_k):
            e = int(idx[t, j])
            ws = (saved[p + f"experts.{e}.{m}_proj.weight"] for m in ("gate", "up", "down"))
            out[t] += w[t, j] * silu_mlp(x[t : t + 1], *ws)[0]
    top = torch.topk(scores, c.moe_k + 1, dim=-1).values
    gap = float((top[:, -2] - top[:, -1]).min())
    return out, idx, w, torch.topk(probs, c.moe_k, dim=-1).indices, gap


def capture_moe(model):
    """Forward hooks on every MoE block (its input and output) and its router (its outputs)."""
    records: dict[int, dict] = {}
    handles = []
    for i in moe_layers(model):
        mlp = model.model.layers[i].mlp

        def block_hook(mod, inputs, output, i=i):
            records.setdefault(i, {})["block"] = (inputs[0].detach().clone(), output.detach().clone())

        def gate_hook(mod, inputs, output, i=i):
            records.setdefault(i, {})["gate"] = [o.detach().clone() for o in output]

        handles += [mlp.register_forward_hook(block_hook), mlp.gate.register_forward_hook(gate_hook)]
    return records, handles


def prompt_outputs(model, saved, prompts, arrays, checks) -> None:
    """Full-forward logits of each prompt, the routing of each MoE layer, and the facts' recomputation."""
    c = model.config
    records, handles = capture_moe(model)
    for i, prompt in enumerate(prompts):
        records.clear()
        logits = model(input_ids=prompt[None], use_cache=False).logits[0]
        arrays[f"prompt_{i}"] = prompt.numpy()
        arrays[f"logits_{i}"] = logits.float().numpy()
        for n, rec in sorted(records.items()):
            _, w, idx = rec["gate"]
            arrays[f"route_idx_{i}_layer{n}"] = idx.numpy().astype(np.int64)
            arrays[f"route_w_{i}_layer{n}"] = w.float().numpy()
            x, y = rec["block"]
            x, y = x.reshape(-1, c.hidden_size), y.reshape(-1, c.hidden_size)
            y_facts, idx_f, w_f, idx_nobias, gap = moe_block_from_facts(x, saved, n, c)
            assert torch.equal(idx_f, idx), (i, n)
            torch.testing.assert_close(w_f, w, rtol=0, atol=1e-6)
            torch.testing.assert_close(y_facts, y, rtol=1e-5, atol=1e-5)
            changed = int((idx.sort(-1).values != idx_nobias.sort(-1).values).any(-1).sum())
            checks["bias_changed_topk"][n] = checks["bias_changed_topk"].get(n, 0) + changed
            checks["tokens_routed"][n] = checks["tokens_routed"].get(n, 0) + len(prompt)
            checks["min_route_gap"] = min(checks.get("min_route_gap", gap), gap)
    for h in handles:
        h.remove()


def greedy_with_cache(model, prompt: torch.Tensor, n: int):
    out = model(input_ids=prompt[None], use_cache=True)
    cache = out.cache
    tokens, step_logits = [], []
    logits = out.logits[0, -1]
    for _ in range(n):
        tok = int(torch.argmax(logits))
        tokens.append(tok)
        step_logits.append(logits.clone())
        out = model(input_ids=torch.tensor([[tok]]), cache=cache, use_cache=True)
        cache = out.cache
        logits = out.logits[0, -1]
    return tokens, torch.stack(step_logits)


def greedy_no_cache(model, prompt: torch.Tensor, n: int) -> list[int]:
    ids = prompt.tolist()
    for _ in range(n):
        logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
        ids.append(int(torch.argmax(logits)))
    return ids[len(prompt) :]


def greedy_outputs(model, prompts, arrays, checks) -> None:
    margins = []
    for i, prompt in enumerate(prompts):
        toks, step_logits = greedy_with_cache(model, prompt, NEW_TOKENS)
        assert toks == greedy_no_cache(model, prompt, NEW_TOKENS), f"prompt {i}: cached greedy differs"
        # the cached path's first step equals the full forward's last position
        last = torch.from_numpy(arrays[f"logits_{i}"][-1])
        torch.testing.assert_close(step_logits[0], last, rtol=1e-5, atol=1e-5)
        top2 = torch.topk(step_logits, 2, dim=-1).values
        margins.append(float((top2[:, 0] - top2[:, 1]).min()))
        arrays[f"greedy_{i}"] = np.asarray(toks, dtype=np.int64)
        arrays[f"greedy_logits_{i}"] = step_logits.float().numpy()
        checks["greedy_distinct"].append(len(set(toks)))
        print(f"prompt {i} len {len(prompt)}: greedy {toks}")
    checks["min_greedy_margin"] = min(margins)
    assert min(checks["greedy_distinct"]) > 4, checks["greedy_distinct"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--tiny-dir", help="existing `fdkit.tiny --preset tiny --layout pt` output")
    ap.add_argument("--fdkit-python", default=str(REPO / ".venv" / "bin" / "python"))
    args = ap.parse_args()
    out = Path(args.out)
    ckpt = out / "tiny_moe_pt"
    torch.set_num_threads(1)  # reproducible reductions

    with tempfile.TemporaryDirectory() as tmp:
        tiny = tiny_checkpoint(args, Path(tmp))
        check_special_tokens(tiny)
        model = build_model()
        print("MoE layers:", moe_layers(model))
        architectures_added = write_checkpoint(model, tiny, ckpt)
    saved = read_saved(ckpt)
    check_pt_layout(model, saved)
    check_reload(model, ckpt)

    gen = torch.Generator().manual_seed(SEED)
    prompts = [torch.randint(3, 1000, (n,), generator=gen, dtype=torch.int64) for n in PROMPT_LENGTHS]
    arrays: dict[str, np.ndarray] = {}
    checks = {"bias_changed_topk": {}, "tokens_routed": {}, "greedy_distinct": []}
    with torch.no_grad():
        prompt_outputs(model, saved, prompts, arrays, checks)
        greedy_outputs(model, prompts, arrays, checks)
    assert sum(checks["bias_changed_topk"].values()) > 0
    np.savez_compressed(out / "reference.npz", **arrays)

    meta = {
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "safetensors": safetensors.__version__,
            "numpy": np.__version__,
        },
        "seed": SEED,
        "prompt_lengths": list(PROMPT_LENGTHS),
        "prompt_ids_range": [3, 1000],
        "new_tokens": NEW_TOKENS,
        "greedy": "argmax each step, no EOS stop, KV cache; checked equal to full no-cache forwards",
        "attn_implementation": "eager",
        "experts_implementation": "eager",
        "dtype": "float32",
        "init": "transformers _init_weights (std 0.02, torch.manual_seed(0)), then scaled: embed std 0.2; "
        "Linear/expert weights std k/sqrt(fan_in), k=4 for o_proj/down_proj else 1; router std 1/sqrt(H); "
        f"RMSNorm 1 + 0.1 N(0,1); e_score_correction_bias {BIAS_STD} N(0,1) (torch.Generator seed 1)",
        "config_kwargs": TINY_MOE,
        "config_json": json.loads((ckpt / "config.json").read_text()),
        "architectures_added_by_script": architectures_added,
        "lm_head_weight_written": "lm_head.weight" in saved,
        "moe_layers": moe_layers(model),
        "checks": checks,
        "files": sorted(p.name for p in ckpt.iterdir()),
    }
    (out / "reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(checks))
    print("lm_head.weight written:", "lm_head.weight" in saved)


if __name__ == "__main__":
    sys.exit(main())
