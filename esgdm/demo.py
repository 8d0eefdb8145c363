"""The demo behind ``python -m esgdm``: ESGD-M beside AdamW on real handwritten digits.

Trains the same small MLP twice on scikit-learn's bundled 8x8 digits (1,797 images,
no download), once with ``esgdm.ESGDM`` and once with ``torch.optim.AdamW``, and prints
final train/test loss and accuracy, time per step and the backend that ran.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import esgdm
from esgdm.integrations import backward


def load_digits(device: torch.device, seed: int = 0):
    """Standardised digits, split 80/20 with a fixed permutation."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:  # pragma: no cover - the install command brings it
        raise SystemExit("the demo needs scikit-learn: pip install 'esgdm[demo]'") from e
    data = sk_load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_train = int(0.8 * len(x))
    mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-3
    x = (x - mean) / std
    return (x[:n_train].to(device), y[:n_train].to(device)), (x[n_train:].to(device), y[n_train:].to(device))


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 512), torch.nn.Tanh(),
        torch.nn.Linear(512, 256), torch.nn.Tanh(),
        torch.nn.Linear(256, 10),
    )


@torch.no_grad()
def evaluate(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def progress(total: int, desc: str):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="step", leave=True)
    except ImportError:  # pragma: no cover
        class Plain:
            def update(self, n=1):
                pass

            def set_postfix(self, **kw):
                pass

            def close(self):
                print(f"{desc}: done")

        return Plain()


def train(name, make_opt, train_set, test_set, epochs, batch_size, device, seed):
    model = make_model(seed).to(device)
    opt = make_opt(model.parameters())
    x, y = train_set
    n = len(x)
    steps_per_epoch = (n + batch_size - 1) // batch_size
    bar = progress(epochs * steps_per_epoch, name)
    gen = torch.Generator().manual_seed(seed)
    is_esgdm = isinstance(opt, esgdm.ESGDM)
    step_time = 0.0
    steps = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        for k in range(steps_per_epoch):
            idx = perm[k * batch_size:(k + 1) * batch_size]
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if is_esgdm:
                backward(loss, opt)  # create_graph=opt.should_create_graph(), without torch's warning
            else:
                loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_time += time.perf_counter() - t0
            steps += 1
            bar.update(1)
            if k == steps_per_epoch - 1:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        if is_esgdm:
            opt.zero_grad(set_to_none=True)  # frees the double-backward graph
    bar.close()
    backend = ""
    if is_esgdm:
        backend = ", ".join(sorted({opt.backend_for(b).name for b in opt.buckets()}))
    return dict(
        optimizer=name,
        train=evaluate(model, *train_set),
        test=evaluate(model, *test_set),
        ms_per_step=1000 * step_time / max(steps, 1),
        backend=backend or "torch.optim",
    )


def table(rows) -> str:
    head = (f"{'optimizer':28s} {'train loss':>10s} {'train acc':>9s} {'test loss':>9s} {'test acc':>8s} "
            f"{'ms/step':>8s}  backend")
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(
            f"{r['optimizer']:28s} {r['train'][0]:10.4f} {r['train'][1]:9.2%} {r['test'][0]:9.4f} "
            f"{r['test'][1]:8.2%} {r['ms_per_step']:8.2f}  {r['backend']}"
        )
    return "\n".join(out)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m esgdm", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.5, help="ESGD-M learning rate")
    parser.add_argument("--adamw-lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default=None, help="esgdm backend (default: $ESGDM_BACKEND or auto)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    train_set, test_set = load_digits(device, args.seed)
    print(f"digits: {len(train_set[0])} train / {len(test_set[0])} test images, device {device}, "
          f"{args.epochs} epochs of batch {args.batch_size}")
    runs = [
        (f"ESGD-M (lr={args.lr})",
         lambda ps: esgdm.ESGDM(ps, lr=args.lr, weight_decay=1e-4, backend=args.backend)),
        (f"AdamW fused (lr={args.adamw_lr})",
         lambda ps: torch.optim.AdamW(ps, lr=args.adamw_lr, weight_decay=1e-2,
                                      fused=True if device.type in ("cpu", "cuda") else None)),
    ]
    rows = [train(name, make, train_set, test_set, args.epochs, args.batch_size, device, args.seed)
            for name, make in runs]
    print()
    print(table(rows))
    print("\nESGD-M steps include its Hessian-vector products (every 10th step, and the first 20).")
    return rows


if __name__ == "__main__":
    main()
