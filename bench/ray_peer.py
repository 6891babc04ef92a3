"""The Ray + PyTorch peer of `swimlane bench pipeline --peer PYTHON` (issue 16).

swimlane's per-user job, written as a team would write it with Ray and PyTorch instead
of a durable pipeline: one Ray task per user over all cores, each

1. fine-tunes a copy of the base model (the same weights swimlane starts every user
   from) on the user's training windows, with swimlane's fine-tuning rule
   (`swimlane_model::TrainConfig::fine_tune`): AdamW (lr 2e-3, weight decay 1e-4),
   batch 32, at most 20 epochs, 15% of the windows held aside for early stopping with
   patience 4 (the best epoch's weights kept), and the same L2 pull towards the
   starting weights (`anchor` 3.0 times sum of squared differences);
2. scores the parent and the candidate on the user's held-out windows (the same split
   swimlane made: read from its store after its run) and keeps the candidate only if
   it passes the run's gain test of swimlane's gate (`ValidationPolicy::decide`: net
   gain >= margin and improved - regressed >= gain_z * sqrt(improved + regressed));
3. serialises the kept model's weights (safetensors bytes, returned to the driver).

What it does not do, and swimlane does: durability (nothing survives a crash), the
population guard set, the per-batch significance test, the ONNX file, the API.

Input: a directory written by swimlane (`peer/`): `base.safetensors` (swimlane's model
format: `norm.mean`, `norm.std`, `fc{1,2,3}.{weight,bias}`, weights [out, in] as in
PyTorch) and per user `u{i}-train.safetensors`, `u{i}-heldout.safetensors`
(swimlane-samples: `x` F32 [n, frames, channels], `y` U8 [n]). Output: one JSON object.

The clock runs from the first task submitted to the last result received; Ray's start
and one warm-up task per core (each worker imports torch) come before it. The whole job
runs `--rounds` times (default 3) in the same Ray session, and the figure is the median
round's: on a shared machine one round's figure moved by a third between runs.
"""
import argparse
import json
import os
import time


def load_user(path):
    from safetensors.numpy import load_file

    t = load_file(path)
    x = t["x"]
    return x.reshape(x.shape[0], -1), t["y"].astype("int64")


