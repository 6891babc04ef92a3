#!/usr/bin/env python3
"""The PyTorch side of bench/model_vs_pytorch.sh.

Trains the same micro model as swimlane-model (per-feature input normalisation, then
Linear 512->128, ReLU, Linear 128->64, ReLU, Linear 64->6; cross-entropy; AdamW with
weight decay 1e-2; shuffled mini-batches; fixed epochs, no validation) on a sample set
written by `swimlane model export-dataset`, on the CPU with a given thread count, and
prints one JSON line: training samples per second and inference latency per window.
"""
import argparse
import json
import struct
import time

import torch


def load(path):
    """Read the safetensors sample set without the safetensors package."""
    with open(path, "rb") as f:
        buf = f.read()
    (n,) = struct.unpack("<Q", buf[:8])
    header = json.loads(buf[8 : 8 + n])
    base = 8 + n
    out = {}
    for name in ("x", "y"):
        info = header[name]
        start, end = info["data_offsets"]
        dtype = {"F32": torch.float32, "U8": torch.uint8}[info["dtype"]]
        t = torch.frombuffer(bytearray(buf[base + start : base + end]), dtype=dtype)
        out[name] = t.reshape(info["shape"])
    return out["x"].reshape(out["x"].shape[0], -1).contiguous(), out["y"].long()


class Micro(torch.nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean_row", mean.repeat(32).reshape(1, -1))
        self.register_buffer("inv_std_row", (1.0 / std).repeat(32).reshape(1, -1))
        self.fc1 = torch.nn.Linear(512, 128)
        self.fc2 = torch.nn.Linear(128, 64)
        self.fc3 = torch.nn.Linear(64, 6)

    def forward(self, x):
        x = (x - self.mean_row) * self.inv_std_row
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


def train(model, x, y, epochs, batch, lr, gen, max_steps=None):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    loss_fn = torch.nn.CrossEntropyLoss()
    n = x.shape[0]
    seen = 0
    steps = 0
    last = float("nan")
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        batches = 0
        for i in range(0, n, batch):
            if max_steps is not None and steps >= max_steps:
                break
            idx = perm[i : i + batch]
            xb = x.index_select(0, idx)
            yb = y.index_select(0, idx)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            total += loss.item()  # candle reads the loss back too
            batches += 1
            steps += 1
            seen += idx.shape[0]
        if batches:
            last = total / batches
    return seen, last


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    x, y = load(a.data)
    feats = x.reshape(-1, 16)
    mean, std = feats.mean(0), feats.std(0, unbiased=False).clamp_min(1e-3)

    train(Micro(mean, std), x, y, 1, a.batch, a.lr, gen, max_steps=5)  # warm-up, as candle
    model = Micro(mean, std)
    t = time.perf_counter()
    seen, last = train(model, x, y, a.epochs, a.batch, a.lr, gen)
    secs = time.perf_counter() - t

    model.eval()
    with torch.inference_mode():
        acc = (model(x).argmax(1) == y).float().mean().item()
        one = x[:1]
        for _ in range(50):
            torch.softmax(model(one), 1)
        reps = 2000
        t = time.perf_counter()
        for _ in range(reps):
            torch.softmax(model(one), 1).tolist()
        single = (time.perf_counter() - t) * 1e6 / reps
        xb = x[:256]
        reps_b = 100
        t = time.perf_counter()
        for _ in range(reps_b):
            torch.softmax(model(xb), 1).tolist()
        batched = (time.perf_counter() - t) * 1e6 / (reps_b * xb.shape[0])
    print(
        json.dumps(
            {
                "framework": "pytorch",
                "torch_version": torch.__version__,
                "threads": a.threads,
                "samples": int(x.shape[0]),
                "epochs": a.epochs,
                "batch": a.batch,
                "train_seconds": secs,
                "train_samples_per_sec": seen / secs,
                "final_train_loss": last,
                "train_accuracy": acc,
                "infer_single_us_per_window": single,
                "infer_batch256_us_per_window": batched,
            }
        )
    )


if __name__ == "__main__":
    main()
