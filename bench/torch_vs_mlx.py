# ruff: noqa: I001
"""CPU: how fast does this project train and sample here, against PyTorch on the same model?

    pip install -e '.[cpu,bench]'     # torch==2.13.0 (CPU build)
    python bench/torch_vs_mlx.py --corpus input.txt --steps 20 --tokens 1000 --rounds 5

The default preset is `quick`, the default job's (its model and batch are `seed`'s).
One process run: the same GPT-2 shape (from the preset), the same random windows of the
real corpus, the same batch, AdamW with the same settings, dropout as configured. Prints
training tokens/s for each and the MLX/PyTorch ratio, then KV-cache sampling tokens/s for
each (batch 1, a full-context prompt, `--tokens` new tokens) and that ratio. The two
sides alternate for `--rounds` rounds of each measurement; each side's figure is the
median of its rounds, and every round is printed too.
The PyTorch model is written here, plainly, as the tutorials write it: eager mode,
fused QKV, `F.scaled_dot_product_attention`, tanh GELU, tied head.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx_model  # noqa: E402,F401,I001  (must come before mlx.core: it preloads OpenBLAS)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_model.config import GPTConfig, TrainConfig, get_preset  # noqa: E402
from mlx_model.data import train_batch  # noqa: E402
from mlx_model.generate import generate  # noqa: E402
from mlx_model.model import GPT  # noqa: E402
from mlx_model.train import make_optimizer, make_step  # noqa: E402
from train_preset import corpus_splits  # noqa: E402


def timed_rounds(run, warmup: int, steps: int, tokens_per_step: int):
    """After run(warmup), yields (tokens/s, last loss) for each further run(steps)."""
    run(warmup)
    while True:
        t0 = time.perf_counter()
        loss = run(steps)
        seconds = time.perf_counter() - t0
        yield steps * tokens_per_step / seconds, float(loss.item())


def mlx_training(cfg: GPTConfig, tc: TrainConfig, ids: np.ndarray, steps: int, warmup: int):
    """Yields (tokens/s, last loss) for each round of `steps` steps, after `warmup` steps."""
    mx.random.seed(tc.seed)
    model = GPT(cfg)
    optimizer = make_optimizer(tc)
    optimizer.init(model.trainable_parameters())
    model.train()
    step = make_step(model, optimizer, tc)
    i = 0

    def run(n: int) -> mx.array:
        nonlocal i
        loss = None
        for _ in range(n):
            x, y = train_batch(ids, cfg.block_size, tc.batch_size, tc.seed, i)
            mx.random.seed(tc.seed * 1_000_003 + i)
            loss = step(mx.array(x), mx.array(y))
            mx.async_eval(loss, model.parameters(), optimizer.state)
            i += 1
        mx.eval(loss)
        return loss

    yield from timed_rounds(run, warmup, steps, tc.batch_size * cfg.block_size)


def torch_model(cfg: GPTConfig):
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F

    class Block(tnn.Module):
        def __init__(self):
            super().__init__()
            C = cfg.n_emb
            self.ln_1, self.ln_2 = tnn.LayerNorm(C), tnn.LayerNorm(C)
            self.c_attn, self.c_proj = tnn.Linear(C, 3 * C), tnn.Linear(C, C)
            self.c_fc, self.mlp_proj = tnn.Linear(C, 4 * C), tnn.Linear(4 * C, C)
            self.drop = tnn.Dropout(cfg.dropout)

        def attend(self, x, cache):
            B, T, C = x.shape
            q, k, v = self.c_attn(x).split(C, dim=2)
            q, k, v = (t.view(B, T, cfg.n_head, -1).transpose(1, 2) for t in (q, k, v))
            if cache is not None:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            p = cfg.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, dropout_p=p)
            return self.drop(self.c_proj(y.transpose(1, 2).reshape(B, T, C))), (k, v)

        def forward(self, x, cache=None):
            a, cache = self.attend(self.ln_1(x), cache)
            x = x + a
            h = F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh")
            return x + self.drop(self.mlp_proj(h)), cache

    class TorchGPT(tnn.Module):
        def __init__(self):
            super().__init__()
            self.wte = tnn.Embedding(cfg.vocab_size, cfg.n_emb)
            self.wpe = tnn.Embedding(cfg.block_size, cfg.n_emb)
            self.drop = tnn.Dropout(cfg.dropout)
            self.h = tnn.ModuleList(Block() for _ in range(cfg.n_layer))
            self.ln_f = tnn.LayerNorm(cfg.n_emb)
            for name, p in self.named_parameters():
                if p.dim() == 2:
                    std = 0.02 / math.sqrt(2 * cfg.n_layer) if "proj" in name else 0.02
                    tnn.init.normal_(p, 0.0, std)
                elif name.endswith("bias"):
                    tnn.init.zeros_(p)

        def forward(self, idx, cache=None):
            offset = 0 if cache is None else cache[0][0].shape[2]
            pos = torch.arange(offset, offset + idx.shape[1], device=idx.device)
            x = self.drop(self.wte(idx) + self.wpe(pos))
            new = []
            for i, block in enumerate(self.h):
                x, c = block(x, None if cache is None else cache[i])
                new.append(c)
            return self.ln_f(x) @ self.wte.weight.T, new

    return TorchGPT()


def torch_training(cfg: GPTConfig, tc: TrainConfig, ids: np.ndarray, steps: int, warmup: int):
    """Yields (tokens/s, last loss) for each round of `steps` steps, after `warmup` steps."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(tc.seed)
    model = torch_model(cfg).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": rest, "weight_decay": 0}],
        lr=tc.learning_rate,
        betas=(tc.beta1, tc.beta2),
    )
    i = 0

    def run(n: int):
        nonlocal i
        loss = None
        for _ in range(n):
            x, y = train_batch(ids, cfg.block_size, tc.batch_size, tc.seed, i)
            x, y = torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64))
            logits, _ = model(x)
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            i += 1
        return loss

    yield from timed_rounds(run, warmup, steps, tc.batch_size * cfg.block_size)