def job(train, heldout, base, cfg, seed):
    """One user's job; returns (kept: 'candidate' | 'parent', weight bytes, epochs)."""
    import numpy as np
    import torch
    from safetensors.torch import save

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    frames = train[0].shape[1] // base["norm.mean"].shape[0]
    mean = torch.from_numpy(np.tile(base["norm.mean"], frames))
    inv_std = 1.0 / torch.from_numpy(np.tile(base["norm.std"], frames))

    def model_from(weights):
        m = torch.nn.Sequential(
            torch.nn.Linear(*reversed(weights["fc1.weight"].shape)),
            torch.nn.ReLU(),
            torch.nn.Linear(*reversed(weights["fc2.weight"].shape)),
            torch.nn.ReLU(),
            torch.nn.Linear(*reversed(weights["fc3.weight"].shape)),
        )
        with torch.no_grad():
            for i, name in ((0, "fc1"), (2, "fc2"), (4, "fc3")):
                m[i].weight.copy_(torch.from_numpy(weights[name + ".weight"]))
                m[i].bias.copy_(torch.from_numpy(weights[name + ".bias"]))
        return m

    def logits(m, x):
        return m((x - mean) * inv_std)

    parent = model_from(base)
    model = model_from(base)
    x = torch.from_numpy(train[0])
    y = torch.from_numpy(train[1])
    n = len(y)
    order = rng.permutation(n)
    n_val = int(round(n * cfg["val_fraction"]))
    early = cfg["min_val_samples"] <= n_val < n
    val_idx, tr_idx = (order[:n_val], order[n_val:]) if early else (order[:0], order)
    xt, yt = x[tr_idx], y[tr_idx]
    xv, yv = x[val_idx], y[val_idx]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    start = [p.detach().clone() for p in model.parameters()]
    loss_fn = torch.nn.functional.cross_entropy
    best, best_state, since, epochs = None, None, 0, 0
    for epoch in range(cfg["epochs"]):
        perm = torch.from_numpy(rng.permutation(len(yt)))
        model.train()
        for i in range(0, len(perm), cfg["batch"]):
            b = perm[i : i + cfg["batch"]]
            loss = loss_fn(logits(model, xt[b]), yt[b])
            pull = sum(((p - s) ** 2).sum() for p, s in zip(model.parameters(), start))
            opt.zero_grad()
            (loss + cfg["anchor"] * pull).backward()
            opt.step()
        epochs = epoch + 1
        if early:
            with torch.no_grad():
                vl = loss_fn(logits(model, xv), yv).item()
            if best is None or vl < best:
                best, since = vl, 0
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
            else:
                since += 1
                if since >= cfg["patience"]:
                    break
    if best_state is not None:
        model.load_state_dict(best_state)

    # The gate: both models on the same held-out windows, counted per window.
    xh, yh = torch.from_numpy(heldout[0]), torch.from_numpy(heldout[1])
    with torch.no_grad():
        right_p = logits(parent, xh).argmax(1) == yh
        right_c = logits(model, xh).argmax(1) == yh
    improved = int((right_c & ~right_p).sum())
    regressed = int((right_p & ~right_c).sum())
    held = max(len(yh), 1)
    net = improved - regressed
    passes = net / held >= cfg["margin"] and net >= cfg["gain_z"] * (improved + regressed) ** 0.5
    kept = model if passes else parent
    weights = save({k: v.contiguous() for k, v in kept.state_dict().items()})
    return ("candidate" if passes else "parent"), weights, epochs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="the directory swimlane wrote")
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--config", required=True, help="JSON: the fine-tuning rule and the gate")
    ap.add_argument("--rounds", type=int, default=3, help="times the whole job runs (median)")
    args = ap.parse_args()
    cfg = json.loads(args.config)

    import numpy as np
    import ray
    from safetensors.numpy import load_file

    base = load_file(os.path.join(args.data, "base.safetensors"))
    users = sorted(
        int(f[1:].split("-")[0]) for f in os.listdir(args.data) if f.endswith("-train.safetensors")
    )
    data = [
        (
            load_user(os.path.join(args.data, f"u{u}-train.safetensors")),
            load_user(os.path.join(args.data, f"u{u}-heldout.safetensors")),
        )
        for u in users
    ]

    t_init = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    remote = ray.remote(num_cpus=1)(job)
    base_ref = ray.put(base)
    refs = [(ray.put(tr), ray.put(ho)) for tr, ho in data]
    # Warm-up: one task per core, so that every worker has imported torch.
    ray.get([remote.remote(*refs[i % len(refs)], base_ref, cfg, 0) for i in range(args.cpus)])
    init_seconds = time.perf_counter() - t_init

    rounds = []
    for _ in range(max(1, args.rounds)):
        t0 = time.perf_counter()
        out = ray.get(
            [remote.remote(tr, ho, base_ref, cfg, 1000 + i) for i, (tr, ho) in enumerate(refs)]
        )
        rounds.append(time.perf_counter() - t0)
    ray.shutdown()
    seconds = sorted(rounds)[len(rounds) // 2]

    kept = [k for k, _, _ in out]
    print(
        json.dumps(
            {
                "peer": f"ray {ray.__version__} + torch {__import__('torch').__version__}",
                "users": len(out),
                "cpus": args.cpus,
                "seconds": round(seconds, 3),
                "rounds_seconds": [round(s, 3) for s in rounds],
                "users_per_min": round(len(out) / seconds * 60, 1),
                "users_per_core_min": round(len(out) / seconds * 60 / args.cpus, 1),
                "candidates_kept": kept.count("candidate"),
                "weights_bytes_mean": round(float(np.mean([len(w) for _, w, _ in out]))),
                "epochs_mean": round(float(np.mean([e for _, _, e in out])), 2),
                "init_seconds": round(init_seconds, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