def torch_sampling(cfg: GPTConfig, prompt: np.ndarray, n: int) -> float:
    """KV-cache sampling, batch 1, the same half-context re-prefill policy as the project."""
    import torch

    torch.manual_seed(0)
    model = torch_model(cfg).eval()
    gen = torch.Generator().manual_seed(1)

    def run(count: int) -> None:
        history = torch.from_numpy(prompt.astype(np.int64))[None]
        with torch.inference_mode():
            logits, cache = model(history)
            for _ in range(count):
                probs = torch.softmax(logits[:, -1, :], dim=-1)
                nxt = torch.multinomial(probs, 1, generator=gen)
                int(nxt)  # the token reaches the host, as streaming needs
                history = torch.cat([history, nxt], 1)
                if cache[0][0].shape[2] < cfg.block_size:
                    logits, cache = model(nxt, cache)
                else:
                    logits, cache = model(history[:, -(cfg.block_size // 2 + 1) :])

    run(20)
    while True:
        t0 = time.perf_counter()
        run(n)
        yield n / (time.perf_counter() - t0)


def mlx_sampling(cfg: GPTConfig, prompt: np.ndarray, n: int) -> float:
    mx.random.seed(0)
    model = GPT(cfg)
    generate(model, prompt, 20, temperature=1.0)
    while True:
        t0 = time.perf_counter()
        generate(model, prompt, n, temperature=1.0, seed=1)
        yield n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default="quick")
    p.add_argument("--corpus", required=True, help="Tiny Shakespeare's input.txt")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per side")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    args = p.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)
    vocab, train_ids, _ = corpus_splits(args.corpus)
    cfg = preset.model.replace(vocab_size=vocab.size)
    if args.dropout is not None:
        cfg = cfg.replace(dropout=args.dropout)
    tc = preset.train.replace(compute_dtype="float32")
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, cfg.block_size)
    # the two sides alternate, round by round, so a slow spell on this shared machine
    # falls on both; each side's figure is its median round
    sides = {
        "train": (
            mlx_training(cfg, tc, train_ids, args.steps, args.warmup),
            torch_training(cfg, tc, train_ids, args.steps, args.warmup),
        ),
        "sampling": (
            mlx_sampling(cfg, prompt, args.tokens),
            torch_sampling(cfg, prompt, args.tokens),
        ),
    }
    rounds: dict[str, dict[str, list]] = {k: {"mlx": [], "torch": []} for k in sides}
    for _ in range(args.rounds):
        for kind, (mlx_side, torch_side) in sides.items():
            rounds[kind]["mlx"].append(next(mlx_side))
            rounds[kind]["torch"].append(next(torch_side))

    def median_rate(values: list) -> float:
        return statistics.median(v[0] if isinstance(v, tuple) else v for v in values)

    mlx_tps, torch_tps = median_rate(rounds["train"]["mlx"]), median_rate(rounds["train"]["torch"])
    mlx_loss, torch_loss = rounds["train"]["mlx"][-1][1], rounds["train"]["torch"][-1][1]
    mlx_gen = median_rate(rounds["sampling"]["mlx"])
    torch_gen = median_rate(rounds["sampling"]["torch"])
    print(
        json.dumps(
            {
                "preset": args.preset,
                "dropout": cfg.dropout,
                "steps": args.steps,
                "rounds": args.rounds,
                "batch": tc.batch_size,
                "context": cfg.block_size,
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
                "mlx": mx.__version__,
                "train_tok_s": {"mlx": round(mlx_tps), "torch": round(torch_tps)},
                "train_ratio_mlx_over_torch": round(mlx_tps / torch_tps, 3),
                "last_loss": {"mlx": round(mlx_loss, 4), "torch": round(torch_loss, 4)},
                "kv_sampling_tok_s": {"mlx": round(mlx_gen, 1), "torch": round(torch_gen, 1)},
                "sampling_ratio_mlx_over_torch": round(mlx_gen / torch_gen, 3),
                "every_round": {
                    kind: {side: [round(median_rate([v])) for v in r[side]] for side in r}
                    for kind, r in rounds.items()
                },
            }
        )
    )


if __name__ == "__main__":
    main()
